"""
Budget windows against a real redis-server: every charge lands in exactly the
periods (hour, day, week, month, in the configured zone) holding its instant,
all in the one script call; limits per window refuse as they should; workers
agree on the period by the store's clock; bad input changes nothing.
"""

from __future__ import annotations

import datetime
import multiprocessing
import threading
import time
import zoneinfo
from collections.abc import Callable
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coreason_budget import (
    BudgetConfig,
    BudgetExceededError,
    BudgetManager,
    ConfigError,
    InvalidInputError,
)
from coreason_budget._windows import WINDOWS, Calendar

from .conftest import ManagerFactory

NANO = 1_000_000_000
ZONES = (
    "America/New_York",
    "Europe/Berlin",
    "Australia/Lord_Howe",
    "Asia/Kathmandu",
    "Pacific/Apia",
)
ALL_WINDOWS = "hour,week,month"  # with the day, always kept: every window


def transitions(zone: str, years: range) -> list[int]:
    """Instants (ms) where *zone*'s offset changes, found hour by hour, then to the ms."""
    tz = zoneinfo.ZoneInfo(zone)
    found = []
    for year in years:
        t = datetime.datetime(year, 1, 1, tzinfo=datetime.UTC)
        end = datetime.datetime(year + 1, 1, 1, tzinfo=datetime.UTC)
        step = datetime.timedelta(hours=1)
        while t < end:
            if t.astimezone(tz).utcoffset() != (t + step).astimezone(tz).utcoffset():
                found.append(int((t + step).timestamp() * 1000))
            t += step
    return found


#: Instants near each zone's DST changes and month ends (2011-2012: Apia's skipped day).
NEAR: dict[str, list[int]] = {
    z: transitions(z, range(2011, 2013)) + transitions(z, range(2026, 2027)) for z in ZONES
}


@st.composite
def moments(draw: st.DrawFn) -> tuple[str, int]:
    zone = draw(st.sampled_from(ZONES))
    tz = zoneinfo.ZoneInfo(zone)
    if NEAR[zone] and draw(st.booleans()):  # (Kathmandu has no changes to be near)
        base = draw(st.sampled_from(NEAR[zone]))
    else:  # a month end in local time
        year, month = draw(st.integers(2011, 2027)), draw(st.integers(1, 12))
        first = datetime.datetime(year + month // 12, month % 12 + 1, 1, tzinfo=tz)
        base = int(first.timestamp() * 1000)
    return zone, base + draw(st.integers(-3 * 3_600_000, 3 * 3_600_000))


def charged(client: redis.Redis, prefix: str) -> dict[str, dict[str, int]]:
    """Every period hash under *prefix*: key -> {field: nano}."""
    out = {}
    for key in client.scan_iter(f"{{{prefix}}}:*"):
        if key.split(":")[1] in WINDOWS:  # the test client decodes replies
            out[key] = {k: int(v) for k, v in client.hgetall(key).items()}
    return out


def every_window(url: str, zone: str) -> BudgetConfig:
    """Every window kept in *zone*, under prefix "w", retained a year (the clock goes back)."""
    return BudgetConfig(
        redis_url=url,
        spool_dir="off",
        timezone=zone,
        windows=ALL_WINDOWS,
        key_prefix="w",
        retention_seconds=366 * 86400,
    )


class TestChargesLandInTheirPeriods:
    """With the clock injected, a charge lands in exactly the periods holding its instant."""

    @settings(
        max_examples=60,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(moment=moments(), amount=st.integers(1, 10**12))
    def test_spend(
        self, moment: tuple[str, int], amount: int, redis_url: str, redis_client: redis.Redis
    ) -> None:
        zone, at = moment
        redis_client.flushall()
        config = every_window(redis_url, zone)
        with BudgetManager(config, clock=lambda: at / 1000) as budget:
            budget.record_spend("alice", amount / NANO, project_id="p")
        calendar = Calendar(zone)
        expected = {
            f"{{w}}:{w}:{calendar.period(w, at).label}": {
                "u:alice": amount,
                "p:p": amount,
                "g": amount,
            }
            for w in WINDOWS
        }
        assert charged(redis_client, "w") == expected

    @settings(
        max_examples=40,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(moment=moments(), later=st.integers(1, 40 * 86_400_000))
    def test_a_hold_settles_in_the_periods_it_was_taken_in(
        self, moment: tuple[str, int], later: int, redis_url: str, redis_client: redis.Redis
    ) -> None:
        """Committed after a boundary (up to 40 days on), it settles where the hold is."""
        zone, at = moment
        redis_client.flushall()
        now = [at]
        config = every_window(redis_url, zone)
        with BudgetManager(config, clock=lambda: now[0] / 1000) as budget:
            r = budget.reserve("alice", 3.0)
            now[0] = at + later
            assert r.commit(1.25).status == "recorded"
        calendar = Calendar(zone)
        expected = {
            f"{{w}}:{w}:{calendar.period(w, at).label}": {
                "u:alice": 1_250_000_000,
                "g": 1_250_000_000,
            }
            for w in WINDOWS
        }
        assert charged(redis_client, "w") == expected


class TestLimitsPerWindow:
    """Every scope kind takes a limit per window; the refusal names scope and window."""

    def test_the_month_refuses_and_says_when_it_resets(self, make_manager: ManagerFactory) -> None:
        budget = make_manager(monthly_user_limit_usd=1.0, timezone="America/New_York")
        budget.record_spend("alice", 0.9)
        before = budget.usage("alice", window="month")["user"].spent_nano
        with pytest.raises(BudgetExceededError) as info:
            budget.reserve("alice", 0.2)
        e = info.value
        assert (e.scope, e.entity_id, e.window) == ("user", "alice", "month")
        tz = zoneinfo.ZoneInfo("America/New_York")
        now = datetime.datetime.now(tz)
        first = datetime.datetime(now.year + now.month // 12, now.month % 12 + 1, 1, tzinfo=tz)
        assert e.resets_at == first
        assert e.retry_after_seconds is not None
        assert abs(e.retry_after_seconds - (first - now).total_seconds()) <= 2
        assert budget.usage("alice", window="month")["user"].spent_nano == before  # nothing written
        assert budget.usage("alice")["user"].spent_nano == before

    def test_the_narrowest_scope_and_its_longest_refusing_window(
        self, make_manager: ManagerFactory
    ) -> None:
        """User over its day and its month, project over its day: user, month."""
        budget = make_manager(
            daily_user_limit_usd=1.0, monthly_user_limit_usd=1.0, daily_project_limit_usd=1.0
        )
        budget.record_spend("alice", 1.0, project_id="p")
        with pytest.raises(BudgetExceededError) as info:
            budget.check_availability("alice", 0.01, project_id="p")
        assert (info.value.scope, info.value.window) == ("user", "month")

    def test_model_limits(self, make_manager: ManagerFactory) -> None:
        """An organisation-wide cap per model: every model alike, one model overridden."""
        budget = make_manager(daily_model_limit_usd=2.0)
        budget.record_spend("alice", 1.5, model="gpt-4o")
        budget.record_spend("bob", 1.5, model="claude")
        with pytest.raises(BudgetExceededError) as info:
            budget.reserve("carol", 1.0, model="gpt-4o")
        assert (info.value.scope, info.value.entity_id, info.value.window) == (
            "model",
            "gpt-4o",
            "day",
        )
        budget.set_limit("model", "gpt-4o", 10.0)
        budget.reserve("carol", 1.0, model="gpt-4o").commit(1.0)
        report = budget.report()
        assert [(m.entity_id, m.spent_nano, m.limit_nano) for m in report.models] == [
            ("gpt-4o", 2_500_000_000, 10 * NANO),
            ("claude", 1_500_000_000, 2 * NANO),
        ]

    def test_an_override_in_a_window_without_a_default(self, make_manager: ManagerFactory) -> None:
        budget = make_manager(windows="week")
        budget.record_spend("alice", 2.0)
        assert budget.usage("alice", window="week")["user"].limit_nano is None
        budget.set_limit("user", "alice", 2.5, window="week")
        with pytest.raises(BudgetExceededError) as info:
            budget.check_availability("alice", 1.0)
        assert info.value.window == "week"
        other = make_manager(windows="week")  # another worker sees it at once
        with pytest.raises(BudgetExceededError):
            other.check_availability("alice", 1.0)
        budget.set_limit("user", "alice", None, window="week")
        budget.check_availability("alice", 1.0)

    def test_a_past_period_is_reported_while_retained(self, make_manager: ManagerFactory) -> None:
        yesterday = time.time() - 86400
        past = make_manager(clock=lambda: yesterday, windows="month")
        past.record_spend("alice", 1.0)
        budget = make_manager(windows="month")
        budget.record_spend("bob", 2.0)
        day = datetime.datetime.fromtimestamp(yesterday, datetime.UTC).date()
        report = budget.report(period=day)
        assert (report.window, report.period) == ("day", day.isoformat())
        assert [(u.entity_id, u.spent_nano) for u in report.users] == [("alice", NANO)]
        assert [u.entity_id for u in budget.report().users] == ["bob"]


class TestBadInput:
    """Clear errors, and nothing written."""

    @pytest.mark.parametrize(
        ("values", "words"),
        [
            ({"timezone": "Mars/Base"}, "timezone"),
            ({"timezone": "localtime"}, "timezone"),
            ({"timezone": ""}, "timezone"),
            ({"week_start": "funday"}, "week_start"),
            ({"windows": "fortnight"}, "windows"),
            ({"monthly_user_limit_usd": -1.0}, "monthly_user_limit_usd"),
            ({"hourly_model_limit_usd": 1e12}, "hourly_model_limit_usd"),
            ({"weekly_global_limit_usd": float("nan")}, "weekly_global_limit_usd"),
        ],
    )
    def test_configuration(self, values: dict[str, Any], words: str) -> None:
        with pytest.raises(ConfigError, match=words):
            BudgetConfig(**values)

    def test_environment(self) -> None:
        with pytest.raises(ConfigError, match="COREASON_BUDGET_TIMEZONE"):
            BudgetConfig.from_env({"COREASON_BUDGET_TIMEZONE": "Nowhere/City"}, env_file=None)
        config = BudgetConfig.from_env(
            {
                "COREASON_BUDGET_TIMEZONE": "Asia/Kathmandu",
                "COREASON_BUDGET_WEEK_START": "sunday",
                "COREASON_BUDGET_MONTHLY_PROJECT_LIMIT_USD": "250",
                "COREASON_BUDGET_WINDOWS": "hour",
            },
            env_file=None,
        )
        assert config.kept_windows() == ("hour", "day", "month")
        assert config.limit_nano("project", "month") == 250 * NANO

    @pytest.mark.parametrize(
        "call",
        [
            lambda b: b.set_limit("user", "alice", 5.0, window="year"),
            lambda b: b.set_limit("user", "alice", 5.0, window="hour"),  # not kept
            lambda b: b.set_limit("user", "alice", -5.0, window="month"),
            lambda b: b.set_limit("user", "alice", 10_000_000.0, window="month"),
            lambda b: b.set_limit("team", "x", 5.0, window="month"),
            lambda b: b.usage("alice", window="fortnight"),
            lambda b: b.report(window="hour"),
            lambda b: b.report(window="month", period="2026-11"),
            lambda b: b.report(period=datetime.datetime(2026, 1, 1)),  # naive
            lambda b: b.reservation("r", user_id="alice", held_at=datetime.datetime(2026, 1, 1)),
        ],
    )
    def test_calls(
        self,
        call: Callable[[BudgetManager], object],
        make_manager: ManagerFactory,
        redis_client: redis.Redis,
    ) -> None:
        budget = make_manager(windows="month")
        budget.record_spend("alice", 1.0)
        before = {k: redis_client.dump(k) for k in redis_client.scan_iter()}
        with pytest.raises(InvalidInputError):
            call(budget)
        assert {k: redis_client.dump(k) for k in redis_client.scan_iter()} == before


class TestOneRoundTrip:
    """Adding windows adds no round trip: one script call, whatever is kept."""

    @pytest.mark.parametrize("windows", ["", "month", "hour,week,month"])
    def test_each_operation(
        self, windows: str, make_manager: ManagerFactory, redis_client: redis.Redis
    ) -> None:
        budget = make_manager(windows=windows)
        budget.usage("alice")  # connected, script loaded
        redis_client.config_resetstat()
        budget.check_availability("alice", 0.5, project_id="p")
        budget.record_spend("alice", 0.5, project_id="p", model="m")
        with budget.reserve("alice", 0.5, project_id="p", model="m") as r:
            r.commit(0.25)
        stats = redis_client.info("commandstats")
        calls = {k: v["calls"] for k, v in stats.items() if k.startswith("cmdstat_")}
        assert calls.pop("cmdstat_evalsha") == 4
        assert all(name.startswith("cmdstat_") and not name.endswith("evalsha") for name in calls)
        # Inside the scripts only (HINCRBY, HMGET, ...): nothing else reached the server
        # (but the reset of these counts, and the INFO reading them).
        assert set(calls) <= {
            "cmdstat_config",
            "cmdstat_hincrby",
            "cmdstat_hmget",
            "cmdstat_set",
            "cmdstat_get",
            "cmdstat_time",
            "cmdstat_pexpire",
            "cmdstat_hget",
            "cmdstat_hset",
            "cmdstat_hlen",
            "cmdstat_del",
            "cmdstat_info",
        }


def _contend(url: str, start: Any, results: Any, tag: int) -> None:
    config = BudgetConfig(
        redis_url=url,
        spool_dir="off",
        key_prefix="contend",
        daily_user_limit_usd=5.0,
        monthly_user_limit_usd=0.5,  # the tighter one
        pool_size=8,
    )
    granted = 0
    with BudgetManager(config) as budget:
        start.wait(60)

        def worker() -> None:
            nonlocal granted
            for _ in range(25):
                try:
                    budget.reserve("shared", 0.01).commit(0.01)
                except BudgetExceededError:
                    continue
                with lock:
                    granted += 1

        lock = threading.Lock()
        threads = [threading.Thread(target=worker) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    results.put((tag, granted))


@pytest.mark.slow
class TestContention:
    def test_four_processes_of_eight_threads_get_exactly_the_month(
        self, redis_url: str, redis_client: redis.Redis
    ) -> None:
        """Day $5, month $0.50 (tighter): exactly 50 of 800 calls at $0.01, month and day alike."""
        ctx = multiprocessing.get_context("spawn")
        start = ctx.Barrier(4)
        results = ctx.Queue()
        procs = [
            ctx.Process(target=_contend, args=(redis_url, start, results, i)) for i in range(4)
        ]
        for p in procs:
            p.start()
        out = [results.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(timeout=30)
            assert p.exitcode == 0
        assert sum(g for _, g in out) == 50
        config = BudgetConfig(redis_url=redis_url, key_prefix="contend", monthly_user_limit_usd=0.5)
        with BudgetManager(config) as budget:
            assert budget.usage("shared", window="month")["user"].spent_nano == NANO // 2
            assert budget.usage("shared")["user"].spent_nano == NANO // 2


def _skewed(url: str, start: Any, results: Any, skew: float) -> None:
    """A worker whose own clock is *skew* seconds off: it charges the store's periods."""
    real = time.time
    time.time = lambda: real() + skew  # type: ignore[assignment]
    config = BudgetConfig(
        redis_url=url, spool_dir="off", key_prefix="skew", windows="hour,week,month"
    )
    with BudgetManager(config) as budget:
        start.wait(60)
        for _ in range(20):
            budget.record_spend("alice", 0.01)
            with budget.reserve("alice", 0.02) as r:
                r.commit(0.01)
    results.put(skew)


class TestWorkersAgree:
    """
    Workers whose clocks disagree across every boundary (an hour, a day, a week, a
    month) charge the one period of each window that the store's clock is in.
    """

    def test_by_the_store_clock(self, redis_url: str, redis_client: redis.Redis) -> None:
        redis_client.delete(*redis_client.keys("{skew}:*") or ["-"])
        ctx = multiprocessing.get_context("spawn")
        day = 86_400.0
        skews = [-32 * day, -8 * day, -day - 1_800, -2_400.0, 0.0, 2_400.0, day + 1_800, 32 * day]
        start = ctx.Barrier(len(skews))
        results = ctx.Queue()
        procs = [ctx.Process(target=_skewed, args=(redis_url, start, results, s)) for s in skews]
        before = redis_client.time()
        for p in procs:
            p.start()
        assert sorted(results.get(timeout=120) for _ in procs) == sorted(skews)
        for p in procs:
            p.join(timeout=30)
            assert p.exitcode == 0
        after = redis_client.time()
        calendar = Calendar()
        served = {
            f"{{skew}}:{w}:{calendar.period(w, int(s) * 1000).label}"
            for w in WINDOWS
            for s, _ in (before, after)
        }
        charged_keys = set(charged(redis_client, "skew"))
        assert charged_keys <= served  # nothing in a period only a skewed clock believed
        for window in WINDOWS:  # every window counted every charge
            total = sum(
                v["g"] for k, v in charged(redis_client, "skew").items() if f":{window}:" in k
            )
            assert total == len(skews) * 20 * 20_000_000, window
