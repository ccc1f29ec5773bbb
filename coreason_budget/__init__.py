"""
coreason-budget: FinOps guardrails for LLM calls.

Refuses a call *before* it is made when a user's, a project's or the whole
organisation's daily budget would be exceeded, atomically across threads,
processes and machines sharing one Redis.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._async_manager import AsyncBudgetManager
from ._config import BudgetConfig
from ._manager import BudgetManager
from ._pricing import PricingEngine
from ._protocols import AsyncBudget, Budget
from ._receipt import Receipt
from ._reservation import AsyncReservation, Reservation, ReservationRequest
from ._spool import ReplaySummary
from ._usage import Report, ScopeUsage
from .exceptions import (
    BudgetError,
    BudgetExceededError,
    BudgetUnavailableError,
    ConfigError,
    IdempotencyConflictError,
    InvalidInputError,
    UnknownModelError,
    UnknownReservationError,
)

if TYPE_CHECKING:
    from .client import AsyncBudgetClient, BudgetClient

__all__ = [
    "AsyncBudget",
    "AsyncBudgetClient",
    "AsyncBudgetManager",
    "AsyncReservation",
    "Budget",
    "BudgetClient",
    "BudgetConfig",
    "BudgetError",
    "BudgetExceededError",
    "BudgetManager",
    "BudgetUnavailableError",
    "ConfigError",
    "IdempotencyConflictError",
    "InvalidInputError",
    "PricingEngine",
    "Receipt",
    "ReplaySummary",
    "Report",
    "Reservation",
    "ReservationRequest",
    "ScopeUsage",
    "UnknownModelError",
    "UnknownReservationError",
    "__version__",
]


def __getattr__(name: str) -> Any:
    """
    ``__version__``: the installed distribution's (setup.cfg is the one place it
    is written), read on first use, so that importing the package does not pay
    for importlib.metadata. The HTTP clients, on first use too: they need the
    ``client`` extra (httpx), which a library user may not have.
    """
    if name in ("AsyncBudgetClient", "BudgetClient"):
        from . import client

        return getattr(client, name)
    if name != "__version__":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib.metadata

    try:
        version = importlib.metadata.version("coreason-budget")
    except importlib.metadata.PackageNotFoundError:  # a source tree never installed
        version = "0+unknown"
    globals()["__version__"] = version
    return version
