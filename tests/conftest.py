from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from coreason_budget import BudgetConfig, BudgetManager

from .redis_server import RedisServer
from .tcp_proxy import TcpProxy

# Pricing must never reach the network, in tests least of all.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


@pytest.fixture(autouse=True)
def _private_data_dir(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    Per-test XDG_DATA_HOME: the default spool and embedded store live there, so
    no test replays another's spooled charges or touches the user's real files.
    """
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path_factory.mktemp("xdg")))


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One real redis-server per test process (each xdist worker has its own)."""
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The shared server's URL, flushed so that each test starts from an empty store."""
    client = redis_server.client()
    client.flushall()
    client.script_flush()
    client.close()
    return redis_server.url


@pytest.fixture
def redis_client(redis_server: RedisServer, redis_url: str) -> Iterator[redis.Redis]:
    client = redis_server.client()
    yield client
    client.close()


@pytest.fixture
def proxy(redis_server: RedisServer, redis_url: str) -> Iterator[TcpProxy]:
    """A fault-injecting TCP proxy in front of the suite's (flushed) redis-server."""
    p = TcpProxy(redis_server.port)
    yield p
    p.close()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A private redis-server the test may kill and restart."""
    server = RedisServer()
    server.start()
    yield server
    server.stop()


ManagerFactory = Callable[..., BudgetManager]


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    """The test's own spool directory, so no test replays another's charges."""
    return tmp_path / "spool"


@pytest.fixture
def managers(spool_dir: Path) -> Iterator[ManagerFactory]:
    """Build managers on any store URL (spooling into ``spool_dir``); all closed after the test."""
    made: list[BudgetManager] = []

    def make(url: str, clock: Callable[[], float] | None = None, **config: Any) -> BudgetManager:
        config.setdefault("spool_dir", str(spool_dir))
        manager = BudgetManager(BudgetConfig(redis_url=url, **config), clock=clock)
        made.append(manager)
        return manager

    yield make
    for manager in made:
        manager.close()


@pytest.fixture
def make_manager(redis_url: str, managers: ManagerFactory) -> ManagerFactory:
    """Build managers on the test server (``redis_url`` may still be overridden)."""

    def make(clock: Callable[[], float] | None = None, **config: Any) -> BudgetManager:
        return managers(config.pop("redis_url", redis_url), clock=clock, **config)

    return make


@pytest.fixture
def budget(make_manager: ManagerFactory) -> BudgetManager:
    """A manager with small limits: $10 per user, $20 per project, $50 globally."""
    return make_manager(
        daily_user_limit_usd=10.0, daily_project_limit_usd=20.0, daily_global_limit_usd=50.0
    )


def day_key(budget: Any) -> str:
    """The key of the day period a call made now by *budget* (a manager) would charge."""
    ledger = budget._core.ledger
    return str(ledger.period_key(ledger.calendar.period("day", ledger.now())))


def marked(client: redis.Redis, budget: Any, operation_id: str, at_ms: int) -> bool:
    """Whether the store holds *operation_id*'s spend marker, made at *at_ms*."""
    from coreason_budget._ledger import DAY_MS, Marker

    ledger = budget._core.ledger
    marker = Marker.of(b"s", operation_id, ledger._buckets)
    (bucket,) = marker.buckets(ledger._tag, at_ms // DAY_MS, 1)
    return bool(client.hexists(bucket, marker.field))
