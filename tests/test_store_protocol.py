"""
What the store says, and how, before and around the script's reply.

A store that is reachable can still betray a ledger: answer the connection
handshake with something that is not Redis's answer (a wrong service on the
port, a broken proxy), trickle a reply a byte at a time so that no single read
ever times out, or evict the day's counters to make room for other traffic.
Each must fail closed (BudgetUnavailableError, spends spooled), within the
bound the configuration promises, and leave no bad connection in the pool.

Most of these talk to :class:`FakeStore`, a loopback server that speaks just
enough RESP for redis-py and answers each command as the test says; eviction
is tested on a real redis-server.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis._parsers import _HiredisParser, _RESP3Parser

from coreason_budget import BudgetManager, BudgetUnavailableError
from coreason_budget._connection import StoreProtocolError, TcpConnection

from .redis_server import RedisServer
from .test_faults import FAST, evalsha_calls, hang_bound, wait_for


def bulk(text: bytes) -> bytes:
    """A RESP bulk string."""
    return b"$%d\r\n%s\r\n" % (len(text), text)


#: The answers a real Redis gives to what redis-py and the ledger send.
HELLO = b"%1\r\n+proto\r\n:3\r\n"
GOOD: dict[str, bytes | None] = {
    "HELLO": HELLO,
    "CLIENT": b"+OK\r\n",
    "INFO": bulk(b"# Memory\r\nused_memory:1000\r\n"),  # no maxmemory fields
    "PING": b"+PONG\r\n",
    "EVALSHA": b":WHEN\r\n",  # an instant in the periods the call named: the script's "yes"
}
#: A reply that never ends: one byte every TRICKLE_INTERVAL seconds, forever.
TRICKLE = None
TRICKLE_INTERVAL = 0.1


def _parse(buf: bytearray) -> list[bytes] | None:
    """One command (an array of bulk strings) off the front of *buf*, or None if incomplete."""
    end = buf.find(b"\r\n")
    if end < 0:
        return None
    if not buf.startswith(b"*"):  # an inline command
        line = bytes(buf[:end])
        del buf[: end + 2]
        return line.split()
    count, pos, args = int(buf[1:end]), end + 2, []
    for _ in range(count):
        end = buf.find(b"\r\n", pos)
        if end < 0:
            return None
        length = int(buf[pos + 1 : end])
        start, pos = end + 2, end + 2 + length + 2
        if pos > len(buf):
            return None
        args.append(bytes(buf[start : start + length]))
    del buf[:pos]
    return args


class FakeStore:
    """
    A loopback server answering each command as :attr:`replies` says (by
    command name; TRICKLE: one byte every 0.1 s, forever).

    It counts connections, and notes every script call made on a connection
    whose HELLO it answered with anything but a proper reply: a pool handing
    out a half-made connection.
    """

    def __init__(self) -> None:
        self.replies: dict[str, bytes | None] = dict(GOOD)
        self.connections = 0
        self.script_calls = 0
        self.on_half_made_connections = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self.port = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._peers: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            peers = list(self._peers)
        for peer in peers:
            with contextlib.suppress(OSError):
                peer.shutdown(socket.SHUT_RDWR)
            peer.close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._listener.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                peer, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            peer.settimeout(0.05)
            with self._lock:
                self.connections += 1
                self._peers.append(peer)
            thread = threading.Thread(target=self._serve, args=(peer,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, peer: socket.socket) -> None:
        buf, handshaken = bytearray(), False
        while not self._stop.is_set():
            try:
                data = peer.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            buf += data
            while (command := _parse(buf)) is not None:
                name = command[0].decode().upper()
                reply = self.replies.get(name, b"-ERR unknown command\r\n")
                if name == "HELLO":
                    handshaken = reply == HELLO
                elif name == "EVALSHA":
                    if reply is not TRICKLE:  # ARGV, after the keys: 10 words, then periods
                        words = command[3 + int(command[2]) :]
                        # A settlement's or replay's own instant, else its first period's start.
                        when = words[2] if words[2] != b"-" else words[10]
                        reply = reply.replace(b"WHEN", when)
                    with self._lock:
                        self.script_calls += 1
                        self.on_half_made_connections += not handshaken
                try:
                    if reply is TRICKLE:
                        self._trickle(peer)
                        return
                    peer.sendall(reply)
                except OSError:
                    return

    def _trickle(self, peer: socket.socket) -> None:
        """A bulk string header, then its body, one byte at a time until the client gives up."""
        data = itertools.chain(b"$100000000\r\n", itertools.repeat(ord("x")))
        for byte in data:
            if self._stop.wait(TRICKLE_INTERVAL):
                return
            peer.sendall(bytes([byte]))  # OSError once the client hangs up: the caller stops


@pytest.fixture
def fake_store() -> Iterator[FakeStore]:
    store = FakeStore()
    yield store
    store.close()


def spend_is_spooled(manager: BudgetManager, spool_dir: Path) -> None:
    """
    record_spend on a store that cannot take it: spooled, never a stray exception.

    Spooled means a receipt saying so, or (where record_spend raises instead)
    BudgetUnavailableError with the spend in the spool.
    """
    try:
        receipt: Any = manager.record_spend("alice", 0.5, project_id="p")
    except BudgetUnavailableError:
        receipt = None
    assert getattr(receipt, "status", None) == "spooled" or list(spool_dir.glob("*.spool"))


def timed(call: Callable[[], object]) -> float:
    """How long *call* took to raise BudgetUnavailableError (it must)."""
    start = time.monotonic()
    with pytest.raises(BudgetUnavailableError):
        call()
    return time.monotonic() - start


class TestGarbledHandshake:
    """A store answering the connection handshake with something that is not Redis's answer."""

    @pytest.mark.parametrize("garbage", [b"+OK\r\n", b":1\r\n", b"*0\r\n", b"_\r\n"])
    @pytest.mark.timeout(60)
    def test_fails_closed_and_the_connection_is_never_reused(
        self,
        garbage: bytes,
        fake_store: FakeStore,
        managers: Callable[..., BudgetManager],
        spool_dir: Path,
    ) -> None:
        """
        Every operation is refused (not a raw AttributeError), spends are
        spooled, and once the store behaves the next call works on a new
        connection, never on the half-made one.
        """
        fake_store.replies["HELLO"] = garbage
        manager = managers(fake_store.url, **FAST)
        with pytest.raises(BudgetUnavailableError, match="handshake"):
            manager.check_availability("alice", 1.0)
        with pytest.raises(BudgetUnavailableError):
            manager.reserve("alice", 1.0)
        spend_is_spooled(manager, spool_dir)
        assert fake_store.script_calls == 0  # no call ran on a half-made connection

        made = fake_store.connections
        fake_store.replies["HELLO"] = HELLO
        manager.check_availability("alice", 1.0)
        assert fake_store.connections > made
        assert manager.replay_spool().error is None  # the spooled spend, now the store answers
        assert fake_store.on_half_made_connections == 0

    def test_the_connection_is_disconnected(self, fake_store: FakeStore) -> None:
        """At the connection itself: a RedisError (StoreProtocolError), and no socket kept."""
        fake_store.replies["HELLO"] = b":1\r\n"
        conn = TcpConnection(
            host="127.0.0.1", port=fake_store.port, socket_timeout=0.5, decode_responses=True
        )
        with pytest.raises(StoreProtocolError, match="not Redis's answer"):
            conn.connect()
        assert not conn.is_connected
        fake_store.replies["HELLO"] = HELLO
        conn.connect()
        assert conn.is_connected
        conn.disconnect()


class TestTrickle:
    """A store that answers one byte every 0.1 s: no single read times out, the call must."""

    @pytest.mark.parametrize("config", [FAST, {}], ids=["fast", "defaults"])
    @pytest.mark.parametrize("command", ["EVALSHA", "HELLO", "INFO"])
    @pytest.mark.timeout(60)
    def test_fails_within_the_bound(
        self,
        command: str,
        config: dict[str, Any],
        fake_store: FakeStore,
        managers: Callable[..., BudgetManager],
        spool_dir: Path,
    ) -> None:
        """
        The script's reply, or the handshake's, trickled: every operation fails
        closed within (retries + 1) x (connect_timeout + socket_timeout), plus
        slack for a loaded machine; the spend is spooled.
        """
        manager = managers(fake_store.url, **config)
        bound = hang_bound(manager.config) + 1.0  # hang_bound has 1 s of slack already
        fake_store.replies[command] = TRICKLE
        for call in (
            lambda: manager.check_availability("alice", 1.0),
            lambda: manager.reserve("alice", 1.0),
            lambda: manager.usage("alice"),
        ):
            elapsed = timed(call)
            assert manager.config.socket_timeout * 0.9 <= elapsed < bound, elapsed
        start = time.monotonic()
        spend_is_spooled(manager, spool_dir)
        assert time.monotonic() - start < bound

        fake_store.replies[command] = GOOD[command]
        manager.check_availability("alice", 1.0)  # the same manager, fresh connections

    @pytest.mark.parametrize("parser", [_HiredisParser, _RESP3Parser], ids=["hiredis", "python"])
    @pytest.mark.timeout(30)
    def test_either_parser_times_out_one_reply(self, parser: type, fake_store: FakeStore) -> None:
        """
        At the connection: one reply is bounded by socket_timeout (the first
        command on a connection by connect_timeout + socket_timeout) whichever
        parser reads it, and the connection is dropped.
        """
        conn = TcpConnection(
            host="127.0.0.1",
            port=fake_store.port,
            socket_timeout=0.3,
            socket_connect_timeout=0.2,
            parser_class=parser,
            decode_responses=True,
        )
        conn.connect()
        conn.send_command("PING")
        assert conn.read_response() == "PONG"
        fake_store.replies["EVALSHA"] = TRICKLE
        conn.send_command("EVALSHA", "0" * 40, 0)
        start = time.monotonic()
        with pytest.raises(redis.TimeoutError):
            conn.read_response()
        assert 0.25 <= time.monotonic() - start < 0.3 + 0.5
        assert not conn.is_connected

    @pytest.mark.parametrize("parser", [_HiredisParser, _RESP3Parser], ids=["hiredis", "python"])
    @pytest.mark.timeout(30)
    def test_a_prompt_store_is_not_cut_short(self, parser: type, fake_store: FakeStore) -> None:
        """
        Each command gets its own window: many quick replies on one connection
        all arrive, and an idle connection whose last window closed long ago
        is still checked (a non-blocking read) and used as before.
        """
        conn = TcpConnection(
            host="127.0.0.1",
            port=fake_store.port,
            socket_timeout=0.05,
            parser_class=parser,
            decode_responses=True,
        )
        deadline = time.monotonic() + 0.3  # several windows' worth of commands
        count = 0
        while time.monotonic() < deadline:
            conn.send_command("PING")
            assert conn.read_response() == "PONG"
            count += 1
        assert count > 10
        time.sleep(0.2)
        assert conn.can_read() is False  # what the pool asks of a connection it hands out
        conn.send_command("PING")
        assert conn.read_response() == "PONG"
        assert fake_store.connections == 1
        conn.disconnect()


class TestEvictingStore:
    """A store that may evict keys would silently reset budgets: it is refused."""

    @staticmethod
    def configure(server: RedisServer, maxmemory: str, policy: str) -> None:
        client = server.client()
        try:
            client.config_set("maxmemory", maxmemory)
            client.config_set("maxmemory-policy", policy)
        finally:
            client.close()

    @pytest.mark.parametrize("policy", ["allkeys-lru", "volatile-lru", "volatile-ttl"])
    @pytest.mark.timeout(60)
    def test_refused_with_a_clear_error_until_fixed(
        self,
        policy: str,
        own_redis: RedisServer,
        managers: Callable[..., BudgetManager],
        spool_dir: Path,
    ) -> None:
        """
        Every operation fails closed, at once (not retried), naming the setting
        and the fix; the spend is spooled. Set to noeviction, the same manager
        works and the spend is recorded.
        """
        self.configure(own_redis, "100mb", policy)
        manager = managers(own_redis.url, **FAST)
        for call in (
            lambda: manager.check_availability("alice", 1.0),
            lambda: manager.reserve("alice", 1.0),
            manager.ping,
        ):
            with pytest.raises(BudgetUnavailableError) as caught:
                call()
            message = str(caught.value)
            assert f"maxmemory-policy is {policy}" in message, message
            assert "noeviction" in message
        spend_is_spooled(manager, spool_dir)
        assert timed(lambda: manager.usage("alice")) < manager.config.socket_timeout

        self.configure(own_redis, "100mb", "noeviction")
        manager.check_availability("alice", 1.0)
        client = own_redis.client()
        try:
            assert evalsha_calls(client) >= 1
            wait_for(lambda: manager.usage("alice")["user"].spent_nano == 500_000_000)
        finally:
            client.close()

    def test_no_memory_limit_never_evicts(
        self, own_redis: RedisServer, managers: Callable[..., BudgetManager]
    ) -> None:
        """maxmemory 0 (Redis's default) has no limit to evict at, whatever the policy."""
        self.configure(own_redis, "0", "allkeys-lru")
        manager = managers(own_redis.url, **FAST)
        manager.record_spend("alice", 1.0)
        assert manager.usage("alice")["user"].spent_nano == 1_000_000_000

    @pytest.mark.timeout(60)
    def test_a_policy_changed_at_run_time_is_caught_on_the_next_connection(
        self, own_redis: RedisServer, managers: Callable[..., BudgetManager]
    ) -> None:
        """Checked as connections are made: after a reconnect, an evicting store is refused."""
        manager = managers(own_redis.url, **FAST)
        manager.check_availability("alice", 1.0)
        self.configure(own_redis, "100mb", "allkeys-random")
        client = own_redis.client()
        try:
            client.client_kill_filter(_type="normal", skipme=True)  # the manager's connections
        finally:
            client.close()
        with pytest.raises(BudgetUnavailableError, match="maxmemory-policy"):
            manager.check_availability("alice", 1.0)

    def test_a_store_that_does_not_say_is_allowed(
        self, fake_store: FakeStore, managers: Callable[..., BudgetManager]
    ) -> None:
        """INFO disabled (renamed away on a managed Redis), or without the fields: allowed."""
        manager = managers(fake_store.url, **FAST)
        manager.check_availability("alice", 1.0)  # INFO without maxmemory fields
        fake_store.replies["INFO"] = b"-ERR unknown command 'INFO'\r\n"
        managers(fake_store.url, **FAST).check_availability("alice", 1.0)

    def test_an_evicting_fake_is_refused(
        self, fake_store: FakeStore, managers: Callable[..., BudgetManager]
    ) -> None:
        """The same check on what INFO says, whoever says it."""
        info = b"# Memory\r\nmaxmemory:1024\r\nmaxmemory_policy:allkeys-lfu\r\n"
        fake_store.replies["INFO"] = bulk(info)
        manager = managers(fake_store.url, **FAST)
        with pytest.raises(BudgetUnavailableError, match="maxmemory-policy is allkeys-lfu"):
            manager.check_availability("alice", 1.0)
        assert fake_store.script_calls == 0


class TestImpostorReplies:
    """A peer that answers the script with anything of its own: never a "yes"."""

    @pytest.mark.parametrize(
        "reply", [b":0\r\n", b":1\r\n", b"+OK\r\n", b"*0\r\n", b"$-1\r\n", b"*1\r\n$2\r\nOK\r\n"]
    )
    def test_nothing_passes_and_the_spend_is_spooled(
        self,
        reply: bytes,
        fake_store: FakeStore,
        managers: Callable[..., BudgetManager],
        spool_dir: Path,
    ) -> None:
        """$5 on a $1 limit: refused as unavailable; the spend is saved, not taken as done."""
        fake_store.replies["EVALSHA"] = reply
        manager = managers(fake_store.url, daily_user_limit_usd=1.0, **FAST)
        with pytest.raises(BudgetUnavailableError):
            manager.check_availability("alice", 5.0)
        with pytest.raises(BudgetUnavailableError):
            manager.reserve("alice", 5.0)
        receipt = manager.record_spend("alice", 5.0, idempotency_key="k")
        assert (receipt.status, receipt.idempotency_key) == ("spooled", "k")
        assert list(spool_dir.glob("*.spool"))
