"""
AsyncBudgetManager: the BudgetManager for asyncio code, on redis.asyncio.

The same core (:mod:`._budget`) as the sync manager, run by the async driver:
the same checks, scopes, script, keys and answers, so a sync and an async
manager on one store are one ledger. Only how it waits differs: nothing here
blocks the event loop (spool writes, starting an embedded store and the first
import of litellm run in worker threads), and a write whose caller is
cancelled runs to its end (it lands once, or is spooled) instead of being cut
off with its outcome unknown.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
from collections.abc import Callable, Coroutine
from decimal import Decimal
from types import TracebackType
from typing import TYPE_CHECKING, Any

from ._budget import BudgetCore, ScopeName
from ._config import BudgetConfig
from ._drivers import AsyncDriver
from ._receipt import Receipt
from ._reservation import AsyncReservation, OnError, ReservationRequest
from ._spool import ReplaySummary
from ._steps import Steps, T
from ._usage import Report, ScopeUsage
from .exceptions import BudgetUnavailableError

if TYPE_CHECKING:
    from ._pricing import PricingEngine
    from ._store import AsyncStore


class AsyncBudgetManager:
    """
    :class:`BudgetManager`'s methods, awaited; for FastAPI, AsyncOpenAI, agents.

    One per process is enough, used from one event loop at a time. The store
    is opened on the first call, in a worker thread, and again if a call comes
    from a new event loop (a script calling ``asyncio.run`` twice): connections
    belong to the loop that made them. Close it with ``await budget.aclose()`` (or ``async with``).
    """

    def __init__(self, config: BudgetConfig, *, clock: Callable[[], float] | None = None) -> None:
        """*clock*: as :class:`BudgetManager`'s (for tests)."""
        self.config = config
        self._core = BudgetCore(config, clock)
        self._store: AsyncStore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._driver = AsyncDriver(self._connect, config.pool_size, config.pool_timeout)
        self._handle = functools.partial(AsyncReservation, self._core, self._driver)

    @classmethod
    def from_env(cls) -> AsyncBudgetManager:
        """A manager configured from ``COREASON_BUDGET_*`` variables and ``.env``."""
        return cls(BudgetConfig.from_env())

    @property
    def pricing(self) -> PricingEngine:
        """
        Model prices, as :attr:`BudgetManager.pricing`. The first priced call
        imports litellm (seconds): ``commit_usage`` does that in a worker thread;
        call ``await budget.load_pricing()`` at start-up to do it up front.
        """
        return self._core.pricing()

    async def load_pricing(self) -> PricingEngine:
        """Load litellm's price table now, in a worker thread (not on the loop)."""
        engine = self._core.pricing()
        await asyncio.to_thread(engine.preload)
        return engine

    # -- the guard ------------------------------------------------------------

    async def check_availability(
        self, user_id: str, estimated_cost: float | Decimal, project_id: str | None = None
    ) -> None:
        """As :meth:`BudgetManager.check_availability`: raise if *estimated_cost* does not fit."""
        await self._driver.run(self._core.check_availability(user_id, estimated_cost, project_id))

    async def record_spend(
        self,
        user_id: str,
        cost: float | Decimal,
        project_id: str | None = None,
        model: str | None = None,
        idempotency_key: str | None = None,
    ) -> Receipt:
        """
        As :meth:`BudgetManager.record_spend`. Cancelled while in flight, the
        spend still lands once (or is spooled): retry it with the same key.
        """
        return await self._driver.run(
            self._core.record_spend(user_id, cost, project_id, model, idempotency_key),
            resumable=True,
        )

    def reserve(
        self,
        user_id: str,
        estimate: float | Decimal,
        project_id: str | None = None,
        model: str | None = None,
        *,
        on_error: OnError = "charge",
        reservation_id: str | None = None,
    ) -> ReservationRequest:
        """
        As :meth:`BudgetManager.reserve`: ``r = await budget.reserve(...)`` takes
        the hold when awaited, ``async with budget.reserve(...) as r:`` on entry
        (and settles it on exit, as the sync with-block does).

        A task cancelled while its reserve is in flight holds nothing: a hold
        the store took meanwhile is released by id.
        """

        def take() -> Coroutine[Any, Any, AsyncReservation]:
            # In the caller's task: a cancellation thrown into the core's steps
            # releases the id in the background, whichever way the reserve went.
            return self._driver.run(
                self._core.reserve(
                    self._handle, user_id, estimate, project_id, model, on_error, reservation_id
                )
            )

        return ReservationRequest(take)

    # -- reporting and administration -------------------------------------------

    async def usage(
        self, user_id: str, project_id: str | None = None, *, window: str = "day"
    ) -> dict[str, ScopeUsage]:
        """As :meth:`BudgetManager.usage`."""
        return await self._driver.run(self._core.usage(user_id, project_id, window))

    async def report(
        self,
        top: int | None = None,
        *,
        window: str = "day",
        period: datetime.date | datetime.datetime | None = None,
    ) -> Report:
        """As :meth:`BudgetManager.report`."""
        return await self._driver.run(self._core.report(top, window, period))

    async def reservation(
        self,
        reservation_id: str,
        *,
        user_id: str | None = None,
        project_id: str | None = None,
        model: str | None = None,
        held_at: datetime.datetime | None = None,
        lookup: bool = True,
    ) -> AsyncReservation:
        """As :meth:`BudgetManager.reservation`."""
        return await self._driver.run(
            self._core.reservation(
                self._handle, reservation_id, user_id, project_id, model, held_at, lookup
            )
        )

    async def set_limit(
        self,
        scope: ScopeName,
        entity_id: str | None,
        limit_usd: float | Decimal | None,
        window: str = "day",
    ) -> None:
        """As :meth:`BudgetManager.set_limit`."""
        await self._driver.run(
            self._core.set_limit(scope, entity_id, limit_usd, window), resumable=True
        )

    def seconds_until_reset(self) -> int:
        """As :meth:`BudgetManager.seconds_until_reset` (no I/O, so not awaited)."""
        return self._core.ledger.seconds_to_reset()

    async def ping(self) -> None:
        """Raise BudgetUnavailableError unless the store answers (for health checks)."""
        await self._driver.run(self._core.ledger.ping())

    async def replay_spool(self) -> ReplaySummary:
        """As :meth:`BudgetManager.replay_spool`; the files are read in a worker thread."""
        with contextlib.suppress(BudgetUnavailableError):  # else the summary says why
            await self._driver.run(self._core.ledger.ping())  # connected first
        return await asyncio.to_thread(self._core.keeper.replay_now)

    async def aclose(self) -> None:
        """
        Let background releases finish (bounded), stop replaying, close the pool
        (and stop an embedded store no one else uses). Spooled charges stay on disk.
        """
        await self._driver.wait_background(self.config.call_bound())
        await asyncio.to_thread(self._core.keeper.close)
        store, self._store = self._store, None
        if store is not None:
            await store.aclose()

    async def __aenter__(self) -> AsyncBudgetManager:
        # Not a ping: a store that is down must fail calls closed, not the start-up.
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- plumbing ------------------------------------------------------------------

    async def _connect(self) -> Any:
        """The store, opened in a worker thread (an embedded store starts a server)."""
        from ._store import open_async_store

        old = self._store
        if old is not None:  # opened on a loop now gone (asyncio.run again): let go of it
            with contextlib.suppress(Exception):
                await old.aclose()
        self._store = store = await asyncio.to_thread(open_async_store, self.config)
        self._loop = asyncio.get_running_loop()
        self._core.keeper.run = self._run_from_thread
        return store.client

    def _run_from_thread(self, steps: Steps[T]) -> T:
        """For the spool's replay thread: run a ledger operation on this manager's loop."""
        loop = self._loop
        assert loop is not None
        future = asyncio.run_coroutine_threadsafe(self._driver.run(steps), loop)
        return future.result(self.config.call_bound())
