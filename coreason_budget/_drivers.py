"""
The drivers of the sans-IO core (see :mod:`._steps`): blocking and asyncio.

Each runs an operation's steps against a redis-py client, sync or
``redis.asyncio``, and maps whatever that client raises to
BudgetUnavailableError before throwing it into the operation (which decides
what to do: spool a charge, undo a reserve, or let the caller fail closed).
They hold no budget logic: only how to wait.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import weakref
from collections.abc import Callable, Coroutine
from typing import Any

import redis
import redis.asyncio
from redis.utils import HIREDIS_AVAILABLE

from ._ledger import LUA, store_unavailable
from ._steps import Blocking, Command, Detach, Script, Steps, T
from .exceptions import BudgetError

#: hiredis' packer (redis[hiredis] is a dependency, but an install may lack it);
#: typed by hand, to take any number of arguments.
_hiredis_pack: Callable[[tuple[Any, ...]], bytes] | None = None
if HIREDIS_AVAILABLE:
    import hiredis

    _hiredis_pack = hiredis.pack_command

log = logging.getLogger("coreason_budget")
#: Times a script call loads the script again when the store says it has none.
_RELOADS = 2


class SyncRunner:
    """Runs steps with blocking calls; a subclass adds its I/O steps in :meth:`_do`."""

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
        if kind is Blocking:
            return step.fn()
        if kind is Detach:
            threading.Thread(
                target=self.run, args=(step.steps,), name=step.name, daemon=True
            ).start()
            return None
        raise TypeError(f"not a step: {step!r}")


class SyncDriver(SyncRunner):
    """The BudgetManager's driver: steps on a redis-py client; thread-safe."""

    def __init__(self, client: redis.Redis, pool_size: int, pool_timeout: float) -> None:
        self._client = client
        self._script = client.register_script(LUA)
        self._bounds = (pool_size, pool_timeout)
        #: A plain client's pool, which the script calls go to directly (see _evalsha).
        self._pool = _direct_pool(client)
        self._lane = _Lane(self._pool)
        _drivers.add(self)

    def _do(self, step: Any) -> Any:
        kind = type(step)
        if kind is Script:
            try:
                for reloads in range(_RELOADS, -1, -1):
                    try:
                        return self._evalsha(step.keys, step.args)
                    except redis.exceptions.NoScriptError:
                        # The store lost its scripts (a restart, SCRIPT FLUSH): nothing
                        # ran. Loaded and sent again (twice: flushed again meanwhile).
                        if not reloads:
                            raise
                        self._vacate()
                        self._client.script_load(LUA)
            except Exception as e:
                # Whatever the client library raises (redis-py's errors, and its own
                # bugs on a peer's garbage): the store could not answer.
                raise store_unavailable(e, *self._bounds) from e
        if kind is Command:
            self._vacate()
            try:
                return getattr(self._client, step.name)(*step.args, **step.kwargs)
            except Exception as e:
                raise store_unavailable(e, *self._bounds) from e
        return super()._do(step)

    def _evalsha(self, keys: list[bytes], args: list[str | bytes]) -> Any:
        """
        One EVALSHA of the ledger script. On a plain client, straight to a
        pooled connection with the connection's retry policy, as
        ``Redis.execute_command`` does, without its per-command layers
        (observability hooks, reply callbacks, the command-name dispatch):
        they cost about 16 us of CPU a call, as much as the rest of a reserve.
        The connection is the lane's when no other thread is using it (see
        :class:`_Lane`), else the pool's. A cluster's or a fake client's call
        goes through its ``Script``.
        """
        pool = self._pool
        if pool is None:
            return self._script(keys=keys, args=args)
        lane = self._lane
        conn = lane.take()
        if conn is None:  # another thread is on the lane
            conn = pool.get_connection()
            try:
                return _send(conn, self._script.sha, keys, args)
            finally:
                pool.release(conn)
        try:
            return _send(conn, self._script.sha, keys, args)
        finally:
            lane.put()

    def _vacate(self) -> None:
        """Empty the lane before a command through the client: it takes a pooled connection."""
        lane = self._lane
        if lane.conn is not None and lane.lock.acquire(blocking=False):
            try:
                lane.vacate()
            finally:
                lane.lock.release()

    def _after_fork(self) -> None:
        """In a forked child: a lane of its own (the parent's connection is not the child's)."""
        self._lane = _Lane(self._pool)


class _Lane:
    """
    One of the pool's connections, kept checked out between script calls for
    whichever thread calls next while no other is on it.

    redis-py's checkout and return cost about 8 us of CPU a call (observability
    hooks on every state change, a queue behind a condition variable); at one
    thread that is about 20 us of wall time a call, the largest part of a
    reserve + commit's distance from the floor. The pool still makes, bounds
    and (after a fork) forgets every connection; the lane only skips the
    checkout. No caller waits on the pool for a connection idle in the lane:
    the lane gives it back after a call that leaves the pool with none, and
    before any other command (those go through the pool).
    """

    __slots__ = ("conn", "lock", "pool")

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.conn: Any = None
        self.lock = threading.Lock()

    def take(self) -> Any:
        """The lane's connection, ready to send on; None if another thread is on it."""
        if not self.lock.acquire(blocking=False):
            return None
        try:
            conn = self.conn
            if conn is None:
                conn = self.conn = self.pool.get_connection()
            elif _stale(conn):
                conn.disconnect()  # sent on, it reconnects
        except BaseException:
            self.lock.release()
            raise
        return conn

    def put(self) -> None:
        """Leave the lane, handing its connection to the pool if the pool has none left."""
        try:
            if self.pool.pool.empty():  # every other connection is out: one may be awaited
                self.vacate()
        finally:
            self.lock.release()

    def vacate(self) -> None:
        """The lane's connection back to the pool (the caller holds the lane, or nobody does)."""
        conn, self.conn = self.conn, None
        if conn is not None:
            self.pool.release(conn)


#: Every SyncDriver, so that a forked child gives each a lane of its own.
_drivers: weakref.WeakSet[SyncDriver] = weakref.WeakSet()


def _forget_lanes() -> None:
    for driver in list(_drivers):
        driver._after_fork()


if hasattr(os, "register_at_fork"):  # not on Windows, which does not fork
    os.register_at_fork(after_in_child=_forget_lanes)


def _stale(conn: Any) -> bool:
    """
    Whether *conn* has data or EOF waiting (a reply nobody read, a server that
    hung up), or fails to say: as the pool's checkout does, start it afresh.
    """
    try:
        return bool(conn.can_read())
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return True


def _send(conn: Any, sha: str, keys: list[bytes], args: list[str | bytes]) -> Any:
    """An EVALSHA on *conn*, retried as the connection's retry policy says."""
    packed = _pack(conn, sha, keys, args)
    return conn.retry.call_with_retry(
        lambda: _exchange(conn, packed), lambda _error: conn.disconnect()
    )


def _pack(conn: Any, sha: str, keys: list[bytes], args: list[str | bytes]) -> Any:
    """
    An EVALSHA's bytes. Our arguments are all str or bytes, so hiredis packs
    them as they are: redis-py's packer first looks at each one in Python.
    """
    if _hiredis_pack is None:
        return conn.pack_command("EVALSHA", sha, len(keys), *keys, *args)
    return [_hiredis_pack(("EVALSHA", sha, len(keys), *keys, *args))]


def _exchange(conn: Any, packed: Any) -> Any:
    conn.send_packed_command(packed)
    return conn.read_response()


def _direct_pool(client: Any) -> Any:
    """The pool of a plain redis-py client (not a cluster's, nor fakeredis'), else None."""
    plain = type(client) in (redis.Redis, redis.asyncio.Redis)
    return client.connection_pool if plain and client.connection is None else None


class AsyncRunner:
    """
    Runs steps with awaits; a subclass adds its I/O steps in :meth:`_do`.

    Blocking steps run in a worker thread; detached steps run as tasks that
    :meth:`wait_background` lets finish on close.
    """

    def __init__(self) -> None:
        #: Tasks that run on without a caller: detached steps, and writes whose
        #: caller was cancelled. Kept (the loop holds tasks weakly), and waited for on close.
        self._background: set[asyncio.Future[Any]] = set()

    async def run(self, steps: Steps[T], *, resumable: bool = False) -> T:
        """
        Run *steps* to the end: their value, or what they raise.

        *resumable*: :meth:`write`'s promise for a write whose every step may
        be sent twice (a spend carries its idempotency key; a limit is set, not
        added), without a task of its own. The steps run in the caller's task,
        and only if the caller is cancelled are they finished in the
        background, the interrupted step sent again (a blocking one, whose
        thread runs on, is awaited instead): the write lands once, or is spooled.
        """
        try:
            step = steps.send(None)
        except StopIteration as stop:
            first: T = stop.value
            return first
        return await self._drive(steps, step, resumable)

    async def _drive(self, steps: Steps[T], step: Any, resumable: bool) -> T:
        value: Any = None
        try:
            while True:
                pending = None
                try:
                    if resumable and type(step) is Blocking:  # a spool write: never twice
                        pending = asyncio.ensure_future(asyncio.to_thread(step.fn))
                        value = await asyncio.shield(pending)
                    else:
                        value = await self._do(step)
                except asyncio.CancelledError as e:
                    if not resumable:
                        step = steps.throw(e)
                        continue
                    self._keep(asyncio.ensure_future(self._finish(steps, step, pending)))
                    raise
                except BaseException as e:
                    step = steps.throw(e)
                    continue
                step = steps.send(value)
        except StopIteration as stop:
            result: T = stop.value
            return result

    async def _finish(
        self, steps: Steps[Any], step: Any, pending: asyncio.Future[Any] | None
    ) -> None:
        """The rest of a resumable write whose caller was cancelled at *step*."""
        try:
            try:
                value = await (self._do(step) if pending is None else pending)
            except BaseException as e:
                step = steps.throw(e)
            else:
                step = steps.send(value)
            await self._drive(steps, step, resumable=False)
        except StopIteration:
            pass
        except Exception as e:
            log.warning("A budget call whose caller was cancelled failed: %s", e)

    async def _do(self, step: Any) -> Any:
        kind = type(step)
        if kind is Blocking:
            return await asyncio.to_thread(step.fn)
        if kind is Detach:
            self.detach(step.steps, step.name)
            return None
        raise TypeError(f"not a step: {step!r}")

    async def write(self, work: Coroutine[Any, Any, T]) -> T:
        """
        Await *work* run to its end even if the caller is cancelled meanwhile.

        For a settlement (its steps are not :meth:`run`'s resumable ones: sent
        again, a settle that landed would answer "done", and a retry must find
        its receipt): cut off by a cancellation, it would leave its outcome
        unknown (the store may have taken it); run on, it lands exactly once
        or is spooled, and a retry finds it. An error it ends with once nobody
        awaits it is logged.
        """
        task = asyncio.ensure_future(work)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            self._keep(task)
            task.add_done_callback(_orphaned)
            raise

    def detach(self, steps: Steps[None], name: str) -> None:
        """Run *steps* in a task of their own, not waited for."""
        self._keep(asyncio.get_running_loop().create_task(self.run(steps), name=name))

    def _keep(self, task: asyncio.Future[Any]) -> None:
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def wait_background(self, timeout: float) -> None:
        """
        Let what runs without a caller finish (a release an orphaned reserve
        starts as it ends, too), for at most *timeout* seconds.
        """
        deadline = asyncio.get_running_loop().time() + timeout
        while self._background:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return
            await asyncio.wait(set(self._background), timeout=left)
            await asyncio.sleep(0)  # the done callbacks (which may detach a release) run


class _AsyncLane:
    """
    :class:`_Lane` for one event loop's pool: the connection kept checked out
    between script calls for whichever task calls next while no other is on
    it. The driver's gate lets at most ``pool_size`` tasks at the store, and
    one on the lane leaves the pool's other connections to the rest, so
    nobody waits on the pool for a connection idle in the lane, as long as
    other commands (which go through the pool) empty the lane first.
    """

    __slots__ = ("busy", "conn", "pool")

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.conn: Any = None
        self.busy = False

    async def take(self) -> Any:
        """The lane's connection, ready to send on; None if another task is on it."""
        if self.busy:
            return None
        self.busy = True
        try:
            conn = self.conn
            if conn is None:
                conn = self.conn = await self.pool.get_connection()
            elif await _async_stale(conn):
                await conn.disconnect()  # sent on, it reconnects
        except BaseException:
            self.busy = False
            raise
        return conn

    async def vacate(self) -> None:
        """The lane's connection back to the pool, unless a task is on it."""
        conn = self.conn
        if conn is not None and not self.busy:
            self.conn = None
            await self.pool.release(conn)


async def _async_stale(conn: Any) -> bool:
    """:func:`_stale` for an asyncio connection."""
    try:
        return bool(await conn.can_read())
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return True


async def _async_send(conn: Any, sha: str, keys: list[bytes], args: list[str | bytes]) -> Any:
    """:func:`_send` on an asyncio connection."""
    packed = _pack(conn, sha, keys, args)
    return await conn.retry.call_with_retry(
        lambda: _async_exchange(conn, packed), lambda _error: conn.disconnect()
    )


async def _async_exchange(conn: Any, packed: Any) -> Any:
    await conn.send_packed_command(packed)
    return await conn.read_response()


def _orphaned(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and (error := task.exception()) is not None:
        log.warning("A budget call whose caller was cancelled failed: %s", error)


class AsyncDriver(AsyncRunner):
    """
    The AsyncBudgetManager's driver: steps on ``redis.asyncio``. The store is
    opened on the first call (*open_client* does its blocking part in a worker thread).
    """

    def __init__(
        self,
        open_client: Callable[[], Coroutine[Any, Any, Any]],
        pool_size: int,
        pool_timeout: float,
    ) -> None:
        super().__init__()
        self._open_client = open_client
        self._bounds = (pool_size, pool_timeout)
        #: The loop the client (and everything below) belongs to.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: Any = None
        self._script: Any = None
        self._pool: Any = None
        self._lane = _AsyncLane(None)
        self._opening: asyncio.Task[Any] | None = None
        # First come, first served: redis.asyncio's pool gives a freed connection to
        # whichever task asks next, so with more tasks than connections some would
        # wait past pool_timeout, and fail, on a healthy store.
        self._gate = asyncio.Semaphore(pool_size)

    async def _do(self, step: Any) -> Any:
        kind = type(step)
        if kind is Script:
            try:
                await self._ready()
                await self._enter()
                try:
                    for reloads in range(_RELOADS, -1, -1):  # as SyncDriver's
                        try:
                            return await self._evalsha(step.keys, step.args)
                        except redis.exceptions.NoScriptError:
                            if not reloads:
                                raise
                            await self._lane.vacate()  # (as a command, below)
                            await self._client.script_load(LUA)
                finally:
                    self._gate.release()
            except BudgetError:  # a ConfigError opening it: not the store being away
                raise
            except Exception as e:
                raise store_unavailable(e, *self._bounds) from e
        if kind is Command:
            try:
                await self._ready()
                await self._enter()
                try:
                    await self._lane.vacate()  # (a command takes its connection from the pool)
                    return await getattr(self._client, step.name)(*step.args, **step.kwargs)
                finally:
                    self._gate.release()
            except BudgetError:
                raise
            except Exception as e:
                raise store_unavailable(e, *self._bounds) from e
        return await super()._do(step)

    async def _enter(self) -> None:
        """A turn at the pool, in the order asked for, within pool_timeout."""
        gate = self._gate
        if not gate.locked():
            await gate.acquire()  # free: no wait, no timer
            return
        try:
            async with asyncio.timeout(self._bounds[1]):
                await gate.acquire()
        except TimeoutError:
            # redis-py's words for it, which store_unavailable explains.
            raise redis.ConnectionError("No connection available.") from None

    async def _evalsha(self, keys: list[bytes], args: list[str | bytes]) -> Any:
        """One EVALSHA of the ledger script, as :meth:`SyncDriver._evalsha` sends it."""
        pool = self._pool
        if pool is None:
            return await self._script(keys=keys, args=args)
        lane = self._lane
        conn = await lane.take()
        if conn is None:  # another task is on the lane
            conn = await pool.get_connection()
            try:
                return await _async_send(conn, self._script.sha, keys, args)
            finally:
                await pool.release(conn)
        try:
            return await _async_send(conn, self._script.sha, keys, args)
        finally:
            lane.busy = False

    async def _ready(self) -> Any:
        """The script, registered on a client of the running loop."""
        if self._loop is asyncio.get_running_loop() and self._script is not None:
            return self._script
        return await self._open()

    async def _open(self) -> Any:
        """
        Open the store: on first use, and again on another loop (``asyncio.run``
        twice in a script): connections, locks and tasks belong to their loop,
        and the old one's are unusable once it is closed.
        """
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop, self._client, self._script, self._opening = loop, None, None, None
            self._gate = asyncio.Semaphore(self._bounds[0])
            self._background = set()
        opening = self._opening
        if opening is None or (
            opening.done() and (opening.cancelled() or opening.exception() is not None)
        ):
            # One opening at a time, in a task of its own: a caller cancelled meanwhile
            # leaves it to finish for the next one, not a store opened and dropped.
            opening = self._opening = loop.create_task(self._open_client())
        client = await asyncio.shield(opening)
        if self._client is not client:
            self._client, self._script = client, client.register_script(LUA)
            self._pool = _direct_pool(client)
            self._lane = _AsyncLane(self._pool)
        return self._script
