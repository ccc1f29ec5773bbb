"""
The ledger's promises at its edges, against a real redis-server: ids reused for
another payment, counters at Redis's integer limit, holds whose record or reply
was lost, and amounts that are numbers of other types.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import pytest
import redis

from coreason_budget import (
    AsyncBudgetManager,
    BudgetConfig,
    BudgetManager,
    BudgetUnavailableError,
    IdempotencyConflictError,
    InvalidInputError,
    Receipt,
)

from .conftest import ManagerFactory, day_key
from .tcp_proxy import TcpProxy
from .test_fail_closed import hang_bound
from .test_faults import FAST, counters, wait_for

NANO = 1_000_000_000


def snapshot(client: redis.Redis) -> dict[str, object]:
    """Every key and its value: a refused write must leave this unchanged."""
    out: dict[str, object] = {}
    for key in client.scan_iter("*"):
        kind = client.type(key)
        out[key] = client.hgetall(key) if kind == "hash" else client.get(key)
    return out


class TestIdReuse:
    """An id names one payment: the same payload again is a no-op, another one is refused."""

    def test_a_spend_key_reused_for_another_user_is_refused(
        self, budget: BudgetManager, redis_client: redis.Redis
    ) -> None:
        """bob's spend under alice's key was acknowledged and recorded as $0."""
        first = budget.record_spend("alice", 5.0, idempotency_key="invoice-1")
        assert first == Receipt("recorded", "spend", "invoice-1", 5 * NANO)
        before = snapshot(redis_client)
        with pytest.raises(IdempotencyConflictError, match="invoice-1"):
            budget.record_spend("bob", 7.0, idempotency_key="invoice-1")
        assert snapshot(redis_client) == before

    @pytest.mark.parametrize(
        "change",
        [
            {"cost": 5.01},
            {"project_id": "p"},
            {"model": "gpt-4o"},
            {"user_id": "Alice"},
        ],
    )
    def test_any_other_payload_is_refused(
        self, budget: BudgetManager, redis_client: redis.Redis, change: dict[str, object]
    ) -> None:
        call: dict[str, object] = {"user_id": "alice", "cost": 5.0, "idempotency_key": "k"}
        budget.record_spend(**call)  # type: ignore[arg-type]
        before = snapshot(redis_client)
        with pytest.raises(IdempotencyConflictError):
            budget.record_spend(**{**call, **change})  # type: ignore[arg-type]
        assert snapshot(redis_client) == before

    def test_the_same_payload_is_a_duplicate(self, budget: BudgetManager) -> None:
        budget.record_spend("alice", 5.0, "p", "gpt-4o", idempotency_key="k")
        again = budget.record_spend("alice", Decimal("5.000"), "p", "gpt-4o", idempotency_key="k")
        assert again == Receipt("duplicate", "spend", "k", 0)
        assert budget.usage("alice", "p")["user"].spent_nano == 5 * NANO

    def test_a_reservation_id_reused_for_another_user_is_refused(
        self, budget: BudgetManager, redis_client: redis.Redis
    ) -> None:
        """bob's reserve under alice's id returned a handle whose commit charged alice."""
        alice = budget.reserve("alice", 5.0, reservation_id="r1")
        before = snapshot(redis_client)
        with pytest.raises(IdempotencyConflictError, match="r1"):
            budget.reserve("bob", 5.0, reservation_id="r1")
        with pytest.raises(IdempotencyConflictError):
            budget.reserve("alice", 4.0, reservation_id="r1")
        with pytest.raises(IdempotencyConflictError):
            budget.reserve("alice", 5.0, project_id="p", reservation_id="r1")
        assert snapshot(redis_client) == before
        again = budget.reserve("alice", 5.0, reservation_id="r1")
        assert (again.state, again.estimate_nano) == ("held", 5 * NANO)
        alice.commit(1.0)
        assert budget.usage("bob")["user"].spent_nano == 0
        assert budget.usage("alice")["user"].spent_nano == NANO

    def test_a_conflict_is_not_spooled(self, budget: BudgetManager, spool_dir: object) -> None:
        """The store answered: refusing is its answer, nothing waits to be charged later."""
        budget.record_spend("alice", 1.0, idempotency_key="k")
        with pytest.raises(IdempotencyConflictError):
            budget.record_spend("alice", 2.0, idempotency_key="k")
        assert budget.replay_spool().replayed == 0


class TestCounterOverflow:
    """A counter near 2^63 refuses before the first write, never half an operation."""

    def near_the_top(self, budget: BudgetManager, redis_client: redis.Redis, field: str) -> None:
        key = day_key(budget)
        redis_client.hset(key, field, str(2**63 - 10))

    @pytest.mark.parametrize("field", ["g", "u:alice", "p:p", "m:gpt-4o"])
    def test_spend(self, budget: BudgetManager, redis_client: redis.Redis, field: str) -> None:
        self.near_the_top(budget, redis_client, field)
        before = snapshot(redis_client)
        with pytest.raises(InvalidInputError, match="largest amount"):
            budget.record_spend("alice", 1.0, "p", "gpt-4o", idempotency_key="k")
        assert snapshot(redis_client) == before  # no marker, no counter
        assert budget.replay_spool().replayed == 0  # and nothing spooled

    def test_commit_above_the_hold(self, budget: BudgetManager, redis_client: redis.Redis) -> None:
        held = budget.reserve("alice", 1.0)
        self.near_the_top(budget, redis_client, "g")
        before = snapshot(redis_client)
        with pytest.raises(InvalidInputError, match="largest amount"):
            held.commit(2.0)
        assert snapshot(redis_client) == before
        assert held.state == "held"
        held.commit(0.5)  # a refund still settles it
        assert held.state == "committed"

    def test_a_counter_that_is_not_a_count(
        self, budget: BudgetManager, redis_client: redis.Redis, spool_dir: object
    ) -> None:
        """
        Someone wrote text into a counter: the spend is refused before its
        marker is written (it was half written, then a "duplicate" for ever),
        and a spooled copy is quarantined, not a replay stopped at it for ever.
        """
        key = day_key(budget)
        redis_client.hset(key, "u:alice", "abc")
        before = snapshot(redis_client)
        with pytest.raises(InvalidInputError, match="not a count"):
            budget.record_spend("alice", 1.0, idempotency_key="k")
        assert snapshot(redis_client) == before

    def test_counters_that_are_no_hash(
        self, make_manager: ManagerFactory, redis_client: redis.Redis
    ) -> None:
        """
        The day's key holds a string (not ours): the spend fails closed, its
        marker taken back, rather than being called too big.
        """
        budget = make_manager(spool_dir="off")
        key = day_key(budget)
        redis_client.set(key, "not a hash")
        before = snapshot(redis_client)
        with pytest.raises(BudgetUnavailableError, match="WRONGTYPE"):
            budget.record_spend("alice", 1.0, idempotency_key="k")
        assert snapshot(redis_client) == before

    def test_reserve(self, make_manager: ManagerFactory, redis_client: redis.Redis) -> None:
        """The model counter has no limit to refuse first."""
        budget = make_manager()
        self.near_the_top(budget, redis_client, "m:gpt-4o")
        before = snapshot(redis_client)
        with pytest.raises(InvalidInputError, match="model gpt-4o"):
            budget.reserve("alice", 1.0, model="gpt-4o")
        assert snapshot(redis_client) == before


class TestLostRecord:
    """A reservation whose record the store lost (restarted empty) is still settled once."""

    def test_commit_records_once_and_the_id_still_answers(
        self, budget: BudgetManager, redis_client: redis.Redis
    ) -> None:
        held = budget.reserve("alice", 2.0, project_id="p", model="gpt-4o", reservation_id="r1")
        redis_client.flushall()
        assert held.commit(1.5).status == "recorded"
        assert budget.usage("alice", "p")["project"].spent_nano == 1_500_000_000
        found = budget.reservation("r1")  # was KeyError('u') from the tombstone
        assert (found.state, found.user_id, found.project_id, found.model) == (
            "committed",
            "alice",
            "p",
            "gpt-4o",
        )
        assert found.commit(1.5).status == "duplicate"
        assert budget.reserve("alice", 2.0, "p", "gpt-4o", reservation_id="r1").state == (
            "committed"
        )
        assert budget.usage("alice", "p")["project"].spent_nano == 1_500_000_000

    def test_a_handle_from_what_the_caller_knows(
        self, budget: BudgetManager, redis_client: redis.Redis
    ) -> None:
        """Another worker (the HTTP service) settles a lost hold from its user and held_at."""
        held = budget.reserve("alice", 2.0, project_id="p", reservation_id="r1")
        redis_client.flushall()
        with pytest.raises(Exception, match="no reservation"):
            budget.reservation("r1")
        again = budget.reservation("r1", user_id="alice", project_id="p", held_at=held.held_at)
        assert again.commit(1.25).status == "recorded"
        assert again.commit(1.25).status == "recorded"  # the handle's own receipt, once
        assert budget.reservation("r1", user_id="alice", held_at=held.held_at).state == "committed"
        assert budget.usage("alice", "p")["user"].spent_nano == 1_250_000_000


class TestWrongDay:
    """A settlement naming another instant than its reservation's is bad input, never spooled."""

    def test_refused_with_nothing_written(
        self, budget: BudgetManager, redis_client: redis.Redis
    ) -> None:
        held = budget.reserve("alice", 1.0, reservation_id="r1")
        before = snapshot(redis_client)
        with pytest.raises(InvalidInputError, match="was taken at"):
            budget._run(
                budget._core.ledger.settle(
                    budget._core.scopes("alice", None, None),
                    "r1",
                    held.held_at_ms - 1,
                    0,
                    "released",
                )
            )
        assert snapshot(redis_client) == before


class TestReserveWhoseRepliesAreLost:
    """A hold the library cannot confirm is undone; the error names its id."""

    def test_spooled_release_undoes_the_hold(
        self, proxy: TcpProxy, managers: Callable[..., BudgetManager], redis_client: redis.Redis
    ) -> None:
        manager = managers(proxy.url, **{**FAST, "retries": 0})
        manager.usage("alice")  # connect
        proxy.drop_replies(1)
        with pytest.raises(BudgetUnavailableError) as info:
            manager.reserve("alice", 2.0, reservation_id="r1")
        assert info.value.reservation_id == "r1"
        assert "r1" in "".join(getattr(info.value, "__notes__", []))
        assert counters(redis_client)["u:alice"] == 2 * NANO  # the server took the hold
        summary = manager.replay_spool()
        assert summary.recorded == 1
        assert counters(redis_client)["u:alice"] == 0
        assert manager.reservation("r1").state == "released"

    def test_the_connections_retry_resends_it_and_it_holds_once(
        self, proxy: TcpProxy, managers: Callable[..., BudgetManager], redis_client: redis.Redis
    ) -> None:
        """
        With retries, the lost reply is a timeout that the connection's retry
        policy answers by sending the reserve again on a new connection: the
        store finds the hold it took, and the caller gets it, held once.
        """
        manager = managers(proxy.url, **{**FAST, "retries": 1})
        manager.usage("alice")
        proxy.drop_replies(1)
        held = manager.reserve("alice", 2.0, reservation_id="r1")
        assert (held.state, held.estimate_nano) == ("held", 2 * NANO)
        assert counters(redis_client)["u:alice"] == 2 * NANO
        assert held.commit(1.0).status == "recorded"
        assert counters(redis_client)["u:alice"] == NANO

    def test_the_async_retry_resends_it_too(
        self, proxy: TcpProxy, redis_client: redis.Redis, tmp_path: Path
    ) -> None:
        """:meth:`test_the_connections_retry_resends_it_and_it_holds_once`, awaited."""

        async def main() -> None:
            config = BudgetConfig(
                redis_url=proxy.url, spool_dir=str(tmp_path), **{**FAST, "retries": 1}
            )
            async with AsyncBudgetManager(config) as manager:
                await manager.usage("alice")
                proxy.drop_replies(1)
                held = await manager.reserve("alice", 2.0, reservation_id="r1")
                assert (held.state, held.estimate_nano) == ("held", 2 * NANO)
                assert counters(redis_client)["u:alice"] == 2 * NANO

        asyncio.run(main())

    def test_without_a_spool_it_is_released_directly(
        self, proxy: TcpProxy, managers: Callable[..., BudgetManager], redis_client: redis.Redis
    ) -> None:
        manager = managers(proxy.url, **{**FAST, "retries": 0}, spool_dir="off")
        manager.usage("alice")
        proxy.drop_replies(1)
        with pytest.raises(BudgetUnavailableError) as info:
            manager.reserve("alice", 2.0, reservation_id="r1")
        assert info.value.reservation_id == "r1"
        wait_for(lambda: counters(redis_client)["u:alice"] == 0)  # in the background
        assert manager.reservation("r1").state == "released"

    @pytest.mark.timeout(30)
    def test_the_error_does_not_wait_for_the_release(
        self, proxy: TcpProxy, managers: Callable[..., BudgetManager]
    ) -> None:
        """A stalled store, no spool: the reserve fails within the bound all the same."""
        manager = managers(proxy.url, **FAST, spool_dir="off")
        proxy.blackhole()
        start = time.monotonic()
        with pytest.raises(BudgetUnavailableError) as info:
            manager.reserve("alice", 2.0)
        assert time.monotonic() - start < hang_bound(manager.config)
        assert info.value.reservation_id

    def test_a_reserve_that_never_landed_cannot_land_later(
        self, proxy: TcpProxy, managers: Callable[..., BudgetManager]
    ) -> None:
        """The release leaves a tombstone: the same id arriving afterwards holds nothing."""
        manager = managers(proxy.url, **FAST)
        proxy.refuse()
        with pytest.raises(BudgetUnavailableError) as info:
            manager.reserve("alice", 2.0, reservation_id="r1")
        assert info.value.reservation_id == "r1"
        proxy.pass_through()
        assert manager.replay_spool().recorded == 1
        late = manager.reserve("alice", 2.0, reservation_id="r1")
        assert late.state == "released"
        assert manager.usage("alice")["user"].spent_nano == 0


class TestAmountTypes:
    """Float and int subclasses (numpy's, enums) are their plain value; never a stray error."""

    def test_numpy(self, budget: BudgetManager) -> None:
        numpy = pytest.importorskip("numpy")
        assert budget.record_spend("alice", numpy.float64(0.05)).amount_nano == 50_000_000
        assert budget.record_spend("alice", numpy.int64(2)).amount_nano == 2 * NANO
        budget.check_availability("alice", numpy.float64(0.05))
        with budget.reserve("alice", numpy.float64(0.5)) as r:
            r.commit(numpy.float64(0.25))
        assert budget.usage("alice")["user"].spent_nano == 2_300_000_000
        with pytest.raises(InvalidInputError):
            budget.record_spend("alice", numpy.float64("nan"))
        with pytest.raises(InvalidInputError):
            budget.record_spend("alice", numpy.float32(0.05))  # not exactly 0.05: refused

    def test_subclasses(self, budget: BudgetManager) -> None:
        class Price(float):
            def __repr__(self) -> str:
                return f"Price({float(self)})"

        class Cents(enum.IntEnum):
            ONE = 1

        assert budget.record_spend("alice", Price(0.05)).amount_nano == 50_000_000
        assert budget.record_spend("alice", Cents.ONE).amount_nano == NANO
        with pytest.raises(InvalidInputError):
            budget.record_spend("alice", Price(-1.0))


class TestReportReadsIncrementally:
    """A report on a day of many counters never holds the store in one long command."""

    def test_many_users(self, budget: BudgetManager, redis_client: redis.Redis) -> None:
        key = day_key(budget)
        spent = {f"user-{i:05d}": (i * 7919) % 1000 for i in range(20_000)}
        pipe = redis_client.pipeline(transaction=False)
        for user, nano in spent.items():
            pipe.hset(key, f"u:{user}", nano)
        pipe.hset(key, "g", sum(spent.values()))
        pipe.execute()
        expected = sorted(spent.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
        redis_client.hset(budget._core.ledger._limits_keys["day"], f"u:{expected[1][0]}", 123)
        redis_client.config_resetstat()

        report = budget.report(top=5)

        assert [(u.entity_id, u.spent_nano) for u in report.users] == expected
        assert report.total.spent_nano == sum(spent.values())
        assert [u.limit_nano for u in report.users] == [10 * NANO, 123, *[10 * NANO] * 3]
        assert len(budget.report().users) == 20_000
        stats = redis_client.info("commandstats")
        assert "cmdstat_hgetall" not in stats
        assert stats["cmdstat_hscan"]["calls"] >= 20  # about 1,000 fields a step


class TestKeyReusedWhileSpooled:
    """
    "Spooled" promises a charge made exactly once: a key already spooled for
    another payment is refused at once, not told "spooled" and then refused
    (quarantined) when the store is back.
    """

    def test_refused_while_the_store_is_away(
        self, proxy: TcpProxy, managers: Callable[..., BudgetManager], redis_client: redis.Redis
    ) -> None:
        manager = managers(proxy.url, **FAST)
        proxy.refuse()
        assert manager.record_spend("alice", 5.0, idempotency_key="invoice-1").status == "spooled"
        with pytest.raises(IdempotencyConflictError, match="invoice-1"):
            manager.record_spend("bob", 7.0, idempotency_key="invoice-1")
        again = manager.record_spend("alice", 5.0, idempotency_key="invoice-1")
        assert again.status == "spooled"  # the same spend: still charged once
        proxy.pass_through()
        summary = manager.replay_spool()
        assert (summary.recorded, summary.quarantined) == (1, 0)
        assert counters(redis_client) == {"u:alice": 5 * NANO, "g": 5 * NANO}
