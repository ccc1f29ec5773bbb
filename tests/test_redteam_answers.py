"""
Red-team of "What an answer means" (issue 10), face by face: the retry a user
naturally makes after each answer, and what each answer says about the money.
Against a real redis-server (through a fault-injecting proxy where the store
must misbehave), the HTTP service in-process, and BudgetClient over real HTTP.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from fastapi.testclient import TestClient

from coreason_budget import (
    AsyncBudgetManager,
    BudgetManager,
    BudgetUnavailableError,
)
from coreason_budget.client import BudgetClient
from coreason_budget.server import ServerSettings, create_app

from .conftest import ManagerFactory
from .service_support import async_managers
from .tcp_proxy import TcpProxy
from .test_client_e2e import USER_KEY, LiveFactory, live  # noqa: F401 (a fixture)
from .test_faults import FAST, counters

NANO = 1_000_000_000
AUTH = {"Authorization": f"Bearer {USER_KEY}"}


@pytest.fixture
def http() -> Iterator[Callable[[AsyncBudgetManager], TestClient]]:
    """The HTTP service over a given manager (in-process)."""
    made: list[TestClient] = []

    def start(manager: AsyncBudgetManager) -> TestClient:
        app = create_app(manager, ServerSettings(api_keys=frozenset({USER_KEY})))
        client = TestClient(app, headers=AUTH)
        client.__enter__()
        made.append(client)
        return client

    yield start
    for client in made:
        client.__exit__(None, None, None)


class TestUnavailableNamesTheReservation:
    """
    Every "unavailable" about a reservation names its id (README: the 503 body
    "names the idempotency_key or reservation_id of the request"), also when
    it is the lookup of the hold that failed.
    """

    def test_manager_lookup(self, proxy: TcpProxy, managers: ManagerFactory) -> None:
        manager = managers(proxy.url, **{**FAST, "retries": 0})
        proxy.refuse()
        with pytest.raises(BudgetUnavailableError) as info:
            manager.reservation("r1")
        assert info.value.reservation_id == "r1"

    def test_http_commit_and_get(
        self,
        proxy: TcpProxy,
        spool_dir: Path,
        http: Callable[[AsyncBudgetManager], TestClient],
    ) -> None:
        api = http(async_managers(proxy.url, spool_dir)(**{**FAST, "retries": 0}))
        proxy.refuse()
        for answer in (
            api.post("/reservations/r1/commit", json={"actual_cost": 1.0}),
            api.post("/reservations/r1/release", json={}),
            api.get("/reservations/r1"),
        ):
            assert answer.status_code == 503, answer.text
            assert answer.json()["reservation_id"] == "r1", answer.text


class _LosesTheFirstReserve(httpx.BaseTransport):
    """
    Forwards every request but the first POST /reservations, which it keeps
    (still "in flight") while the client sees a read timeout.
    """

    def __init__(self) -> None:
        self._inner = httpx.HTTPTransport()
        self.kept: httpx.Request | None = None
        self.releases: list[int] = []
        self.released = threading.Event()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and request.url.path == "/reservations" and not self.kept:
            request.read()
            self.kept = request
            raise httpx.ReadTimeout("reply lost", request=request)
        response = self._inner.handle_request(request)
        if request.url.path.endswith("/release"):
            response.read()
            self.releases.append(response.status_code)
            self.released.set()
        return response

    def close(self) -> None:
        self._inner.close()


class TestClientUndoOfAReserveStillInFlight:
    """
    BudgetClient undoes a reserve whose answer it never got by releasing the
    id. When that reserve is still on its way (a slow worker), the release
    must leave a tombstone, as the manager's undo does, so that the reserve
    landing afterwards holds nothing: otherwise the estimate is held all day
    under an id nobody knows.
    """

    def test_a_late_reserve_holds_nothing(self, live: LiveFactory) -> None:  # noqa: F811
        server = live()
        transport = _LosesTheFirstReserve()
        with BudgetClient(server.url, USER_KEY, retries=0, transport=transport) as client:
            with pytest.raises(BudgetUnavailableError) as info:
                client.reserve("alice", 2.0)
            rid = info.value.reservation_id
            assert rid
            assert transport.released.wait(10)
            assert transport.kept is not None
            late = httpx.post(
                server.url + "/reservations",
                content=transport.kept.content,
                headers={**AUTH, "Content-Type": "application/json"},
            )
            assert late.status_code != 200 or late.json()["state"] != "held", late.text
            assert client.usage("alice")["user"].spent_nano == 0


class TestInterruptedReserve:
    """
    A reserve interrupted after the store took the hold (KeyboardInterrupt, a
    gevent-style timeout: BaseExceptions, not errors) has the same unknown
    outcome as one whose reply was lost, and must be undone the same way:
    otherwise the estimate stays held all day under an id nobody settles.
    """

    def test_the_hold_is_released(
        self, budget: BudgetManager, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        ledger: Any = budget._driver
        script = ledger._evalsha

        def taken_then_interrupted(*args: Any) -> Any:
            script(*args)
            raise KeyboardInterrupt

        monkeypatch.setattr(ledger, "_evalsha", taken_then_interrupted)
        with pytest.raises(KeyboardInterrupt):
            budget.reserve("alice", 2.0, reservation_id="r1")
        monkeypatch.setattr(ledger, "_evalsha", script)
        assert counters(redis_client)["u:alice"] == 2 * NANO  # the store took it
        assert budget.replay_spool().recorded == 1
        assert counters(redis_client)["u:alice"] == 0
        assert budget.reservation("r1").state == "released"
