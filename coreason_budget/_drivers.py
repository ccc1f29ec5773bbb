"""
The two drivers of the sans-IO core (see :mod:`._steps`): blocking and asyncio.

Each runs an operation's steps against a redis-py client, sync or
``redis.asyncio``, and maps whatever that client raises to
BudgetUnavailableError before throwing it into the operation (which decides
what to do: spool a charge, undo a reserve, or let the caller fail closed).
They hold no budget logic: only how to wait.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import redis

from ._ledger import LUA, store_unavailable
from ._steps import Blocking, Command, Detach, Script, Steps, T
from .exceptions import BudgetError

log = logging.getLogger("coreason_budget")


class SyncDriver:
    """Runs steps with blocking calls: the BudgetManager's driver, thread-safe."""

    def __init__(self, client: redis.Redis, pool_size: int, pool_timeout: float) -> None:
        self._client = client
        self._script = client.register_script(LUA)
        self._bounds = (pool_size, pool_timeout)

    def run(self, steps: Steps[T]) -> T:
        """Run *steps* to the end: their value, or what they raise."""
        value: Any = None
        try:
            step = steps.send(None)
            while True:
                try:
                    value = self._do(step)
                except BaseException as e:
                    step = steps.throw(e)
                else:
                    step = steps.send(value)
        except StopIteration as stop:
            result: T = stop.value
            return result

    def _do(self, step: Any) -> Any:
        kind = type(step)
        if kind is Script:
            try:
                try:
                    return self._script(keys=step.keys, args=step.args)
                except redis.exceptions.NoScriptError:
                    # redis-py reloads the script once; flushed again before its retry
                    # (a restart storm, repeated SCRIPT FLUSH): nothing ran, so once more.
                    return self._script(keys=step.keys, args=step.args)
            except Exception as e:
                # Whatever the client library raises (redis-py's errors, and its own
                # bugs on a peer's garbage): the store could not answer.
                raise store_unavailable(e, *self._bounds) from e
        if kind is Command:
            try:
                return getattr(self._client, step.name)(*step.args, **step.kwargs)
            except Exception as e:
                raise store_unavailable(e, *self._bounds) from e
        if kind is Blocking:
            return step.fn()
        if kind is Detach:
            threading.Thread(
                target=self.run, args=(step.steps,), name=step.name, daemon=True
            ).start()
            return None
        raise TypeError(f"not a step: {step!r}")


class AsyncDriver:
    """
    Runs steps with awaits on ``redis.asyncio``: the AsyncBudgetManager's driver.

    The store is opened on the first call (*open_client*, which does its
    blocking part in a worker thread). Blocking steps run in a worker thread;
    detached steps run as tasks that :meth:`wait_detached` lets finish on close.
    """

    def __init__(
        self, open_client: Callable[[], Awaitable[Any]], pool_size: int, pool_timeout: float
    ) -> None:
        self._open_client = open_client
        self._client: Any = None
        self._script: Any = None
        self._opening = asyncio.Lock()
        self._bounds = (pool_size, pool_timeout)
        self._detached: set[asyncio.Task[None]] = set()

    async def run(self, steps: Steps[T]) -> T:
        """Run *steps* to the end: their value, or what they raise."""
        value: Any = None
        try:
            step = steps.send(None)
            while True:
                try:
                    value = await self._do(step)
                except BaseException as e:
                    step = steps.throw(e)
                else:
                    step = steps.send(value)
        except StopIteration as stop:
            result: T = stop.value
            return result

    async def _do(self, step: Any) -> Any:
        kind = type(step)
        if kind is Script:
            try:
                script = self._script or await self._open()
                try:
                    return await script(keys=step.keys, args=step.args)
                except redis.exceptions.NoScriptError:
                    return await script(keys=step.keys, args=step.args)
            except BudgetError:
                raise
            except Exception as e:
                raise store_unavailable(e, *self._bounds) from e
        if kind is Command:
            try:
                if self._client is None:
                    await self._open()
                return await getattr(self._client, step.name)(*step.args, **step.kwargs)
            except BudgetError:
                raise
            except Exception as e:
                raise store_unavailable(e, *self._bounds) from e
        if kind is Blocking:
            return await asyncio.to_thread(step.fn)
        if kind is Detach:
            self.detach(step.steps, step.name)
            return None
        raise TypeError(f"not a step: {step!r}")

    async def _open(self) -> Any:
        async with self._opening:
            if self._script is None:
                client = await self._open_client()
                self._client = client
                self._script = client.register_script(LUA)
        return self._script

    def detach(self, steps: Steps[None], name: str) -> None:
        """Run *steps* in a task of their own, kept until done (the loop holds tasks weakly)."""
        task = asyncio.get_running_loop().create_task(self.run(steps), name=name)
        self._detached.add(task)
        task.add_done_callback(self._detached.discard)

    async def wait_detached(self, timeout: float) -> None:
        """Let background steps (undoing a reserve...) finish, for at most *timeout* seconds."""
        if self._detached:
            await asyncio.wait(set(self._detached), timeout=timeout)
