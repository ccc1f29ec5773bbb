"""
Budgets hold under contention: many threads sharing one manager, and several
processes each with their own manager (or one inherited across fork), all
against one real redis-server.

Every test computes the exact number of nano-dollars the ledger must hold from
what each worker observed, so a lost, doubled or leaked update fails exactly.
"""

from __future__ import annotations

import multiprocessing
import random
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coreason_budget import BudgetConfig, BudgetExceededError, BudgetManager

from .redis_server import RedisServer

NANO = 1_000_000_000
#: A fixed instant (2026-01-01 12:00 UTC) so that no test can straddle midnight.
FIXED_NOW = 1_767_268_800.0

#: Generous timeouts: on a loaded two-core CI box the library's defaults (0.25 s)
#: can time out, which is correct behaviour but not what these tests measure.
ROBUST = {"socket_timeout": 10.0, "connect_timeout": 10.0, "pool_timeout": 10.0}

FORK_WARNING = pytest.mark.filterwarnings("ignore:This process:DeprecationWarning")


def fixed_clock() -> float:
    return FIXED_NOW


def build_manager(url: str, **limits: Any) -> BudgetManager:
    """What every worker process does: its own manager from the store URL."""
    return BudgetManager(BudgetConfig(redis_url=url, **ROBUST, **limits), clock=fixed_clock)


def run_threads(n: int, target: Callable[[int], Any]) -> list[Any]:
    """Run target(0..n-1) on n threads released together; re-raise any failure."""
    barrier = threading.Barrier(n)

    def start(i: int) -> Any:
        barrier.wait(timeout=30)
        return target(i)

    with ThreadPoolExecutor(max_workers=n) as pool:
        futures = [pool.submit(start, i) for i in range(n)]
        return [f.result(timeout=60) for f in futures]


def try_reserve(manager: BudgetManager, *args: Any, **kwargs: Any) -> Any:
    """The reservation, or the BudgetExceededError that refused it."""
    try:
        return manager.reserve(*args, **kwargs)
    except BudgetExceededError as e:
        return e


@pytest.fixture
def manager_factory(make_manager: Callable[..., BudgetManager]) -> Callable[..., BudgetManager]:
    """conftest's make_manager (flushed store, closed after), on the fixed clock by default."""

    def make(clock: Callable[[], float] | None = fixed_clock, **limits: Any) -> BudgetManager:
        return make_manager(clock=clock, **ROBUST, **limits)

    return make


# -- one manager, many threads ---------------------------------------------------

SCOPE_CASES = {
    # scope -> (limits, user of thread i, project of thread i)
    "user": (
        {
            "daily_user_limit_usd": 1.0,
            "daily_project_limit_usd": 1e6,
            "daily_global_limit_usd": 1e6,
        },
        lambda i: "alice",
        lambda i: None,
    ),
    "project": (
        {
            "daily_user_limit_usd": 1e6,
            "daily_project_limit_usd": 1.0,
            "daily_global_limit_usd": 1e6,
        },
        lambda i: f"user-{i}",
        lambda i: "apollo",
    ),
    "global": (
        {
            "daily_user_limit_usd": 1e6,
            "daily_project_limit_usd": 1e6,
            "daily_global_limit_usd": 1.0,
        },
        lambda i: f"user-{i}",
        lambda i: None,
    ),
}


class TestThreadsReserveExactly:
    """32 threads sharing one manager race for a small budget: exactly the capacity is granted."""

    THREADS = 32
    ATTEMPTS = 4  # per thread: 128 attempts for a capacity of 14

    @pytest.mark.parametrize("scope", list(SCOPE_CASES))
    def test_exactly_floor_limit_over_estimate_succeed(
        self, scope: str, manager_factory: Callable[..., BudgetManager]
    ) -> None:
        limits, _, _ = SCOPE_CASES[scope]
        self.race(scope, manager_factory(**limits))

    def test_exact_on_the_store_clock_too(
        self, manager_factory: Callable[..., BudgetManager]
    ) -> None:
        """Without an injected clock the script asks Redis for the time; still exact."""
        limits, _, _ = SCOPE_CASES["user"]
        self.race("user", manager_factory(clock=None, **limits))

    def race(self, scope: str, manager: BudgetManager) -> None:
        _, user_of, project_of = SCOPE_CASES[scope]
        estimate = 0.07  # $1.00 // $0.07 = 14, with $0.02 left over that fits nobody
        estimate_nano = 70_000_000
        capacity = NANO // estimate_nano

        def worker(i: int) -> tuple[int, list[BudgetExceededError]]:
            granted, refusals = 0, []
            for _ in range(self.ATTEMPTS):
                try:
                    manager.reserve(user_of(i), estimate, project_id=project_of(i))
                    granted += 1
                except BudgetExceededError as e:
                    refusals.append(e)
            return granted, refusals

        results = run_threads(self.THREADS, worker)
        granted = sum(g for g, _ in results)
        refusals = [e for _, rs in results for e in rs]

        assert granted == capacity == 14
        assert len(refusals) == self.THREADS * self.ATTEMPTS - capacity
        for e in refusals:
            # Only the tight scope can refuse, and it reports a consistent state.
            assert e.scope == scope
            assert e.limit_nano == NANO
            assert e.requested_nano == estimate_nano
            assert e.spent_nano + estimate_nano > e.limit_nano

        usage = manager.usage(user_of(0), project_of(0))
        assert usage[scope].spent_nano == capacity * estimate_nano
        assert usage[scope].remaining_nano == NANO - capacity * estimate_nano
        assert usage["global"].spent_nano == capacity * estimate_nano
        if scope != "user":
            # Per-user counters add up to the same total: no update went missing.
            per_user = sum(
                manager.usage(user_of(i))["user"].spent_nano for i in range(self.THREADS)
            )
            assert per_user == capacity * estimate_nano

    def test_zero_cost_reservations_fit_until_the_scope_is_exhausted(
        self, manager_factory: Callable[..., BudgetManager]
    ) -> None:
        """A $0 estimate fits while spent < limit, and no longer once the limit is reached."""
        manager = manager_factory(daily_user_limit_usd=0.5)

        def worker(i: int) -> int:
            granted = 0
            for _ in range(10):
                try:
                    manager.reserve("alice", Decimal("0.1") if i % 2 else 0)
                    granted += 1
                except BudgetExceededError:
                    pass
            return granted

        results = run_threads(8, worker)
        paid = sum(results[1::2])
        assert paid == 5
        assert manager.usage("alice")["user"].spent_nano == 500_000_000
        with pytest.raises(BudgetExceededError):
            manager.reserve("alice", 0)

    def test_hold_and_release_loops_leave_nothing_behind(
        self, manager_factory: Callable[..., BudgetManager]
    ) -> None:
        """Threads repeatedly hold and release; afterwards every counter is back to zero."""
        manager = manager_factory(daily_user_limit_usd=0.3, daily_global_limit_usd=1.0)

        def worker(i: int) -> int:
            granted = 0
            for _ in range(25):
                try:
                    r = manager.reserve(f"user-{i % 4}", 0.1)
                except BudgetExceededError:
                    continue
                granted += 1
                r.release()
                r.release()  # second settle is a no-op
            return granted

        assert sum(run_threads(16, worker)) > 0
        for u in range(4):
            usage = manager.usage(f"user-{u}")
            assert usage["user"].spent_nano == 0
            assert usage["global"].spent_nano == 0

    def test_racing_settlements_of_one_reservation_settle_it_once(
        self, manager_factory: Callable[..., BudgetManager]
    ) -> None:
        """
        Threads each hold their own handle on one reservation id (reserve() with
        the same id returns the existing hold) and settle it differently at once:
        exactly one settlement wins, and every handle ends in the winner's state.
        """
        manager = manager_factory(daily_user_limit_usd=100.0)
        threads = 12
        for round_ in range(8):
            rid = f"race-{round_}"
            before = manager.usage("alice")["user"].spent_nano + 500_000_000
            # Racing reserve() calls with one id take one hold between them.
            handles = run_threads(
                threads, lambda _, rid=rid: manager.reserve("alice", 0.5, reservation_id=rid)
            )
            assert all(h.state == "held" and h.estimate_nano == 500_000_000 for h in handles)
            assert manager.usage("alice")["user"].spent_nano == before

            def settle(i: int, handles: list[Any] = handles) -> None:
                if i % 3 == 0:
                    handles[i].release()
                else:
                    handles[i].commit(Decimal(i) / 10)  # $0.1 .. $1.1: some over the estimate

            run_threads(threads, settle)
            states = {h.state for h in handles}
            assert len(states) == 1, states
            charged = manager.usage("alice")["user"].spent_nano - (before - 500_000_000)
            if states == {"released"}:
                assert charged == 0
            else:
                assert states == {"committed"}
                assert charged in {i * 100_000_000 for i in range(threads) if i % 3}


# -- several processes ----------------------------------------------------------

ESTIMATE = Decimal("0.03")
ESTIMATE_NANO = 30_000_000
PROC_LIMITS = {"daily_user_limit_usd": 1.0}
PROC_CAPACITY = NANO // ESTIMATE_NANO  # 33
PROC_ATTEMPTS = 20  # per process


def hammer(manager: BudgetManager, start: Any, results: Any, tag: int) -> None:
    """Try PROC_ATTEMPTS reservations; report (tag, granted, refused)."""
    start.wait(60)
    granted = refused = 0
    for _ in range(PROC_ATTEMPTS):
        try:
            manager.reserve("shared-user", ESTIMATE)
            granted += 1
        except BudgetExceededError:
            refused += 1
    results.put((tag, granted, refused))


def hammer_own_manager(url: str, start: Any, results: Any, tag: int) -> None:
    manager = build_manager(url, **PROC_LIMITS)
    try:
        hammer(manager, start, results, tag)
    finally:
        manager.close()


def run_processes(ctx: Any, target: Callable[..., None], first_arg: Any, n: int) -> list[Any]:
    start = ctx.Barrier(n)  # released once every child is up (spawn takes a while)
    results = ctx.Queue()
    procs = [ctx.Process(target=target, args=(first_arg, start, results, i)) for i in range(n)]
    for p in procs:
        p.start()
    out = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    return out


@pytest.mark.slow
@FORK_WARNING
class TestProcessesReserveExactly:
    """Several processes hammer one small budget: exactly its capacity is granted."""

    N = 4

    def check(self, url: str, results: list[Any], n: int) -> None:
        assert sorted(tag for tag, _, _ in results) == list(range(n))
        assert sum(g for _, g, _ in results) == PROC_CAPACITY
        assert sum(g + r for _, g, r in results) == n * PROC_ATTEMPTS
        with build_manager(url, **PROC_LIMITS) as m:
            usage = m.usage("shared-user")
            assert usage["user"].spent_nano == PROC_CAPACITY * ESTIMATE_NANO
            assert usage["global"].spent_nano == PROC_CAPACITY * ESTIMATE_NANO

    def test_forked_processes_with_their_own_managers(self, redis_url: str) -> None:
        ctx = multiprocessing.get_context("fork")
        self.check(redis_url, run_processes(ctx, hammer_own_manager, redis_url, self.N), self.N)

    def test_spawned_processes_with_their_own_managers(self, redis_url: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.check(redis_url, run_processes(ctx, hammer_own_manager, redis_url, 3), 3)

    def test_manager_created_before_fork_is_safe_in_children(self, redis_url: str) -> None:
        """The pool's parent connections are not shared with children (redis-py pid check)."""
        manager = build_manager(redis_url, **PROC_LIMITS)
        try:
            # Open pooled connections in the parent before forking, and keep using
            # them afterwards, interleaved with the children.
            manager.usage("shared-user")
            manager.set_limit("user", "someone-else", 5)
            ctx = multiprocessing.get_context("fork")
            results = run_processes(ctx, hammer, manager, self.N)
            self.check(redis_url, results, self.N)
            # The parent's manager still works after its children used their copies.
            assert manager.usage("shared-user")["user"].spent_nano == (
                PROC_CAPACITY * ESTIMATE_NANO
            )
            with pytest.raises(BudgetExceededError):
                manager.reserve("shared-user", ESTIMATE)
        finally:
            manager.close()


# -- mixed operations from threads ------------------------------------------------

USERS = ["ann", "bob", "cy"]
PROJECT = "atlas"
#: record_spend idempotency keys shared by every thread; each key always carries
#: the same amount and scopes, so whichever thread records it first, the total is known.
SHARED_KEYS = {f"shared-{k}": (USERS[k % 3], 10_000_000 * (k + 1)) for k in range(6)}


@dataclass
class Tally:
    """What one thread did, in nano-dollars per scope field."""

    charged: Counter[str] = field(default_factory=Counter)
    overshoot: int = 0  # over-commits' excess plus unique record_spend amounts
    granted: int = 0
    refused: int = 0
    shared_keys: set[str] = field(default_factory=set)

    def add(self, user: str, project: str | None, nano: int) -> None:
        self.charged["u:" + user] += nano
        if project is not None:
            self.charged["p:" + project] += nano
        self.charged["g"] += nano


def settle_randomly(r: Any, rng: random.Random, estimate_nano: int, tally: Tally) -> None:
    """Commit, release or leave a with-block; record what it must cost."""
    action = rng.choice(["commit-under", "commit-over", "release", "with", "with-raise"])
    user, project = r.user_id, r.project_id
    if action == "commit-under":
        actual = rng.randrange(0, estimate_nano + 1)
        r.commit(Decimal(actual) / NANO)
        tally.add(user, project, actual)
    elif action == "commit-over":
        actual = estimate_nano + rng.randrange(1, 50_000_000)
        r.commit(Decimal(actual) / NANO)
        tally.add(user, project, actual)
        tally.overshoot += actual - estimate_nano
    elif action == "release":
        r.release()
    elif action == "with":
        with r:
            pass
        tally.add(user, project, estimate_nano)
    else:
        # on_error was drawn at reserve time: "release" refunds, "charge" keeps the estimate.
        with pytest.raises(KeyError), r:
            raise KeyError("the LLM call failed")
        if r.on_error == "charge":
            tally.add(user, project, estimate_nano)
    # A second settlement of either kind never changes anything.
    if rng.random() < 0.3:
        r.release()
    if rng.random() < 0.3:
        r.commit(0.99)


class MixedWorkload:
    """Threads reserving, settling and recording against shared small limits."""

    def __init__(self, manager: BudgetManager) -> None:
        self.manager = manager

    def thread(self, seed: int, ops: int) -> Tally:
        rng = random.Random(seed)
        tally = Tally()
        for _ in range(ops):
            user = rng.choice(USERS)
            project = rng.choice([None, PROJECT])
            if rng.random() < 0.2:
                self.record(rng, tally)
                continue
            estimate_nano = rng.randrange(0, 120_000_000)
            try:
                r = self.manager.reserve(
                    user,
                    Decimal(estimate_nano) / NANO,
                    project_id=project,
                    on_error=rng.choice(["charge", "release"]),
                )
            except BudgetExceededError:
                tally.refused += 1
                continue
            tally.granted += 1
            assert r.estimate_nano == estimate_nano
            settle_randomly(r, rng, estimate_nano, tally)
        return tally

    def record(self, rng: random.Random, tally: Tally) -> None:
        if rng.random() < 0.5:
            key = rng.choice(list(SHARED_KEYS))
            user, nano = SHARED_KEYS[key]
            # Counted once over all threads, at the end.
            self.manager.record_spend(user, Decimal(nano) / NANO, idempotency_key=key)
            tally.shared_keys.add(key)
            return
        user = rng.choice(USERS)
        nano = rng.randrange(0, 30_000_000)
        self.manager.record_spend(user, Decimal(nano) / NANO, project_id=PROJECT)
        tally.add(user, PROJECT, nano)
        tally.overshoot += nano


def expected_totals(tallies: list[Tally]) -> tuple[Counter[str], int]:
    total: Counter[str] = Counter()
    overshoot = 0
    for t in tallies:
        total.update(t.charged)
        overshoot += t.overshoot
    for key in set().union(*(t.shared_keys for t in tallies)):
        user, nano = SHARED_KEYS[key]
        total["u:" + user] += nano
        total["g"] += nano
        overshoot += nano
    return total, overshoot


def observed_totals(manager: BudgetManager) -> Counter[str]:
    got: Counter[str] = Counter()
    for user in USERS:
        usage = manager.usage(user, PROJECT)
        got["u:" + user] = usage["user"].spent_nano
        got["p:" + PROJECT] = usage["project"].spent_nano
        got["g"] = usage["global"].spent_nano
    return +got


class TestMixedThreads:
    """Commit / release / with-blocks / record_spend from many threads add up exactly."""

    LIMITS: ClassVar[dict[str, float]] = {
        "daily_user_limit_usd": 0.8,
        "daily_project_limit_usd": 1.5,
        "daily_global_limit_usd": 2.0,
    }

    def test_final_ledger_is_the_exact_sum_of_what_threads_did(
        self, manager_factory: Callable[..., BudgetManager]
    ) -> None:
        manager = manager_factory(**self.LIMITS)
        workload = MixedWorkload(manager)
        seeds = list(range(100, 116))
        tallies = run_threads(len(seeds), lambda i: workload.thread(seeds[i], 60))
        total, overshoot = expected_totals(tallies)
        assert observed_totals(manager) == +total
        assert sum(t.granted for t in tallies) > 0
        assert sum(t.refused for t in tallies) > 0, "limits too loose to exercise refusals"

        # Reservations alone never push a scope past its limit: any excess is
        # bounded by what was recorded or over-committed.
        limits = manager.usage(USERS[0], PROJECT)
        assert total["g"] <= limits["global"].limit_nano + overshoot
        assert total["p:" + PROJECT] <= limits["project"].limit_nano + overshoot

    def test_reservations_alone_never_exceed_the_limit_at_any_instant(
        self, manager_factory: Callable[..., BudgetManager]
    ) -> None:
        """With no recorded spend or over-commit, a monitor never sees spent > limit."""
        manager = manager_factory(daily_user_limit_usd=0.5, daily_global_limit_usd=0.9)
        stop = threading.Event()
        seen: list[tuple[int, int]] = []

        def monitor() -> None:
            while not stop.is_set():
                for user in USERS:
                    u = manager.usage(user)
                    seen.append((u["user"].spent_nano, u["user"].limit_nano))
                    seen.append((u["global"].spent_nano, u["global"].limit_nano))

        def worker(i: int) -> Counter[str]:
            rng = random.Random(i)
            charged: Counter[str] = Counter()
            for _ in range(40):
                user = rng.choice(USERS)
                est = rng.randrange(1, 150_000_000)
                try:
                    r = manager.reserve(user, Decimal(est) / NANO)
                except BudgetExceededError:
                    continue
                if rng.random() < 0.5:
                    actual = rng.randrange(0, est + 1)
                    r.commit(Decimal(actual) / NANO)
                else:
                    actual = 0
                    r.release()
                charged[user] += actual
            return charged

        watcher = threading.Thread(target=monitor)
        watcher.start()
        try:
            results = run_threads(12, worker)
        finally:
            stop.set()
            watcher.join()
        assert seen
        assert all(spent <= limit for spent, limit in seen)
        total: Counter[str] = Counter()
        for c in results:
            total.update(c)
        for user in USERS:
            assert manager.usage(user)["user"].spent_nano == total[user]
        assert manager.usage(USERS[0])["global"].spent_nano == sum(total.values())


# -- hypothesis-generated mixes ---------------------------------------------------

cents = st.integers(0, 40).map(lambda c: c / 100)
amounts = st.one_of(cents, st.decimals(0, Decimal("0.4"), places=6))


def nano_of(x: float | Decimal) -> int:
    from fractions import Fraction
    from math import ceil

    value = Fraction(Decimal(repr(x))) if isinstance(x, float) else Fraction(x)
    return ceil(value * NANO)


step = st.tuples(
    amounts,  # estimate
    amounts,  # actual
    st.sampled_from(["commit", "release", "with", "spend"]),
)


class TestGeneratedMixes:
    """Generated per-thread scripts: the ledger always equals what the threads observed."""

    @settings(
        max_examples=25,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(
        scripts=st.lists(st.lists(step, min_size=1, max_size=12), min_size=2, max_size=4),
        user_limit=st.sampled_from([Decimal("0.5"), Decimal("1"), 1.25]),
        global_limit=st.sampled_from([Decimal("1"), 2.0]),
    )
    def test_invariants_hold_for_any_mix(
        self,
        redis_server: RedisServer,
        scripts: list[list[tuple[Any, Any, str]]],
        user_limit: float | Decimal,
        global_limit: float | Decimal,
    ) -> None:
        flush = redis_server.client()
        flush.flushall()
        flush.close()
        manager = build_manager(
            redis_server.url,
            daily_user_limit_usd=float(user_limit),
            daily_global_limit_usd=float(global_limit),
        )
        try:
            self.run(manager, scripts, nano_of(user_limit), nano_of(global_limit))
        finally:
            manager.close()

    @staticmethod
    def run(
        manager: BudgetManager,
        scripts: list[list[tuple[Any, Any, str]]],
        user_limit: int,
        global_limit: int,
    ) -> None:
        def worker(i: int) -> tuple[int, int, int]:
            """Returns (charged, overshoot, refused) for user i % 2."""
            user = f"u{i % 2}"
            charged = overshoot = refused = 0
            for estimate, actual, action in scripts[i]:
                if action == "spend":
                    manager.record_spend(user, actual)
                    charged += nano_of(actual)
                    overshoot += nano_of(actual)
                    continue
                r = try_reserve(manager, user, estimate)
                if isinstance(r, BudgetExceededError):
                    # The state the refusal reports does justify it.
                    assert r.requested_nano == nano_of(estimate)
                    assert (r.scope, r.limit_nano) in {
                        ("user", user_limit),
                        ("global", global_limit),
                    }
                    assert r.spent_nano >= r.limit_nano or (
                        r.spent_nano + r.requested_nano > r.limit_nano
                    )
                    refused += 1
                    continue
                assert r.estimate_nano == nano_of(estimate)
                if action == "commit":
                    r.commit(actual)
                    charged += nano_of(actual)
                    overshoot += max(nano_of(actual) - nano_of(estimate), 0)
                elif action == "release":
                    r.release()
                else:
                    with r:
                        pass
                    charged += nano_of(estimate)
            return charged, overshoot, refused

        results = run_threads(len(scripts), worker)
        per_user = [0, 0]
        overshoot = 0
        for i, (charged, over, _) in enumerate(results):
            per_user[i % 2] += charged
            overshoot += over
        for u in (0, 1):
            usage = manager.usage(f"u{u}")
            assert usage["user"].spent_nano == per_user[u]
            assert usage["user"].limit_nano == user_limit
            assert usage["global"].limit_nano == global_limit
        assert manager.usage("u0")["global"].spent_nano == sum(per_user)
        assert sum(per_user) <= global_limit + overshoot
        for u in (0, 1):
            assert per_user[u] <= user_limit + sum(
                over for i, (_, over, _) in enumerate(results) if i % 2 == u
            )
