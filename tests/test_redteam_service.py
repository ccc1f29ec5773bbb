"""
The service red-teamed as an operator and an attacker would (after issue 11).

Each class is one hole that was found: how it was reproduced is its test, and
each test failed before its fix.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from fastapi import FastAPI
from fastapi.testclient import TestClient

from coreason_budget import AsyncBudgetManager, ConfigError
from coreason_budget.cli import main
from coreason_budget.server import (
    ServerSettings,
    configure_logging,
    create_app,
    multiprocess_metrics,
)

from .redis_server import snapshot
from .service_support import async_managers
from .test_client_e2e import USER_KEY as SERVICE_KEY
from .test_client_e2e import Service

USER_KEY = "user-key-1"
ADMIN_KEY = "admin-key-1"
USER = {"Authorization": f"Bearer {USER_KEY}"}
SETTINGS = ServerSettings(api_keys=frozenset({USER_KEY}), admin_api_keys=frozenset({ADMIN_KEY}))


@pytest.fixture
def manager(redis_url: str, spool_dir: Path) -> AsyncBudgetManager:
    return async_managers(redis_url, spool_dir)(daily_user_limit_usd=10.0)


@pytest.fixture
def app(manager: AsyncBudgetManager) -> FastAPI:
    return create_app(manager, SETTINGS)


@pytest.fixture
def api(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app, headers=USER) as client:
        yield client


class TestApiKeysMustBeSendable:
    """
    A non-ASCII (or unprintable) key was accepted, then every request with it
    was 401: headers arrive as bytes read as latin-1, so "clé" sent as UTF-8
    never equals the configured key (and BudgetClient refuses to send it). The
    service now refuses such a key at start-up, naming the variable.
    """

    @pytest.mark.parametrize("key", ["clé", "k\x00ey", "tab\tkey", "🔑"])
    def test_settings_refuse_it(self, key: str) -> None:
        with pytest.raises(ConfigError, match="COREASON_BUDGET_API_KEYS"):
            ServerSettings(api_keys=frozenset({key}))
        with pytest.raises(ConfigError, match="COREASON_BUDGET_ADMIN_API_KEYS"):
            ServerSettings(api_keys=frozenset({"ok"}), admin_api_keys=frozenset({key}))

    def test_from_the_environment(self) -> None:
        with pytest.raises(ConfigError, match="printable ASCII"):
            ServerSettings.from_env(environ={"COREASON_BUDGET_API_KEYS": "ok, clé"}, env_file=None)

    def test_serve_exits_2(
        self, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("COREASON_BUDGET_API_KEYS", "clé")
        assert main(["serve", "--port", "1"]) == 2
        assert "COREASON_BUDGET_API_KEYS" in capsys.readouterr().err

    def test_printable_ascii_keys_still_work(self, manager: AsyncBudgetManager) -> None:
        app = create_app(manager, ServerSettings(api_keys=frozenset({"a key ~!#"})))
        with TestClient(app) as api:
            r = api.get("/usage/u", headers={"Authorization": "Bearer a key ~!#"})
            assert r.status_code == 200


class TestUnwritableLogPath:
    """
    ``COREASON_BUDGET_LOG_PATH`` where no file can be written (a read-only or
    missing parent, a file where a directory should be) crashed ``serve`` with
    a traceback (exit 1); a bad setting is a ConfigError, exit 2, one line.
    """

    def test_configure_logging_says_what_to_set(self, tmp_path: Path) -> None:
        (tmp_path / "a-file").write_text("")
        with pytest.raises(ConfigError) as caught:
            configure_logging(str(tmp_path / "a-file" / "app.log"))
        assert "COREASON_BUDGET_LOG_PATH" in str(caught.value)
        assert "'off'" in str(caught.value)

    def test_serve_exits_2(
        self, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        monkeypatch.chdir(tmp_path)
        (tmp_path / "a-file").write_text("")
        monkeypatch.setenv("COREASON_BUDGET_API_KEYS", "k")
        monkeypatch.setenv("COREASON_BUDGET_REDIS_URL", "memory://")
        monkeypatch.setenv("COREASON_BUDGET_LOG_PATH", str(tmp_path / "a-file" / "app.log"))
        assert main(["serve", "--port", "1"]) == 2
        err = capsys.readouterr().err
        assert "COREASON_BUDGET_LOG_PATH" in err
        assert "Traceback" not in err


class TestHeldAtIsAnInstantNotANumber:
    """
    The hold's ``day`` (commit and release bodies) took a JSON number as a Unix
    timestamp: ``{"day": 0}`` was 1970-01-01, ``{"day": 86400}`` the day
    after, and a settlement of a lost record would be booked decades ago,
    off today's budget. Its successor ``held_at`` (the instant the hold was
    taken) is only ISO 8601 text with a UTC offset: not a number, not numeric
    text (which lax pydantic also reads as a timestamp), not a naive time
    (in which zone?) and not a bare date; 422, nothing written.
    """

    @pytest.mark.parametrize(
        "when", [0, 86400, -0.0, 1e-10, True, "0", "86400", "2026-03-01", "2026-03-01T00:00:00"]
    )
    def test_anything_else_is_422_and_nothing_changes(
        self, api: TestClient, redis_client: redis.Redis, when: object
    ) -> None:
        rid = api.post("/reservations", json={"user_id": "u", "estimate": 1.0}).json()[
            "reservation_id"
        ]
        before = snapshot(redis_client)
        for action, body in (("release", {}), ("commit", {"actual_cost": 0.5})):
            for hold in ({"held_at": when}, {"user_id": "u", "held_at": when}):
                r = api.post(f"/reservations/{rid}/{action}", json={**body, **hold})
                assert r.status_code == 422, r.text
                assert "held_at" in r.json()["detail"]
        assert snapshot(redis_client) == before
        assert api.get(f"/reservations/{rid}").json()["state"] == "held"

    def test_the_old_day_is_refused_by_name(self, api: TestClient) -> None:
        """A client still sending ``day`` is told, not silently settled some other way."""
        answer = api.post("/reservations", json={"user_id": "u", "estimate": 1.0}).json()
        today = datetime.datetime.now(datetime.UTC).date().isoformat()
        r = api.post(
            f"/reservations/{answer['reservation_id']}/commit",
            json={"actual_cost": 0.5, "user_id": "u", "day": today},
        )
        assert r.status_code == 422, r.text
        assert "body.day" in r.json()["detail"]

    def test_the_answer_is_the_instant(self, api: TestClient) -> None:
        answer = api.post("/reservations", json={"user_id": "u", "estimate": 1.0}).json()
        r = api.post(
            f"/reservations/{answer['reservation_id']}/commit",
            json={"actual_cost": 0.5, "user_id": "u", "held_at": answer["held_at"]},
        )
        assert r.status_code == 200, r.text
        assert r.json()["state"] == "committed"


class TestOperatorsMetricsDirectoryWithOneWorker:
    """
    ``PROMETHEUS_MULTIPROC_DIR`` set by the operator (as for Gunicorn) and
    ``serve`` with one worker: prometheus-client writes there whenever the
    variable is set, but ``serve`` only prepared it for ``--workers`` > 1, so a
    missing directory crashed the service at start-up, and an existing one kept
    an earlier run's counts in every scrape.
    """

    def test_the_directory_is_made_and_wiped(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        given = tmp_path / "prom" / "missing"
        monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(given))
        with multiprocess_metrics(1) as used:
            assert used == str(given)
            assert given.is_dir()
            (given / "counter_1.db").write_bytes(b"old run")
        with multiprocess_metrics(1):
            assert not list(given.iterdir())
        assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == str(given)

    def test_serve_with_one_worker_starts_and_counts(self, tmp_path: Path, redis_url: str) -> None:
        prom = tmp_path / "prom" / "not-made-yet"
        served = Service(tmp_path, redis_url, PROMETHEUS_MULTIPROC_DIR=str(prom))
        try:
            served.wait_ready()
            auth = {"Authorization": "Bearer " + SERVICE_KEY}
            for _ in range(3):
                r = httpx.post(
                    served.url + "/check",
                    json={"user_id": "a", "estimated_cost": 0.1},
                    headers=auth,
                    timeout=10,
                )
                assert r.status_code == 200, r.text
            text = httpx.get(served.url + "/metrics", headers=auth, timeout=10).text
            assert 'coreason_budget_decisions_total{decision="allowed",scope="all"} 3.0' in text
        finally:
            served.stop()
