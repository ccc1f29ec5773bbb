"""
``python -m benchmarks.cluster``: reserve + commit on a real 3-master Redis Cluster.

One key prefix lives in one hash slot, so on one master: a prefix's ceiling is
what one Redis core can run of our script. This starts a 3-master cluster
(the test suite's), spreads 1, 3 and 6 prefixes over it (every prefix's keys
share its ``{prefix}`` tag), and drives ``reserve`` + ``commit`` from worker
processes (each with threads, one manager per prefix) for a few seconds. It
reports the throughput reached and, from each master's ``INFO commandstats``,
the server time per pair: the ceiling of one prefix is one core's second
divided by that (the script runs on the master's one thread, nothing else
does). On a small machine the clients run out of CPU long before the
masters do; the server-time ceiling is the number that scales.

``--write`` replaces the "Cluster: one prefix's ceiling" section of
``benchmarks/RESULTS.md`` (appending it when absent).
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
import time
from typing import Any

import redis

from coreason_budget import BudgetConfig, BudgetManager

TITLE = "## Cluster: one prefix's ceiling"


def worker(url: str, prefixes: list[str], seconds: float, threads: int, out: Any) -> None:
    managers = [
        BudgetManager(
            BudgetConfig(
                redis_url=url,
                key_prefix=p,
                spool_dir="off",
                daily_user_limit_usd=9e6,
                daily_project_limit_usd=9e6,
                daily_global_limit_usd=9e6,
            )
        )
        for p in prefixes
    ]
    done = [0] * threads
    stop = time.monotonic() + seconds

    def loop(t: int) -> None:
        m = managers[t % len(managers)]
        i = 0
        while time.monotonic() < stop:
            with m.reserve(f"u{t}-{i % 100}", 0.01, project_id="p", model="gpt-4o") as r:
                r.commit(0.004)
            i += 1
        done[t] = i

    pool = [threading.Thread(target=loop, args=(t,)) for t in range(threads)]
    for p in pool:
        p.start()
    for p in pool:
        p.join()
    for m in managers:
        m.close()
    out.put(sum(done))


def run(
    url: str, ports: list[int], prefixes: list[str], seconds: float, procs: int
) -> dict[str, float]:
    nodes = [redis.Redis(port=p) for p in ports]
    for n in nodes:
        n.config_resetstat()
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    per = [prefixes[i::procs] or prefixes for i in range(procs)]
    ps = [ctx.Process(target=worker, args=(url, per[i], seconds, 4, out)) for i in range(procs)]
    for p in ps:
        p.start()
    pairs = sum(out.get(timeout=120) for _ in ps)
    for p in ps:
        p.join(timeout=30)
    usec = calls = 0
    busiest = 0.0
    for n in nodes:
        stats = n.info("commandstats").get("cmdstat_evalsha", {"usec": 0, "calls": 0})
        usec += stats["usec"]
        calls += stats["calls"]
        busiest = max(busiest, stats["usec"] / 1e6 / seconds)
        n.close()
    per_pair = usec / max(calls / 2, 1)
    return {
        "pairs/s": pairs / seconds,
        "server us/pair": per_pair,
        "ceiling pairs/s per prefix": 1e6 / per_pair if per_pair else 0.0,
        "busiest master, share of a core": busiest,
    }


def section(rows: list[tuple[int, dict[str, float]]], info: dict[str, str], seconds: float) -> str:
    lines = [
        TITLE,
        "",
        f"`python -m benchmarks.cluster --write` (rewrites this section only; {seconds:g} s per "
        "row). A real 3-master Redis Cluster on this machine; 2 worker processes of 4 threads "
        "each, one `BudgetManager` per prefix, `reserve` + `commit` (user, project, model, "
        "global). The ceiling of one prefix: one core's second / the server time per pair "
        "(`INFO commandstats` of the masters): a prefix's keys are one slot, on one master, "
        "whose one thread runs the script.",
        "",
        f"Machine: {info.get('cores', '?')} cores, load average at start "
        f"{info.get('load average at start', '?')}, Redis {info.get('Redis server', '?')}, "
        f"{info.get('date (UTC)', '?')} UTC.",
        "",
        "| prefixes | pairs/s reached | server µs per pair | ceiling of one prefix (pairs/s) "
        "| busiest master (share of a core) |",
        "|--:|--:|--:|--:|--:|",
    ]
    for n, r in rows:
        lines.append(
            f"| {n} | {r['pairs/s']:,.0f} | {r['server us/pair']:.1f} | "
            f"{r['ceiling pairs/s per prefix']:,.0f} | {r['busiest master, share of a core']:.2f} |"
        )
    lines += [
        "",
        "The clients share the machine's cores with the masters, so the throughput reached is "
        "the clients' limit here; the ceiling is what one master core sustains for one prefix, "
        "and a deployment scales by prefixes (tenants, regions) spread over masters.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    from benchmarks.report import machine, publish, section_parser
    from tests.redis_cluster import RedisClusterServers

    parser = section_parser(__doc__)
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    cluster = RedisClusterServers(3)
    cluster.start()
    try:
        info = machine(f"redis://127.0.0.1:{cluster.ports[0]}")
        rows = []
        for n in (1, 3, 6):
            print(f"cluster, {n} prefixes...", file=sys.stderr)
            prefixes = [f"tenant{i}" for i in range(n)]
            rows.append((n, run(cluster.url, cluster.ports, prefixes, args.seconds, 2)))
    finally:
        cluster.stop()
    publish(TITLE, section(rows, info, args.seconds), args.write)


if __name__ == "__main__":
    main()
