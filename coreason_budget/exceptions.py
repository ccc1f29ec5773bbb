"""
Every error coreason-budget raises.

They share one base class, :class:`BudgetError`, so a caller can refuse an LLM
call on ``except BudgetError`` without knowing which of our promises failed:
over budget, store unreachable, or bad input are all reasons not to spend.
"""

from __future__ import annotations

__all__ = [
    "BudgetError",
    "BudgetExceededError",
    "BudgetUnavailableError",
    "ConfigError",
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

    def __init__(
        self,
        *,
        scope: str,
        entity_id: str | None,
        limit_nano: int,
        spent_nano: int,
        requested_nano: int,
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
        who = scope.capitalize() if entity_id is None else f"{scope.capitalize()} {entity_id}"
        super().__init__(
            f"Budget exceeded for {who}: spent {format_usd(spent_nano)} of "
            f"{format_usd(limit_nano)} daily limit, requested {format_usd(requested_nano)}"
        )

    def to_json(self) -> dict[str, object]:
        """Which scope refused and the exact amounts, as the HTTP API and CLI report them."""
        return {
            "scope": self.scope,
            "entity_id": self.entity_id,
            "limit_nano": self.limit_nano,
            "spent_nano": self.spent_nano,
            "requested_nano": self.requested_nano,
        }


class BudgetUnavailableError(BudgetError):
    """
    The budget store could not be asked (unreachable, timed out, misbehaving).

    We fail closed: treat this exactly like "over budget" and do not make the
    call, because a guard that lets calls through when it is down guards nothing.
    """


class InvalidInputError(BudgetError, ValueError):
    """An argument is malformed (a negative or NaN cost, an empty id, ...); nothing was written."""


class ConfigError(BudgetError, ValueError):
    """A configuration value is missing or malformed; the message names the variable."""


class UnknownModelError(BudgetError, LookupError):
    """
    No price is known for a model.

    Raised instead of pricing the call at $0, which would silently void every budget.
    """


class UnknownReservationError(BudgetError, LookupError):
    """No reservation with that id is in the store (it was never made, or it expired)."""
