"""
The HTTP service under load: reserve + commit over HTTP, 1 and 64 concurrent clients.

``python -m benchmarks.service`` starts a redis-server and the service
(``coreason-budget serve``: uvicorn, one worker) on it, then drives it with
``httpx.AsyncClient`` tasks, each repeating what a client of the service does
for one LLM call: ``POST /reservations``, then ``POST
/reservations/{id}/commit`` with the hold as the reserve answer described it
(user, project, model, day). One operation is that pair; the table gives
operations per second and the latency of the pair (and of the commit alone),
p50 and p99, at each concurrency, for a fixed number of operations after a
warm-up.

``--before DIR`` runs a second source tree (a ``git worktree`` of an earlier
commit) the same way, in the same session on the same redis-server,
alternating between the trees for ``--rounds`` rounds (each figure is from the
tree's best round by throughput), and prints both side by side as a Markdown
section for ``RESULTS.md``. Each tree is served by this interpreter with the
tree first on ``PYTHONPATH``; the script checks which ``coreason_budget`` each
service imported.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import attrs
import httpx
import redis

from tests.redis_server import RedisServer, free_port

HERE = Path(__file__).resolve().parent
KEY = "bench-key"
CLIENTS = (1, 64)
USERS = 64


@attrs.frozen
class Load:
    """One load run: *ops* reserve + commit pairs by *clients* concurrent clients."""

    clients: int
    ops: int
    seconds: float
    pair_ms: list[float]  # reserve + commit, per operation
    commit_ms: list[float]
    errors: int
    service_cpu_s: float = 0.0  # the service process's CPU time (user + system) for the ops
    redis_cpu_s: float = 0.0  # the redis-server's
    client_cpu_s: float = 0.0  # the load generator's (this process)

    def cpu_us(self, which: str) -> float:
        """CPU µs per operation: steadier than wall time on a loaded, shared machine."""
        seconds = {
            "service": self.service_cpu_s,
            "redis": self.redis_cpu_s,
            "client": self.client_cpu_s,
        }[which]
        return seconds / self.ops * 1e6

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.seconds

    def quantile(self, which: str, q: float) -> float:
        values = sorted(self.pair_ms if which == "pair" else self.commit_ms)
        return values[min(len(values) - 1, round(q * (len(values) - 1)))]


class Service:
    """``coreason-budget serve`` from source tree *tree*, on *redis_url*, in a subprocess."""

    def __init__(self, tree: Path, redis_url: str) -> None:
        self.tree = tree
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = _service_env(tree, redis_url)
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed by stop())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "coreason_budget", "serve", "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"],
            cwd=tree, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def imported_from(self) -> str:
        """Where this service's interpreter finds ``coreason_budget`` (the tree's, or not)."""
        code = "import coreason_budget; print(coreason_budget.__file__)"
        done = subprocess.run(
            [sys.executable, "-c", code],
            cwd=self.tree, env=self.env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        return done.stdout.strip()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the service exited:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"the service did not start:\n{self.output()}")

    def wait_priced(self) -> None:
        """
        Wait until the service has loaded litellm's price table (it starts the load in
        the background at start-up: seconds of CPU that must not land in a measurement).
        A commit of token usage waits for the table.
        """
        headers = {"Authorization": f"Bearer {KEY}"}
        hold = {"user_id": "warm-up", "model": "gpt-4o"}
        with httpx.Client(base_url=self.url, headers=headers, timeout=120) as http:
            r = http.post("/reservations", json={**hold, "estimate": 0.01})
            r.raise_for_status()
            rid = r.json()["reservation_id"]
            usage = {"input_tokens": 10, "output_tokens": 10}
            http.post(f"/reservations/{rid}/commit", json=usage).raise_for_status()

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-4000:]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def _service_env(tree: Path, redis_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COREASON_BUDGET_")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.update(
        PYTHONPATH=os.pathsep.join([str(tree), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        COREASON_BUDGET_REDIS_URL=redis_url,
        COREASON_BUDGET_API_KEYS=KEY,
        COREASON_BUDGET_LOG_PATH="off",
        COREASON_BUDGET_SPOOL_DIR="off",
        COREASON_BUDGET_KEY_PREFIX="bench-service",
        # Limits far above what a run spends: every reserve is admitted.
        COREASON_BUDGET_DAILY_USER_LIMIT_USD="1000000",
        COREASON_BUDGET_DAILY_PROJECT_LIMIT_USD="1000000",
        COREASON_BUDGET_DAILY_GLOBAL_LIMIT_USD="1000000",
        LITELLM_LOCAL_MODEL_COST_MAP="True",
    )
    return env


def process_cpu(pid: int) -> float:
    """A process's CPU seconds so far (user + system), from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def redis_cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def drive(
    url: str, clients: int, ops: int, warmup: int, service_pid: int, store: redis.Redis
) -> Load:
    """
    *warmup* operations, then *ops* more timed, shared by *clients* concurrent tasks.

    Each task is one client of the service with an ``httpx.AsyncClient`` of its own
    (one keep-alive connection): one client shared by 64 tasks spends more CPU in
    its connection pool than the service spends answering.
    """
    headers = {"Authorization": f"Bearer {KEY}"}
    one_connection = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    https = [
        httpx.AsyncClient(base_url=url, headers=headers, limits=one_connection, timeout=30)
        for _ in range(clients)
    ]
    pair_ms: list[float] = []
    commit_ms: list[float] = []
    errors = 0

    async def one(http: httpx.AsyncClient, n: int, timed: bool) -> None:
        nonlocal errors
        hold = {"user_id": f"user-{n % USERS}", "project_id": "bench", "model": "bench-llm"}
        start = time.perf_counter()
        r = await http.post("/reservations", json={**hold, "estimate": 0.002})
        if r.status_code != 200:
            errors += 1
            return
        answer = r.json()
        settled = time.perf_counter()
        r = await http.post(
            f"/reservations/{answer['reservation_id']}/commit",
            json={**hold, "day": answer["day"], "actual_cost": 0.001},
        )
        end = time.perf_counter()
        if r.status_code != 200:
            errors += 1
            return
        if timed:
            pair_ms.append((end - start) * 1e3)
            commit_ms.append((end - settled) * 1e3)

    async def client(c: int, count: int, timed: bool) -> None:
        for i in range(count):
            await one(https[c], c + i * clients, timed)

    async def run(total: int, timed: bool) -> float:
        shares = [total // clients + (c < total % clients) for c in range(clients)]
        start = time.perf_counter()
        await asyncio.gather(*(client(c, shares[c], timed) for c in range(clients)))
        return time.perf_counter() - start

    try:
        await run(max(warmup, clients), timed=False)  # every client connected
        cpu = process_cpu(service_pid), redis_cpu(store), time.process_time()
        seconds = await run(ops, timed=True)
        service_cpu = process_cpu(service_pid) - cpu[0]
        store_cpu = redis_cpu(store) - cpu[1]
        client_cpu = time.process_time() - cpu[2]
    finally:
        for http in https:
            await http.aclose()
    return Load(
        clients, ops, seconds, pair_ms, commit_ms, errors, service_cpu, store_cpu, client_cpu
    )


def measure(tree: Path, redis_url: str, ops: int, warmup: int) -> tuple[dict[int, Load], str]:
    """Serve *tree* and load it at each concurrency; its loads, and what it imported."""
    store = redis.Redis.from_url(redis_url)
    store.flushall()
    service = Service(tree, redis_url)
    try:
        service.wait_ready()
        service.wait_priced()
        loads = {
            c: asyncio.run(drive(service.url, c, ops, warmup, service.proc.pid, store))
            for c in CLIENTS
        }
        return loads, service.imported_from()
    finally:
        service.stop()
        store.close()


def _revision(tree: Path) -> str:
    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(tree), *args], capture_output=True, text=True)
        return done.stdout.strip()

    rev = git("rev-parse", "--short", "HEAD") or "?"
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return rev + (" + uncommitted changes" if dirty else "")


def section(
    results: dict[str, dict[int, Load]], trees: dict[str, Path], ops: int, warmup: int, url: str
) -> str:
    server = redis.Redis.from_url(url).info("server")
    lines = [
        "## Service: before and after async routes",
        "",
        f"`python -m benchmarks.service --before <worktree>`: the service (`coreason-budget "
        "serve`, uvicorn, 1 worker) on a real redis-server, driven by `httpx.AsyncClient` "
        f"tasks in another process; one operation = `POST /reservations` + `POST "
        "/reservations/{id}/commit` with the hold as the reserve answer described it (what "
        f"`BudgetClient` sends). {ops} timed operations per row after {warmup} of warm-up; "
        "the trees were run alternately on one redis-server, each row from the tree's best "
        "round by throughput. Latencies in ms.",
        "",
        "- **before**: "
        f"`{_revision(trees['before'])}`: sync routes on `BudgetManager` in FastAPI's thread "
        "pool; a commit by id reads the reservation (GET), then settles it (EVALSHA).",
        f"- **after**: `{_revision(trees['after'])}`: `async def` routes on "
        "`AsyncBudgetManager`; a commit by id is one EVALSHA.",
        "",
        f"Machine: {os.cpu_count()} cores, load average at start "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}, Python {platform.python_version()}, "
        f"Redis {server['redis_version']}, uvicorn {version('uvicorn')}, "
        f"httpx {version('httpx')}, "
        f"{datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M')} UTC.",
        "",
        "| code | clients | ops/s | p50 reserve+commit | p99 reserve+commit | p50 commit "
        "| p99 commit | service CPU µs/op | redis CPU µs/op | errors |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for clients in CLIENTS:
        for name in ("before", "after"):
            load = results[name][clients]
            lines.append(
                f"| {name} | {clients} | {load.ops_per_s:,.0f} | {load.quantile('pair', 0.5):.2f} "
                f"| {load.quantile('pair', 0.99):.2f} | {load.quantile('commit', 0.5):.2f} "
                f"| {load.quantile('commit', 0.99):.2f} | {load.cpu_us('service'):,.0f} "
                f"| {load.cpu_us('redis'):,.0f} | {load.errors} |"
            )
    lines.append("")
    lines.append(
        "| clients | after / before: ops/s | p50 reserve+commit | p50 commit "
        "| service CPU per op | redis CPU per op |"
    )
    lines.append("|--:|--:|--:|--:|--:|--:|")
    for clients in CLIENTS:
        b, a = results["before"][clients], results["after"][clients]
        lines.append(
            f"| {clients} | {a.ops_per_s / b.ops_per_s:.2f}x "
            f"| {a.quantile('pair', 0.5) / b.quantile('pair', 0.5):.2f}x "
            f"| {a.quantile('commit', 0.5) / b.quantile('commit', 0.5):.2f}x "
            f"| {a.cpu_us('service') / b.cpu_us('service'):.2f}x "
            f"| {a.cpu_us('redis') / b.cpu_us('redis'):.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, help="an earlier source tree to compare")
    parser.add_argument("--ops", type=int, default=800, help="timed operations per row")
    parser.add_argument("--warmup", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    trees = {"after": HERE.parent}
    if args.before is not None:
        trees = {"before": args.before.resolve(), **trees}
    server = RedisServer()
    server.start()
    best: dict[str, dict[int, Load]] = {name: {} for name in trees}
    try:
        for r in range(args.rounds):
            for name, tree in trees.items():
                loads, imported = measure(tree, server.url, args.ops, args.warmup)
                if not Path(imported).is_relative_to(tree):
                    raise RuntimeError(f"{name}: the service imported {imported}, not {tree}'s")
                for clients, load in loads.items():
                    print(
                        f"round {r + 1} {name:6} {clients:3} clients: {load.ops_per_s:7,.0f} "
                        f"ops/s, p50 {load.quantile('pair', 0.5):6.2f} ms, "
                        f"p99 {load.quantile('pair', 0.99):6.2f} ms, service CPU "
                        f"{load.cpu_us('service'):5,.0f} µs/op, redis CPU "
                        f"{load.cpu_us('redis'):4,.0f} µs/op, client CPU "
                        f"{load.cpu_us('client'):5,.0f} µs/op, errors {load.errors}",
                        file=sys.stderr,
                    )
                    kept = best[name].get(clients)
                    if kept is None or load.ops_per_s > kept.ops_per_s:
                        best[name][clients] = load
        if "before" in trees:
            print(section(best, trees, args.ops, args.warmup, server.url))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
