"""
How a user calls coreason-budget, checked by mypy --strict (never run).

If a public signature changes in a way that breaks typed callers, this file
stops type-checking in CI.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Literal, assert_type

from coreason_budget import (
    BudgetConfig,
    BudgetError,
    BudgetExceededError,
    BudgetManager,
    BudgetUnavailableError,
    IdempotencyConflictError,
    Receipt,
    Reservation,
    ScopeUsage,
)


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
        return None
    except BudgetError:
        return None


def admin(budget: BudgetManager) -> float:
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
