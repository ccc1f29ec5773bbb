"""
Fault injection between the client and a real redis-server, through a TCP proxy.

A dead store is easy to simulate; the faults that matter for a ledger are
subtler: the server executed the script but its reply was lost (the client's
retry must not charge twice), the store stalls (calls must fail within the
configured bound, and the same manager must recover), the store restarts
empty (scripts reload), and a burst outgrows the pool (a bounded wait, then a
clear error).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from coreason_budget import (
    AsyncBudgetManager,
    BudgetConfig,
    BudgetManager,
    BudgetUnavailableError,
    Receipt,
)

from .redis_server import RedisServer
from .tcp_proxy import TcpProxy

NANO = 1_000_000_000
# Short timeouts keep the fault tests fast; every bound below scales with them.
FAST: dict[str, Any] = {"connect_timeout": 0.2, "socket_timeout": 0.2, "retries": 2}
DAY_KEY_GLOB = "{coreason_budget}:day:*"


def hang_bound(config: BudgetConfig) -> float:
    """The longest a failing call may take: every attempt timing out, plus slack."""
    return (config.retries + 1) * (config.connect_timeout + config.socket_timeout) + 1.0


def counters(client: redis.Redis) -> dict[str, int]:
    """Every counter of today (the only day these tests write), straight from the store."""
    keys = list(client.scan_iter(DAY_KEY_GLOB))
    assert len(keys) <= 1, keys
    if not keys:
        return {}
    raw: dict[str, str] = client.hgetall(keys[0])  # type: ignore[assignment]
    return {k: int(v) for k, v in raw.items()}


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """For what a background thread does (the spool's automatic replay)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def evalsha_calls(client: redis.Redis) -> int:
    stats = client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


class TestLostReply:
    """The server ran the script, the reply never came: the retry must charge nothing more."""

    @pytest.mark.parametrize("lost", [1, 2])
    def test_record_spend(
        self,
        lost: int,
        proxy: TcpProxy,
        managers: Callable[..., BudgetManager],
        redis_client: redis.Redis,
    ) -> None:
        manager = managers(proxy.url, **FAST)
        manager.usage("warm-up")
        before = evalsha_calls(redis_client)
        proxy.drop_replies(lost)
        manager.record_spend("alice", 1.25, project_id="p", model="m")
        assert proxy.dropped == lost
        # The server did run it once per attempt; only the first charged.
        assert evalsha_calls(redis_client) - before == lost + 1
        assert counters(redis_client) == {
            "u:alice": 1_250_000_000,
            "p:p": 1_250_000_000,
            "g": 1_250_000_000,
            "m:m": 1_250_000_000,
        }

    def test_reserve(
        self, proxy: TcpProxy, managers: Callable[..., BudgetManager], redis_client: redis.Redis
    ) -> None:
        manager = managers(proxy.url, **FAST)
        manager.usage("warm-up")
        proxy.drop_replies(1)
        held = manager.reserve("alice", 2.0, project_id="p")
        assert proxy.dropped == 1
        assert held.state == "held"
        assert held.estimate_nano == 2 * NANO
        assert counters(redis_client) == {"u:alice": 2 * NANO, "p:p": 2 * NANO, "g": 2 * NANO}
        held.commit(0.5)
        assert counters(redis_client) == {"u:alice": NANO // 2, "p:p": NANO // 2, "g": NANO // 2}

    @pytest.mark.parametrize("settle", ["commit", "release"])
    def test_settle(
        self,
        settle: str,
        proxy: TcpProxy,
        managers: Callable[..., BudgetManager],
        redis_client: redis.Redis,
    ) -> None:
        manager = managers(proxy.url, **FAST)
        held = manager.reserve("alice", 2.0, project_id="p")
        proxy.drop_replies(1)
        if settle == "commit":
            held.commit(0.75)
        else:
            held.release()
        assert proxy.dropped == 1
        assert held.state == ("committed" if settle == "commit" else "released")
        expected = 750_000_000 if settle == "commit" else 0
        assert counters(redis_client) == {"u:alice": expected, "p:p": expected, "g": expected}

    def test_without_retries_the_spool_replays_it_once(
        self, proxy: TcpProxy, managers: Callable[..., BudgetManager], redis_client: redis.Redis
    ) -> None:
        """
        No retry left: the server charged but the reply was lost, so the caller
        is told "spooled" (saved, charged once). The spooled copy replays as a
        duplicate: charged once.
        """
        manager = managers(proxy.url, **{**FAST, "retries": 0})
        held = manager.reserve("alice", 2.0, reservation_id="r1")
        proxy.drop_replies(2)
        assert manager.record_spend("alice", 1.0, idempotency_key="k1").status == "spooled"
        assert held.commit(1.5).status == "spooled"
        assert held.state == "committed"  # settled as far as its holder goes: the spool has it
        assert proxy.dropped == 2
        assert counters(redis_client)["u:alice"] == 2_500_000_000  # both ran on the server
        summary = manager.replay_spool()
        assert (summary.recorded, summary.duplicates, summary.remaining) == (0, 2, 0)
        assert counters(redis_client) == {"u:alice": 2_500_000_000, "g": 2_500_000_000}
        assert held.commit(1.5).status == "spooled"  # the same answer; nothing more is charged
        assert manager.record_spend("alice", 1.0, idempotency_key="k1").status == "duplicate"
        assert counters(redis_client)["u:alice"] == 2_500_000_000


class TestStall:
    """The store stops answering (a blackhole): fail within the bound, recover after."""

    @pytest.mark.timeout(60)
    def test_fails_within_the_bound_and_the_same_manager_recovers(
        self, proxy: TcpProxy, managers: Callable[..., BudgetManager], redis_client: redis.Redis
    ) -> None:
        manager = managers(proxy.url, **FAST)
        held = manager.reserve("alice", 2.0)
        bound = hang_bound(manager.config)
        proxy.blackhole()
        operations: list[Callable[[], object]] = [
            lambda: manager.check_availability("alice", 1.0),
            lambda: manager.reserve("alice", 1.0),
            lambda: manager.record_spend("alice", 0.25),
            lambda: manager.usage("alice"),
            lambda: held.commit(1.0),
            manager.ping,
        ]
        for operation in operations:
            start = time.monotonic()
            try:
                result = operation()
            except BudgetUnavailableError:
                pass
            else:  # a write is saved to the spool instead: "spooled", never "recorded"
                assert isinstance(result, Receipt)
                assert result.status == "spooled"
            elapsed = time.monotonic() - start
            assert elapsed < bound, f"took {elapsed:.2f}s, bound {bound:.2f}s"
            # It waited for the store: a timeout, not a refusal.
            assert elapsed >= manager.config.socket_timeout * 0.9
        assert held.state == "committed"  # spooled: the spool settles it

        proxy.pass_through()
        assert manager.usage("alice")["user"].spent_nano >= 2 * NANO  # same manager, same pool
        # The spend, the commit and the release of the reserve that timed out
        # (it may have taken its hold) were spooled, and replay on their own.
        wait_for(lambda: counters(redis_client)["u:alice"] == 1_250_000_000)
        assert manager.replay_spool().replayed == 0  # the spool is empty again

    @pytest.mark.timeout(60)
    def test_cut_mid_stall_fails_fast_and_recovers(
        self, proxy: TcpProxy, managers: Callable[..., BudgetManager]
    ) -> None:
        """Connections cut while callers wait: the callers fail at once, not at their timeout."""
        manager = managers(proxy.url, **{**FAST, "socket_timeout": 5.0, "retries": 0})
        manager.usage("warm-up")
        proxy.blackhole()
        errors: list[BaseException] = []

        def call() -> None:
            try:
                manager.usage("alice")
            except BaseException as e:
                errors.append(e)

        thread = threading.Thread(target=call)
        start = time.monotonic()
        thread.start()
        time.sleep(0.2)
        proxy.refuse()
        thread.join(timeout=10)
        assert not thread.is_alive()
        assert time.monotonic() - start < 2.0
        assert len(errors) == 1
        assert isinstance(errors[0], BudgetUnavailableError)
        proxy.pass_through()
        assert manager.usage("alice")["user"].spent_nano == 0


class TestRestart:
    """What test_fail_closed does not cover: faults around the script's reload."""

    @pytest.mark.timeout(60)
    def test_lost_script_load_reply_after_a_restart(
        self, own_redis: RedisServer, managers: Callable[..., BudgetManager]
    ) -> None:
        """
        An empty store (restarted without persistence) has no script; the
        SCRIPT LOAD's reply is lost too. The retry loads it again, and charges once.
        """
        proxy = TcpProxy(own_redis.port)
        try:
            manager = managers(proxy.url, **FAST)
            manager.record_spend("alice", 1.0)
            own_redis.kill()
            with pytest.raises(BudgetUnavailableError):
                manager.usage("alice")
            own_redis.start()
            proxy.drop_replies(1, command="SCRIPT")
            manager.record_spend("alice", 0.5, idempotency_key="after-restart")
            assert proxy.dropped == 1
            client = own_redis.client()
            try:
                assert counters(client)["u:alice"] == 500_000_000
            finally:
                client.close()
        finally:
            proxy.close()

    @pytest.mark.timeout(60)
    def test_cut_and_script_flush_under_concurrent_load(
        self,
        proxy: TcpProxy,
        managers: Callable[..., BudgetManager],
        redis_client: redis.Redis,
        tmp_path: Path,
    ) -> None:
        """
        Every pooled connection cut and the script flushed, again and again,
        while threads spend: a call may fail closed (its retries all cut), but
        no spend is lost or doubled once the spool is replayed.
        """
        manager = managers(proxy.url, **FAST)
        stop = threading.Event()
        unexpected: list[BaseException] = []
        ok, failed = [0] * 8, [0] * 8

        def spend(i: int) -> None:
            while not stop.is_set():
                try:
                    manager.record_spend(f"user{i}", 0.001)
                    ok[i] += 1
                except BudgetUnavailableError:
                    failed[i] += 1
                except BaseException as e:
                    unexpected.append(e)
                    return

        threads = [threading.Thread(target=spend, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for _ in range(5):
            time.sleep(0.05)
            proxy.cut()
            redis_client.script_flush()
        stop.set()
        for t in threads:
            t.join(timeout=20)
        assert not unexpected, unexpected
        assert sum(ok) > 100
        # Whatever the automatic replay has not done yet (it runs after any success).
        assert manager.replay_spool().error is None
        assert not list((tmp_path / "spool").glob("*.spool"))
        totals = counters(redis_client)
        assert totals["g"] == (sum(ok) + sum(failed)) * 1_000_000
        assert all(totals[f"u:user{i}"] == (ok[i] + failed[i]) * 1_000_000 for i in range(8))


class TestPoolExhaustion:
    """More concurrent callers than connections, on a stalled store."""

    @pytest.mark.timeout(60)
    def test_bounded_wait_then_a_clear_error(
        self, proxy: TcpProxy, managers: Callable[..., BudgetManager]
    ) -> None:
        config: dict[str, Any] = {
            "pool_size": 2,
            "pool_timeout": 0.2,
            "connect_timeout": 0.2,
            "socket_timeout": 1.5,
            "retries": 0,
        }
        manager = managers(proxy.url, **config)
        proxy.blackhole()
        results: list[tuple[float, BaseException | None]] = []
        lock = threading.Lock()
        start = time.monotonic()

        def call() -> None:
            error: BaseException | None = None
            try:
                manager.check_availability("alice", 1.0)
            except BaseException as e:
                error = e
            with lock:
                results.append((time.monotonic() - start, error))

        threads = [threading.Thread(target=call) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=20)
        assert not any(t.is_alive() for t in threads)
        assert len(results) == 8
        assert all(isinstance(e, BudgetUnavailableError) for _, e in results), results
        exhausted = [(t, e) for t, e in results if "pool exhausted" in str(e)]
        # Two callers hold the two connections (and time out); the other six wait
        # pool_timeout, then are told why, long before the holders' timeout.
        assert len(exhausted) == 6, [str(e) for _, e in results]
        for elapsed, error in exhausted:
            assert elapsed < 0.2 + 0.8, elapsed
            assert "all 2 connections" in str(error)
            assert "pool_size" in str(error)
        assert max(t for t, _ in results) < hang_bound(manager.config)

        proxy.pass_through()
        manager.check_availability("alice", 1.0)  # the pool has its connections back


def _spend_often(manager: BudgetManager, times: int) -> None:
    for _ in range(times):
        assert manager.record_spend("alice", 0.01).status == "recorded"


class TestTheLane:
    """
    The sync manager keeps one pooled connection between script calls for the
    next caller (skipping the pool's checkout); it must never cost a caller
    its turn at the pool, nor a retry.
    """

    @pytest.mark.timeout(30)
    def test_a_caller_waiting_on_a_full_pool_gets_the_lanes_connection(
        self, redis_url: str, managers: Callable[..., BudgetManager]
    ) -> None:
        """
        With every other connection out, the lane hands its connection back to
        the pool after its call: a caller waiting there gets it at once, not
        after pool_timeout.
        """
        manager = managers(redis_url, pool_size=2, pool_timeout=10)
        manager.check_availability("alice", 1.0)  # the lane now holds one of the two
        pool = manager._store.client.connection_pool
        other = pool.get_connection()  # the other one: another caller's
        got: list[Any] = []
        waiter = threading.Thread(target=lambda: got.append(pool.get_connection()))
        waiter.start()
        manager.check_availability("alice", 1.0)
        waiter.join(timeout=5)
        assert got, "a caller was kept waiting for a connection idle in the lane"
        pool.release(got[0])
        pool.release(other)
        manager.record_spend("alice", 1.0)  # and the lane takes one again
        assert manager.usage("alice")["user"].spent_usd == 1.0

    def test_a_connection_the_server_dropped_is_started_afresh_without_a_retry(
        self, make_manager: Callable[..., BudgetManager], redis_client: redis.Redis
    ) -> None:
        """As the pool's checkout does: a hung-up connection is noticed before sending on it."""
        manager = make_manager(retries=0)
        for _ in range(3):
            assert manager.record_spend("alice", 1.0).status == "recorded"
            for client in redis_client.client_list():
                if client["name"] == "coreason-budget":
                    redis_client.client_kill_filter(_id=client["id"])
        assert manager.usage("alice")["user"].spent_usd == 3.0

    @pytest.mark.timeout(60)
    @pytest.mark.filterwarnings("ignore:This process:DeprecationWarning")
    def test_a_forked_child_never_sends_on_the_parents_lane(
        self, redis_url: str, managers: Callable[..., BudgetManager]
    ) -> None:
        """Children forked while the lane holds a connection each make their own."""
        manager = managers(redis_url)
        manager.check_availability("alice", 1.0)  # the lane holds a connection now
        ctx = multiprocessing.get_context("fork")
        children = [ctx.Process(target=_spend_often, args=(manager, 50)) for _ in range(3)]
        for child in children:
            child.start()
        _spend_often(manager, 50)
        for child in children:
            child.join(timeout=30)
            assert child.exitcode == 0
        assert manager.usage("alice")["user"].spent_nano == 4 * 50 * 10_000_000

    @pytest.mark.timeout(30)
    def test_a_command_does_not_wait_for_the_connection_idle_in_the_lane(
        self, redis_url: str, managers: Callable[..., BudgetManager]
    ) -> None:
        """Commands (set_limit, report, lookups) take the pool's: the lane empties first."""
        manager = managers(redis_url, pool_size=2, pool_timeout=10)
        manager.check_availability("alice", 1.0)  # the lane now holds one of the two
        pool = manager._store.client.connection_pool
        other = pool.get_connection()  # the other one: another caller's
        began = time.monotonic()
        manager.set_limit("user", "alice", 5.0)
        assert time.monotonic() - began < 5, "a command waited for the lane's connection"
        pool.release(other)
        assert manager.usage("alice")["user"].limit_usd == 5.0

    @pytest.mark.timeout(30)
    def test_async_one_connection_serves_script_calls_and_commands_in_turn(
        self, redis_url: str
    ) -> None:
        """
        The async manager's lane holds its pool's only connection between
        script calls; a command empties the lane rather than wait pool_timeout.
        """

        async def main() -> None:
            config = BudgetConfig(redis_url=redis_url, pool_size=1, pool_timeout=2.0)
            async with AsyncBudgetManager(config) as budget:
                for _ in range(2):
                    await budget.check_availability("alice", 1.0)
                    await budget.set_limit("user", "alice", 5.0)
                    await budget.record_spend("alice", 1.0)
                usage = await budget.usage("alice")
                assert usage["user"].spent_usd == 2.0
                assert usage["user"].limit_usd == 5.0

        asyncio.run(main())

    def test_async_a_connection_the_server_dropped_is_started_afresh_without_a_retry(
        self, redis_url: str, redis_client: redis.Redis
    ) -> None:
        """
        As redis.asyncio's checkout does: a connection the loop saw hung up is
        started afresh before sending on it.
        """

        async def main() -> None:
            async with AsyncBudgetManager(BudgetConfig(redis_url=redis_url, retries=0)) as budget:
                for _ in range(3):
                    assert (await budget.record_spend("alice", 1.0)).status == "recorded"
                    for client in redis_client.client_list():
                        if client["name"] == "coreason-budget":
                            redis_client.client_kill_filter(_id=client["id"])
                    await asyncio.sleep(0.05)  # the loop sees the hang-up (as between real calls)
                assert (await budget.usage("alice"))["user"].spent_usd == 3.0

        asyncio.run(main())
