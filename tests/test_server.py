"""
The HTTP service in process (FastAPI's TestClient) on a real redis-server.

Every endpoint, every status code the service promises (429 over budget, 503
store unavailable, 422 bad input, 404 unknown reservation, 401/403 auth), and
that a refused request changes nothing in the store.
"""

from __future__ import annotations

import datetime
import math
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from coreason_budget import AsyncBudgetManager, BudgetManager, ConfigError
from coreason_budget.server import ServerSettings, create_app

from .redis_server import RedisServer, snapshot
from .service_support import async_managers

USER_KEY = "user-key-1"
ADMIN_KEY = "admin-key-1"
USER = {"Authorization": f"Bearer {USER_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
LIMITS = {
    "daily_user_limit_usd": 10.0,
    "daily_project_limit_usd": 20.0,
    "daily_global_limit_usd": 50.0,
}
NANO = 1_000_000_000

Serve = Callable[..., TestClient]


@pytest.fixture
def serve(redis_url: str, spool_dir: Path) -> Iterator[Serve]:
    """Start apps on managers of the test store; each is shut down after the test."""
    clients: list[TestClient] = []
    make_manager = async_managers(redis_url, spool_dir)

    def start(
        settings: ServerSettings | None = None,
        manager: AsyncBudgetManager | None = None,
        **config: Any,
    ) -> TestClient:
        if manager is None:
            manager = make_manager(**{**LIMITS, **config})
        settings = settings or ServerSettings(
            api_keys=frozenset({USER_KEY}), admin_api_keys=frozenset({ADMIN_KEY})
        )
        client = TestClient(create_app(manager, settings), headers=USER)
        client.__enter__()
        clients.append(client)
        return client

    yield start
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def api(serve: Serve) -> TestClient:
    """The service with $10 per user, $20 per project, $50 globally; a user key by default."""
    return serve()


def spent(api: TestClient, user_id: str, project_id: str | None = None) -> dict[str, int]:
    params = {} if project_id is None else {"project_id": project_id}
    r = api.get(f"/usage/{user_id}", params=params)
    assert r.status_code == 200, r.text
    return {scope: u["spent_nano"] for scope, u in r.json().items()}


def reserve(api: TestClient, **body: Any) -> str:
    r = api.post("/reservations", json=body)
    assert r.status_code == 200, r.text
    return str(r.json()["reservation_id"])


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def next_midnight() -> str:
    """When today's (UTC) budgets reset, as answers write it."""
    today = utc_now().date() + datetime.timedelta(days=1)
    return datetime.datetime.combine(today, datetime.time(), datetime.UTC).isoformat()


def month_start(moment: datetime.datetime, months: int = 0) -> datetime.datetime:
    """The first instant of *moment*'s month (UTC), *months* later."""
    index = moment.year * 12 + moment.month - 1 + months
    return datetime.datetime(index // 12, index % 12 + 1, 1, tzinfo=datetime.UTC)


def held_at(answer: dict[str, Any]) -> datetime.datetime:
    """A reservation answer's held_at: ISO 8601, UTC, to the millisecond."""
    text = answer["held_at"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", text), text
    return datetime.datetime.fromisoformat(text)


class TestHealth:
    """/health is for load balancers: no key, and 503 exactly when the store does not answer."""

    def test_healthy_without_a_key(self, api: TestClient) -> None:
        r = api.get("/health", headers={"Authorization": ""})
        assert r.status_code == 200
        assert r.json() == {"status": "healthy", "redis": "connected"}

    def test_store_down_is_503_then_recovers(self, serve: Serve, own_redis: RedisServer) -> None:
        api = serve(redis_url=own_redis.url)
        assert api.get("/health").status_code == 200
        own_redis.kill()
        r = api.get("/health")
        assert r.status_code == 503
        assert r.json() == {"status": "unhealthy", "redis": "disconnected"}
        own_redis.start()
        assert api.get("/health").status_code == 200


class TestCheck:
    """POST /check answers from the ledger and writes nothing."""

    def test_allowed(self, api: TestClient, redis_client: redis.Redis) -> None:
        before = snapshot(redis_client)
        r = api.post("/check", json={"user_id": "user_123", "estimated_cost": 9.99})
        assert r.status_code == 200
        assert r.json() == {"status": "allowed"}
        assert snapshot(redis_client) == before

    def test_over_budget_is_429_with_the_scope_and_amounts(self, api: TestClient) -> None:
        api.post("/spend", json={"user_id": "user_123", "cost": 9.99})
        r = api.post("/check", json={"user_id": "user_123", "estimated_cost": 0.05})
        assert r.status_code == 429
        body = r.json()
        assert body["detail"] == (
            "Budget exceeded for User user_123: spent $9.99 of $10.00 daily limit, requested $0.05"
        )
        assert body["scope"] == "user"
        assert body["entity_id"] == "user_123"
        assert body["limit_nano"] == 10 * NANO
        assert body["spent_nano"] == 9_990_000_000
        assert body["requested_nano"] == 50_000_000
        assert body["window"] == "day"
        assert body["resets_at"] == next_midnight()
        assert r.headers["Retry-After"] == str(body["retry_after_seconds"])
        left = datetime.datetime.fromisoformat(body["resets_at"]) - utc_now()
        assert abs(body["retry_after_seconds"] - left.total_seconds()) <= 2

    def test_project_scope_refuses(self, api: TestClient) -> None:
        for user in ("a", "b", "c"):
            api.post("/spend", json={"user_id": user, "cost": 7, "project_id": "p"})
        r = api.post("/check", json={"user_id": "d", "estimated_cost": 0.5, "project_id": "p"})
        assert r.status_code == 429
        assert r.json()["scope"] == "project"
        assert r.json()["entity_id"] == "p"

    def test_global_scope_refuses(self, serve: Serve) -> None:
        api = serve(daily_global_limit_usd=1.0)
        api.post("/spend", json={"user_id": "a", "cost": 1})
        r = api.post("/check", json={"user_id": "b", "estimated_cost": 0})
        assert r.status_code == 429
        assert r.json()["scope"] == "global"
        assert r.json()["entity_id"] is None
        assert r.json()["detail"].startswith("Budget exceeded for Global:")


class TestSpend:
    """POST /spend records, even past a limit, once per idempotency key."""

    def test_recorded_in_every_scope(self, api: TestClient) -> None:
        body = {"user_id": "u", "cost": 0.25, "project_id": "p", "model": "gpt-4"}
        r = api.post("/spend", json=body)
        assert r.status_code == 200
        key = r.json()["idempotency_key"]
        assert re.fullmatch(r"[0-9a-f]{32}", key)
        assert r.json() == {
            "status": "recorded",
            "kind": "spend",
            "idempotency_key": key,
            "amount_usd": 0.25,
            "amount_nano": NANO // 4,
        }
        assert spent(api, "u", "p") == {
            "user": NANO // 4,
            "project": NANO // 4,
            "global": NANO // 4,
        }
        models = api.get("/report", headers=ADMIN).json()["models"]
        assert [(m["entity_id"], m["spent_usd"]) for m in models] == [("gpt-4", 0.25)]

    def test_idempotency_key_records_once(self, api: TestClient) -> None:
        body = {"user_id": "u", "cost": 1.5, "idempotency_key": "op-1"}
        statuses = []
        for _ in range(3):
            r = api.post("/spend", json=body)
            assert r.status_code == 200
            statuses.append(r.json()["status"])
        assert statuses == ["recorded", "duplicate", "duplicate"]
        assert spent(api, "u")["user"] == 1_500_000_000

    def test_a_key_reused_for_another_spend_is_409(
        self, api: TestClient, redis_client: redis.Redis
    ) -> None:
        api.post("/spend", json={"user_id": "alice", "cost": 5, "idempotency_key": "invoice-1"})
        before = snapshot(redis_client)
        r = api.post("/spend", json={"user_id": "bob", "cost": 7, "idempotency_key": "invoice-1"})
        assert r.status_code == 409
        assert r.json()["error"] == "IdempotencyConflictError"
        assert snapshot(redis_client) == before

    def test_past_the_limit_is_still_recorded(self, api: TestClient) -> None:
        assert api.post("/spend", json={"user_id": "u", "cost": 12}).status_code == 200
        assert spent(api, "u")["user"] == 12 * NANO


class TestReservations:
    """Hold, settle, look up; every repeat is harmless."""

    def test_create_then_commit_refunds_the_difference(self, api: TestClient) -> None:
        r = api.post("/reservations", json={"user_id": "u", "estimate": 2, "project_id": "p"})
        assert r.status_code == 200
        body = r.json()
        assert body["state"] == "held"
        assert body["estimate_usd"] == 2.0
        rid = body["reservation_id"]
        assert re.fullmatch(r"[0-9a-f]{32}", rid)
        assert spent(api, "u", "p")["user"] == 2 * NANO
        r = api.post(f"/reservations/{rid}/commit", json={"actual_cost": 0.5})
        assert r.status_code == 200
        assert r.json() == {
            "status": "recorded",
            "state": "committed",
            "kind": "commit",
            "idempotency_key": rid,
            "amount_usd": 0.5,
            "amount_nano": NANO // 2,
        }
        assert spent(api, "u", "p") == {
            "user": NANO // 2,
            "project": NANO // 2,
            "global": NANO // 2,
        }
        # Settling again, either way, changes nothing.
        again = api.post(f"/reservations/{rid}/commit", json={"actual_cost": 9}).json()
        assert (again["status"], again["state"], again["amount_nano"]) == (
            "duplicate",
            "committed",
            0,
        )
        again = api.post(f"/reservations/{rid}/release").json()
        assert (again["status"], again["state"]) == ("duplicate", "committed")
        assert spent(api, "u")["user"] == NANO // 2

    def test_release_gives_the_hold_back(self, api: TestClient) -> None:
        rid = reserve(api, user_id="u", estimate=3)
        r = api.post(f"/reservations/{rid}/release")
        assert r.status_code == 200
        assert (r.json()["status"], r.json()["state"]) == ("recorded", "released")
        assert spent(api, "u")["user"] == 0
        again = api.post(f"/reservations/{rid}/commit", json={"actual_cost": 1}).json()
        assert (again["status"], again["state"]) == ("duplicate", "released")

    def test_over_budget_is_429_and_holds_nothing(
        self, api: TestClient, redis_client: redis.Redis
    ) -> None:
        reserve(api, user_id="u", estimate=8)
        before = snapshot(redis_client)
        r = api.post("/reservations", json={"user_id": "u", "estimate": 2.5})
        assert r.status_code == 429
        assert r.json()["scope"] == "user"
        assert r.json()["requested_nano"] == 2_500_000_000
        assert snapshot(redis_client) == before

    def test_client_sent_id_is_idempotent(self, api: TestClient) -> None:
        body = {"user_id": "u", "estimate": 4, "reservation_id": "req-42"}
        first = api.post("/reservations", json=body)
        again = api.post("/reservations", json=body)
        assert first.status_code == again.status_code == 200
        assert (
            first.json()
            == again.json()
            == {
                "reservation_id": "req-42",
                "state": "held",
                "estimate_usd": 4.0,
                "held_at": first.json()["held_at"],
            }
        )
        # When the store took the hold, to the millisecond; the retry names the same instant.
        assert abs((utc_now() - held_at(first.json())).total_seconds()) < 5
        assert spent(api, "u")["user"] == 4 * NANO
        api.post("/reservations/req-42/commit", json={"actual_cost": 1})
        settled = api.post("/reservations", json=body)
        assert settled.json()["state"] == "committed"
        assert spent(api, "u")["user"] == NANO

    def test_lookup(self, api: TestClient) -> None:
        rid = reserve(api, user_id="u", estimate=1.25, project_id="p", model="gpt-4")
        r = api.get(f"/reservations/{rid}")
        assert r.status_code == 200
        assert r.json() == {
            "reservation_id": rid,
            "state": "held",
            "estimate_usd": 1.25,
            "user_id": "u",
            "project_id": "p",
            "model": "gpt-4",
            "held_at": r.json()["held_at"],
        }
        made = held_at(r.json())
        assert abs((utc_now() - made).total_seconds()) < 5
        rid = reserve(api, user_id="u2", estimate=1)
        assert api.get(f"/reservations/{rid}").json()["project_id"] is None
        assert api.get(f"/reservations/{rid}").json()["model"] is None

    def test_commit_after_the_store_lost_the_record_records_once(
        self, api: TestClient, redis_client: redis.Redis
    ) -> None:
        """The store restarted empty: the hold the client describes is still settled, once."""
        r = api.post("/reservations", json={"user_id": "u", "estimate": 2, "project_id": "p"})
        rid, at = r.json()["reservation_id"], r.json()["held_at"]
        redis_client.flushall()
        assert api.post(f"/reservations/{rid}/commit", json={"actual_cost": 1}).status_code == 404
        hold = {"user_id": "u", "project_id": "p", "held_at": at}
        r = api.post(f"/reservations/{rid}/commit", json={"actual_cost": 1.5, **hold})
        assert r.status_code == 200, r.text
        assert (r.json()["status"], r.json()["state"]) == ("recorded", "committed")
        assert spent(api, "u", "p") == {
            "user": 1_500_000_000,
            "project": 1_500_000_000,
            "global": 1_500_000_000,
        }
        # The tombstone answers like a reservation (it was a 500), and settles nothing again.
        found = api.get(f"/reservations/{rid}")
        assert found.status_code == 200, found.text
        assert (found.json()["state"], found.json()["user_id"]) == ("committed", "u")
        again = api.post(f"/reservations/{rid}/commit", json={"actual_cost": 1.5, **hold})
        assert (again.status_code, again.json()["status"]) == (200, "duplicate")
        assert api.post(f"/reservations/{rid}/commit", json={"actual_cost": 1}).status_code == 200
        assert spent(api, "u")["user"] == 1_500_000_000

    def test_ids_with_url_special_characters(self, api: TestClient) -> None:
        # (Not "%41": Starlette's TestClient decodes paths twice; the e2e tests cover it.)
        for rid in ("a b", "ü?#&", "..", "."):
            body = {"user_id": "u", "estimate": 0.01, "reservation_id": rid}
            assert api.post("/reservations", json=body).status_code == 200
            path = "".join(f"%{b:02X}" for b in rid.encode())
            r = api.get(f"/reservations/{path}")
            assert r.status_code == 200, (rid, r.text)
            assert r.json()["reservation_id"] == rid

    def test_commit_token_usage_priced_with_the_reservations_model(
        self, api: TestClient, budget: BudgetManager
    ) -> None:
        rid = reserve(api, user_id="u", estimate=1, model="gpt-4")
        r = api.post(
            f"/reservations/{rid}/commit", json={"input_tokens": 1000, "output_tokens": 500}
        )
        assert r.status_code == 200, r.text
        assert (r.json()["status"], r.json()["state"]) == ("recorded", "committed")
        expected = budget.pricing.calculate_nano("gpt-4", 1000, 500, 0)
        assert r.json()["amount_nano"] == expected
        assert expected > 0
        assert spent(api, "u")["user"] == expected

    def test_token_usage_of_an_unknown_model_is_422_and_keeps_the_hold(
        self, api: TestClient
    ) -> None:
        rid = reserve(api, user_id="u", estimate=1, model="no-such-model-xyz")
        r = api.post(f"/reservations/{rid}/commit", json={"input_tokens": 1, "output_tokens": 1})
        assert r.status_code == 422
        assert "No price known for model 'no-such-model-xyz'" in r.json()["detail"]
        assert api.get(f"/reservations/{rid}").json()["state"] == "held"

    def test_token_usage_without_a_model_is_422(self, api: TestClient) -> None:
        rid = reserve(api, user_id="u", estimate=1)
        r = api.post(f"/reservations/{rid}/commit", json={"input_tokens": 1, "output_tokens": 1})
        assert r.status_code == 422
        assert "model" in r.json()["detail"]
        assert api.get(f"/reservations/{rid}").json()["state"] == "held"

    @pytest.mark.parametrize(
        "body",
        [
            {},
            {"actual_cost": 1, "input_tokens": 1, "output_tokens": 1},
            {"actual_cost": 1, "output_tokens": 1},
            {"cached_input_tokens": 1},
        ],
    )
    def test_commit_needs_exactly_one_of_cost_or_tokens(
        self, api: TestClient, body: dict[str, Any]
    ) -> None:
        rid = reserve(api, user_id="u", estimate=1, model="gpt-4")
        r = api.post(f"/reservations/{rid}/commit", json=body)
        assert r.status_code == 422
        assert r.json()["detail"] == "send either actual_cost or input_tokens and output_tokens"
        assert api.get(f"/reservations/{rid}").json()["state"] == "held"

    @pytest.mark.parametrize(
        ("method", "path", "body"),
        [
            ("GET", "/reservations/nope", None),
            ("POST", "/reservations/nope/commit", {"actual_cost": 1}),
            ("POST", "/reservations/nope/release", None),
        ],
    )
    def test_unknown_reservation_is_404(
        self,
        api: TestClient,
        redis_client: redis.Redis,
        method: str,
        path: str,
        body: dict[str, Any] | None,
    ) -> None:
        before = snapshot(redis_client)
        r = api.request(method, path, json=body)
        assert r.status_code == 404
        assert r.json()["detail"] == "no reservation 'nope' (never made, or expired)"
        assert snapshot(redis_client) == before


class StoreCalls:
    """
    The commands the service sent the store, as the redis-server saw them.

    INFO commandstats counts the commands a script runs as well (its GETs
    too), so what the service itself sent is read from the slow log, set to
    log every command: it names the connection each came from (the service's
    are named "coreason-budget"; a script's own calls come from none).
    """

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        setting = client.config_get("slowlog-log-slower-than")
        self.slower_than = str(setting["slowlog-log-slower-than"])
        client.config_set("slowlog-log-slower-than", 0)

    def reset(self) -> None:
        self.client.config_resetstat()
        self.client.slowlog_reset()

    def sent(self) -> list[str]:
        """The service's commands since reset(), oldest first (EVALSHA, GET...)."""
        entries = self.client.slowlog_get(1000)
        return [
            bytes(e["command"]).split(b" ", 1)[0].decode().upper()
            for e in reversed(entries)
            if e["client_name"] == b"coreason-budget"
        ]

    def evalsha(self) -> int:
        """Script calls since reset(), by INFO commandstats."""
        stat = self.client.info("commandstats").get("cmdstat_evalsha", {"calls": 0})
        return int(stat["calls"])

    def close(self) -> None:
        self.client.config_set("slowlog-log-slower-than", self.slower_than)


class TestOneRoundTrip:
    """
    Commit and release by id are one store round trip: the ledger script (one
    EVALSHA), no GET of the reservation first, whether the body describes the
    hold (as clients send it) or not (the store's record says whose it is).
    """

    @pytest.fixture
    def store(self, redis_client: redis.Redis) -> Iterator[StoreCalls]:
        calls = StoreCalls(redis_client)
        yield calls
        calls.close()

    def settle(
        self, api: TestClient, store: StoreCalls, rid: str, action: str, body: Any
    ) -> tuple[Any, list[str]]:
        store.reset()
        r = api.post(f"/reservations/{rid}/{action}", json=body)
        sent = store.sent()
        assert store.evalsha() == sent.count("EVALSHA")
        return r, sent

    @pytest.mark.parametrize(
        ("action", "settlement", "described", "state"),
        [
            ("commit", {"actual_cost": 0.75}, True, "committed"),
            ("commit", {"actual_cost": 0.75}, False, "committed"),
            # Token usage is priced for the model the body names (without it: see below).
            ("commit", {"input_tokens": 1000, "output_tokens": 500}, True, "committed"),
            ("release", None, True, "released"),
            ("release", None, False, "released"),
        ],
        ids=["commit-hold", "commit-no-hold", "usage-hold", "release-hold", "release-no-hold"],
    )
    def test_one_evalsha_and_no_get(
        self,
        api: TestClient,
        store: StoreCalls,
        action: str,
        settlement: dict[str, Any] | None,
        described: bool,
        state: str,
    ) -> None:
        made = api.post(
            "/reservations",
            json={"user_id": "u", "estimate": 2, "project_id": "p", "model": "gpt-4"},
        ).json()
        hold = {"user_id": "u", "project_id": "p", "model": "gpt-4", "held_at": made["held_at"]}
        body = {**(settlement or {}), **(hold if described else {})} or None
        r, calls = self.settle(api, store, made["reservation_id"], action, body)
        assert r.status_code == 200, r.text
        assert (r.json()["status"], r.json()["state"]) == ("recorded", state)
        assert calls == ["EVALSHA"]
        # A repeat is one round trip too, and answers "duplicate" with the state it left.
        r, calls = self.settle(api, store, made["reservation_id"], action, body)
        assert (r.json()["status"], r.json()["state"]) == ("duplicate", state)
        assert calls == ["EVALSHA"]

    def test_an_unknown_id_without_a_hold_is_404_in_one_round_trip(
        self, api: TestClient, store: StoreCalls, redis_client: redis.Redis
    ) -> None:
        api.post("/check", json={"user_id": "u", "estimated_cost": 1})  # connected, script loaded
        before = snapshot(redis_client)
        r, calls = self.settle(api, store, "nope", "commit", {"actual_cost": 1})
        assert r.status_code == 404
        assert r.json()["detail"] == "no reservation 'nope' (never made, or expired)"
        assert calls == ["EVALSHA"]
        assert snapshot(redis_client) == before

    def test_token_usage_without_the_model_is_looked_up_first(
        self, api: TestClient, store: StoreCalls
    ) -> None:
        """The model prices the tokens: a body without it costs a GET of the record first."""
        made = api.post("/reservations", json={"user_id": "u", "estimate": 2, "model": "gpt-4"})
        rid, at = made.json()["reservation_id"], made.json()["held_at"]
        tokens = {"input_tokens": 1000, "output_tokens": 500}
        body = {**tokens, "user_id": "u", "held_at": at}
        r, calls = self.settle(api, store, rid, "commit", body)
        assert r.status_code == 200, r.text
        assert r.json()["amount_nano"] > 0
        assert calls == ["GET", "EVALSHA"]

    @pytest.mark.parametrize(
        "off", [datetime.timedelta(milliseconds=-1), datetime.timedelta(days=-1)]
    )
    def test_a_hold_described_at_the_wrong_instant_is_settled_as_the_record_says(
        self, api: TestClient, store: StoreCalls, off: datetime.timedelta
    ) -> None:
        """The record wins over a wrong description (a millisecond off is wrong too): the
        script refuses (nothing written), then the reservation is looked up and settled in
        its own periods."""
        made = api.post("/reservations", json={"user_id": "u", "estimate": 2}).json()
        wrong = held_at(made) + off
        body = {"actual_cost": 0.5, "user_id": "u", "held_at": wrong.isoformat()}
        r, calls = self.settle(api, store, made["reservation_id"], "commit", body)
        assert r.status_code == 200, r.text
        assert (r.json()["status"], r.json()["state"]) == ("recorded", "committed")
        assert calls == ["EVALSHA", "GET", "EVALSHA"]
        assert spent(api, "u")["user"] == 500_000_000

    def test_held_at_in_another_offset_is_the_same_instant(
        self, api: TestClient, store: StoreCalls
    ) -> None:
        """held_at is an instant: the same one written with another offset (or Z) is the hold."""
        made = api.post("/reservations", json={"user_id": "u", "estimate": 2}).json()
        there = held_at(made).astimezone(
            datetime.timezone(datetime.timedelta(hours=-5, minutes=-30))
        )
        body = {"actual_cost": 0.5, "user_id": "u", "held_at": there.isoformat()}
        r, calls = self.settle(api, store, made["reservation_id"], "commit", body)
        assert (r.status_code, r.json()["status"]) == (200, "recorded"), r.text
        assert calls == ["EVALSHA"]
        zulu = made["held_at"].replace("+00:00", "Z")
        body = {"actual_cost": 0.5, "user_id": "u", "held_at": zulu}
        r, calls = self.settle(api, store, made["reservation_id"], "commit", body)
        assert (r.status_code, r.json()["status"]) == (200, "duplicate"), r.text
        assert calls == ["EVALSHA"]
        assert spent(api, "u")["user"] == 500_000_000


def usage_of(
    entity_id: str | None,
    spent_nano: int,
    limit_nano: int | None,
    window: str = "day",
    resets_at: str | None = None,
) -> dict[str, Any]:
    """One scope's entry in /usage and /report, as the service answers it."""
    remaining = None if limit_nano is None else max(limit_nano - spent_nano, 0)
    return {
        "entity_id": entity_id,
        "spent_usd": spent_nano / NANO,
        "limit_usd": None if limit_nano is None else limit_nano / NANO,
        "remaining_usd": None if remaining is None else remaining / NANO,
        "spent_nano": spent_nano,
        "limit_nano": limit_nano,
        "remaining_nano": remaining,
        "window": window,
        "resets_at": next_midnight() if resets_at is None else resets_at,
    }


class TestUsageAndReport:
    """Read-only views of the ledger: the current period of a window, or a past one."""

    def test_usage_per_scope(self, api: TestClient) -> None:
        reserve(api, user_id="u", estimate=1, project_id="p")
        api.post("/spend", json={"user_id": "u", "cost": 0.5})
        r = api.get("/usage/u", params={"project_id": "p"})
        assert r.status_code == 200
        assert r.json() == {
            "user": usage_of("u", 1_500_000_000, 10 * NANO),
            "project": usage_of("p", NANO, 20 * NANO),
            "global": usage_of(None, 1_500_000_000, 50 * NANO),
        }
        assert set(api.get("/usage/u").json()) == {"user", "global"}
        assert api.get("/usage/u", params={"window": "day"}).json() == api.get("/usage/u").json()

    def test_report(self, api: TestClient) -> None:
        for user, cost in (("a", 1), ("b", 3), ("c", 2)):
            api.post(
                "/spend", json={"user_id": user, "cost": cost, "project_id": "p", "model": "m"}
            )
        r = api.get("/report", params={"top": 2}, headers=ADMIN)
        assert r.status_code == 200
        body = r.json()
        today = utc_now().date()
        assert (body["window"], body["period"]) == ("day", today.isoformat())
        assert body["starts_at"] == f"{today.isoformat()}T00:00:00+00:00"
        assert body["resets_at"] == next_midnight()
        assert body["total"] == usage_of(None, 6 * NANO, 50 * NANO)
        assert body["users"] == [
            usage_of("b", 3 * NANO, 10 * NANO),
            usage_of("c", 2 * NANO, 10 * NANO),
        ]
        assert body["projects"] == [usage_of("p", 6 * NANO, 20 * NANO)]
        # Models are scopes too: no model limit is configured, so none.
        assert body["models"] == [usage_of("m", 6 * NANO, None)]

    @pytest.mark.parametrize("top", ["1001", "-1", "x"])
    def test_report_top_out_of_range_is_422(self, api: TestClient, top: str) -> None:
        r = api.get("/report", params={"top": top}, headers=ADMIN)
        assert r.status_code == 422
        assert r.json()["detail"].startswith("query.top:")


class TestLimits:
    """PUT /limits: admin keys only; overrides apply at once and can be removed."""

    def test_admin_sets_and_removes_an_override(self, api: TestClient) -> None:
        r = api.put(
            "/limits", json={"scope": "user", "entity_id": "u", "limit_usd": 1}, headers=ADMIN
        )
        assert r.status_code == 200
        assert r.json() == {"status": "updated", "scope": "user", "entity_id": "u", "window": "day"}
        assert api.post("/check", json={"user_id": "u", "estimated_cost": 2}).status_code == 429
        api.put(
            "/limits", json={"scope": "user", "entity_id": "u", "limit_usd": None}, headers=ADMIN
        )
        assert api.post("/check", json={"user_id": "u", "estimated_cost": 2}).status_code == 200

    def test_project_and_global(self, api: TestClient) -> None:
        for body in (
            {"scope": "project", "entity_id": "p", "limit_usd": 0},
            {"scope": "global", "entity_id": None, "limit_usd": 0.5},
        ):
            assert api.put("/limits", json=body, headers=ADMIN).status_code == 200
        assert (
            api.post(
                "/check", json={"user_id": "u", "estimated_cost": 0, "project_id": "p"}
            ).json()["scope"]
            == "project"
        )
        assert (
            api.post("/check", json={"user_id": "u", "estimated_cost": 1}).json()["scope"]
            == "global"
        )

    @pytest.mark.parametrize(
        "body",
        [
            {"scope": "global", "entity_id": "x", "limit_usd": 1},
            {"scope": "user", "entity_id": None, "limit_usd": 1},
            {"scope": "team", "entity_id": "t", "limit_usd": 1},
            {"scope": "user", "entity_id": "u", "limit_usd": -1},
            {"scope": "user", "entity_id": "u", "limit_usd": 9_000_001},
            {"scope": "user", "entity_id": "u"},
            {"scope": "model", "entity_id": None, "limit_usd": 1},
            {"scope": "user", "entity_id": "u", "limit_usd": 1, "window": "year"},
            {"scope": "user", "entity_id": "u", "limit_usd": 1, "window": "Day"},
            {"scope": "user", "entity_id": "u", "limit_usd": 1, "window": None},
            # Not kept by this service (no hourly limit, not in its windows): said, not ignored.
            {"scope": "user", "entity_id": "u", "limit_usd": 1, "window": "hour"},
        ],
    )
    def test_bad_limits_are_422(
        self, api: TestClient, redis_client: redis.Redis, body: dict[str, Any]
    ) -> None:
        before = snapshot(redis_client)
        r = api.put("/limits", json=body, headers=ADMIN)
        assert r.status_code == 422, r.text
        assert r.json()["detail"]
        assert snapshot(redis_client) == before

    def test_user_key_is_403(self, api: TestClient, redis_client: redis.Redis) -> None:
        r = api.put("/limits", json={"scope": "user", "entity_id": "u", "limit_usd": 100})
        assert r.status_code == 403
        assert r.json() == {"detail": "API key not allowed here"}
        assert snapshot(redis_client) == {}


def month_end() -> str:
    """When this month's (UTC) budgets reset, as answers write it."""
    return month_start(utc_now(), 1).isoformat()


class TestWindows:
    """
    Budgets by the hour, day, week or month: a refusal names its window and when it
    resets (Retry-After agrees), limits are set per window, usage and reports read one.
    """

    def exceeded(self, r: Any, window: str, resets_at: str) -> dict[str, Any]:
        """A 429 of *window*, resetting at *resets_at*, with a Retry-After that agrees."""
        assert r.status_code == 429, r.text
        body: dict[str, Any] = r.json()
        assert (body["window"], body["resets_at"]) == (window, resets_at)
        assert r.headers["Retry-After"] == str(body["retry_after_seconds"])
        left = datetime.datetime.fromisoformat(resets_at) - utc_now()
        assert body["retry_after_seconds"] >= 1
        assert abs(body["retry_after_seconds"] - left.total_seconds()) <= 2
        return body

    def test_a_monthly_limit_refuses_until_the_month_ends(self, serve: Serve) -> None:
        api = serve(monthly_user_limit_usd=5.0)
        assert api.post("/spend", json={"user_id": "u", "cost": 4.5}).status_code == 200
        for r in (
            api.post("/check", json={"user_id": "u", "estimated_cost": 1}),
            api.post("/reservations", json={"user_id": "u", "estimate": 1}),
        ):
            body = self.exceeded(r, "month", month_end())
            assert (body["scope"], body["entity_id"]) == ("user", "u")
            assert (body["limit_nano"], body["spent_nano"]) == (5 * NANO, 4_500_000_000)
            assert body["detail"] == (
                "Budget exceeded for User u: spent $4.50 of $5.00 monthly limit, requested $1.00"
            )
        # The day (limit $10) had room: only the month refused.
        assert api.post("/check", json={"user_id": "u", "estimated_cost": 0.5}).status_code == 200

    def test_when_the_day_and_the_month_refuse_the_later_reset_is_named(self, serve: Serve) -> None:
        """Waiting for the day to end would not be enough: the month's end is the answer."""
        api = serve(monthly_user_limit_usd=8.0)
        api.post("/spend", json={"user_id": "u", "cost": 10})
        r = api.post("/check", json={"user_id": "u", "estimated_cost": 1})
        window = "day" if month_end() == next_midnight() else "month"  # the month's last day
        self.exceeded(r, window, month_end())

    def test_a_limit_set_for_a_month(self, serve: Serve) -> None:
        api = serve(windows="month")
        body = {"scope": "user", "entity_id": "u", "limit_usd": 2, "window": "month"}
        r = api.put("/limits", json=body, headers=ADMIN)
        assert r.status_code == 200, r.text
        assert r.json() == {
            "status": "updated",
            "scope": "user",
            "entity_id": "u",
            "window": "month",
        }
        assert api.post("/spend", json={"user_id": "u", "cost": 1.5}).status_code == 200
        refused = self.exceeded(
            api.post("/check", json={"user_id": "u", "estimated_cost": 1}), "month", month_end()
        )
        assert (refused["scope"], refused["limit_nano"]) == ("user", 2 * NANO)
        assert api.post("/check", json={"user_id": "v", "estimated_cost": 1}).status_code == 200
        # The month's usage shows the override; the day's does not.
        assert api.get("/usage/u", params={"window": "month"}).json()["user"]["limit_nano"] == (
            2 * NANO
        )
        assert api.get("/usage/u").json()["user"]["limit_nano"] == 10 * NANO
        r = api.put("/limits", json={**body, "limit_usd": None}, headers=ADMIN)
        assert r.status_code == 200, r.text
        assert api.post("/check", json={"user_id": "u", "estimated_cost": 1}).status_code == 200
        assert api.get("/usage/u", params={"window": "month"}).json()["user"]["limit_nano"] is None

    def test_a_limit_for_one_model(self, api: TestClient) -> None:
        body = {"scope": "model", "entity_id": "gpt-4", "limit_usd": 1}
        r = api.put("/limits", json=body, headers=ADMIN)
        assert r.status_code == 200, r.text
        assert r.json() == {
            "status": "updated", "scope": "model", "entity_id": "gpt-4", "window": "day"
        }  # fmt: skip
        r = api.post("/reservations", json={"user_id": "u", "estimate": 1.5, "model": "gpt-4"})
        refused = self.exceeded(r, "day", next_midnight())
        assert (refused["scope"], refused["entity_id"]) == ("model", "gpt-4")
        reserve(api, user_id="u", estimate=1.5, model="other")
        reserve(api, user_id="u", estimate=1.5)

    def test_usage_in_a_month(self, serve: Serve) -> None:
        api = serve(monthly_user_limit_usd=100.0)
        api.post("/spend", json={"user_id": "u", "cost": 3, "project_id": "p"})
        reserve(api, user_id="u", estimate=1)
        r = api.get("/usage/u", params={"project_id": "p", "window": "month"})
        assert r.status_code == 200, r.text
        end = month_end()
        assert r.json() == {
            "user": usage_of("u", 4 * NANO, 100 * NANO, "month", end),
            # No monthly project or global limit: spend tracked, never refused.
            "project": usage_of("p", 3 * NANO, None, "month", end),
            "global": usage_of(None, 4 * NANO, None, "month", end),
        }
        assert api.get("/usage/u").json()["user"] == usage_of("u", 4 * NANO, 10 * NANO)

    def test_report_of_a_past_period(self, serve: Serve, make_manager: Any) -> None:
        """What was spent 40 days ago (last month, or earlier), by its day and by its month."""
        api = serve(windows="month")
        past = utc_now() - datetime.timedelta(days=40)
        then = make_manager(clock=past.timestamp, windows="month", **LIMITS)
        then.record_spend("old", 4, "p", "m")
        api.post("/spend", json={"user_id": "new", "cost": 1})

        r = api.get(
            "/report", params={"window": "month", "period": past.date().isoformat()}, headers=ADMIN
        )
        assert r.status_code == 200, r.text
        body = r.json()
        resets = month_start(past, 1).isoformat()
        assert (body["window"], body["period"]) == ("month", f"{past.year:04d}-{past.month:02d}")
        assert (body["starts_at"], body["resets_at"]) == (month_start(past).isoformat(), resets)
        assert body["total"] == usage_of(None, 4 * NANO, None, "month", resets)
        assert body["users"] == [usage_of("old", 4 * NANO, None, "month", resets)]
        assert body["projects"] == [usage_of("p", 4 * NANO, None, "month", resets)]
        assert body["models"] == [usage_of("m", 4 * NANO, None, "month", resets)]
        # An instant names its period as well, in any offset.
        there = past.astimezone(datetime.timezone(datetime.timedelta(hours=9)))
        for period in (there.isoformat(), past.isoformat().replace("+00:00", "Z")):
            r = api.get("/report", params={"window": "month", "period": period}, headers=ADMIN)
            assert r.status_code == 200, r.text
            assert r.json()["period"] == body["period"]

        r = api.get("/report", params={"period": past.date().isoformat()}, headers=ADMIN)
        day = r.json()
        midnight = datetime.datetime.combine(past.date(), datetime.time(), datetime.UTC)
        assert (day["window"], day["period"]) == ("day", past.date().isoformat())
        assert day["starts_at"] == midnight.isoformat()
        ends = (midnight + datetime.timedelta(days=1)).isoformat()
        assert day["total"] == usage_of(None, 4 * NANO, 50 * NANO, "day", ends)

        # The current month has only today's spend.
        now = api.get("/report", params={"window": "month"}, headers=ADMIN).json()
        assert now["period"] == f"{utc_now().year:04d}-{utc_now().month:02d}"
        assert [u["entity_id"] for u in now["users"]] == ["new"]
        assert now["total"]["spent_nano"] == NANO

    @pytest.mark.parametrize(
        ("path", "params", "field"),
        [
            ("/usage/u", {"window": "year"}, "query.window"),
            ("/usage/u", {"window": "DAY"}, "query.window"),
            ("/usage/u", {"window": ""}, "query.window"),
            ("/usage/u", {"window": "hour"}, "the hour window is not kept"),
            ("/report", {"window": "fortnight"}, "query.window"),
            ("/report", {"window": "week"}, "the week window is not kept"),
            ("/report", {"period": "yesterday"}, "query.period"),
            ("/report", {"period": "2026-02-30"}, "query.period"),
            ("/report", {"period": "2026-03-01T00:00:00"}, "UTC offset"),
            ("/report", {"period": "1700000000"}, "query.period"),
            ("/report", {"period": "2026-03"}, "query.period"),
            ("/report", {"period": ""}, "query.period"),
            # The edge of the calendar: bad input, not a server error.
            ("/report", {"period": "9999-12-31"}, "period"),
            ("/report", {"period": "9999-12-31T23:59:59+00:00", "window": "day"}, "period"),
        ],
    )
    def test_a_bad_window_or_period_is_422(
        self,
        api: TestClient,
        redis_client: redis.Redis,
        path: str,
        params: dict[str, str],
        field: str,
    ) -> None:
        api.post("/spend", json={"user_id": "u", "cost": 1})
        before = snapshot(redis_client)
        r = api.get(path, params=params, headers=ADMIN)
        assert r.status_code == 422, r.text
        assert field in r.json()["detail"]
        assert snapshot(redis_client) == before

    @pytest.mark.parametrize(
        "when",
        [
            "2026-03-01T12:00:00",  # naive: which zone?
            "2026-03-01",
            "1700000000",
            "soon",
            "",
            0,
            1.7e9,
            True,
            ["2026-03-01T12:00:00Z"],
        ],
    )
    @pytest.mark.parametrize("action", ["commit", "release"])
    def test_a_bad_held_at_is_422_and_settles_nothing(
        self, api: TestClient, redis_client: redis.Redis, when: Any, action: str
    ) -> None:
        rid = reserve(api, user_id="u", estimate=1)
        before = snapshot(redis_client)
        body = {"user_id": "u", "held_at": when}
        if action == "commit":
            body["actual_cost"] = 0.5
        r = api.post(f"/reservations/{rid}/{action}", json=body)
        assert r.status_code == 422, r.text
        assert "body.held_at" in r.json()["detail"]
        assert snapshot(redis_client) == before
        assert api.get(f"/reservations/{rid}").json()["state"] == "held"

    @pytest.mark.parametrize(
        "when", ["0001-01-01T00:00:00+00:00", "1969-12-31T23:59:59Z", "9999-12-31T23:59:00Z"]
    )
    def test_a_held_at_out_of_range_is_422(
        self, api: TestClient, redis_client: redis.Redis, when: str
    ) -> None:
        rid = reserve(api, user_id="u", estimate=1)
        before = snapshot(redis_client)
        body = {"user_id": "u", "held_at": when, "actual_cost": 0.5}
        r = api.post(f"/reservations/{rid}/commit", json=body)
        assert r.status_code == 422, r.text
        assert snapshot(redis_client) == before
        assert api.get(f"/reservations/{rid}").json()["state"] == "held"


ENDPOINTS = [
    ("POST", "/check", {"user_id": "u", "estimated_cost": 1}),
    ("POST", "/spend", {"user_id": "u", "cost": 1}),
    ("POST", "/reservations", {"user_id": "u", "estimate": 1}),
    ("GET", "/reservations/r1", None),
    ("POST", "/reservations/r1/commit", {"actual_cost": 1}),
    ("POST", "/reservations/r1/release", None),
    ("GET", "/usage/u", None),
    ("GET", "/report", None),
    ("GET", "/metrics", None),
    ("PUT", "/limits", {"scope": "user", "entity_id": "u", "limit_usd": 1}),
]


class TestAuth:
    """Bearer API keys: 401 without a good one, 403 for a user key on admin endpoints."""

    @pytest.mark.parametrize(("method", "path", "body"), ENDPOINTS)
    def test_no_key_is_401(
        self, api: TestClient, method: str, path: str, body: dict[str, Any] | None
    ) -> None:
        r = api.request(method, path, json=body, headers={"Authorization": ""})
        assert r.status_code == 401
        assert r.json() == {"detail": "missing bearer API key"}
        assert r.headers["WWW-Authenticate"] == "Bearer"

    @pytest.mark.parametrize(("method", "path", "body"), ENDPOINTS)
    def test_wrong_key_is_401(
        self, api: TestClient, redis_client: redis.Redis, method: str, path: str, body: Any
    ) -> None:
        for header in (f"Bearer {USER_KEY}x", "Bearer ", f"Basic {USER_KEY}", USER_KEY):
            r = api.request(method, path, json=body, headers={"Authorization": header})
            assert r.status_code == 401, header
        assert snapshot(redis_client) == {}

    def test_auth_comes_before_validation(self, api: TestClient) -> None:
        r = api.post("/check", json={"bad": 1}, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401

    def test_admin_key_may_do_everything(self, api: TestClient) -> None:
        assert (
            api.post("/spend", json={"user_id": "u", "cost": 1}, headers=ADMIN).status_code == 200
        )
        assert api.get("/usage/u", headers=ADMIN).status_code == 200

    def test_several_keys(self, serve: Serve) -> None:
        api = serve(ServerSettings(api_keys=frozenset({"k1", "k2"})))
        for key in ("k1", "k2"):
            r = api.get("/usage/u", headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200
        # Without admin keys no one may change limits.
        r = api.put(
            "/limits",
            json={"scope": "global", "entity_id": None, "limit_usd": 1},
            headers={"Authorization": "Bearer k1"},
        )
        assert r.status_code == 403

    def test_insecure_mode_needs_no_key(
        self, serve: Serve, caplog: pytest.LogCaptureFixture
    ) -> None:
        api = serve(ServerSettings(insecure_no_auth=True))
        assert "AUTHENTICATION IS DISABLED" in caplog.text
        r = api.post(
            "/check", json={"user_id": "u", "estimated_cost": 1}, headers={"Authorization": ""}
        )
        assert r.status_code == 200
        r = api.put("/limits", json={"scope": "global", "entity_id": None, "limit_usd": 1})
        assert r.status_code == 200

    def test_no_keys_refuses_to_start(self) -> None:
        with pytest.raises(
            ConfigError, match="No API keys configured: set COREASON_BUDGET_API_KEYS"
        ):
            ServerSettings()

    def test_settings_from_env(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("COREASON_BUDGET_INSECURE_NO_AUTH", raising=False)
        monkeypatch.setenv("COREASON_BUDGET_API_KEYS", " a, b ,,")
        monkeypatch.setenv("COREASON_BUDGET_ADMIN_API_KEYS", "root")
        s = ServerSettings.from_env()
        assert s.api_keys == {"a", "b"}
        assert s.admin_api_keys == {"root"}
        assert not s.insecure_no_auth

        monkeypatch.setenv("COREASON_BUDGET_API_KEYS", " , ")
        monkeypatch.delenv("COREASON_BUDGET_ADMIN_API_KEYS")
        with pytest.raises(ConfigError):
            ServerSettings.from_env()
        monkeypatch.setenv("COREASON_BUDGET_INSECURE_NO_AUTH", "1")
        assert ServerSettings.from_env().insecure_no_auth
        with pytest.raises(ConfigError):
            ServerSettings.from_env(insecure_no_auth=False)


BAD_INPUT = [
    # (endpoint, raw JSON body, text the message must contain)
    ("/check", '{"user_id": "u", "estimated_cost": -1}', "body.estimated_cost"),
    ("/check", '{"user_id": "u", "estimated_cost": NaN}', "body.estimated_cost"),
    ("/check", '{"user_id": "u", "estimated_cost": Infinity}', "body.estimated_cost"),
    ("/check", '{"user_id": "u", "estimated_cost": 1e400}', "body.estimated_cost"),
    ("/check", '{"user_id": "u", "estimated_cost": 1000001}', "body.estimated_cost"),
    ("/check", '{"user_id": "u", "estimated_cost": "a lot"}', "body.estimated_cost"),
    ("/check", '{"user_id": "", "estimated_cost": 1}', "body.user_id"),
    ("/check", '{"user_id": "' + "x" * 257 + '", "estimated_cost": 1}', "body.user_id"),
    ("/check", '{"user_id": 7, "estimated_cost": 1}', "body.user_id"),
    ("/check", '{"user_id": "u", "estimated_cost": 1, "project_id": ""}', "body.project_id"),
    ("/check", '{"user_id": "u", "estimated_cost": 1, "budget": 5}', "body.budget"),
    ("/check", '{"estimated_cost": 1}', "body.user_id"),
    ("/check", '{"user_id": "u", "estimated_cost": 1', "body"),
    ("/check", "[1, 2]", "body"),
    ("/spend", '{"user_id": "u", "cost": -0.000001}', "body.cost"),
    ("/spend", '{"user_id": "u", "cost": NaN}', "body.cost"),
    ("/spend", '{"user_id": "u", "cost": 1e7}', "body.cost"),
    ("/spend", '{"user_id": "u", "cost": 1, "idempotency_key": ""}', "body.idempotency_key"),
    ("/spend", '{"user_id": "u", "cost": 1, "model": "' + "m" * 257 + '"}', "body.model"),
    ("/spend", '{"user_id": "u", "cost": 1, "extra": null}', "body.extra"),
    ("/reservations", '{"user_id": "u", "estimate": -5}', "body.estimate"),
    ("/reservations", '{"user_id": "u", "estimate": -Infinity}', "body.estimate"),
    (
        "/reservations",
        '{"user_id": "u", "estimate": 1, "reservation_id": ""}',
        "body.reservation_id",
    ),
    ("/reservations", '{"user_id": "u", "estimate": 1, "on_error": "release"}', "body.on_error"),
]


class TestValidation:
    """422 with a message naming the field, and nothing written."""

    @pytest.mark.parametrize(("path", "raw", "field"), BAD_INPUT)
    def test_bad_body_is_422(
        self, api: TestClient, redis_client: redis.Redis, path: str, raw: str, field: str
    ) -> None:
        api.post("/spend", json={"user_id": "u", "cost": 1})
        before = snapshot(redis_client)
        r = api.post(path, content=raw, headers={"Content-Type": "application/json"})
        assert r.status_code == 422, r.text
        detail = r.json()["detail"]
        assert isinstance(detail, str)
        assert field in detail
        assert snapshot(redis_client) == before

    @pytest.mark.parametrize(
        "body",
        [
            {"actual_cost": -1},
            {"actual_cost": 2_000_000},
            {"input_tokens": -1, "output_tokens": 1},
            {"input_tokens": 1, "output_tokens": 100_000_001},
            {"input_tokens": 1.5, "output_tokens": 1},
            {"input_tokens": 10, "output_tokens": 1, "cached_input_tokens": 11},
            {"actual_cost": 1, "state": "committed"},
        ],
    )
    def test_bad_commit_is_422(
        self, api: TestClient, redis_client: redis.Redis, body: dict[str, Any]
    ) -> None:
        rid = reserve(api, user_id="u", estimate=1, model="gpt-4")
        before = snapshot(redis_client)
        r = api.post(f"/reservations/{rid}/commit", json=body)
        assert r.status_code == 422, r.text
        assert snapshot(redis_client) == before

    def test_overlong_path_ids_are_422(self, api: TestClient) -> None:
        assert api.get("/usage/" + "u" * 257).status_code == 422
        assert api.get("/usage/u", params={"project_id": ""}).status_code == 422
        assert api.get("/reservations/" + "r" * 257).status_code == 422

    def test_smallest_amounts_round_up_to_a_nano_dollar(self, api: TestClient) -> None:
        assert api.post("/spend", json={"user_id": "u", "cost": 1e-12}).status_code == 200
        assert api.post("/spend", json={"user_id": "u", "cost": 0.1}).status_code == 200
        assert spent(api, "u")["user"] == 100_000_001


class TestStoreDown:
    """Fail closed: with the store gone every call is 503, never a guess."""

    @pytest.mark.parametrize(("method", "path", "body"), ENDPOINTS[:-2] + ENDPOINTS[-1:])
    def test_503(
        self,
        serve: Serve,
        own_redis: RedisServer,
        method: str,
        path: str,
        body: dict[str, Any] | None,
    ) -> None:
        api = serve(redis_url=own_redis.url, spool_dir="off")
        own_redis.kill()
        r = api.request(method, path, json=body, headers=ADMIN)
        assert r.status_code == 503, r.text
        assert r.json()["detail"]
        if path == "/spend":  # nothing saved: the key is what makes a retry safe
            assert r.json()["idempotency_key"]

    def test_a_spend_the_service_spooled_is_202_and_charged_once(
        self, serve: Serve, own_redis: RedisServer
    ) -> None:
        """202 "spooled" names the key; the natural retry with it charges nothing twice."""
        api = serve(redis_url=own_redis.url)
        own_redis.kill()
        body = {"user_id": "alice", "cost": 0.05}
        r = api.post("/spend", json=body)
        assert r.status_code == 202, r.text
        assert r.json()["status"] == "spooled"
        key = r.json()["idempotency_key"]
        again = api.post("/spend", json={**body, "idempotency_key": key})
        assert (again.status_code, again.json()["status"]) == (202, "spooled")
        own_redis.start()
        assert api.get("/health").status_code == 200
        for _ in range(100):
            if spent(api, "alice")["user"] == 50_000_000:
                break
            time.sleep(0.05)
        assert spent(api, "alice")["user"] == 50_000_000
        again = api.post("/spend", json={**body, "idempotency_key": key})
        assert (again.status_code, again.json()["status"]) == (200, "duplicate")
        assert spent(api, "alice")["user"] == 50_000_000


def metric(api: TestClient, name: str, **labels: str) -> float:
    """One sample of /metrics (0 when the labelled series does not exist yet)."""
    text = api.get("/metrics").text
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        sname, _, slabels = series.partition("{")
        got = ",".join(sorted(slabels.rstrip("}").split(","))) if slabels else ""
        if sname == name and got == want:
            return float(value)
    return 0.0


class TestMetrics:
    """Prometheus counters move with the decisions; /metrics needs a key."""

    def test_decisions_and_dollars(self, api: TestClient) -> None:
        total = "coreason_budget_decisions_total"
        dollars = "coreason_budget_dollars_total"
        assert metric(api, total, decision="allowed", scope="all") == 0
        api.post("/check", json={"user_id": "u", "estimated_cost": 1.5})
        rid = reserve(api, user_id="u", estimate=2)
        assert metric(api, total, decision="allowed", scope="all") == 2
        assert metric(api, dollars, decision="allowed", scope="all") == 3.5
        api.post("/spend", json={"user_id": "u", "cost": 7})
        api.post(f"/reservations/{rid}/commit", json={"actual_cost": 0.5})
        assert metric(api, total, decision="recorded", scope="all") == 2
        assert metric(api, dollars, decision="recorded", scope="all") == 7.5
        api.post("/check", json={"user_id": "u", "estimated_cost": 5})
        assert metric(api, total, decision="blocked", scope="user") == 1
        assert metric(api, dollars, decision="blocked", scope="user") == 5
        assert metric(api, "coreason_budget_store_seconds_count", operation="check") == 2

    def test_store_errors(self, serve: Serve, own_redis: RedisServer) -> None:
        api = serve(redis_url=own_redis.url)
        own_redis.kill()
        api.post("/check", json={"user_id": "u", "estimated_cost": 1})
        api.get("/health")
        assert metric(api, "coreason_budget_store_errors_total", operation="check") == 1
        assert metric(api, "coreason_budget_store_errors_total", operation="ping") == 1

    def test_content_type(self, api: TestClient) -> None:
        r = api.get("/metrics")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/plain")
        assert "# TYPE coreason_budget_decisions_total counter" in r.text


class TestOpenAPI:
    """The schema is served (clients and the fuzz tests are generated from it)."""

    def test_schema(self, api: TestClient) -> None:
        r = api.get("/openapi.json", headers={"Authorization": ""})
        assert r.status_code == 200
        schema = r.json()
        assert schema["info"]["title"] == "coreason-budget"
        assert set(schema["paths"]) == {
            "/health",
            "/check",
            "/spend",
            "/reservations",
            "/reservations/{reservation_id}",
            "/reservations/{reservation_id}/commit",
            "/reservations/{reservation_id}/release",
            "/usage/{user_id}",
            "/report",
            "/limits",
            "/metrics",
        }
        assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
        check = schema["components"]["schemas"]["CheckBody"]
        assert check["additionalProperties"] is False
        assert check["properties"]["estimated_cost"]["minimum"] == 0
        assert not math.isinf(check["properties"]["estimated_cost"]["maximum"])
