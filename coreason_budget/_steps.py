"""
The steps of an operation: what the sans-IO core asks its driver to do.

Every operation (validate, call the ledger script, decode its answer, spool
what the store could not take, settle a reservation) is written once, as a
generator that *yields* the I/O it needs and is *sent* its result; an
exception the I/O raised is thrown into it at the ``yield``. A driver runs
the generator: the synchronous one with blocking calls, the asynchronous one
with awaits. So the sync and async faces share every decision and differ
only in how they wait, as h11 and httpcore split protocol from I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any, NamedTuple, TypeVar

T = TypeVar("T")


class Script(NamedTuple):
    """One call of the ledger script; sent back its reply (an int or a list)."""

    keys: list[bytes]
    args: list[str | bytes]


class Command(NamedTuple):
    """One Redis command by its redis-py method name (``get``, ``hscan``...); sent its reply."""

    name: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = {}  # noqa: RUF012 (never mutated: a NamedTuple default)


class Blocking(NamedTuple):
    """
    A call that may block for a while (a spool fsync, the first import of
    litellm, starting a store): run as is by the sync driver, in a worker
    thread by the async one, so that it never stalls an event loop.
    """

    fn: Callable[[], Any]


class Detach(NamedTuple):
    """
    Steps to run in the background (a thread, or a task), not waited for: a
    caller's error must not wait on a store that just failed it. The steps
    handle (log) their own errors.
    """

    steps: Steps[None]
    name: str


#: An operation: yields the steps above (and a client's requests), returns its answer.
Steps = Generator[Any, Any, T]
