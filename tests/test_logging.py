"""
The service's log: store outages and recoveries (once each), refusals with their
scope, spool replays; stderr always, the file unless "off", text or JSON lines.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from coreason_budget import BudgetConfig, ConfigError
from coreason_budget.server import ServerSettings, configure_logging, create_app

from .redis_server import RedisServer
from .service_support import async_managers

KEY = "log-key"
LIMITS = {"daily_user_limit_usd": 1.0, "daily_project_limit_usd": 5.0}


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """configure_logging changes the root logger: put it back after the test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
            h.close()
    root.setLevel(level)


@pytest.fixture
def app(own_redis: RedisServer, spool_dir: Path) -> Iterator[TestClient]:
    manager = async_managers(own_redis.url, spool_dir)(**LIMITS)
    settings = ServerSettings(api_keys=frozenset({KEY}))
    with TestClient(create_app(manager, settings), headers={"Authorization": f"Bearer {KEY}"}) as c:
        yield c


def server_records(caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == event]


class TestStoreOutages:
    def test_outage_then_recovery_logged_once_each(
        self, app: TestClient, own_redis: RedisServer, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.INFO)
        assert (
            app.post("/check", json={"user_id": "alice", "estimated_cost": 0.1}).status_code == 200
        )
        # Successful requests log nothing.
        assert [r for r in caplog.records if r.name.startswith("coreason_budget")] == [
            r for r in caplog.records if "Worker" in r.getMessage()
        ]

        own_redis.kill()
        for _ in range(3):
            r = app.post("/check", json={"user_id": "alice", "estimated_cost": 0.1})
            assert r.status_code == 503
        assert app.get("/health").status_code == 503
        down = server_records(caplog, "store_unavailable")
        assert len(down) == 1
        assert down[0].levelno == logging.WARNING
        assert "Budget store unavailable" in down[0].getMessage()
        assert "budget store unavailable" in down[0].error  # type: ignore[attr-defined]
        assert server_records(caplog, "store_recovered") == []

        time.sleep(0.2)
        own_redis.start()
        assert (
            app.post("/check", json={"user_id": "alice", "estimated_cost": 0.1}).status_code == 200
        )
        assert app.get("/health").status_code == 200
        back = server_records(caplog, "store_recovered")
        assert len(back) == 1
        assert back[0].levelno == logging.INFO
        assert back[0].down_seconds >= 0.2  # type: ignore[attr-defined]
        assert "back after" in back[0].getMessage()
        assert len(server_records(caplog, "store_unavailable")) == 1

    def test_a_spooled_write_is_an_outage_not_a_recovery(
        self, app: TestClient, own_redis: RedisServer, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.INFO)
        own_redis.kill()
        r = app.post("/spend", json={"user_id": "alice", "cost": 0.1, "idempotency_key": "s1"})
        assert r.status_code == 202, r.text
        assert len(server_records(caplog, "store_unavailable")) == 1
        assert server_records(caplog, "store_recovered") == []
        r = app.post("/spend", json={"user_id": "alice", "cost": 0.1, "idempotency_key": "s2"})
        assert r.status_code == 202
        assert server_records(caplog, "store_recovered") == []
        own_redis.start()
        assert app.get("/health").status_code == 200
        assert len(server_records(caplog, "store_recovered")) == 1
        # The spool is replayed in the background once the store answers: logged too.
        app.post("/check", json={"user_id": "bob", "estimated_cost": 0.1})
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if any("Replayed 2 spooled" in r.getMessage() for r in caplog.records):
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"no replay logged: {[r.getMessage() for r in caplog.records]}")


class TestRefusals:
    def test_refusal_logged_with_its_scope(
        self, app: TestClient, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.INFO)
        r = app.post("/reservations", json={"user_id": "alice", "estimate": 2.0})
        assert r.status_code == 429
        r = app.post("/check", json={"user_id": "bob", "estimated_cost": 6.0, "project_id": "p"})
        assert r.status_code == 429
        refused = server_records(caplog, "refused")
        assert len(refused) == 2
        assert all(x.levelno == logging.INFO for x in refused)
        assert (refused[0].scope, refused[0].entity_id) == ("user", "alice")  # type: ignore[attr-defined]
        assert refused[1].entity_id in ("bob", "p")  # type: ignore[attr-defined]
        first = refused[0].getMessage()
        assert first.startswith("refused: scope user alice: requested $2.00")
        assert "reserve" in first
        assert refused[0].requested_nano == 2_000_000_000  # type: ignore[attr-defined]


class TestSettings:
    def test_json_lines_with_the_expected_fields(
        self, restore_logging: None, tmp_path: Path, app: TestClient
    ) -> None:
        path = tmp_path / "logs" / "app.log"
        configure_logging(str(path), "json")
        stderr = io.StringIO()
        stream = [h for h in logging.getLogger().handlers if type(h) is logging.StreamHandler]
        assert len(stream) == 1
        stream[0].setStream(stderr)
        assert app.post("/check", json={"user_id": "alice", "estimated_cost": 5}).status_code == 429
        logging.getLogger("coreason_budget.server").warning("plain %s", "words")
        for text in (path.read_text(), stderr.getvalue()):
            docs = [json.loads(line) for line in text.splitlines()]
            refused = [d for d in docs if d.get("event") == "refused"]
            assert len(refused) == 1
            doc: dict[str, Any] = refused[0]
            assert doc["level"] == "INFO"
            assert doc["logger"] == "coreason_budget.server"
            assert doc["message"].startswith("refused: scope user alice")
            assert (doc["scope"], doc["entity_id"], doc["requested_nano"]) == (
                "user",
                "alice",
                5_000_000_000,
            )
            assert {"time", "pid"} <= doc.keys()
            assert docs[-1]["message"] == "plain words"

    def test_text_is_the_default(self, restore_logging: None, tmp_path: Path) -> None:
        path = tmp_path / "app.log"
        configure_logging(str(path))
        logging.getLogger("coreason_budget.server").info("hello")
        line = path.read_text().strip()
        assert line.endswith("INFO coreason_budget.server: hello")

    def test_file_off_writes_no_file(
        self, restore_logging: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.chdir(tmp_path)
        configure_logging("off")
        logging.getLogger("coreason_budget.server").warning("only on stderr")
        assert list(tmp_path.iterdir()) == []
        ours = [
            h for h in logging.getLogger().handlers if getattr(h, "_coreason_budget_handler", 0)
        ]
        assert [type(h) for h in ours] == [logging.StreamHandler]

    def test_configuring_again_replaces_the_handlers(
        self, restore_logging: None, tmp_path: Path
    ) -> None:
        configure_logging(str(tmp_path / "a.log"))
        configure_logging(str(tmp_path / "b.log"))
        logging.getLogger("coreason_budget.server").warning("once")
        assert (tmp_path / "a.log").read_text() == ""
        assert (tmp_path / "b.log").read_text().count("once") == 1

    def test_log_format_variable(self) -> None:
        env = {"COREASON_BUDGET_LOG_FORMAT": "json", "COREASON_BUDGET_LOG_PATH": "off"}
        config = BudgetConfig.from_env(env, env_file=None)
        assert (config.log_format, config.log_path) == ("json", "off")
        assert BudgetConfig.from_env({}, env_file=None).log_format == "text"
        with pytest.raises(ConfigError, match="COREASON_BUDGET_LOG_FORMAT='yaml': must be one"):
            BudgetConfig.from_env({"COREASON_BUDGET_LOG_FORMAT": "yaml"}, env_file=None)
