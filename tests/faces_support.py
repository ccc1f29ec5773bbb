"""
One synchronous adapter over the four faces, for ``tests/test_faces.py``.

The faces are :class:`BudgetManager` and :class:`AsyncBudgetManager` on the
test's redis-server, and :class:`BudgetClient` and :class:`AsyncBudgetClient`
against the real service (``create_app`` on an AsyncBudgetManager, served by
uvicorn in a thread, over real HTTP). A :class:`Face` calls the sync faces
directly; an async face's calls are made on one event loop that runs in a
thread of its own for the whole test (so the face and its connections stay on
one loop), and the test's thread waits for each.

The adapter only *calls*: what a face returns, raises or swallows is passed
through unchanged, so a face that disagrees with the others fails the test.
For the async faces it also checks that every call is awaitable (a coroutine,
or a :class:`ReservationRequest` for ``reserve``), as the protocol says.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, TypeVar

import redis
import uvicorn

from coreason_budget import (
    AsyncBudgetManager,
    AsyncReservation,
    BudgetConfig,
    BudgetManager,
    Reservation,
    ReservationRequest,
)
from coreason_budget.client import AsyncBudgetClient, BudgetClient
from coreason_budget.server import ServerSettings, create_app

from .redis_server import free_port, snapshot

T = TypeVar("T")

FACES = ("sync-manager", "async-manager", "sync-client", "async-client")
USER_KEY = "faces-user-key"
ADMIN_KEY = "faces-admin-key"
NANO = 1_000_000_000
#: Every face's limits: $10 per user, $20 per project, $50 for everyone.
LIMITS: dict[str, Any] = {
    "daily_user_limit_usd": 10.0,
    "daily_project_limit_usd": 20.0,
    "daily_global_limit_usd": 50.0,
}
#: A price of our own, so that pricing a commit never imports litellm.
HOUSE_PRICES = {"house-llm": {"input_per_mtok": 3, "output_per_mtok": 15}}
#: How long any one call of a face may take before the test fails.
CALL_BOUND = 30.0


class LoopThread:
    """An event loop running in a thread of its own; ``run`` waits for a coroutine on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(CALL_BOUND)

    def close(self) -> None:
        async def drain() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.loop.shutdown_asyncgens()
            await self.loop.shutdown_default_executor()

        try:
            self.run(drain())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


class Service:
    """The HTTP service on an AsyncBudgetManager of its own, served by uvicorn in a thread."""

    def __init__(self, manager: AsyncBudgetManager) -> None:
        settings = ServerSettings(
            api_keys=frozenset({USER_KEY}), admin_api_keys=frozenset({ADMIN_KEY})
        )
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            create_app(manager, settings), host="127.0.0.1", port=self.port, log_level="warning"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert self.thread.is_alive(), "uvicorn did not start"
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.005)

    def stop(self) -> None:
        """
        Ask uvicorn to stop; it takes about 0.2 s (its own fixed pauses), which
        the next test need not wait for: :func:`join_stopped` waits for them all.
        """
        self.server.should_exit = True
        _stopping.append(self)


#: Services asked to stop, not yet joined.
_stopping: list[Service] = []


def join_stopped() -> None:
    """Wait until every service asked to stop has stopped (and closed its manager)."""
    while _stopping:
        service = _stopping.pop()
        service.thread.join(10)
        assert not service.thread.is_alive(), "uvicorn did not stop"


class Face:
    """
    One face, called synchronously: the protocol's methods, with handles wrapped
    in :class:`Handle` and ``hold(...)`` for the with-block.

    ``ledger`` reads the face's ledger without going through the face (a sync
    BudgetManager on the same store and prefix), ``snapshot()`` is every key in
    the store, and ``unreachable()`` the same kind of face with nothing to reach.
    """

    def __init__(self, name: str, target: Any, loop: LoopThread | None, faces: Faces) -> None:
        self.name = name
        self.target = target
        self.loop = loop
        self._faces = faces
        self._ledger: BudgetManager | None = None

    @property
    def ledger(self) -> BudgetManager:
        assert self._ledger is not None, f"{self.name} has no ledger of its own"
        return self._ledger

    def snapshot(self) -> dict[str, Any]:
        return snapshot(self._faces.store)

    def unreachable(self) -> Face:
        return self._faces.unreachable(self.name)

    def call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """*method* called with the arguments; on an async face, awaited on its loop."""
        if self.loop is None:
            return method(*args, **kwargs)

        async def on_loop() -> Any:
            awaitable = method(*args, **kwargs)
            assert inspect.iscoroutine(awaitable), f"{method.__qualname__} is not awaitable"
            return await awaitable

        return self.loop.run(on_loop())

    # -- the protocol's calls --------------------------------------------------------

    def check_availability(self, *args: Any, **kwargs: Any) -> None:
        self.call(self.target.check_availability, *args, **kwargs)

    def record_spend(self, *args: Any, **kwargs: Any) -> Any:
        return self.call(self.target.record_spend, *args, **kwargs)

    def reserve(self, *args: Any, **kwargs: Any) -> Handle:
        if self.loop is None:
            raw = self.target.reserve(*args, **kwargs)
            assert isinstance(raw, Reservation)
            return Handle(self, raw)

        async def on_loop() -> AsyncReservation:
            request = self.target.reserve(*args, **kwargs)
            assert isinstance(request, ReservationRequest)
            return await request

        raw = self.loop.run(on_loop())
        assert isinstance(raw, AsyncReservation)
        return Handle(self, raw)

    def hold(self, *args: Any, **kwargs: Any) -> Block:
        """``with face.hold(...) as r:``: ``with budget.reserve(...) as r:``, or ``async with``."""
        return Block(self, args, kwargs)

    def reservation(self, reservation_id: Any) -> Handle:
        return Handle(self, self.call(self.target.reservation, reservation_id))

    def usage(self, *args: Any, **kwargs: Any) -> Any:
        return self.call(self.target.usage, *args, **kwargs)

    def report(self, *args: Any, **kwargs: Any) -> Any:
        return self.call(self.target.report, *args, **kwargs)

    def set_limit(self, *args: Any, **kwargs: Any) -> None:
        self.call(self.target.set_limit, *args, **kwargs)

    def ping(self) -> None:
        self.call(self.target.ping)

    def close(self) -> None:
        if self.loop is None:
            self.target.close()
        else:
            self.call(self.target.aclose)


class Handle:
    """A reservation handle of any face: its settlements called as the face's other calls."""

    def __init__(self, face: Face, raw: Reservation | AsyncReservation) -> None:
        self.face = face
        self.raw = raw

    def commit(self, actual_cost: Any) -> Any:
        return self.face.call(self.raw.commit, actual_cost)

    def release(self) -> Any:
        return self.face.call(self.raw.release)

    def commit_usage(self, **tokens: Any) -> Any:
        return self.face.call(self.raw.commit_usage, **tokens)

    def __getattr__(self, name: str) -> Any:
        # id, state, receipt, estimate_nano, date, on_error, user_id, project_id, model
        return getattr(self.raw, name)


class Block:
    """
    The with-block of a face's ``reserve``: the sync handle's ``__enter__`` and
    ``__exit__``, or the request's ``__aenter__`` and ``__aexit__`` on the face's
    loop. What the face's exit returns is returned (a true value would swallow
    the exception, as it would in the face's own block).
    """

    def __init__(self, face: Face, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.face = face
        self.args = args
        self.kwargs = kwargs
        self.manager: Any = None

    def __enter__(self) -> Handle:
        face, loop = self.face, self.face.loop
        if loop is None:
            self.manager = face.target.reserve(*self.args, **self.kwargs)
            return Handle(face, self.manager.__enter__())

        async def enter() -> AsyncReservation:
            self.manager = face.target.reserve(*self.args, **self.kwargs)
            assert isinstance(self.manager, ReservationRequest)
            handle: AsyncReservation = await self.manager.__aenter__()
            return handle

        return Handle(face, loop.run(enter()))

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        loop = self.face.loop
        if loop is None:
            result: bool | None = self.manager.__exit__(exc_type, exc, tb)
            return result
        return loop.run(self.manager.__aexit__(exc_type, exc, tb))  # type: ignore[no-any-return]


class Faces:
    """Makes the faces of one test (and unreachable ones) and closes them all afterwards."""

    def __init__(self, redis_url: str, spool_dir: str, pricing_file: str) -> None:
        self.redis_url = redis_url
        self.spool_dir = spool_dir
        self.pricing_file = pricing_file
        self.store = redis.Redis.from_url(redis_url, decode_responses=True)
        self.loop: LoopThread | None = None
        self.opened: list[Face] = []
        self.services: list[Service] = []
        self.ledgers: list[BudgetManager] = []

    def _loop(self) -> LoopThread:
        if self.loop is None:
            self.loop = LoopThread()
        return self.loop

    def config(self, **overrides: Any) -> BudgetConfig:
        values: dict[str, Any] = {
            "redis_url": self.redis_url,
            "spool_dir": self.spool_dir,
            "pricing_file": self.pricing_file,
            **LIMITS,
            **overrides,
        }
        return BudgetConfig(**values)

    def face(self, name: str, key_prefix: str) -> Face:
        """The face *name* on the test's store under *key_prefix*, with :data:`LIMITS`."""
        config = self.config(key_prefix=key_prefix)
        if name == "sync-manager":
            face = self._opened(Face(name, BudgetManager(config), None, self))
        elif name == "async-manager":
            face = self._on_loop(name, lambda: AsyncBudgetManager(config))
        else:
            manager = AsyncBudgetManager(config)
            # The service imports litellm's price table as it starts (seconds of CPU, once
            # per process, in a thread); these tests price only their own model, by override.
            manager.pricing.preload = lambda: False  # type: ignore[method-assign]
            service = Service(manager)
            self.services.append(service)
            face = self._client(name, service.url, ADMIN_KEY)
        face._ledger = BudgetManager(config)
        self.ledgers.append(face._ledger)
        return face

    def unreachable(self, name: str) -> Face:
        """
        The face *name* with nothing to reach and no spool: a dead port for the
        managers, a dead service URL for the clients; no retries, short timeouts.
        """
        dead = free_port()
        if name.endswith("manager"):
            config = self.config(
                redis_url=f"redis://127.0.0.1:{dead}",
                spool_dir="off",
                retries=0,
                connect_timeout=0.2,
                socket_timeout=0.2,
            )
            if name == "sync-manager":
                return self._opened(Face(name, BudgetManager(config), None, self))
            return self._on_loop(name, lambda: AsyncBudgetManager(config))
        return self._client(name, f"http://127.0.0.1:{dead}", ADMIN_KEY, retries=0, timeout=0.5)

    def _client(self, name: str, url: str, key: str, **options: Any) -> Face:
        if name == "sync-client":
            return self._opened(Face(name, BudgetClient(url, key, **options), None, self))
        assert name == "async-client", name
        return self._on_loop(name, lambda: AsyncBudgetClient(url, key, **options))

    def _on_loop(self, name: str, make: Callable[[], Any]) -> Face:
        loop = self._loop()

        async def made() -> Any:  # made on the loop it will run on
            return make()

        return self._opened(Face(name, loop.run(made()), loop, self))

    def _opened(self, face: Face) -> Face:
        self.opened.append(face)
        return face

    def close(self) -> None:
        try:
            for face in reversed(self.opened):
                face.close()
            for service in self.services:
                service.stop()
            for ledger in self.ledgers:
                ledger.close()
            self.store.close()
        finally:
            if self.loop is not None:
                self.loop.close()
