"""
Every error coreason-budget raises.

They share one base class, :class:`BudgetError`, so a caller can refuse an LLM
call on ``except BudgetError`` without knowing which of our promises failed:
over budget, store unreachable, or bad input are all reasons not to spend.
"""

from __future__ import annotations

import datetime

__all__ = [
    "BudgetError",
    "BudgetExceededError",
    "BudgetUnavailableError",
    "ConfigError",
    "IdempotencyConflictError",
    "InvalidInputError",
    "UnknownModelError",
    "UnknownReservationError",
]


class BudgetError(Exception):
    """Base class of every error this library raises."""


class BudgetExceededError(BudgetError):
    """
    The request does not fit a daily budget; nothing was charged.

    When several scopes refuse, the narrowest one (user, then project, then
    global) is reported because that is the one a person can act on.
    """

    scope: str
    entity_id: str | None
    limit_usd: float
    spent_usd: float
    requested_usd: float
    #: The window that refused ("hour", "day", "week", "month"): of the
    #: narrowest scope's refusing windows, the one whose period ends last.
    window: str
    #: When that period ends (an aware UTC datetime), by the store's clock.
    resets_at: datetime.datetime | None
    #: Whole seconds until then (at least 1): what the service's Retry-After says.
    retry_after_seconds: int | None

    def __init__(
        self,
        *,
        scope: str,
        entity_id: str | None,
        limit_nano: int,
        spent_nano: int,
        requested_nano: int,
        window: str = "day",
        resets_at: datetime.datetime | None = None,
        retry_after_seconds: int | None = None,
    ) -> None:
        # Local import: money formatting lives with the money code; this module
        # must stay importable on its own (it is public API).
        from ._money import format_usd, nano_to_usd

        self.scope = scope
        self.entity_id = entity_id
        self.limit_nano = limit_nano
        self.spent_nano = spent_nano
        self.requested_nano = requested_nano
        self.limit_usd = nano_to_usd(limit_nano)
        self.spent_usd = nano_to_usd(spent_nano)
        self.requested_usd = nano_to_usd(requested_nano)
        self.window = window
        self.resets_at = resets_at
        self.retry_after_seconds = retry_after_seconds
        who = scope.capitalize() if entity_id is None else f"{scope.capitalize()} {entity_id}"
        adverb = {"hour": "hourly", "day": "daily", "week": "weekly", "month": "monthly"}
        # When it resets is a field (resets_at), not words: the message stays the
        # same all period, for logs to group and people to read.
        super().__init__(
            f"Budget exceeded for {who}: spent {format_usd(spent_nano)} of "
            f"{format_usd(limit_nano)} {adverb.get(window, window)} limit, requested "
            f"{format_usd(requested_nano)}"
        )

    def to_json(self) -> dict[str, object]:
        """Which scope refused and the exact amounts, as the HTTP API and CLI report them."""
        return {
            "scope": self.scope,
            "entity_id": self.entity_id,
            "limit_nano": self.limit_nano,
            "spent_nano": self.spent_nano,
            "requested_nano": self.requested_nano,
            "window": self.window,
            "resets_at": None if self.resets_at is None else self.resets_at.isoformat(),
            "retry_after_seconds": self.retry_after_seconds,
        }


class BudgetUnavailableError(BudgetError):
    """
    The budget store could not be asked (unreachable, timed out, misbehaving).

    We fail closed: treat this exactly like "over budget" and do not make the
    call, because a guard that lets calls through when it is down guards nothing.

    Nothing this error answers is charged later: a write that was saved to the
    local spool returns a receipt saying "spooled" instead of raising this. When
    the store may have taken a write whose reply was lost, the ids below make a
    retry safe: pass them back and the write lands once.

    *idempotency_key*: the spend's key (the one generated for it, if none was given).
    *reservation_id*: the reservation the failed call was about. For a reserve
    whose outcome is unknown, the library is undoing that hold (directly, or
    through the spool); reserving again needs a new id.
    """

    idempotency_key: str | None
    reservation_id: str | None

    def __init__(
        self,
        message: str,
        *,
        idempotency_key: str | None = None,
        reservation_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.idempotency_key = idempotency_key
        self.reservation_id = reservation_id

    def to_json(self) -> dict[str, object]:
        """The ids a retry needs, as the HTTP API and CLI report them (only those set)."""
        ids = {"idempotency_key": self.idempotency_key, "reservation_id": self.reservation_id}
        return {k: v for k, v in ids.items() if v is not None}


class InvalidInputError(BudgetError, ValueError):
    """An argument is malformed (a negative or NaN cost, an empty id, ...); nothing was written."""


class IdempotencyConflictError(InvalidInputError):
    """
    An idempotency key or reservation id was used before for a different write
    (another user, other scopes or another amount); nothing was written.

    Repeating a write with the same key and the same payload is a safe no-op;
    the same key for something else is a bug in the caller that would otherwise
    lose one of the two charges or settle someone else's hold.
    """


class ConfigError(BudgetError, ValueError):
    """A configuration value is missing or malformed; the message names the variable."""


class UnknownModelError(BudgetError, LookupError):
    """
    No price is known for a model.

    Raised instead of pricing the call at $0, which would silently void every budget.
    """


class UnknownReservationError(BudgetError, LookupError):
    """No reservation with that id is in the store (it was never made, or it expired)."""
