"""
The service's tests run apps on an AsyncBudgetManager, as the service does.

FastAPI's TestClient serves an app on an event loop of its own (in a thread):
a manager given to an app is used only through that app, which opens its
store on that loop and closes it when the TestClient exits. A test that reads
the ledger directly does it with a sync BudgetManager (``make_manager``) or a
redis client on the same store: they are one ledger.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from coreason_budget import AsyncBudgetManager, BudgetConfig

AsyncManagerFactory = Callable[..., AsyncBudgetManager]


def async_managers(redis_url: str, spool_dir: Path) -> AsyncManagerFactory:
    """Make AsyncBudgetManagers on *redis_url* (overridable) spooling into *spool_dir*."""

    def make(clock: Callable[[], float] | None = None, **config: Any) -> AsyncBudgetManager:
        url = config.pop("redis_url", redis_url)
        config.setdefault("spool_dir", str(spool_dir))
        return AsyncBudgetManager(BudgetConfig(redis_url=url, **config), clock=clock)

    return make
