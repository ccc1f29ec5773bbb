"""
A deadline on each whole HTTP attempt of :class:`~coreason_budget.client.BudgetClient`.

(:class:`~coreason_budget.client.AsyncBudgetClient` needs none of this: it bounds
each attempt with ``asyncio.timeout``, which cancels however the peer trickles.)

httpx's timeouts bound each socket operation, not a request: a peer that sends
one byte every 0.1 s never trips a 1 s read timeout and holds the caller for as
long as it likes. Here every socket operation of an attempt gets at most the
time left until that attempt's deadline (``min(timeout, left)``), and one that
starts past it fails at once with a timeout, so an attempt ends within about
its deadline however the peer trickles: connect, TLS handshake, request
write, status line, headers and body alike.

* :func:`attempt_deadline` sets the deadline of the current thread (a
  ``ContextVar``, so each thread, and each asyncio task, has its own) around
  one attempt; pooled connections read it at each operation, so a connection
  reused from the pool obeys the attempt that is using it.
* :class:`DeadlineTransport` is httpx's default transport built from public
  httpcore parts (a ``ConnectionPool`` with a network backend that enforces the
  deadline), and honours ``HTTP(S)_PROXY``/``ALL_PROXY``/``NO_PROXY`` as httpx
  does for the one URL the client talks to.
* Not bounded: DNS resolution (``getaddrinfo`` takes no timeout) and waiting
  for a free pooled connection, which httpx's own ``pool`` timeout bounds.
"""

from __future__ import annotations

import contextlib
import ipaddress
import ssl
import time
import urllib.request
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from typing import Any

import httpcore
import httpx

__all__ = ["DeadlineTransport", "attempt_deadline", "deadline_exceeded"]

#: ``(monotonic end, seconds)`` of the current attempt, or None outside one.
_deadline: ContextVar[tuple[float, float] | None] = ContextVar(
    "coreason_budget_http_deadline", default=None
)


@contextlib.contextmanager
def attempt_deadline(seconds: float) -> Iterator[None]:
    """Bound every socket operation inside the block to end *seconds* from now."""
    token = _deadline.set((time.monotonic() + seconds, seconds))
    try:
        yield
    finally:
        _deadline.reset(token)


def _limit(
    timeout: float | None, error: type[httpcore.TimeoutException]
) -> tuple[float | None, bool]:
    """The timeout for one operation, and whether the deadline (not *timeout*) set it."""
    current = _deadline.get()
    if current is None:
        return timeout, False
    end, seconds = current
    left = end - time.monotonic()
    if left <= 0:
        raise error(_message(seconds))
    if timeout is None or left < timeout:
        return left, True
    return timeout, False


def _message(seconds: float) -> str:
    return f"no complete answer within the {seconds:g} s deadline of this attempt"


def deadline_exceeded(seconds: float) -> httpx.TimeoutException:
    """
    The error of an attempt past its *seconds*, for AsyncBudgetClient: a
    transport error (so retried), worded as the deadline transport words it.
    """
    return httpx.TimeoutException(_message(seconds))


class _DeadlineStream(httpcore.NetworkStream):
    """A network stream whose operations end by the current attempt's deadline."""

    def __init__(self, stream: httpcore.NetworkStream) -> None:
        self._stream = stream

    def _run(self, error: type[httpcore.TimeoutException], timeout: float | None, op: Any) -> Any:
        limit, by_deadline = _limit(timeout, error)
        try:
            return op(limit)
        except error as e:
            current = _deadline.get()
            if by_deadline and current is not None:
                raise error(_message(current[1])) from e
            raise

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        data: bytes = self._run(
            httpcore.ReadTimeout, timeout, lambda t: self._stream.read(max_bytes, t)
        )
        return data

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._run(httpcore.WriteTimeout, timeout, lambda t: self._stream.write(buffer, t))

    def close(self) -> None:
        self._stream.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        stream: httpcore.NetworkStream = self._run(
            httpcore.ConnectTimeout,
            timeout,
            lambda t: self._stream.start_tls(ssl_context, server_hostname, t),
        )
        return _DeadlineStream(stream)

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    """httpcore's default (sync) network backend, with streams that keep the deadline."""

    def __init__(self) -> None:
        self._backend = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        limit, by_deadline = _limit(timeout, httpcore.ConnectTimeout)
        try:
            stream = self._backend.connect_tcp(host, port, limit, local_address, socket_options)
        except httpcore.ConnectTimeout as e:
            current = _deadline.get()
            if by_deadline and current is not None:
                raise httpcore.ConnectTimeout(_message(current[1])) from e
            raise
        return _DeadlineStream(stream)

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        limit, _ = _limit(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(self._backend.connect_unix_socket(path, limit, socket_options))

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


# httpcore's exceptions as httpx's, most specific first (what httpx's own transport does).
_EXCEPTIONS: tuple[tuple[type[Exception], type[httpx.TransportError]], ...] = (
    (httpcore.ConnectTimeout, httpx.ConnectTimeout),
    (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout),
    (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.TimeoutException, httpx.TimeoutException),
    (httpcore.ConnectError, httpx.ConnectError),
    (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError),
    (httpcore.NetworkError, httpx.NetworkError),
    (httpcore.ProxyError, httpx.ProxyError),
    (httpcore.UnsupportedProtocol, httpx.UnsupportedProtocol),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError),
    (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
    (httpcore.ProtocolError, httpx.ProtocolError),
)


@contextlib.contextmanager
def _httpx_errors() -> Iterator[None]:
    try:
        yield
    except Exception as e:
        for source, target in _EXCEPTIONS:
            if isinstance(e, source):
                raise target(str(e)) from e
        raise


class _ResponseStream(httpx.SyncByteStream):
    def __init__(self, stream: Iterable[bytes]) -> None:
        self._stream = stream

    def __iter__(self) -> Iterator[bytes]:
        with _httpx_errors():
            yield from self._stream

    def close(self) -> None:
        close = getattr(self._stream, "close", None)
        if close is not None:
            close()


class DeadlineTransport(httpx.BaseTransport):
    """
    httpx's default HTTP/1.1 transport for *base_url*, whose attempts keep their deadline.

    As ``httpx.HTTPTransport()`` with the client's limits (TLS verified with the
    default context, which honours ``SSL_CERT_FILE``/``SSL_CERT_DIR``), plus
    the environment's proxy for *base_url*, which httpx only applies to a
    transport it builds itself.
    """

    def __init__(self, base_url: str, limits: httpx.Limits) -> None:
        ssl_context = httpx.create_ssl_context()
        backend = _DeadlineBackend()
        pool_args: dict[str, Any] = {
            "ssl_context": ssl_context,
            "max_connections": limits.max_connections,
            "max_keepalive_connections": limits.max_keepalive_connections,
            "keepalive_expiry": limits.keepalive_expiry,
            "network_backend": backend,
        }
        proxy = _environment_proxy(base_url)
        self._pool: httpcore.ConnectionPool
        if proxy is None:
            self._pool = httpcore.ConnectionPool(**pool_args)
        else:
            url = httpcore.URL(
                scheme=proxy.url.raw_scheme,
                host=proxy.url.raw_host,
                port=proxy.url.port,
                target=proxy.url.raw_path,
            )
            if proxy.url.scheme in ("http", "https"):
                self._pool = httpcore.HTTPProxy(
                    proxy_url=url,
                    proxy_auth=proxy.raw_auth,
                    proxy_headers=proxy.headers.raw,
                    proxy_ssl_context=proxy.ssl_context,
                    **pool_args,
                )
            else:  # socks5 / socks5h (httpx.Proxy accepts no other scheme); needs socksio
                self._pool = httpcore.SOCKSProxy(
                    proxy_url=url, proxy_auth=proxy.raw_auth, **pool_args
                )

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.SyncByteStream)
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=request.url.raw_scheme,
                host=request.url.raw_host,
                port=request.url.port,
                target=request.url.raw_path,
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        with _httpx_errors():
            response = self._pool.handle_request(core_request)
        assert isinstance(response.stream, Iterable)
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_ResponseStream(response.stream),
            extensions=response.extensions,
        )

    def close(self) -> None:
        self._pool.close()


def _environment_proxy(base_url: str) -> httpx.Proxy | None:
    """
    The proxy the environment names for *base_url*, read as httpx reads it:
    ``<scheme>_proxy`` or ``all_proxy`` (a bare ``host:port`` is an HTTP proxy),
    unless ``no_proxy`` is ``*`` or names the host, a parent domain of it, or
    an IP network holding it.
    """
    url = httpx.URL(base_url)
    proxies = urllib.request.getproxies()
    value = proxies.get(url.scheme) or proxies.get("all")
    if not value:
        return None
    host = url.host.lower()
    for entry in (e.strip().lower() for e in proxies.get("no", "").split(",")):
        if "://" in entry:
            scheme, _, entry = entry.partition("://")
            if scheme not in (url.scheme, "all"):
                continue
        entry = entry.strip("[]").rstrip("/")
        if not entry:
            continue
        if entry == "*" or _host_matches(host, entry):
            return None
    return httpx.Proxy(value if "://" in value else f"http://{value}")


def _host_matches(host: str, entry: str) -> bool:
    try:
        return ipaddress.ip_address(host) in ipaddress.ip_network(entry, strict=False)
    except ValueError:
        pass
    domain = entry.lstrip(".")
    return (host == domain and not entry.startswith(".")) or host.endswith("." + domain)
