"""
The reservation handle: money held before an LLM call, settled after it.
"""

from __future__ import annotations

import datetime
import logging
import threading
from decimal import Decimal
from types import TracebackType
from typing import TYPE_CHECKING, Literal, Self

from ._ledger import Held, Ledger, Scopes, day_date
from ._money import nano_to_usd, to_nano
from ._receipt import Kind, Receipt, Status
from .exceptions import BudgetError, BudgetUnavailableError, InvalidInputError

if TYPE_CHECKING:
    from ._manager import BudgetManager
    from ._replay import SpoolKeeper

log = logging.getLogger("coreason_budget")

OnError = Literal["charge", "release"]


class SettlesOnExit:
    """
    The with-block contract of every reservation handle, local or over HTTP.

    Leaving the block unsettled charges the estimate: on a normal exit because
    the call was made, and on an exception too (unless ``on_error="release"``)
    because a failed call may still have been billed. If that settlement cannot
    reach the store it is spooled; without a spool the estimate simply stays
    held, which is what charging it would have done: it is logged, never raised
    over the caller's own exception.
    """

    __slots__ = ()

    id: str
    state: str
    on_error: OnError
    receipt: Receipt | None

    def _settle_on_exit(self, release: bool) -> None:
        raise NotImplementedError

    def _already_settled(self, kind: Kind) -> Receipt | None:
        """
        The answer to a settle with nothing left to do: the first settlement's
        receipt, or a "duplicate" for a hold settled before this handle was made.
        None: the hold is this handle's to settle.
        """
        if self.receipt is None and self.state != "held":
            return Receipt("duplicate", kind, self.id, 0)
        return self.receipt

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
        "_keeper",
        "_ledger",
        "_lock",
        "_manager",
        "_scopes",
        "day",
        "estimate_nano",
        "id",
        "model",
        "on_error",
        "project_id",
        "receipt",
        "state",
        "user_id",
    )

    def __init__(
        self,
        manager: BudgetManager,
        ledger: Ledger,
        keeper: SpoolKeeper,
        scopes: Scopes,
        reservation_id: str,
        held: Held,
        *,
        user_id: str,
        project_id: str | None,
        model: str | None,
        on_error: OnError,
    ) -> None:
        self._manager = manager  # for its public pricing only
        self._ledger = ledger
        self._keeper = keeper
        self._scopes = scopes
        self._lock = threading.Lock()
        self.id = reservation_id
        self.user_id = user_id
        self.project_id = project_id
        self.model = model
        self.on_error = on_error
        self.day = held.day
        self.estimate_nano = held.held_nano
        #: "held", then "committed" or "released" (as this handle settled it,
        #: or as the store had it settled already).
        self.state = held.state
        #: What became of the settlement's money, once settled through this handle.
        self.receipt: Receipt | None = None

    @property
    def estimate_usd(self) -> float:
        return nano_to_usd(self.estimate_nano)

    @property
    def date(self) -> datetime.date:
        """The (UTC) day the hold was taken on, which it settles on whenever committed."""
        return day_date(self.day)

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
        return self._settle(to_nano(actual_cost, "actual_cost"), "committed")

    def release(self) -> Receipt:
        """Give the whole hold back (the call was not made). A no-op once settled."""
        return self._settle(0, "released")

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
        if self.model is None:
            raise InvalidInputError("commit_usage() needs a reservation made with model=...")
        cost = self._manager.pricing.calculate(
            self.model,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cached_input_tokens=cached_input_tokens,
            cache_creation_input_tokens=cache_creation_input_tokens,
        )
        return self.commit(cost)  # through commit's checks: a price can exceed any single amount

    def _settle(self, actual: int, state: str) -> Receipt:
        kind: Kind = "commit" if state == "committed" else "release"
        with self._lock:
            if (settled := self._already_settled(kind)) is not None:
                return settled
            try:
                reply = self._ledger.settle(self._scopes, self.id, self.day, actual, state)
            except BudgetUnavailableError as e:
                e.reservation_id = self.id
                self._keeper.keep(e, "settle", self.id, self.day, self._scopes, actual, state)
                self.state = state
                self.receipt = Receipt("spooled", kind, self.id, actual)
                return self.receipt
            if reply == ("GONE", "expired"):
                log.warning(
                    "Reservation %s settled after its day's ledger expired; not recorded", self.id
                )
            status = "duplicate" if reply[0] == "DONE" else _SETTLED[reply[1]]
            self.state = reply[1] if reply[0] == "DONE" else state
            self.receipt = Receipt(status, kind, self.id, actual if status == "recorded" else 0)
        return self.receipt

    def _settle_on_exit(self, release: bool) -> None:
        if release:
            self._settle(0, "released")
        else:
            self._settle(self.estimate_nano, "committed")

    def __repr__(self) -> str:
        return (
            f"<Reservation {self.id} user={self.user_id!r} project={self.project_id!r} "
            f"estimate=${self.estimate_usd} state={self.state}>"
        )


#: A settlement's reply word (OK's state, or GONE's) -> what became of the money.
_SETTLED: dict[str, Status] = {
    "committed": "recorded",
    "released": "recorded",
    "recorded": "recorded",
    "expired": "expired",
}
