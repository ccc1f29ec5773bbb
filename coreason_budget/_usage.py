"""
What reading the ledger returns: spend per scope, and the day's report.

Values are exact integer nano-dollars; the ``*_usd`` properties are floats for
display (the float nearest the exact amount).
"""

from __future__ import annotations

import datetime

import attrs

from ._money import nano_to_usd


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


@attrs.frozen
class ModelSpend:
    """Today's spend on one model (models have no limit; they are tracked for reports)."""

    model: str
    spent_nano: int

    @property
    def spent_usd(self) -> float:
        return nano_to_usd(self.spent_nano)


@attrs.frozen
class Report:
    """Today's spend across the organisation, biggest spenders first."""

    day: datetime.date
    total: ScopeUsage
    users: tuple[ScopeUsage, ...]
    projects: tuple[ScopeUsage, ...]
    models: tuple[ModelSpend, ...]
