"""
A Hypothesis state machine drives a BudgetManager on a real redis-server and
a pure-Python model of the ledger side by side, in integer nano-dollars.

Every step must agree exactly: whether a call raises, what the refusal reports,
the state and estimate of every reservation handle, and every usage number.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    rule,
    run_state_machine_as_test,
)

from coreason_budget import (
    BudgetConfig,
    BudgetExceededError,
    BudgetManager,
    IdempotencyConflictError,
    Reservation,
    ScopeUsage,
)

from .redis_server import RedisServer

NANO = 10**9
#: A fixed instant (2026-01-01 12:00 UTC): one day for the whole run.
FIXED_NOW = 1_767_268_800.0

#: Ids chosen to collide if the store's key or field names were naive: a user
#: named like a project field, braces of a Redis Cluster hash tag, the global field.
USERS = ["alice", "p:alice", "{x}"]
PROJECTS = ["alice", "g"]
#: One pool for reservation ids and idempotency keys: the two must not collide.
RECORD_IDS = ["id-0", "id-1", "id-2", "id-3"]
MODELS = ["gpt-x", "u:alice"]


def nano(amount: float | Decimal | int) -> int:
    """USD to nano-dollars, rounded up, computed independently of the library."""
    exact = Fraction(Decimal(repr(amount))) if isinstance(amount, float) else Fraction(amount)
    return math.ceil(exact * NANO)


amounts = st.one_of(
    st.decimals(0, 3, places=6),
    st.integers(0, 300).map(lambda c: c / 100),  # floats of a few digits: 0.07, 1.1
    st.integers(0, 3000).map(lambda m: m / 1000),
    st.floats(0, 3, allow_nan=False, allow_infinity=False),  # any float: sub-nano rounding
    st.integers(0, 3),
)
limit_amounts = st.one_of(
    st.decimals(0, 8, places=2),
    st.integers(0, 80).map(lambda d: d / 10),
    st.floats(0, 8, allow_nan=False, allow_infinity=False),
)

Field = tuple[str, str | None]  # ("user", id) | ("project", id) | ("global", None) | ("model", id)


@dataclass
class ModelReservation:
    state: str
    held: int
    fields: tuple[Field, ...]


#: The windows kept: one day and one month hold every operation (the clock is fixed),
#: so both count the same spend; each has its own limits.
WINDOWS = ("day", "month")


@dataclass
class Ledger:
    """The pure-Python model: one day's (and month's) counters, limit overrides, records."""

    #: (scope kind, window) -> default limit; -1: none
    defaults: dict[tuple[str, str], int]
    spent: dict[Field, int] = field(default_factory=dict)
    overrides: dict[tuple[Field, str], int] = field(default_factory=dict)
    reservations: dict[str, ModelReservation] = field(default_factory=dict)
    #: idempotency key -> what it paid for: (scopes, amount)
    operations: dict[str, tuple[tuple[Field, ...], int]] = field(default_factory=dict)

    def limit(self, f: Field, window: str = "day") -> int:
        return self.overrides.get((f, window), self.defaults.get((f[0], window), -1))

    def fields(self, user: str, project: str | None, model: str | None) -> list[Field]:
        out: list[Field] = [("user", user)]
        if project is not None:
            out.append(("project", project))
        if model is not None:
            out.append(("model", model))
        out.append(("global", None))
        return out

    def headroom(self, f: Field) -> int:
        """What still fits in *f*, in its tightest window."""
        spent = self.spent.get(f, 0)
        limits = [self.limit(f, w) for w in WINDOWS if self.limit(f, w) >= 0]
        return min(max(limit - spent, 0) for limit in limits) if limits else 10**18

    def refusal(self, fields: list[Field], amount: int) -> tuple[Field, str, int, int] | None:
        """The narrowest refusing scope, and of its refusing windows the one ending last."""
        for f in fields:
            spent = self.spent.get(f, 0)
            refusing = [
                (w, limit)
                for w in WINDOWS
                if (limit := self.limit(f, w)) >= 0
                and not (spent < limit and spent + amount <= limit)
            ]
            if refusing:
                window, limit = refusing[-1]  # the month ends no sooner than the day
                return f, window, spent, limit
        return None

    def charge(self, fields: tuple[Field, ...] | list[Field], delta: int) -> None:
        for f in fields:
            self.spent[f] = self.spent.get(f, 0) + delta


@dataclass
class Handle:
    """A library Reservation and what the model says its local state must be."""

    res: Reservation
    rid: str
    state: str
    estimate: int
    on_error: str


def handles_of(*handles: Handle | None) -> Any:
    """What a rule with target=handles returns: the granted ones, maybe none."""
    return multiple(*(h for h in handles if h is not None))


def check_refusal(
    e: BudgetExceededError, expected: tuple[Field, str, int, int], amount: int
) -> None:
    (scope, entity), window, spent, limit = expected
    assert (e.scope, e.entity_id, e.window) == (scope, entity, window)
    assert (e.spent_nano, e.limit_nano, e.requested_nano) == (spent, limit, amount)


class BudgetMachine(RuleBasedStateMachine):
    """Rules mirror the public API; the model predicts each outcome."""

    url: str = ""  # set by the test before running

    handles = Bundle("handles")

    def __init__(self) -> None:
        super().__init__()
        self.manager: BudgetManager | None = None
        self.model: Ledger | None = None
        self.projects: list[str] = []

    @initialize(
        user_limit=st.sampled_from([0.5, 1.0, Decimal("2.5"), 5]),
        project_limit=st.sampled_from([2.0, Decimal("4")]),
        global_limit=st.sampled_from([3.0, 6.0, Decimal("10.000000001")]),
        monthly_user_limit=st.sampled_from([None, 0.75, 3.0]),
        n_projects=st.integers(0, 2),
    )
    def start(
        self,
        user_limit: float | Decimal,
        project_limit: float | Decimal,
        global_limit: float | Decimal,
        monthly_user_limit: float | None,
        n_projects: int,
    ) -> None:
        # Each example starts from an empty store.
        with redis.Redis.from_url(self.url) as r:
            r.flushall()
        self.manager = BudgetManager(
            BudgetConfig(
                redis_url=self.url,
                daily_user_limit_usd=float(user_limit),
                daily_project_limit_usd=float(project_limit),
                daily_global_limit_usd=float(global_limit),
                monthly_user_limit_usd=monthly_user_limit,
                windows="month",
                socket_timeout=10.0,
                connect_timeout=10.0,
            ),
            clock=lambda: FIXED_NOW,
        )
        defaults = {
            ("user", "day"): nano(float(user_limit)),
            ("project", "day"): nano(float(project_limit)),
            ("global", "day"): nano(float(global_limit)),
        }
        if monthly_user_limit is not None:
            defaults[("user", "month")] = nano(monthly_user_limit)
        self.model = Ledger(defaults=defaults)
        self.projects = PROJECTS[:n_projects]

    def teardown(self) -> None:
        if self.manager is not None:
            self.manager.close()

    # -- helpers --------------------------------------------------------------

    @property
    def m(self) -> BudgetManager:
        assert self.manager is not None
        return self.manager

    @property
    def ledger(self) -> Ledger:
        assert self.model is not None
        return self.model

    def project(self, index: int) -> str | None:
        choices: list[str | None] = [None, *self.projects]
        return choices[index % len(choices)]

    # -- rules ----------------------------------------------------------------

    @rule(
        target=handles,
        user=st.sampled_from(USERS),
        pidx=st.integers(0, 2),
        model=st.none() | st.sampled_from(MODELS),
        estimate=amounts,
        on_error=st.sampled_from(["charge", "release"]),
        rid=st.none() | st.sampled_from(RECORD_IDS),
    )
    def reserve(
        self,
        user: str,
        pidx: int,
        model: str | None,
        estimate: Any,
        on_error: str,
        rid: str | None,
    ) -> Any:
        return handles_of(self.do_reserve(user, self.project(pidx), model, estimate, on_error, rid))

    @rule(
        target=handles,
        h=handles,
        estimate=st.none() | amounts,
        on_error=st.sampled_from(["charge", "release"]),
    )
    def reserve_again(self, h: Handle, estimate: Any, on_error: str) -> Any:
        """
        The same reservation id again: a client retry (the same estimate, None
        here) gets the existing hold back; another estimate is refused.
        """
        res = h.res
        if estimate is None:
            estimate = Decimal(res.estimate_nano) / NANO
        return handles_of(
            self.do_reserve(res.user_id, res.project_id, res.model, estimate, on_error, h.rid)
        )

    @rule(
        target=handles,
        user=st.sampled_from(USERS),
        pidx=st.integers(0, 2),
        then_zero=st.booleans(),
    )
    def reserve_the_rest(self, user: str, pidx: int, then_zero: bool) -> Any:
        """
        Reserve exactly the headroom left (so the tightest scope lands on its
        limit), then ask for $0, which an exhausted scope must refuse.
        """
        project = self.project(pidx)
        fields = self.ledger.fields(user, project, None)
        rest = min(self.ledger.headroom(f) for f in fields)
        handle = self.do_reserve(user, project, None, Decimal(rest) / NANO, "charge", None)
        if not then_zero:
            return handles_of(handle)
        zero = self.do_reserve(user, project, None, Decimal(0), "release", None)
        self.check_availability(user, project, 0.0)
        return handles_of(handle, zero)

    def do_reserve(
        self,
        user: str,
        project: str | None,
        model: str | None,
        estimate: Any,
        on_error: str,
        rid: str | None,
    ) -> Handle | None:
        """Reserve in both worlds; the new handle, or None if (rightly) refused."""
        amount = nano(estimate)
        fields = self.ledger.fields(user, project, model)
        prior = self.ledger.reservations.get(rid) if rid is not None else None
        expected = None if prior is not None else self.ledger.refusal(fields, amount)
        conflict = prior is not None and (prior.held, prior.fields) != (amount, tuple(fields))
        try:
            res = self.m.reserve(
                user, estimate, project, model, on_error=on_error, reservation_id=rid
            )
        except IdempotencyConflictError:
            assert conflict, "refused the retry of a reservation"
            return None
        except BudgetExceededError as e:
            assert expected is not None, "refused a reservation that fits"
            check_refusal(e, expected, amount)
            return None
        assert not conflict, "took a reservation id reused for another hold"
        assert expected is None, f"granted a reservation that does not fit: {expected}"
        if prior is not None:
            # Reserving an existing id returns that hold, as it stands now; a settled
            # one is folded away with its amounts and holds nothing.
            held = prior.held if prior.state == "held" else 0
            assert (res.state, res.estimate_nano) == (prior.state, held)
        else:
            assert (res.state, res.estimate_nano) == ("held", amount)
            self.ledger.charge(fields, amount)
            key = rid if rid is not None else res.id
            self.ledger.reservations[key] = ModelReservation("held", amount, tuple(fields))
        return Handle(res, res.id, res.state, res.estimate_nano, on_error)

    def settle(self, h: Handle, actual: int, state: str) -> None:
        """What the model does for commit(actual) / release() on one handle."""
        if h.state != "held":
            return  # settled through this handle before: no call to the store at all
        rec = self.ledger.reservations[h.rid]
        if rec.state != "held":
            h.state = rec.state  # settled through another handle: the first one won
            return
        self.ledger.charge(rec.fields, actual - rec.held)
        rec.state = h.state = state

    @rule(h=handles, actual=amounts)
    def commit(self, h: Handle, actual: Any) -> None:
        h.res.commit(actual)
        self.settle(h, nano(actual), "committed")
        assert h.res.state == h.state

    @rule(h=handles)
    def release(self, h: Handle) -> None:
        h.res.release()
        self.settle(h, 0, "released")
        assert h.res.state == h.state

    @rule(h=handles, fail=st.booleans())
    def leave_with_block(self, h: Handle, fail: bool) -> None:
        """Leaving the block unsettled charges the estimate (or, failing, maybe releases)."""
        with pytest.raises(ZeroDivisionError) if fail else contextlib.nullcontext(), h.res:
            if fail:
                _ = 1 / 0
        if fail and h.on_error == "release":
            self.settle(h, 0, "released")
        else:
            self.settle(h, h.estimate, "committed")
        assert h.res.state == h.state

    @rule(
        user=st.sampled_from(USERS),
        pidx=st.integers(0, 2),
        model=st.none() | st.sampled_from(MODELS),
        cost=amounts,
        key=st.none() | st.sampled_from(RECORD_IDS),
    )
    def record_spend(
        self, user: str, pidx: int, model: str | None, cost: Any, key: str | None
    ) -> None:
        """
        The same key again records nothing: the same spend is a duplicate, and
        another one (other scopes or amount) is refused.
        """
        project = self.project(pidx)
        fields = tuple(self.ledger.fields(user, project, model))
        paid = self.ledger.operations.get(key) if key is not None else None
        if paid is not None and paid != (fields, nano(cost)):
            with pytest.raises(IdempotencyConflictError):
                self.m.record_spend(user, cost, project, model, idempotency_key=key)
            return
        receipt = self.m.record_spend(user, cost, project, model, idempotency_key=key)
        assert receipt.status == ("recorded" if paid is None else "duplicate")
        if paid is not None:
            return
        if key is not None:
            self.ledger.operations[key] = (fields, nano(cost))
        self.ledger.charge(list(fields), nano(cost))

    @rule(user=st.sampled_from(USERS), pidx=st.integers(0, 2), estimate=amounts)
    def check(self, user: str, pidx: int, estimate: Any) -> None:
        self.check_availability(user, self.project(pidx), estimate)

    def check_availability(self, user: str, project: str | None, estimate: Any) -> None:
        amount = nano(estimate)
        expected = self.ledger.refusal(self.ledger.fields(user, project, None), amount)
        try:
            self.m.check_availability(user, estimate, project)
        except BudgetExceededError as e:
            assert expected is not None, "check refused an amount that fits"
            check_refusal(e, expected, amount)
        else:
            assert expected is None, f"check passed an amount that does not fit: {expected}"

    @rule(
        scope=st.sampled_from(["user", "project", "global"]),
        index=st.integers(0, 2),
        limit=st.none() | limit_amounts,
        window=st.sampled_from(WINDOWS),
    )
    def set_limit(self, scope: str, index: int, limit: Any, window: str) -> None:
        if scope == "user":
            entity: str | None = USERS[index]
        elif scope == "project":
            entity = PROJECTS[index % len(PROJECTS)]
        else:
            entity = None
        self.m.set_limit(scope, entity, limit, window=window)  # type: ignore[arg-type]
        f: Field = (scope, entity)
        if limit is None:
            self.ledger.overrides.pop((f, window), None)
        else:
            self.ledger.overrides[(f, window)] = nano(limit)

    @rule(user=st.sampled_from(USERS), pidx=st.integers(0, 2))
    def usage(self, user: str, pidx: int) -> None:
        project = self.project(pidx)
        self.check_usage(user, project)

    # -- invariants -----------------------------------------------------------

    def check_usage(self, user: str, project: str | None) -> None:
        for window in WINDOWS:
            got = self.m.usage(user, project, window=window)
            fields = self.ledger.fields(user, project, None)
            assert list(got) == [f[0] for f in fields]
            for (scope, entity), u in zip(fields, got.values(), strict=True):
                spent = self.ledger.spent.get((scope, entity), 0)
                limit = self.ledger.limit((scope, entity), window)
                assert isinstance(u, ScopeUsage)
                assert (u.scope, u.entity_id, u.window) == (scope, entity, window)
                assert u.spent_nano == spent, (scope, entity, window)
                assert u.spent_usd == spent / NANO
                if limit < 0:
                    assert (u.limit_nano, u.remaining_nano) == (None, None)
                    continue
                assert u.limit_nano == limit, (scope, entity, window)
                assert u.remaining_nano == max(limit - spent, 0)
                assert u.limit_usd == limit / NANO
                assert u.remaining_usd == max(limit - spent, 0) / NANO

    @invariant()
    def every_counter_agrees(self) -> None:
        if self.manager is None:
            return
        for user in USERS:
            self.check_usage(user, None)
        for project in PROJECTS:
            self.check_usage(USERS[0], project)

    @invariant()
    def model_counters_agree(self) -> None:
        """
        Per-model counters are tracked but never limit anything; usage() does not
        report them, so read the day's hash (an internal key name) directly.
        """
        if self.manager is None:
            return
        ledger = self.m._core.ledger
        day_key = ledger.period_key(ledger.calendar.period("day", int(FIXED_NOW * 1000)))
        with redis.Redis.from_url(self.url, decode_responses=True) as r:
            for model in MODELS:
                stored = int(r.hget(day_key, "m:" + model) or 0)
                assert stored == self.ledger.spent.get(("model", model), 0), model

    @invariant()
    def everything_but_the_limits_expires(self) -> None:
        """
        Counters, reservations and operation ids all carry an expiry (the script
        re-arms the day's only when a charge creates a field); only overrides stay.
        """
        if self.manager is None:
            return
        with redis.Redis.from_url(self.url, decode_responses=True) as r:
            for key in r.scan_iter(count=1000):
                if ":limits:" not in key:
                    assert r.pttl(key) > 0, key

    @invariant()
    def counters_never_go_negative(self) -> None:
        """A refund never exceeds what was charged."""
        if self.model is None:
            return
        assert all(v >= 0 for v in self.ledger.spent.values())


@pytest.mark.slow
class TestLedgerStateMachine:
    """The library and the model agree on every step of generated API sessions."""

    def test_library_matches_model(self, redis_server: RedisServer) -> None:
        BudgetMachine.url = redis_server.url
        run_state_machine_as_test(
            BudgetMachine,
            settings=settings(
                max_examples=40,
                stateful_step_count=30,
                deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
            ),
        )
