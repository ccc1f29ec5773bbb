"""
What reading the ledger returns: spend per scope, and the day's report.

Values are exact integer nano-dollars; the ``*_usd`` properties are floats for
display (the float nearest the exact amount).
"""

from __future__ import annotations

import datetime
from typing import Any

import attrs

from ._ledger import at_ms
from ._money import nano_to_usd
from ._windows import WINDOWS
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


def check_window(window: object) -> str:
    """
    *window*, if it names one: the same words on every face. (Whether a manager
    keeps it is the manager's to say.)
    """
    if isinstance(window, str) and window in WINDOWS:
        return window
    raise InvalidInputError(f"window must be one of {', '.join(WINDOWS)}, got {window!r}")


def check_period(period: object) -> datetime.date:
    """A report's *period*: a date (its local midnight), or an aware datetime."""
    if isinstance(period, datetime.datetime):
        at_ms(period)  # aware, or InvalidInputError
        return period
    if isinstance(period, datetime.date):
        return period
    raise InvalidInputError(f"period must be a date or an aware datetime, got {period!r}")


@attrs.frozen
class ScopeUsage:
    """
    The spend of one scope in the current period of one window (today, by
    default). Open reservations count as spent until settled. A limit of
    None: none (the spend is tracked, never refused).
    """

    scope: str
    entity_id: str | None
    spent_nano: int
    limit_nano: int | None
    window: str = "day"
    #: When the period ends and the window's budget starts again (aware, UTC).
    resets_at: datetime.datetime | None = None

    @property
    def remaining_nano(self) -> int | None:
        """What still fits (0 when nothing does); None without a limit."""
        if self.limit_nano is None:
            return None
        return max(self.limit_nano - self.spent_nano, 0)

    @property
    def spent_usd(self) -> float:
        return nano_to_usd(self.spent_nano)

    @property
    def limit_usd(self) -> float | None:
        return None if self.limit_nano is None else nano_to_usd(self.limit_nano)

    @property
    def remaining_usd(self) -> float | None:
        remaining = self.remaining_nano
        return None if remaining is None else nano_to_usd(remaining)

    def to_json(self) -> dict[str, Any]:
        """The shape the HTTP API and the CLI's ``--json`` share."""
        return {
            "entity_id": self.entity_id,
            "spent_usd": self.spent_usd,
            "limit_usd": self.limit_usd,
            "remaining_usd": self.remaining_usd,
            "spent_nano": self.spent_nano,
            "limit_nano": self.limit_nano,
            "remaining_nano": self.remaining_nano,
            "window": self.window,
            "resets_at": None if self.resets_at is None else self.resets_at.isoformat(),
        }


@attrs.frozen
class Report:
    """One period's spend across the organisation (today, by default), biggest spenders first."""

    window: str
    #: The period's local name: "2026-11-29" (a day or the week starting then),
    #: "2026-11" (a month), "2026-11-29T14" (an hour).
    period: str
    starts_at: datetime.datetime
    resets_at: datetime.datetime
    total: ScopeUsage
    users: tuple[ScopeUsage, ...]
    projects: tuple[ScopeUsage, ...]
    models: tuple[ScopeUsage, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "window": self.window,
            "period": self.period,
            "starts_at": self.starts_at.isoformat(),
            "resets_at": self.resets_at.isoformat(),
            "total": self.total.to_json(),
            "users": [u.to_json() for u in self.users],
            "projects": [p.to_json() for p in self.projects],
            "models": [m.to_json() for m in self.models],
        }
