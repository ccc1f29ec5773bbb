"""
No recorded spend is lost: charges the store could not take are spooled on
disk and replayed, exactly once, when it is back (by the same manager, by a
new process after a crash, or by ``coreason-budget replay-spool``).
"""

from __future__ import annotations

import datetime
import errno
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
from typing import Any, ClassVar

import pytest
import redis

from coreason_budget import BudgetConfig, BudgetManager, BudgetUnavailableError, ConfigError, _spool
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
        and comes back: every commit it could not take answered "spooled" and
        was replayed (in the background as soon as the store answered, the
        rest on request), and the ledger ends at the exact sum of the actuals,
        to the nano-dollar.
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
        processed = [0]
        statuses: dict[str, int] = {}
        unexpected: list[BaseException] = []

        def commit_all(start: int) -> None:
            for i in range(start, n, threads_n):
                with lock:
                    r = handles.pop(i)
                try:
                    status = r.commit(Decimal(actuals[i]) / NANO).status
                except BaseException as e:  # with a spool, an outage is no error
                    unexpected.append(e)
                else:
                    with lock:
                        statuses[status] = statuses.get(status, 0) + 1
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
        assert set(statuses) == {"recorded", "spooled"}, statuses
        assert 300 <= statuses["spooled"] < n, statuses

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
        assert again.commit(0.99).status == "duplicate"
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
try:
    spend = m.record_spend("alice", 1.25, idempotency_key="k-crash")
    commit = r.commit(0.5)
except BudgetUnavailableError as e:
    sys.exit(f"not spooled: {e}")
print(spend.status, commit.status, flush=True)
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
        assert self.stdout.readline().strip() == "spooled spooled"
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
        with BudgetManager(config) as manager:
            assert manager.record_spend("alice", 1.0).status == "spooled"
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
        header = json.dumps({"spool": "coreason-budget", "v": 2, "store": label})
        path.write_bytes(("\n".join([header, *lines]) + "\n").encode() + tail)
        return path

    @staticmethod
    def spend(seq: int, op: str, amount: int, at: int, fields: list[str]) -> str:
        entry = {"seq": seq, "kind": "spend", "op": op, "at": at, "fields": fields}
        return json.dumps({**entry, "amount": amount})

    @staticmethod
    def today(client: redis.Redis) -> int:
        """The store's time now, ms (what a spooled entry is dated with)."""
        seconds, micros = client.time()
        return int(seconds) * 1000 + int(micros) // 1000

    def test_torn_last_line_is_skipped_and_corrupt_lines_quarantined(
        self,
        redis_url: str,
        redis_client: redis.Redis,
        managers: Callable[..., BudgetManager],
        spool_dir: Path,
    ) -> None:
        day = self.today(redis_client)
        lines = [
            self.spend(1, "a", 100, day, ["u:alice", "g"]),
            '{"seq": 2, "kind": "spend", "op": "b", "at"',  # cut short, then appended to
            self.spend(3, "c", 30, day, ["u:alice", "g"]),
            '{"seq": 4, "kind": "spend", "op": "d", "at": 1, "fields": [], "amount": 5}',
        ]
        torn = self.spend(5, "e", 7, day, ["u:alice", "g"]).encode()[:-9]
        self.write_spool(spool_dir, redis_url, lines, tail=torn)
        summary = managers(redis_url).replay_spool()
        assert (summary.recorded, summary.torn_lines, summary.remaining) == (2, 1, 0)
        assert summary.quarantined == 2  # kept beside the spool: see TestQuarantine
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
        settle = {
            "seq": 2,
            "kind": "settle",
            "op": "r1",
            "at": held.held_at_ms,
            "fields": ["u:alice"],
        }
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
        assert manager.record_spend("alice", 1e-7).status == "spooled"
        proxy.pass_through()
        assert manager.replay_spool().recorded == 2
        assert day_counters(redis_client) == {"g": 140, "u:alice": 100}
        assert not spool_files(spool_dir)

    def test_an_unwritable_spool_keeps_nothing(
        self,
        proxy: TcpProxy,
        managers: Callable[..., BudgetManager],
        redis_client: redis.Redis,
        tmp_path: Path,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """
        The spool directory cannot be made (a file stands where it should be):
        the spend is not spooled, so the answer is BudgetUnavailableError naming
        the key, and nothing is charged behind the caller's back when the store
        is back. Only the caller's retry with that key charges it, once.
        """
        blocker = tmp_path / "a-file"
        blocker.write_text("not a directory")
        manager = managers(proxy.url, spool_dir=str(blocker / "spool"), **FAST)
        proxy.refuse()
        with pytest.raises(BudgetUnavailableError) as info:
            manager.record_spend("alice", 1.0)
        key = info.value.idempotency_key
        assert key
        assert "could not write it to the local spool" in "".join(info.value.__notes__)
        assert any("is not kept" in r.getMessage() for r in caplog.records)
        proxy.pass_through()
        manager.usage("alice")  # a call that reaches the store: any replay would start now
        summary = manager.replay_spool()
        assert (summary.replayed, summary.remaining, summary.error) == (0, 0, None)
        time.sleep(0.3)
        assert day_counters(redis_client) == {}
        assert manager.record_spend("alice", 1.0, idempotency_key=key).status == "recorded"
        assert manager.record_spend("alice", 1.0, idempotency_key=key).status == "duplicate"
        assert day_counters(redis_client) == {"u:alice": NANO, "g": NANO}

    def test_a_failed_spool_write_leaves_no_entry(
        self,
        proxy: TcpProxy,
        managers: Callable[..., BudgetManager],
        redis_client: redis.Redis,
        spool_dir: Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """
        The entry's line was written but could not be made durable (fsync
        failed): the caller is told nothing was kept, so the line is undone,
        and neither this process nor a replayer after a crash ever charges it.
        """
        manager = managers(proxy.url, **FAST)
        proxy.refuse()
        assert manager.record_spend("bob", 0.5, idempotency_key="kept").status == "spooled"
        write_line = _spool._write_lines

        def write_then_fail(fd: int, doc: dict[str, Any], *, newline_first: bool = False) -> None:
            write_line(fd, doc, newline_first=newline_first)
            if doc.get("op") == "lost":
                raise OSError(errno.EIO, "fsync failed")

        monkeypatch.setattr(_spool, "_write_lines", write_then_fail)
        with pytest.raises(BudgetUnavailableError) as info:
            manager.record_spend("alice", 1.0, idempotency_key="lost")
        assert info.value.idempotency_key == "lost"
        monkeypatch.undo()
        assert manager.record_spend("carol", 0.25, idempotency_key="after").status == "spooled"
        (path,) = spool_files(spool_dir)
        assert b"lost" not in path.read_bytes()
        # As a replayer would find it after a crash: only the two spooled spends.
        copy = path.with_name(path.name.replace(".spool", "0.spool"))
        copy.write_bytes(path.read_bytes())
        proxy.pass_through()
        summary = manager.replay_spool()
        assert (summary.recorded, summary.duplicates, summary.remaining) == (2, 2, 0)
        assert summary.error is None
        assert day_counters(redis_client) == {
            "u:bob": NANO // 2,
            "u:carol": NANO // 4,
            "g": 3 * NANO // 4,
        }
        assert not spool_files(spool_dir)


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
        assert manager.record_spend("alice", 1.0).status == "spooled"
        assert held.commit(0.25).status == "spooled"
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
        assert manager.record_spend("alice", 1.0).status == "spooled"
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
        assert manager.record_spend("alice", 1.0).status == "spooled"
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
        assert manager.record_spend("alice", 1.0).status == "spooled"
        assert proxy.dropped >= 1
        proxy.pass_through()
        time.sleep(1.5)  # the idempotency TTL is over
        summary = manager.replay_spool()
        assert (summary.duplicates, summary.recorded, summary.remaining) == (1, 0, 0)
        assert day_counters(redis_client) == {"u:alice": NANO, "g": NANO}


class TestHandles:
    """A commit spooled through a handle settles it: once, whatever is retried."""

    def test_a_spooled_commit_answers_spooled_again_and_charges_nothing_more(
        self,
        proxy: TcpProxy,
        managers: Callable[..., BudgetManager],
        redis_client: redis.Redis,
        spool_dir: Path,
    ) -> None:
        manager = managers(proxy.url, **FAST)
        held = manager.reserve("alice", 2.0)
        proxy.refuse()
        receipt = held.commit(1.5)
        assert (receipt.status, receipt.idempotency_key) == ("spooled", held.id)
        assert receipt.amount_nano == 1_500_000_000
        assert (held.state, held.receipt) == ("committed", receipt)
        # The holder's retries, with another figure or none: the same answer, nothing done.
        assert held.commit(1.75) is receipt
        assert held.release() is receipt
        proxy.pass_through()
        assert held.commit(1.75) is receipt  # the store is back: still nothing sent
        assert day_counters(redis_client)["u:alice"] == 2 * NANO  # the hold, as it was
        assert len(spool_files(spool_dir)) == 1
        summary = manager.replay_spool()
        assert (summary.recorded, summary.remaining) == (1, 0)
        assert day_counters(redis_client)["u:alice"] == 1_500_000_000  # the spooled figure
        assert held.commit(1.75) is receipt
        assert day_counters(redis_client)["u:alice"] == 1_500_000_000
        assert not spool_files(spool_dir)

    def test_the_spool_replays_a_spooled_commit_exactly_once(
        self,
        proxy: TcpProxy,
        managers: Callable[..., BudgetManager],
        redis_client: redis.Redis,
        spool_dir: Path,
    ) -> None:
        manager = managers(proxy.url, **FAST)
        held = manager.reserve("alice", 2.0)
        proxy.refuse()
        assert held.commit(1.5).status == "spooled"
        proxy.pass_through()
        manager.usage("alice")  # a call that reaches the store starts the automatic replay
        wait_for(lambda: day_counters(redis_client)["u:alice"] == 1_500_000_000)
        wait_for(lambda: not spool_files(spool_dir))
        assert manager.replay_spool().replayed == 0
        again = manager.reservation(held.id)
        assert again.state == "committed"
        assert again.commit(1.75).status == "duplicate"
        assert day_counters(redis_client) == {"u:alice": 1_500_000_000, "g": 1_500_000_000}

    def test_with_block_exit_is_spooled_and_replayed_once(
        self,
        proxy: TcpProxy,
        managers: Callable[..., BudgetManager],
        redis_client: redis.Redis,
        spool_dir: Path,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        manager = managers(proxy.url, **FAST)
        with manager.reserve("alice", 2.0) as r:
            proxy.refuse()
        assert r.state == "committed"  # settled: spooled, nothing to log
        assert r.receipt is not None
        assert (r.receipt.status, r.receipt.amount_nano) == ("spooled", 2 * NANO)
        assert not any("Could not settle" in rec.getMessage() for rec in caplog.records)
        proxy.pass_through()
        manager.usage("alice")
        wait_for(lambda: not spool_files(spool_dir))
        assert manager.reservation(r.id).state == "committed"  # the estimate, committed
        assert manager.replay_spool().replayed == 0
        assert day_counters(redis_client) == {"u:alice": 2 * NANO, "g": 2 * NANO}


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


# -- quarantine: entries that can never be replayed are kept aside, the rest replay ------------


def dead_spool(spool_dir: Path, url: str, lines: list[str], tail: bytes = b"") -> Path:
    """A spool file for the store at *url* as a dead process (pid 999999999) would have left it."""
    label, store_id = store_identity(BudgetConfig(redis_url=url))  # type: ignore[misc]
    spool_dir.mkdir(parents=True, exist_ok=True)
    path = spool_dir / f"{store_id}-999999999.spool"
    header = json.dumps({"spool": "coreason-budget", "v": 2, "store": label})
    path.write_bytes(("\n".join([header, *lines]) + "\n").encode() + tail)
    return path


def spend_line(seq: int, op: str, amount: int, at: int, fields: list[str] | None = None) -> str:
    fields = ["u:alice", "g"] if fields is None else fields
    doc = {"seq": seq, "kind": "spend", "op": op, "at": at, "fields": fields, "amount": amount}
    return json.dumps(doc)


def server_day(client: redis.Redis) -> int:
    """The store's time now, ms (what a spooled entry is dated with)."""
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def quarantine_files(spool_dir: Path) -> list[Path]:
    return sorted(spool_dir.glob("*.quarantine")) if spool_dir.exists() else []


def quarantined(spool_dir: Path) -> list[dict[str, Any]]:
    """Every record of every quarantine file in the directory."""
    return [
        json.loads(line)
        for path in quarantine_files(spool_dir)
        for line in path.read_text().splitlines()
    ]


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


class TestQuarantine:
    """
    A spooled line that can never be replayed (out of range, unreadable, or
    refused by the store) is quarantined: kept in a ``.quarantine`` file beside
    the spool, reported and logged; every other entry is still replayed.
    """

    GOOD = 1_000  # each good spend, in nano-dollars

    # Each is written as seq 2, between two good spends (seq 1 and 3).
    BAD: ClassVar[dict[str, Callable[[int], str]]] = {
        "at 1e15": lambda day: spend_line(2, "bad", 5, 10**15),
        "at 1e12 as a float": lambda day: spend_line(2, "bad", 5, 0).replace(
            '"at": 0', '"at": 1e12'
        ),
        "at -1": lambda day: spend_line(2, "bad", 5, -1),
        "spend at null": lambda day: spend_line(2, "bad", 5, 0).replace('"at": 0', '"at": null'),
        "amount 1e20": lambda day: spend_line(2, "bad", 10**20, day),
        "amount above the largest charge": lambda day: spend_line(2, "bad", 10**15 + 1, day),
        "negative amount": lambda day: spend_line(2, "bad", -5, day),
        "nested 100,000 deep": lambda day: nested(100_000),
        "nested 20,000 deep (short)": lambda day: '{"a":' * 20_000 + "1" + "}" * 20_000,
        "bogus field": lambda day: spend_line(2, "bad", 5, day, ["x:alice", "g"]),
        "five fields": lambda day: spend_line(2, "bad", 5, day, ["u:a", "p:b", "g", "m:c", "u:d"]),
        "field twice": lambda day: spend_line(2, "bad", 5, day, ["g", "g"]),
        "id too long": lambda day: spend_line(2, "x" * 257, 5, day),
        "seq 2**63": lambda day: spend_line(2**63, "bad", 5, day),
        "absurdly long line": lambda day: spend_line(2, "bad", 5, day) + " " * 1_000_000,
        "done of infinity": lambda day: '{"done": [Infinity]}',
        "not an object": lambda day: "[1, 2, 3]",
        "seq taken by another entry": lambda day: spend_line(1, "other", 5, day),
    }

    @pytest.mark.parametrize("bad", list(BAD), ids=list(BAD))
    def test_a_bad_line_is_quarantined_and_the_rest_replay(
        self,
        bad: str,
        redis_url: str,
        redis_client: redis.Redis,
        managers: Callable[..., BudgetManager],
        spool_dir: Path,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """
        Valid JSON with out-of-range values, a line nested 100,000 deep, a bogus
        field: replay_spool() returns normally, the good spends on both sides are
        recorded exactly, the bad line is kept (raw) in the quarantine file and
        logged at ERROR, and a second replay does nothing more.
        """
        day = server_day(redis_client)
        line = self.BAD[bad](day)
        path = dead_spool(
            spool_dir,
            redis_url,
            [spend_line(1, "good1", self.GOOD, day), line, spend_line(3, "good3", self.GOOD, day)],
        )
        manager = managers(redis_url)
        summary = manager.replay_spool()
        assert summary.error is None
        assert (summary.recorded, summary.quarantined, summary.remaining) == (2, 1, 0)
        assert summary.torn_lines == 0
        assert manager.usage("alice")["user"].spent_nano == 2 * self.GOOD
        assert day_counters(redis_client) == {"u:alice": 2 * self.GOOD, "g": 2 * self.GOOD}
        (qfile,) = quarantine_files(spool_dir)
        assert summary.quarantine_files == [str(qfile)]
        assert qfile.name == path.name.replace(".spool", ".quarantine")
        (record,) = quarantined(spool_dir)
        assert record["raw"] == line  # kept byte for byte
        assert record["line"] == 3
        assert record["spool"] == str(path)
        assert record["reason"]
        assert any(r.levelname == "ERROR" and "uarantine" in r.getMessage() for r in caplog.records)
        assert not spool_files(spool_dir)  # everything replayed or kept aside

        again = manager.replay_spool()
        assert (again.replayed, again.quarantined, again.remaining) == (0, 0, 0)
        assert len(quarantined(spool_dir)) == 1
        assert day_counters(redis_client) == {"u:alice": 2 * self.GOOD, "g": 2 * self.GOOD}

    def test_a_settlement_the_store_refuses_is_quarantined(
        self,
        redis_url: str,
        redis_client: redis.Redis,
        managers: Callable[..., BudgetManager],
        spool_dir: Path,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """
        A settlement naming a reservation taken at another time ("was taken at"): the
        store refuses it every time, so it used to block every later entry. Now it
        is quarantined with the store's words, and the entries after it replay.
        """
        day = server_day(redis_client)
        manager = managers(redis_url)
        held = manager.reserve("alice", 2.0, reservation_id="r1")
        settle = {"seq": 2, "kind": "settle", "op": "r1", "at": held.held_at_ms - 1}
        settle.update({"fields": ["u:alice", "g"], "amount": NANO // 2, "state": "committed"})
        lines = [
            spend_line(1, "good1", self.GOOD, day),
            json.dumps(settle),
            spend_line(3, "good3", self.GOOD, day),
        ]
        dead_spool(spool_dir, redis_url, lines)
        summary = manager.replay_spool()
        assert summary.error is None
        assert (summary.recorded, summary.rejected, summary.quarantined) == (2, 1, 1)
        assert summary.remaining == 0
        expected = 2 * NANO + 2 * self.GOOD  # the hold, never settled, and the two spends
        assert day_counters(redis_client) == {"u:alice": expected, "g": expected}
        assert manager.usage("alice")["user"].spent_nano == expected
        (record,) = quarantined(spool_dir)
        assert record["entry"] == settle
        assert "was taken at" in record["reason"]
        assert any(
            r.levelname == "ERROR" and "was taken at" in r.getMessage() for r in caplog.records
        )
        assert not spool_files(spool_dir)
        assert manager.reservation("r1").state == "held"

        again = manager.replay_spool()
        assert (again.replayed, again.quarantined) == (0, 0)
        assert len(quarantined(spool_dir)) == 1
        assert day_counters(redis_client) == {"u:alice": expected, "g": expected}

    def test_a_spend_whose_key_names_another_charge_is_quarantined(
        self,
        redis_url: str,
        redis_client: redis.Redis,
        managers: Callable[..., BudgetManager],
        spool_dir: Path,
    ) -> None:
        """The same idempotency key as a recorded spend of another amount: refused, kept aside."""
        day = server_day(redis_client)
        manager = managers(redis_url)
        manager.record_spend("alice", 1.0, idempotency_key="k1")
        lines = [
            spend_line(1, "k1", 5, day),  # same key, another amount
            spend_line(2, "good2", self.GOOD, day),
        ]
        dead_spool(spool_dir, redis_url, lines)
        summary = manager.replay_spool()
        assert summary.error is None
        assert (summary.recorded, summary.rejected, summary.quarantined) == (1, 1, 1)
        assert day_counters(redis_client) == {"u:alice": NANO + self.GOOD, "g": NANO + self.GOOD}
        (record,) = quarantined(spool_dir)
        assert record["entry"]["op"] == "k1"
        assert manager.replay_spool().replayed == 0


class TestQuarantineAcrossReplays:
    """Quarantine and torn lines when a replay stops part-way (the store went away)."""

    def test_an_unavailable_store_still_stops_the_replay(
        self,
        proxy: TcpProxy,
        redis_client: redis.Redis,
        managers: Callable[..., BudgetManager],
        spool_dir: Path,
    ) -> None:
        """
        Unreadable lines are quarantined at once (that needs no store), but the
        entries wait: the first replay, with the store down, stops with the rest
        spooled; the next one records them, and quarantines nothing twice.
        """
        day = server_day(redis_client)
        lines = [
            spend_line(1, "good1", 10, day),
            spend_line(2, "bad", 5, 10**15),
            spend_line(3, "good3", 20, day),
        ]
        torn = spend_line(4, "torn", 7, day).encode()[:-9]
        path = dead_spool(spool_dir, proxy.url, lines, tail=torn)
        manager = managers(proxy.url, **FAST)
        proxy.refuse()
        first = manager.replay_spool()
        proxy.pass_through()
        assert first.error is not None
        assert (first.replayed, first.remaining, first.quarantined, first.torn_lines) == (
            0,
            2,
            1,
            1,
        )
        assert spool_files(spool_dir) == [path]
        assert len(quarantined(spool_dir)) == 1

        second = manager.replay_spool()
        assert second.error is None
        # The torn last line was counted once; once written after, it is no quarantine case.
        assert (second.recorded, second.quarantined, second.torn_lines) == (2, 0, 0)
        assert day_counters(redis_client) == {"u:alice": 30, "g": 30}
        assert len(quarantined(spool_dir)) == 1
        assert not spool_files(spool_dir)

    def test_a_torn_line_in_the_middle_is_quarantined(
        self,
        redis_url: str,
        redis_client: redis.Redis,
        managers: Callable[..., BudgetManager],
        spool_dir: Path,
    ) -> None:
        """Only a torn *last* line is a crash's normal trace; one followed by more is kept."""
        day = server_day(redis_client)
        cut = '{"seq": 2, "kind": "spend", "op": "b", "at"'
        lines = [spend_line(1, "a", 10, day), cut, spend_line(3, "c", 20, day)]
        dead_spool(spool_dir, redis_url, lines)
        summary = managers(redis_url).replay_spool()
        assert (summary.recorded, summary.quarantined, summary.torn_lines) == (2, 1, 0)
        assert [r["raw"] for r in quarantined(spool_dir)] == [cut]

    def test_bad_lines_of_an_adopted_namesake_are_quarantined(
        self,
        proxy: TcpProxy,
        managers: Callable[..., BudgetManager],
        redis_client: redis.Redis,
        spool_dir: Path,
    ) -> None:
        """A dead process's file with our pid becomes ours; its bad lines are quarantined."""
        day = server_day(redis_client)
        lines = [spend_line(7, "old", 40, day, ["g"]), spend_line(8, "bad", 5, -800_000)]
        dead = dead_spool(spool_dir, proxy.url, lines)
        path = dead.with_name(dead.name.replace("999999999", str(os.getpid())))
        dead.rename(path)
        manager = managers(proxy.url, **FAST)
        proxy.refuse()
        receipt = manager.record_spend("alice", 1e-7)
        assert receipt.status == "spooled"  # the file is adopted
        proxy.pass_through()
        # The automatic replay may have started: what it did is not in this summary.
        summary = manager.replay_spool()
        assert summary.error is None
        wait_for(lambda: not spool_files(spool_dir))
        assert day_counters(redis_client) == {"g": 140, "u:alice": 100}
        (record,) = quarantined(spool_dir)
        assert record["raw"] == lines[1]
        assert record["line"] == 3
        assert quarantine_files(spool_dir) == [path.with_suffix(".quarantine")]
        assert manager.replay_spool().quarantined == 0
        assert len(quarantined(spool_dir)) == 1

    def test_a_line_that_cannot_be_quarantined_stays_in_the_spool(
        self,
        redis_url: str,
        redis_client: redis.Redis,
        managers: Callable[..., BudgetManager],
        spool_dir: Path,
    ) -> None:
        """
        When the quarantine file cannot be written, the bad line and the refused
        entry stay in the spool file (never dropped), the rest still replays, and
        a later replay quarantines them.
        """
        day = server_day(redis_client)
        manager = managers(redis_url)
        manager.reserve("alice", 2.0, reservation_id="r1")
        settle = {"seq": 3, "kind": "settle", "op": "r1", "at": day - 86_400_000, "fields": ["g"]}
        refused = json.dumps({**settle, "amount": 0, "state": "released"})
        lines = [spend_line(1, "good", 10, day), nested(50), refused]
        path = dead_spool(spool_dir, redis_url, lines)
        blocker = path.with_suffix(".quarantine")
        blocker.mkdir()  # not a file: cannot be appended to
        first = manager.replay_spool()
        assert (first.recorded, first.quarantined, first.remaining, first.rejected) == (1, 0, 2, 0)
        assert first.error is None
        assert spool_files(spool_dir) == [path]
        blocker.rmdir()
        second = manager.replay_spool()
        assert (second.recorded, second.quarantined, second.rejected) == (0, 2, 1)
        assert [r.get("raw", r.get("entry")) for r in quarantined(spool_dir)] == [
            nested(50),
            json.loads(refused),
        ]
        assert not spool_files(spool_dir)
        assert day_counters(redis_client) == {"u:alice": 2 * NANO + 10, "g": 2 * NANO + 10}

    def test_cli_reports_the_quarantine(
        self,
        redis_url: str,
        redis_client: redis.Redis,
        spool_dir: Path,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """``replay-spool`` says how many lines were quarantined and where they are kept."""
        day = server_day(redis_client)
        lines = [spend_line(1, "good", 10, day), nested(100_000), spend_line(3, "bad", 10**20, day)]
        dead_spool(spool_dir, redis_url, lines)
        args = ["replay-spool", "--spool-dir", str(spool_dir), "--redis-url", redis_url]
        assert main([*args, "--json"]) == 0
        doc = json.loads(capsys.readouterr().out)
        (qfile,) = quarantine_files(spool_dir)
        assert (doc["recorded"], doc["quarantined"]) == (1, 2)
        assert doc["quarantine_files"] == [str(qfile)]
        dead_spool(spool_dir, redis_url, [spend_line(1, "bogus", 1, day, ["q"])])
        assert main(args) == 0
        out, err = capsys.readouterr()
        assert "1 line(s) quarantined" in out + err
        assert str(qfile) in out + err
        assert len(quarantined(spool_dir)) == 3
