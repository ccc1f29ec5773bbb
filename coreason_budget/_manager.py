"""
BudgetManager: the public, synchronous, thread-safe entry point.
"""

from __future__ import annotations

import datetime
import functools
from collections.abc import Callable
from decimal import Decimal
from types import TracebackType
from typing import TYPE_CHECKING

from ._budget import BudgetCore, ScopeName
from ._config import BudgetConfig
from ._drivers import SyncDriver
from ._receipt import Receipt
from ._reservation import OnError, Reservation
from ._spool import ReplaySummary
from ._store import open_store
from ._usage import Report, ScopeUsage

if TYPE_CHECKING:
    from ._pricing import PricingEngine

__all__ = ["BudgetManager", "ScopeName"]


class BudgetManager:
    """
    Daily USD budgets per user, per project and for the whole organisation.

    One manager per process is enough: it is thread-safe and owns a bounded
    connection pool. Every operation is one atomic call of the ledger script,
    so budgets hold across threads, processes and machines sharing a store.
    (:class:`AsyncBudgetManager` is the same, awaited, for asyncio code.)
    """

    def __init__(self, config: BudgetConfig, *, clock: Callable[[], float] | None = None) -> None:
        """
        *clock* (seconds since the epoch) replaces the store's clock in deciding
        which day a call belongs to; meant for tests. Without it every worker
        uses the Redis server's clock, so drifting worker clocks cannot split a day.
        """
        self.config = config
        self._core = core = BudgetCore(config, clock)
        self._store = open_store(config)
        self._driver = SyncDriver(self._store.client, config.pool_size, config.pool_timeout)
        self._run = self._driver.run
        core.keeper.run = self._run  # a replay's own ledger calls
        self._handle = functools.partial(Reservation, core, self._run)

    @classmethod
    def from_env(cls) -> BudgetManager:
        """A manager configured from ``COREASON_BUDGET_*`` variables and ``.env``."""
        return cls(BudgetConfig.from_env())

    @property
    def pricing(self) -> PricingEngine:
        """Model prices (litellm's table plus overrides); loaded on first use."""
        return self._core.pricing()

    # -- the guard ------------------------------------------------------------

    def check_availability(
        self, user_id: str, estimated_cost: float | Decimal, project_id: str | None = None
    ) -> None:
        """
        Raise :class:`BudgetExceededError` if *estimated_cost* does not fit today.

        Read-only: two callers can both pass a check and together overspend.
        Use :meth:`reserve` where that matters.
        """
        self._run(self._core.check_availability(user_id, estimated_cost, project_id))

    def record_spend(
        self,
        user_id: str,
        cost: float | Decimal,
        project_id: str | None = None,
        model: str | None = None,
        idempotency_key: str | None = None,
    ) -> Receipt:
        """
        Record money already spent, in every scope, even past a limit.

        Repeating a call with the same *idempotency_key* records it once
        (status "duplicate"); the same key for a different user, scopes or
        amount raises IdempotencyConflictError. Without a key, one is generated
        for this call (the receipt names it) so that retries cannot double-charge.

        If the store cannot be reached, the spend is saved to the local spool
        (``spool_dir``) and the receipt says "spooled": it is recorded exactly
        once when the store is back, on the day it was made. Without a spool this
        raises BudgetUnavailableError naming the key: the spend may or may not
        have reached the store, and only a retry with that key is safe.
        """
        return self._run(self._core.record_spend(user_id, cost, project_id, model, idempotency_key))

    def reserve(
        self,
        user_id: str,
        estimate: float | Decimal,
        project_id: str | None = None,
        model: str | None = None,
        *,
        on_error: OnError = "charge",
        reservation_id: str | None = None,
    ) -> Reservation:
        """
        Hold *estimate* in every applicable scope, atomically, or raise.

        Raises :class:`BudgetExceededError` having held nothing when any scope
        cannot fit it. Reserving again with the same *reservation_id* returns
        the existing hold instead of taking a second one (a handle for an id
        settled before holds nothing: its state says so); the same id with
        another payload raises IdempotencyConflictError.
        """
        return self._run(
            self._core.reserve(
                self._handle, user_id, estimate, project_id, model, on_error, reservation_id
            )
        )

    # -- reporting and administration -------------------------------------------

    def usage(
        self, user_id: str, project_id: str | None = None, *, window: str = "day"
    ) -> dict[str, ScopeUsage]:
        """
        Spent, limit, remaining and when it resets, per scope ("user",
        "project" if given, "global") in the current period of *window*
        (today, by default; any window this manager keeps).
        """
        return self._run(self._core.usage(user_id, project_id, window))

    def report(
        self,
        top: int | None = None,
        *,
        window: str = "day",
        period: datetime.date | datetime.datetime | None = None,
    ) -> Report:
        """
        One period's spend: the organisation's total, then users, projects and
        models, biggest first (the *top* of each, or all). The current period
        of *window* (today), or the one holding *period* (a date: its local
        midnight; an aware datetime) while it is retained.
        """
        return self._run(self._core.report(top, window, period))

    def reservation(
        self,
        reservation_id: str,
        *,
        user_id: str | None = None,
        project_id: str | None = None,
        model: str | None = None,
        held_at: datetime.datetime | None = None,
        lookup: bool = True,
    ) -> Reservation:
        """
        The handle of an existing reservation, by id, from any process.

        For settling a hold in another worker than the one that took it (an
        HTTP service behind a load balancer). Raises UnknownReservationError
        when the store has no such reservation (never made, or expired).

        With *user_id* and *held_at* (the handle's ``held_at``, and the
        *project_id* and *model* it was made with), a reservation whose record
        the store lost (restarted without persistence) still gets a handle:
        committing it records the cost once in that moment's periods, as the
        handle that took it would. So does one
        the store cannot be asked about now, so that its settlement can be
        spooled. (The store settles a reservation in the scopes its record
        names, whatever the handle says.)

        With ``lookup=False`` the store is not asked: the handle is made from
        what is passed (*user_id* and *held_at*, or nothing: then it settles by
        the store's record alone), for relaying a settlement in one round trip
        (the HTTP service does). Its estimate is unknown (0): settle it
        explicitly (left unsettled, a with-block leaves the hold as the store
        has it, which charges it); a retry of a settled one answers "duplicate".
        """
        return self._run(
            self._core.reservation(
                self._handle, reservation_id, user_id, project_id, model, held_at, lookup
            )
        )

    def set_limit(
        self,
        scope: ScopeName,
        entity_id: str | None,
        limit_usd: float | Decimal | None,
        window: str = "day",
    ) -> None:
        """
        Override the limit of one user, project or model (or the global one,
        with entity_id None) in one *window* (a kept one); ``None`` removes
        the override. Stored in Redis, so every worker applies it from its
        next call on.
        """
        self._run(self._core.set_limit(scope, entity_id, limit_usd, window))

    def seconds_until_reset(self) -> int:
        """
        Seconds until today's budgets reset (the next midnight in the
        configured time zone), by the store's clock as this manager last
        learnt it. At least 1. (A refusal says when its own window resets:
        ``BudgetExceededError.retry_after_seconds``.)
        """
        return self._core.ledger.seconds_to_reset()

    def ping(self) -> None:
        """Raise BudgetUnavailableError unless the store answers (for health checks)."""
        self._run(self._core.ledger.ping())

    def replay_spool(self) -> ReplaySummary:
        """
        Record now every charge spooled for this store: this process's, and
        those left by processes that died (files another live process holds
        are left to it). Replaying is idempotent, so a charge that did reach
        the store is not charged again. Stops at the first entry the store
        cannot take (``error`` says why); what is left stays spooled.
        """
        return self._core.keeper.replay_now()

    def close(self) -> None:
        """
        Close the connection pool (and stop an embedded store no one else uses).

        Charges still spooled stay on disk: the next manager for this store
        (in any process) or ``coreason-budget replay-spool`` records them.
        """
        self._core.keeper.close()
        self._store.close()

    def __enter__(self) -> BudgetManager:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
