"""
How a user calls coreason-budget, checked by mypy --strict (never run).

If a public signature changes in a way that breaks typed callers, this file
stops type-checking in CI.
"""

from __future__ import annotations

import datetime
from decimal import Decimal
from typing import Literal, assert_type

from coreason_budget import (
    AsyncBudget,
    AsyncBudgetManager,
    AsyncReservation,
    Budget,
    BudgetConfig,
    BudgetError,
    BudgetExceededError,
    BudgetManager,
    BudgetUnavailableError,
    IdempotencyConflictError,
    Receipt,
    Report,
    Reservation,
    ScopeUsage,
)
from coreason_budget.client import AsyncBudgetClient, BudgetClient


def guarded_call(budget: BudgetManager, prompt: str) -> str | None:
    try:
        with budget.reserve("user_123", 0.05, project_id="proj", model="gpt-4") as r:
            assert_type(r, Reservation)
            answer = prompt.upper()
            receipt = r.commit(Decimal("0.031"))
            assert_type(receipt.status, Literal["recorded", "duplicate", "spooled", "expired"])
            return answer
    except BudgetExceededError as e:
        assert_type(e.scope, str)
        assert_type(e.entity_id, str | None)
        assert_type(e.requested_usd, float)
        assert_type(e.window, str)
        assert_type(e.resets_at, datetime.datetime | None)
        assert_type(e.retry_after_seconds, int | None)
        return None
    except BudgetError:
        return None


def admin(budget: BudgetManager) -> float | None:
    budget.check_availability("user_123", estimated_cost=0.05, project_id="proj")
    try:
        receipt = budget.record_spend(
            "user_123", 0.045, project_id="proj", model="gpt-4", idempotency_key="k"
        )
        assert_type(receipt, Receipt)
        assert_type(receipt.idempotency_key, str)
    except IdempotencyConflictError:
        pass
    except BudgetUnavailableError as e:
        assert_type(e.idempotency_key, str | None)
    budget.set_limit("user", "user_123", 25.0)
    budget.set_limit("global", None, None)
    r = budget.reserve("user_123", 1, on_error="release", reservation_id="r-1")
    r.release()
    usage = budget.usage("user_123")
    assert_type(usage, dict[str, ScopeUsage])
    assert_type(usage["user"].spent_nano, int)
    return usage["global"].remaining_usd


def configure() -> BudgetManager:
    config = BudgetConfig(redis_url="redis://localhost:6379", daily_user_limit_usd=10.0)
    with BudgetManager(config) as budget:
        admin(budget)
    return BudgetManager.from_env()


def on_any_face(budget: Budget, user: str) -> Receipt:
    """Written against the protocol: the manager and the HTTP client both fit."""
    with budget.reserve(user, 0.05, model="gpt-4o") as r:
        assert_type(r, Reservation)
        return r.commit(0.01)


def windows(budget: Budget, user: str) -> datetime.datetime:
    """Budget windows, on any face: usage, report, limits and holds by their moment."""
    week = budget.usage(user, "proj", window="week")
    assert_type(week, dict[str, ScopeUsage])
    assert_type(week["user"].limit_nano, int | None)
    assert_type(week["user"].remaining_nano, int | None)
    assert_type(week["user"].window, str)
    assert_type(week["user"].resets_at, datetime.datetime | None)
    month = budget.report(10, window="month")
    assert_type(month, Report)
    assert_type(month.period, str)
    assert_type(month.starts_at, datetime.datetime)
    assert_type(month.resets_at, datetime.datetime)
    assert_type(month.models, tuple[ScopeUsage, ...])
    budget.report(window="day", period=datetime.date(2026, 11, 29))
    budget.report(period=datetime.datetime(2026, 11, 29, 14, tzinfo=datetime.UTC), window="hour")
    budget.set_limit("model", "gpt-4o", 100, "month")
    budget.set_limit("user", user, Decimal("2.5"), window="hour")
    budget.set_limit("global", None, None, window="week")
    r = budget.reserve(user, 0.05)
    assert_type(r.held_at, datetime.datetime)
    assert_type(r.held_at_ms, int)
    r.release()
    return r.held_at


def both_sync_faces(local: BudgetManager, remote: BudgetClient) -> None:
    on_any_face(local, "alice")
    on_any_face(remote, "alice")
    windows(local, "alice")
    windows(remote, "alice")
    # A hold the store lost, described by its moment (the manager alone can).
    held_at = windows(local, "bob")
    local.reservation("r-1", user_id="bob", held_at=held_at, lookup=False).commit(0.01)
    assert_type(remote.usage("bob", window="day")["global"].window, str)
    assert_type(remote.report(window="week", period=held_at).period, str)


async def guarded_async_call(budget: AsyncBudget, prompt: str) -> str | None:
    try:
        async with budget.reserve("user_123", 0.05, project_id="proj", model="gpt-4o") as r:
            assert_type(r, AsyncReservation)
            receipt = await r.commit(Decimal("0.031"))
            assert_type(receipt, Receipt)
            return prompt.upper()
    except BudgetExceededError:
        return None


async def async_admin(budget: AsyncBudgetManager) -> float | None:
    await budget.check_availability("user_123", 0.05, project_id="proj")
    receipt = await budget.record_spend("user_123", 0.045, idempotency_key="k")
    assert_type(receipt, Receipt)
    r = await budget.reserve("user_123", 1, on_error="release", reservation_id="r-1")
    assert_type(r, AsyncReservation)
    assert_type(await r.release(), Receipt)
    again = await budget.reservation("r-1")
    assert_type(again.state, str)
    await budget.set_limit("user", "user_123", 25.0)
    usage = await budget.usage("user_123")
    assert_type(usage, dict[str, ScopeUsage])
    await budget.ping()
    return usage["global"].remaining_usd


async def async_windows(budget: AsyncBudget, user: str) -> datetime.datetime:
    """:func:`windows`, awaited: the same parameters on the asyncio faces."""
    week = await budget.usage(user, "proj", window="week")
    assert_type(week, dict[str, ScopeUsage])
    assert_type(week["global"].resets_at, datetime.datetime | None)
    month = await budget.report(10, window="month")
    assert_type(month, Report)
    assert_type(month.models, tuple[ScopeUsage, ...])
    await budget.report(window="day", period=datetime.date(2026, 11, 29))
    await budget.report(period=datetime.datetime(2026, 11, 29, tzinfo=datetime.UTC))
    await budget.set_limit("model", "gpt-4o", 100, "month")
    await budget.set_limit("project", "proj", 7, window="week")
    async with budget.reserve(user, 0.05) as r:
        assert_type(r.held_at, datetime.datetime)
        return r.held_at


async def both_async_faces(config: BudgetConfig, remote: AsyncBudgetClient) -> None:
    async with AsyncBudgetManager(config) as local:
        await guarded_async_call(local, "hi")
        await async_admin(local)
        held_at = await async_windows(local, "alice")
        again = await local.reservation("r-1", user_id="alice", held_at=held_at, lookup=False)
        assert_type(again.held_at, datetime.datetime)
    await guarded_async_call(remote, "hi")
    await async_windows(remote, "alice")
    assert_type((await remote.usage("alice", window="hour"))["user"].window, str)
    assert_type((await remote.report(window="month", period=held_at)).period, str)
    await remote.aclose()
