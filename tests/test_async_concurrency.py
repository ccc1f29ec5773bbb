"""
Budgets hold under asyncio contention: thousands of tasks on one
AsyncBudgetManager, and several processes each with its own event loop and
manager, all against one real redis-server.

Each test knows exactly how many reservations the limit fits, and how many
nano-dollars the ledger must hold afterwards.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from coreason_budget import (
    AsyncBudgetManager,
    AsyncReservation,
    BudgetConfig,
    BudgetExceededError,
    BudgetManager,
)

NANO = 1_000_000_000
#: A fixed instant (2026-01-01 12:00 UTC) so that no test can straddle midnight.
FIXED_NOW = 1_767_268_800.0
#: Generous timeouts: 2,000 tasks queue for a pool of 32 connections on a loaded box.
ROBUST: dict[str, Any] = {"socket_timeout": 10.0, "connect_timeout": 10.0, "pool_timeout": 30.0}
LIMITS: dict[str, Any] = {"daily_user_limit_usd": 1.0}
CENT = Decimal("0.01")
CENT_NANO = 10_000_000
CAPACITY = NANO // CENT_NANO  # 100


def fixed_clock() -> float:
    return FIXED_NOW


def config(url: str, spool_dir: str) -> BudgetConfig:
    return BudgetConfig(redis_url=url, spool_dir=spool_dir, **ROBUST, **LIMITS)


async def reserve_all(budget: AsyncBudgetManager, user: str, n: int) -> list[AsyncReservation]:
    """*n* tasks at once each reserving $0.01: the holds granted (the rest were refused)."""

    async def one() -> AsyncReservation | None:
        try:
            return await budget.reserve(user, CENT)
        except BudgetExceededError:
            return None

    results = await asyncio.gather(*(one() for _ in range(n)))
    return [r for r in results if r is not None]


def usage_of(url: str, user: str) -> dict[str, int]:
    with BudgetManager(BudgetConfig(redis_url=url, **LIMITS), clock=fixed_clock) as sync:
        return {scope: u.spent_nano for scope, u in sync.usage(user).items()}


class TestTasksReserveExactly:
    """Many tasks on one loop, one manager: exactly the limit's capacity is granted."""

    def test_two_thousand_tasks_against_one_dollar(self, redis_url: str, spool_dir: Path) -> None:
        """
        2,000 tasks in one ``gather`` each reserve $0.01 against a $1.00 user
        limit: exactly 100 are granted; committed at $0.01 each, usage is
        exactly $1.00, read from the async manager and from a sync one.
        """

        async def main() -> tuple[int, list[Any], dict[str, int]]:
            async with AsyncBudgetManager(
                config(redis_url, str(spool_dir)), clock=fixed_clock
            ) as budget:
                granted = await reserve_all(budget, "shared", 2000)
                receipts = await asyncio.gather(*(r.commit(CENT) for r in granted))
                usage = await budget.usage("shared")
                with pytest.raises(BudgetExceededError):
                    await budget.reserve("shared", Decimal("0.000000001"))
                return len(granted), receipts, {k: u.spent_nano for k, u in usage.items()}

        granted, receipts, usage = asyncio.run(main())
        assert granted == CAPACITY
        assert all(r.status == "recorded" and r.amount_nano == CENT_NANO for r in receipts)
        assert len({r.idempotency_key for r in receipts}) == CAPACITY
        assert usage == {"user": NANO, "global": NANO}
        assert usage_of(redis_url, "shared") == {"user": NANO, "global": NANO}


# -- several processes, each with its own loop and manager ------------------------------

PROCESSES = 4
ATTEMPTS = 60  # per process: 240 attempts at a capacity of 100


def hammer(url: str, spool_dir: str, start: Any, results: Any, tag: int) -> None:
    """A process: its own loop and manager, ATTEMPTS reserves at once, the granted committed."""

    async def main() -> tuple[int, int]:
        async with AsyncBudgetManager(config(url, spool_dir), clock=fixed_clock) as budget:
            start.wait(60)  # every process connected, then all at once
            granted = await reserve_all(budget, "shared", ATTEMPTS)
            receipts = await asyncio.gather(*(r.commit(CENT) for r in granted))
            recorded = sum(r.amount_nano for r in receipts if r.status == "recorded")
            return len(granted), recorded

    try:
        results.put((tag, *asyncio.run(main())))
    except BaseException as e:  # reported, so that the parent fails with the cause
        results.put((tag, repr(e), None))
        raise


@pytest.mark.slow
class TestProcessesReserveExactly:
    """Spawned processes, each with its own asyncio loop: exactly the capacity, in total."""

    def test_four_processes_against_one_dollar(self, redis_url: str, spool_dir: Path) -> None:
        """
        4 processes (spawn) each reserve $0.01 from 60 tasks at once against the
        same $1.00 user: exactly 100 granted in total, usage exactly $1.00.
        """
        ctx = multiprocessing.get_context("spawn")
        start = ctx.Barrier(PROCESSES)
        results = ctx.Queue()
        procs = [
            ctx.Process(target=hammer, args=(redis_url, str(spool_dir), start, results, i))
            for i in range(PROCESSES)
        ]
        for p in procs:
            p.start()
        try:
            out = [results.get(timeout=120) for _ in procs]
        finally:
            for p in procs:
                p.join(timeout=30)
        assert all(isinstance(granted, int) for _, granted, _ in out), out
        assert sorted(tag for tag, _, _ in out) == list(range(PROCESSES))
        assert all(p.exitcode == 0 for p in procs)
        assert sum(granted for _, granted, _ in out) == CAPACITY
        assert sum(recorded for _, _, recorded in out) == CAPACITY * CENT_NANO
        assert usage_of(redis_url, "shared") == {"user": NANO, "global": NANO}
