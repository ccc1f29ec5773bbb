"""
Store outages and recoveries, as the service logs them: once per outage, not per request.

The service wraps each store operation in :meth:`StoreWatch.watching`. The first
operation that finds the store unavailable after one that reached it logs a
WARNING with the error; the first that reaches it again logs an INFO with how
long it was down. A write that the manager spooled (the store was away, the
caller is told "spooled") counts as a failure, not as the store answering: the
operation says so on what ``watching`` yields, from its receipt.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import attrs

from .exceptions import (
    BudgetExceededError,
    BudgetUnavailableError,
    IdempotencyConflictError,
    UnknownReservationError,
)

log = logging.getLogger("coreason_budget.server")


@attrs.define
class Watched:
    """One watched operation; ``spooled``: its write was saved to the spool, not the store."""

    spooled: bool = False


class StoreWatch:
    """Whether the store is down, as this process last found it; thread-safe."""

    def __init__(self) -> None:
        self._clock = time.monotonic
        self._lock = threading.Lock()
        self._down_since: float | None = None

    @property
    def down(self) -> bool:
        return self._down_since is not None

    def failed(self, error: object, operation: str) -> None:
        if self._down_since is not None:
            return
        with self._lock:
            if self._down_since is not None:
                return
            self._down_since = self._clock()
        log.warning(
            "Budget store unavailable (%s): %s; requests are refused, and writes spooled if "
            "a spool is configured, until it answers",
            operation,
            error,
            extra={"event": "store_unavailable", "operation": operation, "error": str(error)},
        )

    def reached(self) -> None:
        if self._down_since is None:
            return
        with self._lock:
            since, self._down_since = self._down_since, None
        if since is None:
            return
        seconds = round(self._clock() - since, 3)
        log.info(
            "Budget store is back after %.1f s unavailable",
            seconds,
            extra={"event": "store_recovered", "down_seconds": seconds},
        )

    @contextmanager
    def watching(self, operation: str) -> Iterator[Watched]:
        """One store operation: an outage if it fails (or is spooled), a recovery if not."""
        watched = Watched()
        try:
            yield watched
        except BudgetUnavailableError as e:
            self.failed(e, operation)
            raise
        except (BudgetExceededError, UnknownReservationError, IdempotencyConflictError):
            # Refused by the store (over budget, unknown id, conflict): it answered. Bad
            # input and unknown models say nothing about the store.
            self.reached()
            raise
        if watched.spooled:
            self.failed("a write was saved to the spool instead", operation)
        else:
            self.reached()
