"""
What reading the ledger returns: spend per scope, and the day's report.

Values are exact integer nano-dollars; the ``*_usd`` properties are floats for
display (the float nearest the exact amount).
"""

from __future__ import annotations

import datetime
from typing import Any

import attrs

from ._money import nano_to_usd
from .exceptions import InvalidInputError

#: The longest list a report gives (per scope kind), on every face: the service's
#: answers stay bounded, and the manager's and the client's agree.
MAX_REPORT_TOP = 1000


def check_top(top: object) -> int | None:
    """A report's *top*: None (every row; a client asks for MAX_REPORT_TOP) or 0 to 1000."""
    if top is not None and (
        isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_REPORT_TOP
    ):
        raise InvalidInputError(
            f"top must be None or a whole number from 0 to {MAX_REPORT_TOP}, got {top!r}"
        )
    return top


@attrs.frozen
class ScopeUsage:
    """Today's spend in one scope. Open reservations count as spent until settled."""

    scope: str
    entity_id: str | None
    spent_nano: int
    limit_nano: int

    @property
    def remaining_nano(self) -> int:
        return max(self.limit_nano - self.spent_nano, 0)

    @property
    def spent_usd(self) -> float:
        return nano_to_usd(self.spent_nano)

    @property
    def limit_usd(self) -> float:
        return nano_to_usd(self.limit_nano)

    @property
    def remaining_usd(self) -> float:
        return nano_to_usd(self.remaining_nano)

    def to_json(self) -> dict[str, Any]:
        """The shape the HTTP API and the CLI's ``--json`` share."""
        return {
            "entity_id": self.entity_id,
            "spent_usd": self.spent_usd,
            "limit_usd": self.limit_usd,
            "remaining_usd": self.remaining_usd,
            "spent_nano": self.spent_nano,
            "limit_nano": self.limit_nano,
        }


@attrs.frozen
class ModelSpend:
    """Today's spend on one model (models have no limit; they are tracked for reports)."""

    model: str
    spent_nano: int

    @property
    def spent_usd(self) -> float:
        return nano_to_usd(self.spent_nano)

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "spent_usd": self.spent_usd, "spent_nano": self.spent_nano}


@attrs.frozen
class Report:
    """Today's spend across the organisation, biggest spenders first."""

    day: datetime.date
    total: ScopeUsage
    users: tuple[ScopeUsage, ...]
    projects: tuple[ScopeUsage, ...]
    models: tuple[ModelSpend, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "day": self.day.isoformat(),
            "total": self.total.to_json(),
            "users": [u.to_json() for u in self.users],
            "projects": [p.to_json() for p in self.projects],
            "models": [m.to_json() for m in self.models],
        }
