"""
No recorded spend is lost: charges the store could not take are spooled on
disk and replayed, exactly once, when it is back (by the same manager, by a
new process after a crash, or by ``coreason-budget replay-spool``).
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis

from coreason_budget import BudgetConfig, BudgetManager, BudgetUnavailableError, ConfigError
from coreason_budget._spool import store_identity
from coreason_budget.cli import main

from .redis_server import free_port
from .tcp_proxy import TcpProxy

NANO = 1_000_000_000
FAST: dict[str, Any] = {"connect_timeout": 0.2, "socket_timeout": 0.2, "retries": 1}
BIG: dict[str, Any] = {
    "daily_user_limit_usd": 1e6,
    "daily_project_limit_usd": 1e6,
    "daily_global_limit_usd": 1e6,
}


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def day_counters(client: redis.Redis, day: datetime.date | None = None) -> dict[str, int]:
    """One day's counters (today's, by the server's clock, unless given), from the store."""
    if day is None:
        seconds = int(client.time()[0])
        day = datetime.datetime.fromtimestamp(seconds, datetime.UTC).date()
    raw: dict[str, str] = client.hgetall(f"{{coreason_budget}}:day:{day.isoformat()}")  # type: ignore[assignment]
    return {k: int(v) for k, v in raw.items()}


def spool_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.spool")) if directory.exists() else []


class TestThroughAnOutage:
    @pytest.mark.timeout(120)
    def test_thousand_commits_charge_exactly_the_committed_actuals(
        self,
        proxy: TcpProxy,
        managers: Callable[..., BudgetManager],
        redis_client: redis.Redis,
        spool_dir: Path,
    ) -> None:
        """
        1,000 reservations committed from 8 threads while the store goes away
        and comes back: whatever failed was spooled, replayed (in the
        background as soon as the store answered, the rest on request), and
        the ledger ends at the exact sum of the actuals, to the nano-dollar.
        """
        n, threads_n = 1000, 8
        manager = managers(proxy.url, pool_size=8, **FAST, **BIG)
        rng = random.Random(6)
        actuals = [rng.randrange(1, NANO) for _ in range(n)]  # below the $1 estimate
        user = [f"user{i % 13}" for i in range(n)]
        project = [f"p{i % 5}" for i in range(n)]
        handles = {
            i: manager.reserve(user[i], 1.0, project[i], reservation_id=f"r{i}") for i in range(n)
        }
        assert day_counters(redis_client)["g"] == n * NANO

        lock = threading.Lock()
        processed, failed = [0], [0]
        unexpected: list[BaseException] = []

        def commit_all(start: int) -> None:
            for i in range(start, n, threads_n):
                with lock:
                    r = handles.pop(i)  # dropped after the attempt, as a request handler would
                try:
                    r.commit(Decimal(actuals[i]) / NANO)
                except BudgetUnavailableError:
                    with lock:
                        failed[0] += 1
                except BaseException as e:
                    unexpected.append(e)
                del r
                with lock:
                    processed[0] += 1
                time.sleep(0.001)

        threads = [threading.Thread(target=commit_all, args=(t,)) for t in range(threads_n)]
        for t in threads:
            t.start()
        wait_for(lambda: processed[0] >= 300, 60)
        proxy.refuse()  # the store goes away part-way
        wait_for(lambda: processed[0] >= 750, 60)
        proxy.pass_through()  # and comes back while commits go on
        for t in threads:
            t.join(timeout=60)
        assert not unexpected, unexpected
        assert 300 <= failed[0] < n, failed[0]

        gc.collect()
        summary = manager.replay_spool()  # what the background replay has not done yet
        assert summary.error is None
        assert summary.remaining == 0
        assert not spool_files(spool_dir)

        totals = day_counters(redis_client)
        assert totals["g"] == sum(actuals)
        for u in set(user):
            assert totals[f"u:{u}"] == sum(a for a, x in zip(actuals, user, strict=True) if x == u)
        for p in set(project):
            assert totals[f"p:{p}"] == sum(
                a for a, x in zip(actuals, project, strict=True) if x == p
            )
        # Replaying again, or committing again, changes nothing.
        assert manager.replay_spool().replayed == 0
        again = manager.reservation("r0")
        assert again.state == "committed"
        again.commit(0.99)
        assert day_counters(redis_client) == totals


CHILD = """
import os, sys
from coreason_budget import BudgetConfig, BudgetManager, BudgetUnavailableError

url, spool = sys.argv[1], sys.argv[2]
m = BudgetManager(BudgetConfig(redis_url=url, spool_dir=spool, connect_timeout=0.2,
                               socket_timeout=0.2, retries=0))
r = m.reserve("alice", 2.0, reservation_id="r-crash")
print("reserved", flush=True)
sys.stdin.readline()  # the test takes the store away
for call in (lambda: m.record_spend("alice", 1.25, idempotency_key="k-crash"),
             lambda: r.commit(0.5)):
    try:
        call()
    except BudgetUnavailableError:
        pass
    else:
        sys.exit("the store should have been unreachable")
print("spooled", flush=True)
sys.stdin.readline()
os._exit(0)  # a crash: no close(), no atexit, no flush of anything
"""


class Child:
    """A worker process that reserves, loses its store, spools two charges and crashes."""

    def __init__(self, proxy: TcpProxy, spool_dir: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, proxy.url, str(spool_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.stdin, self.stdout = self.proc.stdin, self.proc.stdout
        assert self.stdout.readline().strip() == "reserved"
        proxy.refuse()
        self.stdin.write("\n")
        self.stdin.flush()
        assert self.stdout.readline().strip() == "spooled"
        proxy.pass_through()

    def crash(self) -> None:
        self.stdin.write("\n")
        self.stdin.flush()
        assert self.proc.wait(timeout=30) == 0


class TestCrash:
    EXPECTED = 1_750_000_000  # the 0.5 commit of a 2.0 hold, and the 1.25 spend

    @pytest.mark.timeout(60)
    def test_a_new_manager_replays_what_a_dead_process_spooled(
        self,
        proxy: TcpProxy,
        managers: Callable[..., BudgetManager],
        redis_client: redis.Redis,
        spool_dir: Path,
    ) -> None:
        child = Child(proxy, spool_dir)
        child.crash()
        assert day_counters(redis_client)["u:alice"] == 2 * NANO  # the hold, never settled
        assert len(spool_files(spool_dir)) == 1
        manager = managers(proxy.url)
        manager.usage("bob")  # any call that reaches the store starts the replay
        wait_for(lambda: day_counters(redis_client)["u:alice"] == self.EXPECTED)
        wait_for(lambda: not spool_files(spool_dir))
        assert day_counters(redis_client)["g"] == self.EXPECTED

    @pytest.mark.timeout(60)
    def test_cli_leaves_live_processes_alone_and_replays_dead_ones(
        self,
        proxy: TcpProxy,
        redis_client: redis.Redis,
        spool_dir: Path,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        child = Child(proxy, spool_dir)
        args = ["replay-spool", "--spool-dir", str(spool_dir), "--redis-url", proxy.url, "--json"]

        def replay() -> dict[str, Any]:
            assert main(args) == 0
            doc: dict[str, Any] = json.loads(capsys.readouterr().out)
            return doc

        try:
            alive = replay()
            assert (alive["busy_files"], alive["replayed"]) == (1, 0)
            assert day_counters(redis_client)["u:alice"] == 2 * NANO
        finally:
            child.crash()
        dead = replay()
        assert (dead["files"], dead["recorded"], dead["remaining"]) == (1, 2, 0)
        assert day_counters(redis_client)["u:alice"] == self.EXPECTED
        assert not spool_files(spool_dir)
        assert replay()["replayed"] == 0
        assert day_counters(redis_client)["u:alice"] == self.EXPECTED

    def test_cli_exit_3_when_the_store_is_still_down(
        self, spool_dir: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        url = f"redis://127.0.0.1:{free_port()}"
        config = BudgetConfig(redis_url=url, spool_dir=str(spool_dir), **FAST)
        with BudgetManager(config) as manager, pytest.raises(BudgetUnavailableError):
            manager.record_spend("alice", 1.0)
        # The manager's file is still locked by this process: copy it as a dead process's.
        (own,) = spool_files(spool_dir)
        (spool_dir / own.name.replace(".spool", "0.spool")).write_bytes(own.read_bytes())
        assert main(["replay-spool", "--spool-dir", str(spool_dir), "--redis-url", url]) == 3
        assert "stopped: budget store unavailable" in capsys.readouterr().err
        assert len(spool_files(spool_dir)) == 2  # nothing confirmed, nothing lost


class TestFiles:
    def write_spool(self, spool_dir: Path, url: str, lines: list[str], tail: bytes = b"") -> Path:
        """A spool file as a dead process (pid 999999999) would have left it."""
        label, store_id = store_identity(BudgetConfig(redis_url=url))  # type: ignore[misc]
        spool_dir.mkdir(parents=True, exist_ok=True)
        path = spool_dir / f"{store_id}-999999999.spool"
        header = json.dumps({"spool": "coreason-budget", "v": 1, "store": label})
        path.write_bytes(("\n".join([header, *lines]) + "\n").encode() + tail)
        return path

    @staticmethod
    def spend(seq: int, op: str, amount: int, day: int, fields: list[str]) -> str:
        entry = {"seq": seq, "kind": "spend", "op": op, "day": day, "fields": fields}
        return json.dumps({**entry, "amount": amount})

    @staticmethod
    def today(client: redis.Redis) -> int:
        return int(client.time()[0]) // 86400

    def test_torn_last_line_and_corrupt_lines_are_skipped(
        self,
        redis_url: str,
        redis_client: redis.Redis,
        managers: Callable[..., BudgetManager],
        spool_dir: Path,
    ) -> None:
        day = self.today(redis_client)
        lines = [
            self.spend(1, "a", 100, day, ["u:alice", "g"]),
            '{"seq": 2, "kind": "spend", "op": "b", "day"',  # cut short, then appended to
            self.spend(3, "c", 30, day, ["u:alice", "g"]),
            '{"seq": 4, "kind": "spend", "op": "d", "day": 1, "fields": [], "amount": 5}',
        ]
        torn = self.spend(5, "e", 7, day, ["u:alice", "g"]).encode()[:-9]
        self.write_spool(spool_dir, redis_url, lines, tail=torn)
        summary = managers(redis_url).replay_spool()
        assert (summary.recorded, summary.torn_lines, summary.remaining) == (2, 3, 0)
        assert day_counters(redis_client) == {"u:alice": 130, "g": 130}
        assert not spool_files(spool_dir)

    def test_replaying_twice_charges_once(
        self,
        redis_url: str,
        redis_client: redis.Redis,
        managers: Callable[..., BudgetManager],
        spool_dir: Path,
    ) -> None:
        """A crash after replaying but before confirming on disk: the next replay is a no-op."""
        day = self.today(redis_client)
        manager = managers(redis_url)
        held = manager.reserve("alice", 2.0, reservation_id="r1")
        settle = {"seq": 2, "kind": "settle", "op": "r1", "day": held.day, "fields": ["u:alice"]}
        lines = [
            self.spend(1, "k1", 5 * NANO, day, ["u:alice", "g"]),
            json.dumps({**settle, "amount": NANO // 2, "state": "committed"}),
        ]
        path = self.write_spool(spool_dir, redis_url, lines)
        saved = path.read_bytes()
        first = manager.replay_spool()
        assert (first.recorded, first.duplicates) == (2, 0)
        after = day_counters(redis_client)
        assert after == {"u:alice": 5_500_000_000, "g": 5_500_000_000}
        path.write_bytes(saved)
        second = manager.replay_spool()
        assert (second.recorded, second.duplicates) == (0, 2)
        assert day_counters(redis_client) == after
        held.commit(1.0)  # the spooled settlement won
        assert held.state == "committed"
        assert day_counters(redis_client) == after

    def test_files_of_other_stores_are_left_alone(
        self, redis_url: str, managers: Callable[..., BudgetManager], spool_dir: Path
    ) -> None:
        other = f"redis://127.0.0.1:{free_port()}"
        path = self.write_spool(spool_dir, other, [self.spend(1, "x", 1, 0, ["g"])])
        summary = managers(redis_url).replay_spool()
        assert summary.replayed == 0
        assert summary.other_stores == [f"{path.name}: {other} prefix=coreason_budget"]
        assert path.exists()

    def test_a_dead_namesake_file_is_adopted(
        self,
        proxy: TcpProxy,
        managers: Callable[..., BudgetManager],
        redis_client: redis.Redis,
        spool_dir: Path,
    ) -> None:
        """A file left by a dead process whose pid we now have: its charges are ours."""
        day = self.today(redis_client)
        dead = self.write_spool(spool_dir, proxy.url, [self.spend(7, "old", 40, day, ["g"])])
        path = dead.with_name(dead.name.replace("999999999", str(os.getpid())))
        dead.rename(path)
        manager = managers(proxy.url, **FAST)
        proxy.refuse()
        with pytest.raises(BudgetUnavailableError):
            manager.record_spend("alice", 1e-7)
        proxy.pass_through()
        assert manager.replay_spool().recorded == 2
        assert day_counters(redis_client) == {"g": 140, "u:alice": 100}
        assert not spool_files(spool_dir)

    def test_an_unwritable_spool_keeps_charges_in_memory(
        self,
        proxy: TcpProxy,
        managers: Callable[..., BudgetManager],
        redis_client: redis.Redis,
        tmp_path: Path,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        blocker = tmp_path / "a-file"
        blocker.write_text("not a directory")
        manager = managers(proxy.url, spool_dir=str(blocker / "spool"), **FAST)
        proxy.refuse()
        with pytest.raises(BudgetUnavailableError) as info:
            manager.record_spend("alice", 1.0)
        assert "could not write it to the local spool" in "".join(info.value.__notes__)
        assert any("kept in memory only" in r.getMessage() for r in caplog.records)
        proxy.pass_through()
        manager.usage("alice")
        wait_for(lambda: day_counters(redis_client).get("u:alice") == NANO)


class TestDays:
    """A spooled charge lands on the day it was made, even when replayed after midnight."""

    NOON = datetime.datetime(2031, 5, 17, 12, tzinfo=datetime.UTC).timestamp()
    DAY = datetime.date(2031, 5, 17)

    def test_spend_replayed_after_midnight_lands_on_its_day(
        self,
        proxy: TcpProxy,
        managers: Callable[..., BudgetManager],
        redis_client: redis.Redis,
    ) -> None:
        now = [self.NOON]
        manager = managers(proxy.url, clock=lambda: now[0], **FAST)
        held = manager.reserve("alice", 2.0, reservation_id="r1")
        proxy.refuse()
        with pytest.raises(BudgetUnavailableError):
            manager.record_spend("alice", 1.0)
        with pytest.raises(BudgetUnavailableError):
            held.commit(0.25)
        proxy.pass_through()
        now[0] += 86400  # the next day
        summary = manager.replay_spool()
        assert (summary.recorded, summary.remaining) == (2, 0)
        assert day_counters(redis_client, self.DAY) == {
            "u:alice": 1_250_000_000,
            "g": 1_250_000_000,
        }
        next_day = self.DAY + datetime.timedelta(days=1)
        assert day_counters(redis_client, next_day) == {}

    def test_spend_replayed_past_retention_is_dropped(
        self,
        proxy: TcpProxy,
        managers: Callable[..., BudgetManager],
        redis_client: redis.Redis,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        now = [self.NOON]
        manager = managers(proxy.url, clock=lambda: now[0], retention_seconds=3600, **FAST)
        proxy.refuse()
        with pytest.raises(BudgetUnavailableError):
            manager.record_spend("alice", 1.0)
        proxy.pass_through()
        now[0] += 2 * 86400
        summary = manager.replay_spool()
        assert (summary.expired, summary.remaining) == (1, 0)
        assert any("expired" in r.getMessage() for r in caplog.records)
        assert not list(redis_client.scan_iter("{coreason_budget}:day:*"))

    def test_spend_dated_in_the_future_lands_today(
        self,
        proxy: TcpProxy,
        managers: Callable[..., BudgetManager],
        redis_client: redis.Redis,
    ) -> None:
        """A worker whose clock ran a day ahead: its spend is recorded today, not tomorrow."""
        now = [self.NOON + 86400]
        manager = managers(proxy.url, clock=lambda: now[0], **FAST)
        proxy.refuse()
        with pytest.raises(BudgetUnavailableError):
            manager.record_spend("alice", 1.0)
        proxy.pass_through()
        now[0] = self.NOON
        assert manager.replay_spool().recorded == 1
        assert day_counters(redis_client, self.DAY) == {"u:alice": NANO, "g": NANO}


class TestLateReplay:
    """A spool replayed long after the outage still charges each spend once."""

    def test_a_spend_that_landed_is_not_charged_again_after_the_id_ttl(
        self,
        proxy: TcpProxy,
        managers: Callable[..., BudgetManager],
        redis_client: redis.Redis,
    ) -> None:
        """
        The spend reached the store but every reply was lost, so it was spooled
        too. Replayed after its operation id's TTL (a crashed job's spool, picked
        up days later), the id is still known: it lives as long as the day it charged.
        """
        manager = managers(proxy.url, idempotency_ttl_seconds=1, **FAST)
        manager.usage("warm-up")
        proxy.drop_replies(100)
        with pytest.raises(BudgetUnavailableError):
            manager.record_spend("alice", 1.0)
        assert proxy.dropped >= 1
        proxy.pass_through()
        time.sleep(1.5)  # the idempotency TTL is over
        summary = manager.replay_spool()
        assert (summary.duplicates, summary.recorded, summary.remaining) == (1, 0, 0)
        assert day_counters(redis_client) == {"u:alice": NANO, "g": NANO}


class TestHandles:
    """A spooled settlement of a handle its holder still has waits for them to retry."""

    def test_a_held_handle_retry_wins_over_the_spool(
        self,
        proxy: TcpProxy,
        managers: Callable[..., BudgetManager],
        redis_client: redis.Redis,
        spool_dir: Path,
    ) -> None:
        manager = managers(proxy.url, **FAST)
        held = manager.reserve("alice", 2.0)
        proxy.refuse()
        with pytest.raises(BudgetUnavailableError) as info:
            held.commit(1.5)
        assert "saved to the local spool" in "".join(getattr(info.value, "__notes__", []))
        proxy.pass_through()
        manager.usage("alice")  # the automatic replay runs, and leaves the handle's commit
        time.sleep(0.3)
        assert day_counters(redis_client)["u:alice"] == 2 * NANO
        held.commit(1.75)  # the holder's own retry, with a better figure
        assert day_counters(redis_client)["u:alice"] == 1_750_000_000
        assert not spool_files(spool_dir)

    def test_a_dropped_handle_is_replayed(
        self,
        proxy: TcpProxy,
        managers: Callable[..., BudgetManager],
        redis_client: redis.Redis,
    ) -> None:
        manager = managers(proxy.url, **FAST)
        held = manager.reserve("alice", 2.0)
        proxy.refuse()
        with pytest.raises(BudgetUnavailableError):
            held.commit(1.5)
        proxy.pass_through()
        del held
        gc.collect()
        manager.usage("alice")
        wait_for(lambda: day_counters(redis_client)["u:alice"] == 1_500_000_000)

    def test_with_block_exit_is_spooled_and_replayed(
        self,
        proxy: TcpProxy,
        managers: Callable[..., BudgetManager],
        redis_client: redis.Redis,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        manager = managers(proxy.url, **FAST)
        with manager.reserve("alice", 2.0) as r:
            proxy.refuse()
        assert r.state == "held"  # the exit only logs, as before
        assert any("Could not settle" in rec.getMessage() for rec in caplog.records)
        proxy.pass_through()
        manager.usage("alice")  # r is still referenced, but nobody will retry an exit
        wait_for(lambda: manager.replay_spool().remaining == 0)
        assert day_counters(redis_client)["u:alice"] == 2 * NANO  # the estimate, committed
        assert manager.reservation(r.id).state == "committed"


class TestConfig:
    def test_spooling_off(
        self, managers: Callable[..., BudgetManager], tmp_path: Path, spool_dir: Path
    ) -> None:
        manager = managers(f"redis://127.0.0.1:{free_port()}", spool_dir="off", **FAST)
        with pytest.raises(BudgetUnavailableError) as info:
            manager.record_spend("alice", 1.0)
        assert not getattr(info.value, "__notes__", None)
        assert not spool_files(spool_dir)
        with pytest.raises(ConfigError, match="off"):
            manager.replay_spool()

    def test_memory_store_has_no_spool(self) -> None:
        with (
            BudgetManager(BudgetConfig(redis_url="memory://")) as manager,
            pytest.raises(ConfigError, match="memory"),
        ):
            manager.replay_spool()

    def test_from_env(self, tmp_path: Path) -> None:
        env = {"COREASON_BUDGET_SPOOL_DIR": str(tmp_path)}
        assert BudgetConfig.from_env(env, env_file=None).spool_dir == str(tmp_path)

    def test_default_is_per_user(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        from coreason_budget._spool import spool_directory

        monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
        assert spool_directory(BudgetConfig()) == tmp_path / "coreason-budget" / "spool"

    def test_store_identity_hides_the_password(self) -> None:
        identity = store_identity(BudgetConfig(redis_url="redis://u:secret@h:1/2"))
        assert identity is not None
        assert identity[0] == "redis://u@h:1/2 prefix=coreason_budget"
        assert identity == store_identity(BudgetConfig(redis_url="redis://u:other@h:1/2"))
        assert identity != store_identity(BudgetConfig(redis_url="redis://h:1/2", key_prefix="x"))
