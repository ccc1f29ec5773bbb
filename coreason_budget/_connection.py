"""
The connections every store's pool is made of: redis-py's, with three guarantees more.

**A call is bounded as a whole.** redis-py's ``socket_timeout`` bounds each
``recv``, not a reply: a peer that sends one byte every 0.1 s keeps a call
waiting forever. Here the socket is wrapped so that each send and receive
waits at most what is left of a window: ``socket_timeout`` from the moment a
command is sent (its reply included); ``connect_timeout + socket_timeout``
from the start of a connection for the connect, the whole handshake and the
first command on it. The window costs one ``monotonic()`` per command and one
per send or receive; the socket's timeout is only changed when a reply is slow.

**A garbled handshake is a RedisError, and the connection is dropped.**
Answered with something that is not Redis's answer (``+OK`` or ``:1`` to
``HELLO``), redis-py raises whatever its handshake code trips on (an
AttributeError) and keeps the half-made connection in its pool. Here that is a
:class:`StoreProtocolError` (a redis ConnectionError, like redis-py's own
"Invalid RESP version": retried, then the call fails closed), and the
connection is disconnected first.

**A store that may evict the ledger's keys is refused.** Each new connection
reads ``INFO memory``; a ``maxmemory`` limit with any ``maxmemory-policy`` but
``noeviction`` (the ``volatile-*`` policies too: every counter and record has
a TTL) raises :class:`EvictingStoreError`, which is not retried: every
operation fails closed until the store is fixed. A store without a limit
(``maxmemory 0``) never evicts, whatever its policy. A store that does not say
(INFO renamed or forbidden, fields absent) is allowed.

The asyncio connections (:data:`ASYNC_CONNECTION_CLASSES`) keep the same three
promises. redis.asyncio already bounds each send, and each whole reply, with
``socket_timeout`` (no wrapped socket is needed); here a reply must also be in
within ``socket_timeout`` of its command's send, and a new connection's
connect, handshake and first command share ``connect_timeout +
socket_timeout``, kept by ``asyncio.timeout``. redis.asyncio's handshake takes
any reply to HELLO: here it must be Redis's, a map naming the protocol asked
for. What is decided, and what is said, is shared by both kinds (the functions
below the sync classes).
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

import redis
import redis.asyncio.connection as aconnection
from redis.connection import AbstractConnection, HiredisRespSerializer
from redis.utils import HIREDIS_AVAILABLE

log = logging.getLogger("coreason_budget")
T = TypeVar("T")

_monotonic = time.monotonic
#: How far a first send or receive may run past its window (it keeps the socket's
#: own timeout rather than pay to set one a few microseconds shorter).
_SLACK = 0.001
_warned_unchecked = False


class StoreProtocolError(redis.ConnectionError):
    """The store answered the connection handshake with something that is not Redis's answer."""


class EvictingStoreError(redis.RedisError):
    """
    The store may evict keys under memory pressure, and with them a day's
    counters: budgets would silently reset. Not a ConnectionError, so not
    retried; every operation fails closed until the store is fixed.
    """


class _DeadlineSocket:
    """
    A socket whose sends and receives never wait past :attr:`deadline`.

    Each blocking operation waits at most the smaller of the timeout it was
    given (``settimeout``) and what is left until the deadline, and raises
    ``socket.timeout`` once that has passed: redis-py (both parsers, and the
    connection's send) takes that for a timeout, and disconnects. Non-blocking
    reads (timeout 0) and peeks are not bounded: redis-py uses those between
    calls, to check a pooled connection, after the window has closed.

    It offers exactly what redis-py calls on a socket, each passed on; no
    catch-all ``__getattr__``, so that redis-py's ``hasattr(sock, "pending")``
    on every pool checkout stays as cheap as on a bare socket.
    """

    __slots__ = ("_applied", "_cut", "_sock", "_timeout", "deadline")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock = sock
        self.deadline = deadline
        self._set(sock.gettimeout())

    def _set(self, timeout: float | None) -> None:
        #: The timeout redis-py set, and the one the socket has now (less near the deadline).
        self._timeout = self._applied = timeout
        #: Below this much time left, the socket's timeout must be cut to fit the window.
        self._cut = math.inf if timeout is None else timeout - _SLACK if timeout else -math.inf

    def _bound(self) -> None:
        """Cut the socket's timeout to the time left, or restore it, or raise if none is left."""
        timeout = self._timeout
        left = self.deadline - _monotonic()
        want: float | None
        if left >= self._cut:
            want = timeout  # the window has (nearly) all of the timeout left
        elif left <= 0:
            raise TimeoutError("timed out: the budget store's reply took longer than its timeout")
        else:
            want = left
        if want is not self._applied:
            self._sock.settimeout(want)
            self._applied = want

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        # Checked inline: this is every reply's path.
        if (self.deadline - _monotonic() < self._cut or self._applied is not self._timeout) and (
            not flags  # a peek (MSG_PEEK) never waits: redis-py peeks only when data is there
        ):
            self._bound()
        return self._sock.recv(bufsize, flags)

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        if (self.deadline - _monotonic() < self._cut or self._applied is not self._timeout) and (
            not flags
        ):
            self._bound()
        return self._sock.recv_into(buffer, nbytes, flags)

    def send(self, data: Any, flags: int = 0) -> int:
        if self.deadline - _monotonic() < self._cut or self._applied is not self._timeout:
            self._bound()
        return self._sock.send(data, flags)

    def sendall(self, data: Any, flags: int = 0) -> None:
        if self.deadline - _monotonic() < self._cut or self._applied is not self._timeout:
            self._bound()
        self._sock.sendall(data, flags)

    def settimeout(self, value: float | None) -> None:
        self._sock.settimeout(value)
        self._set(value)

    def gettimeout(self) -> float | None:
        return self._timeout

    def fileno(self) -> int:
        return self._sock.fileno()

    def setsockopt(self, *args: Any) -> None:
        self._sock.setsockopt(*args)

    def getsockopt(self, *args: Any) -> Any:
        return self._sock.getsockopt(*args)

    def getsockname(self) -> Any:
        return self._sock.getsockname()

    def getpeername(self) -> Any:
        return self._sock.getpeername()

    def shutdown(self, how: int) -> None:
        self._sock.shutdown(how)

    def close(self) -> None:
        self._sock.close()


class _DeadlineTlsSocket(_DeadlineSocket):
    """A TLS socket's: redis-py also asks it for decrypted bytes it holds."""

    __slots__ = ()

    def pending(self) -> int:
        return self._sock.pending()  # type: ignore[attr-defined, no-any-return]


class _Guarded(AbstractConnection):
    """
    What the three connection classes below add to redis-py's (see the module).

    For request and reply use, as the ledger makes: a blocking read that no
    command precedes (pub/sub) would be bounded by the last command's window.
    """

    #: Read INFO memory on each new connection, refusing a store that may evict.
    check_eviction = True
    #: A connection just made: its first command keeps the connection's window.
    _fresh = False
    _handshaking = False

    def _connect(self) -> Any:
        start = _monotonic()
        sock = super()._connect()  # type: ignore[no-untyped-call,safe-super]
        window = connection_window(self.socket_connect_timeout, self.socket_timeout)
        wrapper = _DeadlineTlsSocket if hasattr(sock, "pending") else _DeadlineSocket
        return wrapper(sock, start + window)

    def connect_check_health(
        self, check_health: bool = True, retry_socket_connect: bool = True
    ) -> None:
        if self._sock:
            return
        try:
            super().connect_check_health(
                check_health=check_health, retry_socket_connect=retry_socket_connect
            )
        except redis.RedisError:
            raise  # redis-py has disconnected
        except Exception as e:
            # Not Redis's answer to the handshake (a wrong service on the port, a
            # broken proxy): redis-py trips on it and would keep the half-made
            # connection, which the pool would hand out again.
            self.disconnect()  # type: ignore[no-untyped-call]
            raise not_redis(self._where(), f"{type(e).__name__}: {e}") from e
        except BaseException:  # interrupted mid-handshake: no half-made connection either
            self.disconnect()  # type: ignore[no-untyped-call]
            raise
        self._fresh = True

    def on_connect_check_health(self, check_health: bool = True) -> None:
        self._handshaking = True
        try:
            super().on_connect_check_health(check_health)
            if self.check_eviction:
                self._refuse_an_evicting_store()
        finally:
            self._handshaking = False

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        if not self._handshaking:  # the handshake's commands share the connection's window
            if not self._sock:
                self.connect_check_health(check_health=False)
            if self._fresh:
                self._fresh = False
            else:
                timeout = self._socket_timeout
                sock: _DeadlineSocket = self._sock  # type: ignore[assignment]
                sock.deadline = math.inf if timeout is None else _monotonic() + timeout
        super().send_packed_command(command, check_health)  # type: ignore[no-untyped-call]

    def _where(self) -> str:
        return str(self._host_error())  # type: ignore[no-untyped-call]

    def _refuse_an_evicting_store(self) -> None:
        self.send_command("INFO", "memory", check_health=False)  # type: ignore[no-untyped-call]
        try:
            info: object = self.read_response()
        except redis.ResponseError as e:
            info = e
        judge_memory(self._where(), info)


def connection_window(connect_timeout: float | None, socket_timeout: float | None) -> float:
    """How long a new connection has for its connect, its handshake and its first command."""
    return (connect_timeout or 0) + (socket_timeout or math.inf)


def not_redis(where: str, what: str) -> StoreProtocolError:
    """The error for a handshake that *where* answered with *what*, not Redis's answer."""
    return StoreProtocolError(
        f"budget store {where} answered the connection handshake with something that is "
        f"not Redis's answer ({what})"
    )


def check_hello(where: str, reply: object, protocol: object) -> None:
    """
    Raise StoreProtocolError unless *reply* is Redis's answer to ``HELLO
    protocol``: a map whose ``proto`` is that protocol. (redis-py's sync
    handshake trips over anything else; redis.asyncio's takes any reply.)
    """
    if isinstance(reply, dict):
        proto = reply.get("proto", reply.get(b"proto"))
        if proto is not None and str(proto) == str(protocol):
            return
    raise not_redis(where, f"HELLO answered with {reply!r:.60}")


def judge_memory(where: str, info: object) -> None:
    """
    What *where*'s reply to ``INFO memory`` (or the ResponseError it gave)
    means for the ledger: EvictingStoreError if the store may evict; a warning,
    once a process, if it would not say.
    """
    global _warned_unchecked
    if isinstance(info, redis.ResponseError):  # INFO renamed away, or forbidden by an ACL
        if not _warned_unchecked:
            _warned_unchecked = True
            log.warning(
                "could not read the budget store's maxmemory-policy (INFO memory: %s); "
                "make sure it is noeviction, or budgets may silently reset",
                info,
            )
        return
    maxmemory, policy = memory_settings(info)
    if policy is None or policy == "noeviction" or not maxmemory:
        return
    raise EvictingStoreError(
        f"budget store {where} may evict the ledger's keys: "
        f"maxmemory-policy is {policy} with maxmemory {maxmemory} bytes, so under memory "
        "pressure a day's counters can be evicted and budgets silently reset. Set "
        "maxmemory-policy to noeviction (CONFIG SET maxmemory-policy noeviction, "
        "redis.conf, or the managed service's parameters)"
    )


def memory_settings(info: object) -> tuple[int | None, str | None]:
    """``maxmemory`` and ``maxmemory_policy`` from an ``INFO memory`` reply; None if absent."""
    if isinstance(info, bytes):
        info = info.decode(errors="replace")
    if not isinstance(info, str):
        return None, None
    maxmemory: int | None = None
    policy: str | None = None
    for line in info.splitlines():
        name, _, value = line.partition(":")
        if name == "maxmemory":
            try:
                maxmemory = int(value)
            except ValueError:
                maxmemory = None
        elif name == "maxmemory_policy":
            policy = value.strip() or None
    return maxmemory, policy


class TcpConnection(_Guarded, redis.Connection):
    """``redis://``."""


class TlsConnection(_Guarded, redis.SSLConnection):
    """``rediss://``."""


class UnixConnection(_Guarded, redis.UnixDomainSocketConnection):
    """``unix://`` and the embedded store."""


#: The connection class for each URL scheme redis-py opens.
CONNECTION_CLASSES: dict[str, type[redis.Connection | redis.UnixDomainSocketConnection]] = {
    "redis": TcpConnection,
    "rediss": TlsConnection,
    "unix": UnixConnection,
}


class _AsyncGuarded(aconnection.AbstractConnection):
    """
    :class:`_Guarded`'s promises on redis.asyncio's connections (see the module).

    Windows are the event loop's time, kept by ``asyncio.timeout_at``; the
    handshake's HELLO reply is checked, and a connection that fails in any
    way during its connect or handshake is closed before the error leaves.
    """

    #: Read INFO memory on each new connection, refusing a store that may evict.
    check_eviction = True
    #: A connection just made: its first command keeps the connection's window.
    _fresh = False
    _handshaking = False
    #: The next reply read is HELLO's.
    _hello_pending = False
    #: When (loop time) the reply to the command last sent must be in.
    _reply_by = math.inf

    async def connect_check_health(
        self, check_health: bool = True, retry_socket_connect: bool = True
    ) -> None:
        if self.is_connected:
            return
        window = connection_window(self.socket_connect_timeout, self.socket_timeout)
        end = asyncio.get_running_loop().time() + window
        try:
            async with asyncio.timeout_at(end if end < math.inf else None):
                await super().connect_check_health(
                    check_health=check_health, retry_socket_connect=retry_socket_connect
                )
        except redis.RedisError:
            raise  # redis-py has disconnected
        except TimeoutError:  # the window closed, not one read: redis-py raises its own
            self._drop()
            raise redis.TimeoutError(
                f"Timeout connecting to {self._host_error()}: the connection and its "
                f"handshake took longer than {window:g}s"
            ) from None
        except Exception as e:  # not Redis's answer, which redis-py tripped on
            self._drop()
            raise not_redis(self._host_error(), f"{type(e).__name__}: {e}") from e
        except BaseException:  # cancelled mid-handshake: no half-made connection either
            self._drop()
            raise
        self._fresh = True
        self._reply_by = end

    def _drop(self) -> None:
        """Close at once, without waiting (what redis-py's disconnect does outside a task)."""
        self._parser.on_disconnect()  # type: ignore[no-untyped-call]
        self._close()  # type: ignore[no-untyped-call]

    async def on_connect_check_health(self, check_health: bool = True) -> None:
        self._handshaking = True
        try:
            await super().on_connect_check_health(check_health)
            if self.check_eviction:
                await self.send_command("INFO", "memory", check_health=False)
                try:
                    info: object = await self.read_response()
                except redis.ResponseError as e:
                    info = e
                judge_memory(self._host_error(), info)
        finally:
            self._handshaking = self._hello_pending = False

    if HIREDIS_AVAILABLE:
        # redis.asyncio packs in Python where the sync client uses hiredis: about
        # 4 us of a call's CPU for the ledger's ten arguments. Same bytes either way.
        _packer = HiredisRespSerializer()

        def pack_command(self, *args: Any) -> list[bytes]:
            packed: list[bytes] = self._packer.pack(*args)
            return packed

    async def send_command(self, *args: Any, **kwargs: Any) -> None:
        if self._handshaking and args and args[0] == "HELLO":
            self._hello_pending = True
        await super().send_command(*args, **kwargs)

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        first = False
        if not self._handshaking:  # the handshake's commands share the connection's window
            if not self.is_connected:
                await self.connect_check_health(check_health=False)
            first, self._fresh = self._fresh, False
            # A later command's send and reply are each bounded by redis-py already
            # (socket_timeout around the whole reply): no second timer on the hot path.
            self._reply_by = self._reply_by if first else math.inf
            if not first and (writer := self._writer) is not None:
                await self._send_now(writer, command)
                return
        work = super().send_packed_command(command, check_health)
        await (self._in_window(work, disconnect=True) if first else work)

    async def _send_now(self, writer: asyncio.StreamWriter, command: Any) -> None:
        """
        A command on a connection in use, as redis-py sends it but without its
        ``asyncio.wait_for`` (a task, and a turn of the loop, for every
        command): the transport takes the bytes at once unless its buffer is
        full, and only then is the wait for it to drain bounded by socket_timeout.
        """
        if isinstance(command, str):
            command = command.encode()
        if writer.transport.is_closing():  # (it would drop the bytes without a word)
            await self.disconnect(nowait=True)
            raise redis.ConnectionError("Error while writing to socket: the connection is closed")
        try:
            writer.writelines([command] if isinstance(command, bytes) else command)
            if writer.transport.get_write_buffer_size():
                async with asyncio.timeout(self.socket_timeout):
                    await writer.drain()
        except TimeoutError:
            await self.disconnect(nowait=True)
            raise redis.TimeoutError("Timeout writing to socket") from None
        except OSError as e:
            await self.disconnect(nowait=True)
            raise redis.ConnectionError(f"Error while writing to socket: {e}") from e
        except BaseException:
            await self.disconnect(nowait=True)
            raise

    async def read_response(
        self,
        disable_decoding: bool = False,
        timeout: float | None = None,
        *,
        disconnect_on_error: bool = True,
        push_request: bool | None = False,
    ) -> Any:
        work = super().read_response(
            disable_decoding,
            timeout,
            disconnect_on_error=disconnect_on_error,
            push_request=push_request,
        )
        # A read given its own timeout (pub/sub's) is the caller's business.
        response = await (
            work
            if timeout is not None or self._reply_by == math.inf
            else self._in_window(work, disconnect_on_error)
        )
        if self._hello_pending:
            self._hello_pending = False
            check_hello(self._host_error(), response, self.protocol)
        return response

    async def _in_window(self, work: Awaitable[T], disconnect: bool) -> T:
        """
        *work*, bounded by the window of the command last sent (the
        handshake's are bounded by the connection's, around them).
        """
        end = self._reply_by
        if self._handshaking or end == math.inf:
            return await work
        try:
            async with asyncio.timeout_at(end):
                return await work
        except TimeoutError:
            if disconnect:
                self._drop()
            raise redis.TimeoutError(
                f"Timeout reading from {self._host_error()}: the budget store's reply "
                "took longer than its timeout"
            ) from None


class AsyncTcpConnection(_AsyncGuarded, aconnection.Connection):
    """``redis://``, for asyncio."""


class AsyncTlsConnection(_AsyncGuarded, aconnection.SSLConnection):
    """``rediss://``, for asyncio."""


class AsyncUnixConnection(_AsyncGuarded, aconnection.UnixDomainSocketConnection):
    """``unix://`` and the embedded store, for asyncio."""

    async def _connect(self) -> None:
        # redis-py's also runs the whole handshake here, and then again as
        # every connection does once connected: twice, the first time outside
        # the error handling that drops a half-made connection.
        async with asyncio.timeout(self.socket_connect_timeout):
            self._reader, self._writer = await asyncio.open_unix_connection(path=self.path)


#: The asyncio connection class for each URL scheme redis-py opens.
ASYNC_CONNECTION_CLASSES: dict[
    str, type[aconnection.Connection | aconnection.UnixDomainSocketConnection]
] = {
    "redis": AsyncTcpConnection,
    "rediss": AsyncTlsConnection,
    "unix": AsyncUnixConnection,
}
