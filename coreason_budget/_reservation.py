"""
The reservation handle: money held before an LLM call, settled after it.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import threading
from collections.abc import Callable, Coroutine, Generator
from decimal import Decimal
from types import TracebackType
from typing import Any, Generic, Literal, Protocol, Self, TypeVar

from ._drivers import AsyncRunner
from ._ledger import Held, instant
from ._money import nano_to_usd, to_nano
from ._pricing import _check_tokens
from ._receipt import Kind, Receipt
from ._steps import Steps
from .exceptions import BudgetError, InvalidInputError

log = logging.getLogger("coreason_budget")

OnError = Literal["charge", "release"]
#: What runs a handle's steps: a sync driver's run, or an async runner.
R = TypeVar("R")


class HoldOps(Protocol):
    """What a handle's settlements are made of: the manager's core, or a client's."""

    def settle(self, hold: Hold[Any], actual: int, state: str) -> Steps[Receipt]: ...

    def settle_usage(
        self, hold: Hold[Any], tokens: tuple[int, int, int, int]
    ) -> Steps[Receipt]: ...


class Hold(Generic[R]):
    """
    A reservation as its handle knows it: the hold, and how it was settled.

    Settle it once: ``commit`` with the real cost, or ``release``. Leaving a
    ``with`` (or ``async with``) block unsettled charges the estimate: on a
    normal exit because the call was made, and on an exception too (unless
    ``on_error="release"``) because a failed call may still have been billed.
    If that settlement cannot reach the store it is spooled; without a spool
    the estimate simply stays held, which is what charging it would have done:
    it is logged, never raised over the caller's own exception.

    A handle whose ``state`` is not "held" (one got for a settled id) holds
    nothing: settling it is a no-op answering "duplicate".
    """

    # One per LLM call: slots keep it small.
    __slots__ = (
        "_known",
        "_lock",
        "_ops",
        "_run",
        "estimate_nano",
        "held_at_ms",
        "id",
        "model",
        "on_error",
        "project_id",
        "receipt",
        "state",
        "user_id",
    )

    @staticmethod
    def _new_lock() -> Any:
        """The lock that settles a hold once: a thread's, or a task's."""
        raise NotImplementedError

    def __init__(
        self,
        ops: HoldOps,
        run: R,
        reservation_id: str,
        held: Held,
        *,
        user_id: str,
        project_id: str | None,
        model: str | None,
        on_error: OnError,
    ) -> None:
        self._ops = ops
        self._run = run
        self._lock = self._new_lock()
        self.id = reservation_id
        self.user_id = user_id
        self.project_id = project_id
        self.model = model
        self.on_error: OnError = on_error
        #: When the hold was taken (ms since the epoch, by the store's clock).
        self.held_at_ms = held.at
        self.estimate_nano = held.held_nano
        #: "held", then "committed" or "released" (as this handle settled it,
        #: or as the store had it settled already).
        self.state = held.state
        #: What became of the settlement's money, once settled through this handle.
        self.receipt: Receipt | None = None
        self._known = held.known

    @property
    def estimate_usd(self) -> float:
        return nano_to_usd(self.estimate_nano)

    @property
    def held_at(self) -> datetime.datetime:
        """
        When the hold was taken (aware, UTC, by the store's clock): it settles
        in that moment's hour, day, week and month whenever it is settled.
        """
        return instant(self.held_at_ms)

    def already_settled(self, kind: Kind) -> Receipt | None:
        """
        The answer to a settle with nothing left to do: the first settlement's
        receipt, or a "duplicate" for a hold settled before this handle was made.
        None: the hold is this handle's to settle.
        """
        if self.receipt is None and self.state != "held":
            return Receipt("duplicate", kind, self.id, 0)
        return self.receipt

    def _commit_steps(self, ops: HoldOps, actual_cost: float | Decimal) -> Steps[Receipt]:
        return ops.settle(self, to_nano(actual_cost, "actual_cost"), "committed")

    def _usage_steps(self, ops: HoldOps, tokens: tuple[int, int, int, int]) -> Steps[Receipt]:
        if self.model is None:
            raise InvalidInputError("commit_usage() needs a reservation made with model=...")
        return ops.settle_usage(self, _check_tokens(*tokens))

    def _exit_steps(self, ops: HoldOps, failed: bool) -> Steps[Receipt] | None:
        """The settlement leaving a with-block makes (None: settled already)."""
        if self.state != "held":
            return None
        if failed and self.on_error == "release":
            return ops.settle(self, 0, "released")
        if not self._known:
            # An estimate this handle never learnt (made without asking the store):
            # the hold stays as the store has it, which is what charging it does.
            return None
        return ops.settle(self, self.estimate_nano, "committed")

    def _exit_failed(self, error: BudgetError) -> None:
        log.warning("Could not settle reservation %s on exit: %s", self.id, error)

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.id} user={self.user_id!r} project={self.project_id!r} "
            f"estimate=${self.estimate_usd} state={self.state}>"
        )


class Reservation(Hold[Callable[[Steps[Receipt]], Receipt]]):
    """
    A hold on the estimate in every scope, taken when ``reserve()`` returned.

    Thread-safe: settling from two threads settles once.
    """

    __slots__ = ()
    _new_lock = staticmethod(threading.Lock)

    def commit(self, actual_cost: float | Decimal) -> Receipt:
        """
        Settle the hold to *actual_cost*: refund the difference, or charge it.

        A cost above the estimate is still recorded in full, even past a
        limit: the money was spent. Settling twice is a no-op (the first
        settlement's receipt is returned again).

        If the store cannot be reached, the settlement is saved to the local
        spool and the receipt says "spooled": it will be recorded exactly once
        when the store is back. Without a spool this raises
        BudgetUnavailableError and the hold stays as it is: commit again later.
        """
        return self._settle(self._commit_steps(self._ops, actual_cost))

    def release(self) -> Receipt:
        """Give the whole hold back (the call was not made). A no-op once settled."""
        return self._settle(self._ops.settle(self, 0, "released"))

    def commit_usage(
        self,
        *,
        input_tokens: int,
        output_tokens: int,
        cached_input_tokens: int = 0,
        cache_creation_input_tokens: int = 0,
    ) -> Receipt:
        """
        Commit the price of the tokens used, priced for the reservation's model.

        Cache reads (*cached_input_tokens*) and writes (*cache_creation_input_tokens*)
        are counted within *input_tokens*, see :meth:`PricingEngine.calculate`.
        """
        tokens = (input_tokens, output_tokens, cached_input_tokens, cache_creation_input_tokens)
        return self._settle(self._usage_steps(self._ops, tokens))

    def _settle(self, steps: Steps[Receipt]) -> Receipt:
        with self._lock:  # the steps start here: their "settled already?" runs under the lock
            return self._run(steps)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        steps = self._exit_steps(self._ops, failed=exc_type is not None)
        if steps is not None:
            try:
                self._settle(steps)
            except BudgetError as e:
                self._exit_failed(e)


class AsyncReservation(Hold[AsyncRunner]):
    """
    :class:`Reservation`'s async twin: ``await r.commit(x)``, ``async with``.

    Every settlement runs to its end even if the awaiting task is cancelled
    (it lands once, or is spooled; a retry returns its receipt), and leaving
    an ``async with`` block by a cancellation settles as ``on_error`` says.
    """

    __slots__ = ()
    _new_lock = staticmethod(asyncio.Lock)

    async def commit(self, actual_cost: float | Decimal) -> Receipt:
        """As :meth:`Reservation.commit`, awaited."""
        return await self._settle(self._commit_steps(self._ops, actual_cost))

    async def release(self) -> Receipt:
        """As :meth:`Reservation.release`, awaited."""
        return await self._settle(self._ops.settle(self, 0, "released"))

    async def commit_usage(
        self,
        *,
        input_tokens: int,
        output_tokens: int,
        cached_input_tokens: int = 0,
        cache_creation_input_tokens: int = 0,
    ) -> Receipt:
        """As :meth:`Reservation.commit_usage`, awaited (litellm's table loads off the loop)."""
        tokens = (input_tokens, output_tokens, cached_input_tokens, cache_creation_input_tokens)
        return await self._settle(self._usage_steps(self._ops, tokens))

    async def _settle(self, steps: Steps[Receipt]) -> Receipt:
        async def locked() -> Receipt:
            async with self._lock:
                return await self._run.run(steps)

        return await self._run.write(locked())

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        steps = self._exit_steps(self._ops, failed=exc_type is not None)
        if steps is not None:
            try:
                await self._settle(steps)
            except BudgetError as e:
                self._exit_failed(e)


class ReservationRequest:
    """
    What :meth:`AsyncBudgetManager.reserve` returns: await it for the handle,
    or use it in ``async with`` (the hold is taken on entry, settled on exit).
    """

    __slots__ = ("_handle", "_take")

    def __init__(self, take: Callable[[], Coroutine[Any, Any, AsyncReservation]]) -> None:
        self._take = take
        self._handle: AsyncReservation | None = None

    def __await__(self) -> Generator[Any, None, AsyncReservation]:
        return self._taken().__await__()

    async def __aenter__(self) -> AsyncReservation:
        return await self._taken()

    async def _taken(self) -> AsyncReservation:
        """The hold, taken once: awaiting the request again gives the same handle."""
        if self._handle is None:
            self._handle = await self._take()
        return self._handle

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._handle is not None:
            await self._handle.__aexit__(exc_type, exc, tb)
