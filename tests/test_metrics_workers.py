"""
/metrics of ``serve --workers N``: one scrape adds up every worker, whichever worker answers it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import attrs
import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from coreason_budget import BudgetConfig
from coreason_budget.server import ServerSettings, create_app, multiprocess_metrics

from .redis_server import free_port
from .service_support import async_managers

KEY = "metrics-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def sample(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


class Served:
    def __init__(self, tmp_path: Path, redis_url: str, workers: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp_path / "serve.log"
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("COREASON_BUDGET_") and k != "PROMETHEUS_MULTIPROC_DIR"
        }
        env.update(
            COREASON_BUDGET_REDIS_URL=redis_url,
            COREASON_BUDGET_API_KEYS=KEY,
            COREASON_BUDGET_LOG_PATH="off",
            COREASON_BUDGET_KEY_PREFIX="workers",
            COREASON_BUDGET_DAILY_USER_LIMIT_USD="1000",
            COREASON_BUDGET_DAILY_PROJECT_LIMIT_USD="1000",
            COREASON_BUDGET_DAILY_GLOBAL_LIMIT_USD="1000",
            LITELLM_LOCAL_MODEL_COST_MAP="True",
        )
        args = [
            sys.executable, "-m", "coreason_budget", "serve",
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", str(workers),
        ]  # fmt: skip
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                args, env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT
            )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"service did not start: {self.log.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:  # pragma: no cover
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def served(tmp_path: Path, redis_url: str) -> Iterator[Served]:
    s = Served(tmp_path, redis_url, workers=3)
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


@pytest.mark.slow
def test_a_scrape_counts_every_workers_decisions(served: Served) -> None:
    n = 60

    def decide(i: int) -> int:
        # A fresh connection each time, so the requests spread over the workers.
        r = httpx.post(
            served.url + "/check",
            json={"user_id": f"u{i % 7}", "estimated_cost": 0.5},
            headers=AUTH,
            timeout=10,
        )
        return r.status_code

    with ThreadPoolExecutor(12) as pool:
        assert set(pool.map(decide, range(n))) == {200}

    scrapes: set[str] = set()
    for _ in range(6):  # several scrapes over fresh connections: no jumps, no resets
        r = httpx.get(served.url + "/metrics", headers=AUTH, timeout=10)
        assert r.status_code == 200
        text = r.text
        assert sample(text, "coreason_budget_decisions_total", decision="allowed") == n
        assert sample(text, "coreason_budget_dollars_total", decision="allowed") == n * 0.5
        assert sample(text, "coreason_budget_store_seconds_count", operation="check") == n
        scrapes.add(text)
    assert len(scrapes) == 1
    served.stop()
    assert served.proc.returncode == 0, served.log.read_text()


def test_one_process_keeps_its_own_registry(redis_url: str, spool_dir: Path) -> None:
    """create_app without PROMETHEUS_MULTIPROC_DIR (tests, one worker): in-process counters."""
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ
    manager = async_managers(redis_url, spool_dir)()
    app = create_app(manager, ServerSettings(api_keys=frozenset({KEY})))
    with TestClient(app, headers=AUTH) as api:
        for _ in range(3):
            assert (
                api.post("/check", json={"user_id": "a", "estimated_cost": 0.1}).status_code == 200
            )
        text = api.get("/metrics").text
    assert sample(text, "coreason_budget_decisions_total", decision="allowed") == 3


def test_multiprocess_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    with multiprocess_metrics(1) as none:
        assert none is None
        assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ
    with multiprocess_metrics(4) as made:
        assert made is not None
        assert Path(made).is_dir()
        assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == made
        (Path(made) / "counter_1.db").write_bytes(b"x")
    assert not Path(made).exists()
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ

    # The operator's own directory: kept, but an earlier run's values are wiped first.
    given = tmp_path / "prom"
    given.mkdir()
    (given / "counter_123.db").write_bytes(b"stale")
    (given / "notes.txt").write_text("mine")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(given))
    with multiprocess_metrics(2) as used:
        assert used == str(given)
        assert sorted(p.name for p in given.iterdir()) == ["notes.txt"]
    assert given.is_dir()


# -- the container files (Docker cannot run here: what they promise, read from them) --------

ROOT = Path(__file__).resolve().parent.parent


def test_dockerfile_installs_pricing_offline() -> None:
    text = (ROOT / "Dockerfile").read_text()
    installs = [line for line in text.splitlines() if "pip install" in line]
    assert len(installs) == 1
    assert '".[server,pricing]"' in installs[0]
    assert "LITELLM_LOCAL_MODEL_COST_MAP=True" in text
    assert "HEALTHCHECK" in text


def test_compose_runs_the_service_on_a_persistent_non_evicting_redis() -> None:
    yaml = pytest.importorskip("yaml")
    doc = yaml.safe_load((ROOT / "compose.yaml").read_text())
    redis_service = doc["services"]["redis"]
    command = " ".join(redis_service["command"])
    assert "--appendonly yes" in command
    assert "--maxmemory-policy noeviction" in command
    assert any(v.endswith(":/data") for v in redis_service["volumes"])
    assert set(doc["volumes"]) == {"redis-data"}

    budget = doc["services"]["budget"]
    assert budget["build"] == "."
    assert budget["depends_on"]["redis"]["condition"] == "service_healthy"
    env = budget["environment"]
    assert env["COREASON_BUDGET_REDIS_URL"] == "redis://redis:6379"
    # Keys from the environment (or .env), required: no well-known default key.
    assert env["COREASON_BUDGET_API_KEYS"].startswith("${COREASON_BUDGET_API_KEYS:?")
    assert env["COREASON_BUDGET_ADMIN_API_KEYS"] == "${COREASON_BUDGET_ADMIN_API_KEYS:-}"
    assert "/health" in " ".join(budget["healthcheck"]["test"])
    assert budget["command"][:2] == ["coreason-budget", "serve"]
    # Every variable it sets is one the service knows.
    known = {f"COREASON_BUDGET_{a.name.upper()}" for a in attrs.fields(BudgetConfig)} | {
        "COREASON_BUDGET_API_KEYS",
        "COREASON_BUDGET_ADMIN_API_KEYS",
    }
    assert set(env) <= known
