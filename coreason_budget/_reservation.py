"""
The reservation handle: money held before an LLM call, settled after it.
"""

from __future__ import annotations

import logging
import threading
from decimal import Decimal
from types import TracebackType
from typing import TYPE_CHECKING, Literal, Self

from ._ledger import Held, Ledger, Scopes
from ._money import nano_to_usd, to_nano
from .exceptions import BudgetError, BudgetUnavailableError, InvalidInputError

if TYPE_CHECKING:
    from ._manager import BudgetManager

log = logging.getLogger("coreason_budget")

OnError = Literal["charge", "release"]


class SettlesOnExit:
    """
    The with-block contract of every reservation handle, local or over HTTP.

    Leaving the block unsettled charges the estimate: on a normal exit because
    the call was made, and on an exception too (unless ``on_error="release"``)
    because a failed call may still have been billed. If that settlement cannot
    reach the store, the estimate simply stays held, which is what charging it
    would have done: it is logged, never raised over the caller's own exception.
    """

    __slots__ = ()

    id: str
    state: str
    on_error: OnError

    def _settle_on_exit(self, release: bool) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.state != "held":
            return
        try:
            self._settle_on_exit(release=exc_type is not None and self.on_error == "release")
        except BudgetError as e:
            log.warning("Could not settle reservation %s on exit: %s", self.id, e)


class Reservation(SettlesOnExit):
    """
    A hold on the estimate in every scope, taken when ``reserve()`` returned.

    Settle it once: :meth:`commit` with the real cost, or :meth:`release`.
    Used as a context manager it keeps the :class:`SettlesOnExit` contract: an
    unknown outcome is safest assumed spent.
    """

    # One per LLM call: slots keep it small.
    __slots__ = (
        "__weakref__",  # the spool refers to a handle whose settlement it keeps
        "_ledger",
        "_lock",
        "_manager",
        "_scopes",
        "_spooled",
        "day",
        "estimate_nano",
        "id",
        "model",
        "on_error",
        "project_id",
        "state",
        "user_id",
    )

    def __init__(
        self,
        manager: BudgetManager,
        ledger: Ledger,
        scopes: Scopes,
        reservation_id: str,
        held: Held,
        *,
        user_id: str,
        project_id: str | None,
        model: str | None,
        on_error: OnError,
    ) -> None:
        self._manager = manager
        self._ledger = ledger
        self._scopes = scopes
        self._lock = threading.Lock()
        self.id = reservation_id
        self.user_id = user_id
        self.project_id = project_id
        self.model = model
        self.on_error = on_error
        self.day = held.day
        self.estimate_nano = held.held_nano
        #: "held", then "committed" or "released".
        self.state = held.state
        self._spooled = False  # a settlement of ours waits in the spool

    @property
    def estimate_usd(self) -> float:
        return nano_to_usd(self.estimate_nano)

    def commit(self, actual_cost: float | Decimal) -> None:
        """
        Settle the hold to *actual_cost*: refund the difference, or charge it.

        A cost above the estimate is still recorded in full, even past a
        limit: the money was spent. Settling twice is a no-op.

        If the store cannot be reached this raises BudgetUnavailableError, having
        first saved the settlement to the local spool, from which it is recorded
        once the store is back (unless this handle, still held, settles first).
        """
        self._settle(to_nano(actual_cost, "actual_cost"), "committed")

    def release(self) -> None:
        """Give the whole hold back (the call was not made). A no-op once settled."""
        self._settle(0, "released")

    def commit_usage(
        self, *, input_tokens: int, output_tokens: int, cached_input_tokens: int = 0
    ) -> None:
        """Commit the price of the tokens used, priced for the reservation's model."""
        if self.model is None:
            raise InvalidInputError("commit_usage() needs a reservation made with model=...")
        cost = self._manager.pricing.calculate(
            self.model,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cached_input_tokens=cached_input_tokens,
        )
        self.commit(cost)  # through commit's checks: a price can exceed any single amount

    def _settle(self, actual: int, state: str, *, implicit: bool = False) -> None:
        """
        *implicit*: the settlement on leaving a ``with`` block, which nobody will
        retry, so its spooled copy is replayed without waiting for this handle.
        """
        manager = self._manager
        with self._lock:
            if self.state != "held":
                return
            try:
                reply = self._ledger.settle(self._scopes, self.id, self.day, actual, state)
            except BudgetUnavailableError as e:
                self._spooled = manager._keeper.spool is not None
                owner = None if implicit else self
                manager._keeper.keep(
                    e, "settle", self.id, self.day, self._scopes, actual, state, owner=owner
                )
            if reply == ("GONE", "expired"):
                log.warning(
                    "Reservation %s settled after its day's ledger expired; not recorded", self.id
                )
            self.state = reply[1] if reply[0] == "DONE" else state
            if self._spooled:
                # Settled by this retry: what the spool holds for it is moot (and harmless).
                self._spooled = False
                manager._keeper.confirm_settled(self.id)
        manager._keeper.replay_if_due()

    def _settle_on_exit(self, release: bool) -> None:
        # Nobody retries these, so their spooled copies (if any) replay at once.
        if release:
            self._settle(0, "released", implicit=True)
        else:
            self._settle(self.estimate_nano, "committed", implicit=True)

    def __repr__(self) -> str:
        return (
            f"<Reservation {self.id} user={self.user_id!r} project={self.project_id!r} "
            f"estimate=${self.estimate_usd} state={self.state}>"
        )
