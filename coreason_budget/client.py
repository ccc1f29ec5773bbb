"""
BudgetClient: the budget guard of a coreason-budget service, called over HTTP.

``pip install coreason-budget[client]`` (httpx only). The client has the calls,
the with-block semantics and the exceptions of
:class:`~coreason_budget.BudgetManager`, so code written against the manager
works against a shared service unchanged (and :class:`AsyncBudgetClient` has
those of :class:`~coreason_budget.AsyncBudgetManager`, awaited):

* input is validated here, with the manager's own checks, so bad input raises
  :class:`InvalidInputError` before anything is sent;
* 429 is :class:`BudgetExceededError` (with the service's scope, amounts,
  window and when it resets),
  404 on a reservation :class:`UnknownReservationError`, 422 :class:`InvalidInputError`
  (or :class:`UnknownModelError`), and everything that means "the service could
  not say yes" -- 503, 5xx, a timeout, a refused connection, an answer that is not
  the service's -- :class:`BudgetUnavailableError`: fail closed;
* 401/403 (a missing, wrong or non-admin API key) are plain :class:`BudgetError`,
  so ``except BudgetError`` still refuses the call, with a message that names
  the key as the cause.

Every request is safe to repeat, so transport failures are retried a few times:
reservation ids and idempotency keys are generated here, before the first
attempt, so a retry finds the hold (or the recorded spend) the lost attempt made.

Both clients run one core (:mod:`._client_core`); they differ only in how one
attempt is sent and bounded, and in how they wait.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import time
from collections.abc import Callable, Coroutine
from decimal import Decimal
from types import TracebackType
from typing import Any

import httpx

from ._budget import ScopeName
from ._client_core import MAX_TOKENS, Answer, ClientCore, Request, Wait
from ._drivers import AsyncRunner, SyncRunner
from ._http_deadline import DeadlineTransport, attempt_deadline, deadline_exceeded
from ._receipt import Receipt
from ._reservation import AsyncReservation, OnError, Reservation, ReservationRequest
from ._usage import MAX_REPORT_TOP, Report, ScopeUsage

__all__ = ["MAX_REPORT_TOP", "MAX_TOKENS", "AsyncBudgetClient", "BudgetClient"]


class BudgetClient:
    """
    A :class:`~coreason_budget.BudgetManager` lookalike backed by the HTTP service.

    Thread-safe: one client (one pooled ``httpx.Client``) per process is enough.
    Timeouts are short on purpose, as the manager's are: a guard that hangs
    stalls every LLM call behind it. A dead service fails a call within about
    ``(retries + 1) * timeout`` seconds, and sooner when the connection is refused.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        *,
        timeout: float = 2.0,
        retries: int = 2,
        pool_size: int = 32,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        """
        *api_key* is sent as a bearer token; None only for a service run with
        ``--insecure-no-auth``. *transport* replaces httpx's network transport
        (for tests, or a custom TLS setup); each attempt's *timeout* then bounds
        only its individual reads and writes, as in httpx.
        """
        self._core = core = ClientCore(base_url, api_key, timeout, retries, pool_size)
        self.base_url, self.retries, self.timeout = core.base_url, core.retries, core.timeout
        if transport is None:
            # httpx's timeouts bound each read, not a request: a peer trickling a byte at a
            # time would hold the call for ever. This transport ends each attempt by its
            # deadline, however slowly the peer answers.
            transport = DeadlineTransport(core.base_url, core.limits)
        self._http = httpx.Client(transport=transport, **core.http_options())
        self._run = _SyncHttp(self._http, core.timeout).run
        self._handle = functools.partial(Reservation, core, self._run)

    # -- the guard ------------------------------------------------------------

    def check_availability(
        self, user_id: str, estimated_cost: float | Decimal, project_id: str | None = None
    ) -> None:
        """
        Raise :class:`BudgetExceededError` if *estimated_cost* does not fit now, in
        every scope and window (read-only).
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

        Without an *idempotency_key* one is generated per call, so the retry
        of a request whose answer was lost records the spend once. The receipt
        says what the service did, as :meth:`BudgetManager.record_spend`'s does
        ("spooled": the service saved it and records it once its store is back).
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

        The id is chosen here (unless given) before the first attempt, so a
        retry after a lost answer returns the hold that attempt took instead of
        taking a second one. When every attempt's answer is lost the hold is
        released by id in the background, and the error names the id.
        """
        return self._run(
            self._core.reserve(
                self._handle, user_id, estimate, project_id, model, on_error, reservation_id
            )
        )

    def reservation(self, reservation_id: str) -> Reservation:
        """
        The handle of an existing reservation, by id (taken by any client or worker).

        Raises :class:`UnknownReservationError` when the service has no such reservation.
        """
        return self._run(self._core.reservation(self._handle, reservation_id))

    # -- reporting and administration -------------------------------------------

    def usage(
        self, user_id: str, project_id: str | None = None, *, window: str = "day"
    ) -> dict[str, ScopeUsage]:
        """
        Spent, limit, remaining and when it resets, per scope ("user",
        "project" if given, "global") in the current period of *window*
        (today, by default; any window the service keeps).
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
        models, biggest first. The current period of *window* (today), or the
        one holding *period* (a date: its local midnight; an aware datetime),
        as :meth:`BudgetManager.report`. Needs an admin API key.

        The service lists at most 1000 of each, so ``top=None`` means 1000.
        """
        return self._run(self._core.report(top, window, period))

    def set_limit(
        self,
        scope: ScopeName,
        entity_id: str | None,
        limit_usd: float | Decimal | None,
        window: str = "day",
    ) -> None:
        """
        Override the limit of one user, project or model (or the global one,
        with entity_id None) in one *window* (one the service keeps); ``None``
        removes the override. Needs an admin API key.
        """
        self._run(self._core.set_limit(scope, entity_id, limit_usd, window))

    def ping(self) -> None:
        """Raise :class:`BudgetUnavailableError` unless the service and its store answer."""
        self._run(self._core.ping())

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> BudgetClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<BudgetClient {self.base_url}>"


class AsyncBudgetClient:
    """
    :class:`BudgetClient`'s calls, awaited, on ``httpx.AsyncClient``: the
    :class:`~coreason_budget.AsyncBudgetManager` lookalike backed by the service.

    One per process is enough (a new event loop gets a new pool). Each attempt
    is bounded by *timeout* as a whole (``asyncio.timeout``), so a dead or
    trickling service fails a call within about ``(retries + 1) * timeout``
    seconds. A write whose task is
    cancelled while in flight (a spend, a limit, a settlement, a reserve) runs
    to its end, so that it lands once; a reserve whose caller went away
    releases its hold. Close it with ``await client.aclose()`` or ``async with``.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        *,
        timeout: float = 2.0,
        retries: int = 2,
        pool_size: int = 32,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """As :class:`BudgetClient`'s; *transport* replaces httpx's async network transport."""
        self._core = core = ClientCore(base_url, api_key, timeout, retries, pool_size)
        self.base_url, self.retries, self.timeout = core.base_url, core.retries, core.timeout
        self._driver = _AsyncHttp(
            functools.partial(httpx.AsyncClient, transport=transport, **core.http_options()),
            core.timeout,
        )
        self._handle = functools.partial(AsyncReservation, core, self._driver)

    # -- the guard ------------------------------------------------------------

    async def check_availability(
        self, user_id: str, estimated_cost: float | Decimal, project_id: str | None = None
    ) -> None:
        """As :meth:`BudgetClient.check_availability`."""
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
        As :meth:`BudgetClient.record_spend`. Cancelled while in flight, the
        request still runs to its end: retry with the receipt's key, never without.
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
        As :meth:`BudgetClient.reserve`: ``r = await client.reserve(...)``, or
        ``async with client.reserve(...) as r:`` (settled on exit, as with ``with``).

        A task cancelled while its reserve is in flight holds nothing: a hold
        the service took meanwhile is released by id.
        """

        def take() -> Coroutine[Any, Any, AsyncReservation]:
            # In the caller's task: a cancellation thrown into the core's steps
            # releases the id in the background, whichever way the request went.
            return self._driver.run(
                self._core.reserve(
                    self._handle, user_id, estimate, project_id, model, on_error, reservation_id
                )
            )

        return ReservationRequest(take)

    async def reservation(self, reservation_id: str) -> AsyncReservation:
        """As :meth:`BudgetClient.reservation`."""
        return await self._driver.run(self._core.reservation(self._handle, reservation_id))

    # -- reporting and administration -------------------------------------------

    async def usage(
        self, user_id: str, project_id: str | None = None, *, window: str = "day"
    ) -> dict[str, ScopeUsage]:
        """As :meth:`BudgetClient.usage`."""
        return await self._driver.run(self._core.usage(user_id, project_id, window))

    async def report(
        self,
        top: int | None = None,
        *,
        window: str = "day",
        period: datetime.date | datetime.datetime | None = None,
    ) -> Report:
        """As :meth:`BudgetClient.report`."""
        return await self._driver.run(self._core.report(top, window, period))

    async def set_limit(
        self,
        scope: ScopeName,
        entity_id: str | None,
        limit_usd: float | Decimal | None,
        window: str = "day",
    ) -> None:
        """As :meth:`BudgetClient.set_limit`."""
        await self._driver.run(
            self._core.set_limit(scope, entity_id, limit_usd, window), resumable=True
        )

    async def ping(self) -> None:
        """As :meth:`BudgetClient.ping`."""
        await self._driver.run(self._core.ping())

    async def aclose(self) -> None:
        """Let background releases finish (bounded), then close the connection pool."""
        await self._driver.wait_background(self._core.call_bound())
        await self._driver.http.aclose()

    async def __aenter__(self) -> AsyncBudgetClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<AsyncBudgetClient {self.base_url}>"


# -- the drivers: one attempt, and a pause ---------------------------------------------
#
# Each runs the core's steps with the run loop (and the Blocking and Detach steps)
# the store's drivers share; they only add the two steps of HTTP: sending one attempt,
# bounded by the timeout as a whole, and waiting before the next.


class _SyncHttp(SyncRunner):
    """Blocking: the attempt's deadline is enforced by :class:`DeadlineTransport`."""

    def __init__(self, http: httpx.Client, timeout: float) -> None:
        self._http = http
        self._timeout = timeout

    def _do(self, step: Any) -> Any:
        kind = type(step)
        if kind is Request:
            # The whole attempt, body included (httpx reads it inside request()).
            with attempt_deadline(self._timeout):
                response = self._http.request(
                    step.method, step.path, json=step.body, params=step.params
                )
            return Answer.of(response)
        if kind is Wait:
            time.sleep(step.seconds)
            return None
        return super()._do(step)


class _AsyncHttp(AsyncRunner):
    """
    Awaited: the attempt is cancelled by ``asyncio.timeout``, however the peer
    trickles. The connection pool belongs to the loop it was made on: a call
    from another loop (``asyncio.run`` twice in a script) gets a new one.
    """

    def __init__(self, make_http: Callable[[], httpx.AsyncClient], timeout: float) -> None:
        super().__init__()
        self._make_http = make_http
        self.http = make_http()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timeout = timeout

    async def _do(self, step: Any) -> Any:
        kind = type(step)
        if kind is Request:
            try:
                async with asyncio.timeout(self._timeout):
                    response = await self._pool().request(
                        step.method, step.path, json=step.body, params=step.params
                    )
            except TimeoutError as e:
                raise deadline_exceeded(self._timeout) from e
            return Answer.of(response)
        if kind is Wait:
            await asyncio.sleep(step.seconds)
            return None
        return await super()._do(step)

    def _pool(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._loop is not None:  # the old loop's connections die with it
                self.http = self._make_http()
                self._background = set()
            self._loop = loop
        return self.http
