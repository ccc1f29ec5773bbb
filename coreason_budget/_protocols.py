"""
The promises every face keeps, as types: :class:`Budget` and :class:`AsyncBudget`.

BudgetManager and BudgetClient are Budgets; AsyncBudgetManager and
AsyncBudgetClient are AsyncBudgets. Code written against the protocol runs
against a local store or a shared service unchanged, and mypy checks that
the faces keep the same signatures (``tests/typing_api.py``).
"""

from __future__ import annotations

import datetime
from decimal import Decimal
from types import TracebackType
from typing import Protocol, Self

from ._budget import ScopeName
from ._receipt import Receipt
from ._reservation import AsyncReservation, OnError, Reservation, ReservationRequest
from ._usage import Report, ScopeUsage


class Budget(Protocol):
    """The synchronous face: :class:`BudgetManager`, :class:`BudgetClient`."""

    def check_availability(
        self, user_id: str, estimated_cost: float | Decimal, project_id: str | None = None
    ) -> None: ...

    def record_spend(
        self,
        user_id: str,
        cost: float | Decimal,
        project_id: str | None = None,
        model: str | None = None,
        idempotency_key: str | None = None,
    ) -> Receipt: ...

    def reserve(
        self,
        user_id: str,
        estimate: float | Decimal,
        project_id: str | None = None,
        model: str | None = None,
        *,
        on_error: OnError = "charge",
        reservation_id: str | None = None,
    ) -> Reservation: ...

    def reservation(self, reservation_id: str) -> Reservation: ...

    def usage(
        self, user_id: str, project_id: str | None = None, *, window: str = "day"
    ) -> dict[str, ScopeUsage]: ...

    def report(
        self,
        top: int | None = None,
        *,
        window: str = "day",
        period: datetime.date | datetime.datetime | None = None,
    ) -> Report: ...

    def set_limit(
        self,
        scope: ScopeName,
        entity_id: str | None,
        limit_usd: float | Decimal | None,
        window: str = "day",
    ) -> None: ...

    def ping(self) -> None: ...

    def close(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class AsyncBudget(Protocol):
    """The asyncio face: :class:`AsyncBudgetManager`, :class:`AsyncBudgetClient`."""

    async def check_availability(
        self, user_id: str, estimated_cost: float | Decimal, project_id: str | None = None
    ) -> None: ...

    async def record_spend(
        self,
        user_id: str,
        cost: float | Decimal,
        project_id: str | None = None,
        model: str | None = None,
        idempotency_key: str | None = None,
    ) -> Receipt: ...

    def reserve(
        self,
        user_id: str,
        estimate: float | Decimal,
        project_id: str | None = None,
        model: str | None = None,
        *,
        on_error: OnError = "charge",
        reservation_id: str | None = None,
    ) -> ReservationRequest: ...

    async def reservation(self, reservation_id: str) -> AsyncReservation: ...

    async def usage(
        self, user_id: str, project_id: str | None = None, *, window: str = "day"
    ) -> dict[str, ScopeUsage]: ...

    async def report(
        self,
        top: int | None = None,
        *,
        window: str = "day",
        period: datetime.date | datetime.datetime | None = None,
    ) -> Report: ...

    async def set_limit(
        self,
        scope: ScopeName,
        entity_id: str | None,
        limit_usd: float | Decimal | None,
        window: str = "day",
    ) -> None: ...

    async def ping(self) -> None: ...

    async def aclose(self) -> None: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...
