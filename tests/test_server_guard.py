"""
The service's edges against misuse (issue 11): authentication before the body
is read, bounded bodies, strict amounts, admin-only reports, insecure mode only
without keys, settings from ``.env``, Retry-After, and typed answers.

The guard is driven at the ASGI level, with a ``receive`` that counts the bytes
it hands out, so "not read" is measured rather than assumed.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi import FastAPI
from fastapi.testclient import TestClient

from coreason_budget import AsyncBudgetManager, BudgetExceededError, ConfigError, server
from coreason_budget.cli import main
from coreason_budget.server import MAX_BODY_BYTES, ServerSettings, create_app

from .conftest import ManagerFactory
from .redis_server import snapshot
from .service_support import async_managers

USER_KEY = "user-key-1"
ADMIN_KEY = "admin-key-1"
USER = {"Authorization": f"Bearer {USER_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
SETTINGS = ServerSettings(api_keys=frozenset({USER_KEY}), admin_api_keys=frozenset({ADMIN_KEY}))
CHUNK = 64 * 1024
BIG = 200 * 1024 * 1024  # 200 MiB
NANO = 1_000_000_000


class Spy:
    """Counts the manager calls that reach it: a handler that ran calls one."""

    def __init__(self, manager: AsyncBudgetManager) -> None:
        self.calls = 0
        self.manager = manager
        original = manager.record_spend

        def record_spend(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return original(*args, **kwargs)

        manager.record_spend = record_spend  # type: ignore[method-assign]


@pytest.fixture
def manager(redis_url: str, spool_dir: Path) -> AsyncBudgetManager:
    return async_managers(redis_url, spool_dir)(
        daily_user_limit_usd=10.0, daily_project_limit_usd=20.0, daily_global_limit_usd=50.0
    )


@pytest.fixture
def app(manager: AsyncBudgetManager) -> Iterator[FastAPI]:
    """The app; requests sent with :func:`call` are served on one event loop of its own."""
    app = create_app(manager, SETTINGS)
    with asyncio.Runner() as runner:
        app.state.runner = runner
        yield app
        runner.run(manager.aclose())  # what its lifespan would do


@pytest.fixture
def api(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app, headers=USER) as client:
        yield client


class Sent:
    def __init__(self) -> None:
        self.pulled = 0
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = b""


def call(
    app: FastAPI,
    method: str,
    path: str,
    headers: dict[str, str],
    chunks: Iterator[bytes],
) -> Sent:
    """One request through the app's ASGI interface, counting the body bytes pulled."""
    sent = Sent()

    async def receive() -> dict[str, Any]:
        chunk = next(chunks, None)
        if chunk is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        sent.pulled += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            sent.status = message["status"]
            sent.headers = {k.decode(): v.decode() for k, v in message["headers"]}
        elif message["type"] == "http.response.body":
            sent.body += message.get("body", b"")

    # The app's loop: its manager's store is bound to the loop that first used it.
    runner: asyncio.Runner = app.state.runner
    runner.run(app(http_scope(method, path, headers), receive, send))  # type: ignore[arg-type]
    return sent


def http_scope(method: str, path: str, headers: dict[str, str]) -> dict[str, Any]:
    """An ASGI HTTP request scope, as a server would hand it to the app."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 12345),
        "server": ("testserver", 80),
    }


def big_body(total: int = BIG) -> Iterator[bytes]:
    """A JSON-looking body of *total* bytes, produced only as it is pulled."""
    yield b'{"user_id": "u", "cost": 1, "model": "'
    for _ in range(total // CHUNK):
        yield b"x" * CHUNK


class TestBodiesAreBoundedAndReadAfterAuth:
    """Issue 11.1: no key, no read; a key, at most MAX_BODY_BYTES read."""

    @pytest.mark.parametrize("auth", [None, "Bearer wrong"])
    def test_unauthenticated_big_body_is_401_unread(
        self, app: FastAPI, manager: AsyncBudgetManager, auth: str | None
    ) -> None:
        spy = Spy(manager)
        headers = {"content-type": "application/json"}
        if auth is not None:
            headers["authorization"] = auth
        start = time.perf_counter()
        sent = call(app, "POST", "/spend", headers, big_body())
        assert sent.status == 401
        assert sent.pulled == 0
        assert spy.calls == 0
        assert time.perf_counter() - start < 2
        detail = "missing bearer API key" if auth is None else "bad API key"
        assert json.loads(sent.body) == {"detail": detail}

    def test_authenticated_big_body_is_413_after_the_limit(
        self, app: FastAPI, manager: AsyncBudgetManager, redis_client: redis.Redis
    ) -> None:
        spy = Spy(manager)
        sent = call(app, "POST", "/spend", {**USER, "content-type": "application/json"}, big_body())
        assert sent.status == 413
        assert sent.pulled <= MAX_BODY_BYTES + CHUNK
        assert spy.calls == 0
        body = json.loads(sent.body)
        assert body["error"] == "InvalidInputError"
        assert str(MAX_BODY_BYTES) in body["detail"]
        assert snapshot(redis_client) == {}

    def test_a_too_long_content_length_is_413_unread(self, app: FastAPI) -> None:
        headers = {**USER, "content-type": "application/json", "content-length": str(BIG)}
        sent = call(app, "POST", "/spend", headers, big_body())
        assert sent.status == 413
        assert sent.pulled == 0

    def test_a_user_key_on_an_admin_route_is_403_unread(self, app: FastAPI) -> None:
        headers = {**USER, "content-type": "application/json"}
        sent = call(app, "PUT", "/limits", headers, big_body())
        assert (sent.status, sent.pulled) == (403, 0)
        assert json.loads(sent.body) == {"detail": "API key not allowed here"}

    def test_a_body_in_many_small_chunks_is_read_whole(
        self, app: FastAPI, make_manager: ManagerFactory
    ) -> None:
        raw = json.dumps({"user_id": "chunked", "cost": 1.5}).encode()
        sent = call(
            app,
            "POST",
            "/spend",
            {**USER, "content-type": "application/json"},
            iter([raw[i : i + 3] for i in range(0, len(raw), 3)]),
        )
        assert sent.status == 200, sent.body
        # Read with a sync manager on the same store: one ledger.
        assert make_manager().usage("chunked")["user"].spent_nano == 1_500_000_000

    def test_the_longest_valid_body_fits(self, api: TestClient) -> None:
        # Four ids of 256 astral characters, each escaped as a 12-byte surrogate pair.
        ids = dict.fromkeys(("user_id", "project_id", "model"), "😀" * 256)
        raw = json.dumps({**ids, "cost": 0.5, "idempotency_key": "\U0001f600" * 256})
        assert len(raw) < MAX_BODY_BYTES
        r = api.post("/spend", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 200, r.text

    def test_the_413_is_in_the_schema(self, api: TestClient) -> None:
        paths = api.get("/openapi.json").json()["paths"]
        assert "413" in paths["/spend"]["post"]["responses"]
        assert "413" in paths["/limits"]["put"]["responses"]


class TestAmountsAreStrictNumbers:
    """Issue 11.2: true is not $1, false is not $0, "5" is not $5; nothing is written."""

    @pytest.mark.parametrize(
        ("path", "body"),
        [
            ("/spend", {"user_id": "u", "cost": True}),
            ("/spend", {"user_id": "u", "cost": "1"}),
            ("/check", {"user_id": "u", "estimated_cost": False}),
            ("/reservations", {"user_id": "u", "estimate": True}),
            ("/reservations", {"user_id": "u", "estimate": "0.5"}),
        ],
    )
    def test_non_numbers_are_422(
        self, api: TestClient, redis_client: redis.Redis, path: str, body: dict[str, Any]
    ) -> None:
        r = api.post(path, json=body)
        assert r.status_code == 422, r.text
        assert "valid number" in r.json()["detail"]
        assert snapshot(redis_client) == {}

    @pytest.mark.parametrize("limit", [False, True, "0", "100"])
    def test_limits_are_numbers(
        self, api: TestClient, redis_client: redis.Redis, limit: Any
    ) -> None:
        body = {"scope": "global", "limit_usd": limit}
        r = api.put("/limits", json=body, headers=ADMIN)
        assert r.status_code == 422, r.text
        assert snapshot(redis_client) == {}
        assert api.post("/check", json={"user_id": "u", "estimated_cost": 1}).status_code == 200

    @pytest.mark.parametrize(
        "tokens",
        [
            {"input_tokens": True, "output_tokens": 1},
            {"input_tokens": 1, "output_tokens": 1.0},
            {"input_tokens": "10", "output_tokens": 1},
            {"input_tokens": 1, "output_tokens": 1, "cached_input_tokens": False},
        ],
    )
    def test_token_counts_are_integers(
        self, api: TestClient, redis_client: redis.Redis, tokens: dict[str, Any]
    ) -> None:
        rid = api.post("/reservations", json={"user_id": "u", "estimate": 1}).json()[
            "reservation_id"
        ]
        before = snapshot(redis_client)
        r = api.post(f"/reservations/{rid}/commit", json=tokens)
        assert r.status_code == 422, r.text
        assert snapshot(redis_client) == before

    def test_integers_are_still_amounts(self, api: TestClient) -> None:
        assert api.post("/spend", json={"user_id": "u", "cost": 2}).json()["amount_nano"] == (
            2 * NANO
        )
        r = api.put(
            "/limits", json={"scope": "user", "entity_id": "u", "limit_usd": 3}, headers=ADMIN
        )
        assert r.status_code == 200


class TestReportsAreForAdmins:
    """Issue 11.3: every user's spend is an admin's to read."""

    def test_user_key_is_403(self, api: TestClient) -> None:
        r = api.get("/report")
        assert r.status_code == 403
        assert r.json() == {"detail": "API key not allowed here"}
        assert api.get("/report", headers=ADMIN).status_code == 200


class TestInsecureMode:
    """Issue 11.4: running without keys is a choice that cannot switch configured keys off."""

    def test_insecure_with_keys_is_a_config_error(self) -> None:
        with pytest.raises(ConfigError) as caught:
            ServerSettings(api_keys=frozenset({"k"}), insecure_no_auth=True)
        message = str(caught.value)
        assert "COREASON_BUDGET_INSECURE_NO_AUTH" in message
        assert "COREASON_BUDGET_API_KEYS" in message
        with pytest.raises(ConfigError):
            ServerSettings(admin_api_keys=frozenset({"k"}), insecure_no_auth=True)

    def test_from_env(self, tmp_path: Path) -> None:
        env = {"COREASON_BUDGET_API_KEYS": "k", "COREASON_BUDGET_INSECURE_NO_AUTH": "1"}
        with pytest.raises(ConfigError, match="INSECURE_NO_AUTH"):
            ServerSettings.from_env(environ=env, env_file=None)
        with pytest.raises(ConfigError, match="INSECURE_NO_AUTH"):
            ServerSettings.from_env(True, environ={"COREASON_BUDGET_API_KEYS": "k"}, env_file=None)
        for on in ("1", "true", "YES"):
            s = ServerSettings.from_env(
                environ={"COREASON_BUDGET_INSECURE_NO_AUTH": on}, env_file=None
            )
            assert s.insecure_no_auth
        with pytest.raises(ConfigError, match="expected 1 or 0"):
            ServerSettings.from_env(environ={"COREASON_BUDGET_INSECURE_NO_AUTH": "maybe"})
        s = ServerSettings.from_env(
            environ={"COREASON_BUDGET_API_KEYS": "k", "COREASON_BUDGET_INSECURE_NO_AUTH": "0"},
            env_file=None,
        )
        assert (s.api_keys, s.insecure_no_auth) == ({"k"}, False)

    def test_serve_refuses_the_flag_with_keys(
        self,
        capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path,
    ) -> None:
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("COREASON_BUDGET_API_KEYS", "k")
        assert main(["serve", "--insecure-no-auth", "--port", "1"]) == 2
        assert "INSECURE_NO_AUTH" in capsys.readouterr().err


class TestSettingsFromDotEnv:
    """Issue 11.6: the service reads .env as every other command does."""

    def test_keys_from_dot_env(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        for name in ("API_KEYS", "ADMIN_API_KEYS", "INSECURE_NO_AUTH"):
            monkeypatch.delenv("COREASON_BUDGET_" + name, raising=False)
        monkeypatch.chdir(tmp_path)
        (tmp_path / ".env").write_text(
            "COREASON_BUDGET_API_KEYS=a, b\nCOREASON_BUDGET_ADMIN_API_KEYS=root\n"
        )
        s = ServerSettings.from_env()
        assert (s.api_keys, s.admin_api_keys) == ({"a", "b"}, {"root"})
        # The environment wins over the file.
        monkeypatch.setenv("COREASON_BUDGET_API_KEYS", "env-key")
        assert ServerSettings.from_env().api_keys == {"env-key"}

    def test_insecure_in_dot_env_with_keys_in_the_environment(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("COREASON_BUDGET_API_KEYS", "k")
        (tmp_path / ".env").write_text("COREASON_BUDGET_INSECURE_NO_AUTH=1\n")
        with pytest.raises(ConfigError, match="INSECURE_NO_AUTH"):
            ServerSettings.from_env()


class TestRetryAfter:
    """Issue 11.10: a 429 says when the refusing window's period ends, in its header and body."""

    def test_seconds_until_the_day_resets(
        self, make_manager: ManagerFactory, redis_url: str, spool_dir: Path
    ) -> None:
        """By the clock that decides the day (injected here; the store's otherwise)."""
        midnight = datetime.datetime(2026, 3, 1, tzinfo=datetime.UTC).timestamp()
        make_async = async_managers(redis_url, spool_dir)  # the service's: no I/O, not awaited
        for now, left in ((-0.5, 1), (-3600, 3600), (0, 86400), (1.5, 86399)):
            for make in (make_manager, make_async):
                budget = make(clock=lambda now=now: midnight + now)
                assert budget.seconds_until_reset() == left

    def test_429_has_retry_after(self, api: TestClient) -> None:
        api.post("/spend", json={"user_id": "u", "cost": 10})
        for r in (
            api.post("/check", json={"user_id": "u", "estimated_cost": 1}),
            api.post("/reservations", json={"user_id": "u", "estimate": 1}),
        ):
            assert r.status_code == 429
            now = time.time()
            expected = 86400 - now % 86400
            assert abs(int(r.headers["Retry-After"]) - expected) <= 2
            body = r.json()
            assert r.headers["Retry-After"] == str(body["retry_after_seconds"])
            midnight = datetime.datetime.fromtimestamp(now + expected, datetime.UTC)
            assert (body["window"], body["resets_at"]) == ("day", midnight.isoformat())
        assert "Retry-After" not in api.post("/spend", json={"user_id": "u", "cost": 1}).headers

    @pytest.mark.parametrize(
        ("config", "now", "window", "resets_at"),
        [
            # Mid-March: the month refuses for 16.5 days, not until midnight.
            (
                {"monthly_user_limit_usd": 1.0},
                "2026-03-15T12:00:00+00:00",
                "month",
                "2026-04-01T00:00:00+00:00",
            ),
            # A week in New York, across the start of daylight saving time (8 March):
            # it ends at Monday's local midnight, 04:00 UTC.
            (
                {"weekly_user_limit_usd": 1.0, "timezone": "America/New_York"},
                "2026-03-04T12:00:00+00:00",
                "week",
                "2026-03-09T04:00:00+00:00",
            ),
            # An hour: 20 minutes and half a second left, rounded up.
            (
                {"hourly_user_limit_usd": 1.0},
                "2026-03-15T12:39:59.500+00:00",
                "hour",
                "2026-03-15T13:00:00+00:00",
            ),
        ],
    )
    def test_retry_after_is_the_refusing_windows(
        self,
        redis_url: str,
        spool_dir: Path,
        config: dict[str, Any],
        now: str,
        window: str,
        resets_at: str,
    ) -> None:
        """By the error's own reset (the clock is injected), not the current day's end."""
        moment = datetime.datetime.fromisoformat(now)
        manager = async_managers(redis_url, spool_dir)(clock=moment.timestamp, **config)
        with TestClient(create_app(manager, SETTINGS), headers=USER) as api:
            assert api.post("/spend", json={"user_id": "u", "cost": 1}).status_code == 200
            r = api.post("/check", json={"user_id": "u", "estimated_cost": 0.5})
            assert r.status_code == 429, r.text
            body = r.json()
            assert (body["window"], body["resets_at"]) == (window, resets_at)
            left = datetime.datetime.fromisoformat(resets_at) - moment
            assert body["retry_after_seconds"] == math.ceil(left.total_seconds())
            assert r.headers["Retry-After"] == str(body["retry_after_seconds"])
            if window != "day":
                assert body["retry_after_seconds"] != manager.seconds_until_reset()

    def test_an_untimed_refusal_falls_back_to_the_days_end(
        self, manager: AsyncBudgetManager, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A BudgetExceededError without its reset (not the store's) still answers a whole 429."""

        async def refuse(*args: Any, **kwargs: Any) -> None:
            raise BudgetExceededError(
                scope="user", entity_id="u", limit_nano=NANO, spent_nano=NANO, requested_nano=1
            )

        monkeypatch.setattr(manager, "check_availability", refuse)
        with TestClient(create_app(manager, SETTINGS), headers=USER) as api:
            r = api.post("/check", json={"user_id": "u", "estimated_cost": 1})
        assert r.status_code == 429, r.text
        body = r.json()
        assert r.headers["Retry-After"] == str(body["retry_after_seconds"])
        assert abs(body["retry_after_seconds"] - manager.seconds_until_reset()) <= 2
        resets_at = datetime.datetime.fromisoformat(body["resets_at"])
        left = resets_at - datetime.datetime.now(datetime.UTC)
        assert abs(left.total_seconds() - body["retry_after_seconds"]) <= 2
        assert body["window"] == "day"


class TestTypedAnswers:
    """Issue 11.10: every success answer has a schema, so generated clients are typed."""

    def test_every_success_answer_has_a_schema(self, api: TestClient) -> None:
        schema = api.get("/openapi.json").json()
        for path, methods in schema["paths"].items():
            for op in methods.values():
                ok = op["responses"]["200"]["content"]
                if path == "/metrics":
                    assert "text/plain" in next(iter(ok))
                    continue
                body = ok["application/json"]["schema"]
                assert body, path
                assert body.get("additionalProperties") is not True, (path, body)
        models = schema["components"]["schemas"]
        for name in ("ReceiptAnswer", "ReservationAnswer", "ReportAnswer", "HealthAnswer"):
            assert name in models
        spend = schema["paths"]["/spend"]["post"]["responses"]
        assert spend["202"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ReceiptAnswer"
        }
        refused = schema["paths"]["/check"]["post"]["responses"]["429"]
        assert "Retry-After" in refused["headers"]
        exceeded = models["ExceededBody"]
        assert {"window", "resets_at", "retry_after_seconds"} <= set(exceeded["required"])
        assert exceeded["properties"]["resets_at"]["format"] == "date-time"
        assert exceeded["properties"]["window"]["enum"] == ["hour", "day", "week", "month"]
        assert models["HoldBody"]["properties"]["held_at"]["anyOf"][0]["format"] == "date-time"
        assert models["ReservationAnswer"]["properties"]["held_at"]["format"] == "date-time"
        report = {p["name"] for p in schema["paths"]["/report"]["get"]["parameters"]}
        assert report == {"top", "window", "period"}
        usage = {p["name"] for p in schema["paths"]["/usage/{user_id}"]["get"]["parameters"]}
        assert usage == {"user_id", "project_id", "window"}
        assert models["LimitBody"]["properties"]["scope"]["enum"] == [
            "user", "project", "model", "global"
        ]  # fmt: skip

    def test_answers_keep_their_shape(self, api: TestClient) -> None:
        r = api.post("/reservations", json={"user_id": "u", "estimate": 1, "project_id": "p"})
        rid = r.json()["reservation_id"]
        assert set(r.json()) == {"reservation_id", "state", "estimate_usd", "held_at"}
        info = api.get(f"/reservations/{rid}").json()
        assert (info["project_id"], info["model"]) == ("p", None)
        assert set(api.post(f"/reservations/{rid}/commit", json={"actual_cost": 0.5}).json()) == {
            "status", "kind", "idempotency_key", "amount_usd", "amount_nano", "state"
        }  # fmt: skip
        assert set(api.post("/spend", json={"user_id": "u", "cost": 1}).json()) == {
            "status", "kind", "idempotency_key", "amount_usd", "amount_nano"
        }  # fmt: skip
        assert api.get("/health").json() == {"status": "healthy", "redis": "connected"}
        assert os.environ.get("COREASON_BUDGET_INSECURE_NO_AUTH") in (None, "", "0")


class TestSlowBodies:
    """A body trickled in (a slowloris) holds no worker: 408 once its time is up."""

    @pytest.mark.parametrize(
        ("path", "headers"),
        [("/spend", USER), ("/health", {})],  # with a key, and where none is needed
    )
    def test_408(
        self,
        manager: AsyncBudgetManager,
        monkeypatch: pytest.MonkeyPatch,
        path: str,
        headers: dict[str, str],
    ) -> None:
        monkeypatch.setattr(server, "BODY_SECONDS", 0.2)
        app = create_app(manager, SETTINGS)
        statuses: list[int] = []

        async def receive() -> dict[str, Any]:
            if not statuses:
                statuses.append(0)
                return {"type": "http.request", "body": b"{", "more_body": True}
            await asyncio.sleep(3600)  # the rest never comes
            raise AssertionError("unreachable")

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        scope = http_scope("POST" if path == "/spend" else "GET", path, headers)
        start = time.monotonic()
        asyncio.run(asyncio.wait_for(app(scope, receive, send), 10))  # type: ignore[arg-type]
        assert statuses[-1] == 408
        assert time.monotonic() - start < 5
