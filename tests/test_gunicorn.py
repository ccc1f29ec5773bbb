"""
The Flask example (``examples/flask_app``) under Gunicorn with several sync worker processes.

A real deployment: one BudgetManager per worker process, all sharing the test's redis-server,
hammered by a multi-threaded load generator over HTTP. Afterwards the ledger must hold exactly
the nano-dollars the app said it committed, in every scope, and (when the fake model never
costs more than its estimate) no scope may have spent past its limit.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import attrs
import pytest
import redis

from coreason_budget import BudgetConfig, BudgetManager

from .conftest import ManagerFactory
from .redis_server import RedisServer, free_port

pytest.importorskip("flask")
pytest.importorskip("gunicorn")

pytestmark = pytest.mark.slow

APP_DIR = Path(__file__).resolve().parent.parent / "examples" / "flask_app"
PREFIX = "gunicorn-test"
LIMITS = {
    "daily_user_limit_usd": "0.25",
    "daily_project_limit_usd": "0.70",
    "daily_global_limit_usd": "1.50",
}
# Overrides, set in Redis before the workers see any traffic: every worker must apply them.
# They make each scope certain to refuse: demand (~$10 of actual cost) is far above the global
# limit, and user-0 and project labs run out long before everyone runs into the global limit.
OVERRIDES = {("user", "user-0"): 0.05, ("project", "labs"): 0.10}
USERS = [f"user-{i}" for i in range(12)]
PROJECTS = ["search", "support", "labs"]
THREADS = 16
REQUESTS_PER_THREAD = 100

Response = tuple[int, dict[str, Any]]


class Gunicorn:
    """A Gunicorn master and its workers in a process group of their own."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.proc = proc
        self.port = port
        self.log = log

    def request(self, method: str, path: str, body: object = None) -> Response:
        # Sync workers close every connection after one response: no keep-alive to reuse.
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
        try:
            payload = None if body is None else json.dumps(body)
            headers = {} if body is None else {"Content-Type": "application/json"}
            conn.request(method, path, body=payload, headers=headers)
            response = conn.getresponse()
            raw = response.read()
            try:
                return response.status, json.loads(raw)
            except ValueError:  # an HTML error page: keep it for the assertion message
                return response.status, {"raw": raw.decode(errors="replace")}
        finally:
            conn.close()

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"gunicorn exited with {self.proc.returncode}:\n{self.logs()}")
            with contextlib.suppress(OSError):
                if self.request("GET", "/healthz")[0] == 200:
                    return
            if time.monotonic() > deadline:
                pytest.fail(f"gunicorn did not become ready:\n{self.logs()}")
            time.sleep(0.05)

    def logs(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        """Terminate the master and every worker (the whole process group), then reap."""
        pgid = self.proc.pid  # start_new_session: the master leads its own group
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        # Whatever is left (a worker stuck in a request, an orphan): no survivors.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        deadline = time.monotonic() + 5
        while True:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            assert time.monotonic() < deadline, f"gunicorn process group {pgid} survived"
            time.sleep(0.05)


StartGunicorn = Callable[..., Gunicorn]


@pytest.fixture
def start_gunicorn(tmp_path: Path) -> Iterator[StartGunicorn]:
    started: list[Gunicorn] = []

    def start(redis_url: str, *, workers: int = 4, preload: bool = True, **env: str) -> Gunicorn:
        port = free_port()
        log = tmp_path / f"gunicorn-{port}.log"
        environ = {k: v for k, v in os.environ.items() if not k.startswith("COREASON_BUDGET_")}
        environ.update(
            COREASON_BUDGET_REDIS_URL=redis_url,
            COREASON_BUDGET_KEY_PREFIX=PREFIX,
            LITELLM_LOCAL_MODEL_COST_MAP="True",
            PYTHONUNBUFFERED="1",
            **{f"COREASON_BUDGET_{k.upper()}": v for k, v in LIMITS.items()},
            **env,
        )
        if "spool_dir" in attrs.fields_dict(BudgetConfig):  # keep any spool in the test's dir
            environ["COREASON_BUDGET_SPOOL_DIR"] = str(tmp_path / "spool")
        args = [
            sys.executable, "-m", "gunicorn",
            "--workers", str(workers),
            "--worker-class", "sync",
            "--bind", f"127.0.0.1:{port}",
            "--pythonpath", str(APP_DIR),
            "--error-logfile", str(log),
            "--log-level", "warning",
            "--graceful-timeout", "5",
            *(["--preload"] if preload else []),
            "app:app",
        ]  # fmt: skip
        proc = subprocess.Popen(
            args,
            cwd=tmp_path,  # no stray .env is read
            env=environ,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        server = Gunicorn(proc, port, log)
        started.append(server)
        server.wait_ready()
        return server

    yield start
    for server in started:
        server.stop()


def hammer(server: Gunicorn) -> list[tuple[dict[str, Any], Response]]:
    """THREADS threads, each sending REQUESTS_PER_THREAD random completions, one at a time."""

    def worker(seed: int) -> list[tuple[dict[str, Any], Response]]:
        rng = random.Random(seed)
        done = []
        for _ in range(REQUESTS_PER_THREAD):
            user = rng.randrange(len(USERS))
            body: dict[str, Any] = {
                "user_id": USERS[user],
                "prompt": "x" * rng.randint(40, 400),
                "max_tokens": rng.randint(100, 1500),
            }
            if rng.random() < 0.9:  # some calls belong to no project
                body["project_id"] = PROJECTS[user % len(PROJECTS)]
            done.append((body, server.request("POST", "/v1/complete", body)))
        return done

    with ThreadPoolExecutor(THREADS) as pool:
        return [r for batch in pool.map(worker, range(THREADS)) for r in batch]


def res_states(client: redis.Redis) -> Counter[str]:
    """
    How many reservations are in each state: open records (a record's first word),
    and settled ones folded into their day's buckets ("c" or "r" and a 8-character
    digest; a spend's marker is the digest alone).
    """
    keys = list(client.scan_iter(match=f"{{{PREFIX}}}:res:*", count=1000))
    states = Counter(str(client.get(key)).split(" ", 1)[0] for key in keys)
    for bucket in client.scan_iter(match=f"{{{PREFIX}}}:ops:*", count=1000):
        for value in client.hvals(bucket):
            text = value if isinstance(value, str) else value.decode()
            if len(text) == 9:
                states["committed" if text[0] == "c" else "released"] += 1
    return states


class TestGunicornDeployment:
    """Many worker processes, one ledger: exact, never overspent, 429 when full."""

    @pytest.mark.parametrize(
        ("preload", "overrun_rate"),
        [
            pytest.param(True, "0", id="preload-fork-after-import-exact-estimates"),
            pytest.param(False, "0.2", id="import-per-worker-with-overruns"),
        ],
    )
    def test_concurrent_load_is_accounted_to_the_nano(
        self,
        start_gunicorn: StartGunicorn,
        make_manager: ManagerFactory,
        redis_url: str,
        redis_client: redis.Redis,
        preload: bool,
        overrun_rate: str,
    ) -> None:
        """
        Every 200's cost is in the ledger, at every scope, nano-exact; only 200 and 429 occur.

        With ``--preload`` the app (and its manager, which has already pinged Redis) is
        imported in the master and forked into the workers: redis-py's pool must notice the
        fork. Without overruns (actual <= estimate) no scope may end above its limit.
        """
        manager: BudgetManager = make_manager(
            key_prefix=PREFIX, **{k: float(v) for k, v in LIMITS.items()}
        )
        for (scope, entity), limit in OVERRIDES.items():
            manager.set_limit(scope, entity, limit)
        server = start_gunicorn(redis_url, preload=preload, FAKE_LLM_OVERRUN_RATE=overrun_rate)
        started = time.monotonic()
        results = hammer(server)
        elapsed = time.monotonic() - started
        assert elapsed < 20, f"load took {elapsed:.1f}s"

        statuses = Counter(status for _, (status, _) in results)
        assert set(statuses) <= {200, 429}, (statuses, server.logs())
        assert statuses[200] > 0
        refused_by = Counter(answer.get("scope") for _, (status, answer) in results)
        assert {"user", "project", "global"} <= set(refused_by), (
            f"the limits are small on purpose: every scope must refuse some calls: {refused_by}"
        )

        expected_users: defaultdict[str, int] = defaultdict(int)
        expected_projects: defaultdict[str, int] = defaultdict(int)
        pids = set()
        overruns = 0
        for body, (status, answer) in results:
            if status == 429:
                assert answer["error"].startswith("Budget exceeded for "), answer
                continue
            cost, estimate = int(answer["cost_nano"]), int(answer["estimate_nano"])
            assert cost >= 0
            overruns += cost > estimate
            expected_users[body["user_id"]] += cost
            if "project_id" in body:
                expected_projects[body["project_id"]] += cost
            pids.add(answer["pid"])
        total = sum(expected_users.values())
        assert len(pids) >= 2, f"only worker(s) {pids} answered: not a multi-process test"
        if overrun_rate == "0":
            assert overruns == 0
        else:
            assert overruns > 0, "the fake model must sometimes cost more than its estimate"

        # Every reservation was settled: nothing is left holding money.
        states = res_states(redis_client)
        assert states["held"] == 0, states
        assert states["committed"] == statuses[200], states

        report = manager.report()
        users = {u.entity_id: u.spent_nano for u in report.users if u.spent_nano}
        projects = {p.entity_id: p.spent_nano for p in report.projects if p.spent_nano}
        assert users == {k: v for k, v in expected_users.items() if v}
        assert projects == {k: v for k, v in expected_projects.items() if v}
        assert report.total.spent_nano == total
        assert [(m.entity_id, m.spent_nano) for m in report.models] == [("fake-llm", total)]

        if overrun_rate == "0":
            # Actual <= estimate everywhere, so the reservations alone keep every scope in limit.
            for scope in (*report.users, *report.projects, report.total):
                assert scope.spent_nano <= scope.limit_nano, scope
            limits = {(u.scope, u.entity_id): u.limit_nano for u in report.users}
            limits |= {(p.scope, p.entity_id): p.limit_nano for p in report.projects}
            for key, limit in OVERRIDES.items():
                assert limits[key] == round(limit * 10**9)
            # And the limits did bind: most of the global budget was spent.
            assert report.total.spent_nano > report.total.limit_nano // 2


class TestFailClosed:
    """A store that goes away turns every guarded call into a 503, and recovery is automatic."""

    def test_store_down_is_503_and_back_up_is_200(
        self, start_gunicorn: StartGunicorn, own_redis: RedisServer
    ) -> None:
        """No 200 (no model call) while the store is dead; service resumes once it returns."""
        server = start_gunicorn(own_redis.url, workers=2)
        body = {"user_id": "alice", "project_id": "search", "prompt": "hi", "max_tokens": 10}
        assert server.request("POST", "/v1/complete", body)[0] == 200

        own_redis.kill()
        for _ in range(6):  # enough to reach both workers
            started = time.monotonic()
            status, answer = server.request("POST", "/v1/complete", body)
            assert status == 503, answer
            assert "unavailable" in answer["error"]
            assert time.monotonic() - started < 3, "fail closed, but fast"
        assert server.request("GET", "/healthz")[0] == 503

        own_redis.start()  # same port, empty store
        deadline = time.monotonic() + 10
        while server.request("POST", "/v1/complete", body)[0] != 200:
            assert time.monotonic() < deadline, server.logs()
            time.sleep(0.05)
