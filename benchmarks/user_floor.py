"""
``python -m benchmarks.user_floor``: reserve + commit against the floor a user would measure.

The report's own floor uses the manager's pool settings and a call without a
model. A user measures differently: redis-py's default client
(``redis.Redis.from_url(url)``, its default pool) running two EVALSHAs of a
trivial script, against the call the README shows::

    with budget.reserve(user, 0.01, project_id=..., model=...) as r:
        r.commit(...)

on a ``BudgetManager(BudgetConfig(redis_url=url))``. Both run on one
redis-server this script starts, at 1 and 8 threads, alternating round by
round; ratios are the medians of the rounds' side-by-side ratios of time per
pair. The server's own time per pair (``INFO commandstats``) is reported next
to them.

``--write`` replaces the "Reserve + commit as a user measures it" section of
``benchmarks/RESULTS.md`` (appending it when absent).
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable

import redis

from coreason_budget import BudgetConfig, BudgetManager

TITLE = "## Reserve + commit as a user measures it"
THREADS = (1, 8)
#: The spec's target for ours / floor.
TARGET = 1.25


def run(fn: Callable[[str], object], threads: int, per_thread: int) -> float:
    """Seconds per pair, *threads* threads each making *per_thread* pairs."""
    start = threading.Barrier(threads + 1)

    def work(t: int) -> None:
        start.wait()
        for i in range(per_thread):
            fn(f"user-{t}-{i % 50}")

    pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for p in pool:
        p.start()
    start.wait()
    began = time.perf_counter()
    for p in pool:
        p.join()
    return (time.perf_counter() - began) / (threads * per_thread)


def measure(url: str, pairs: int, rounds: int) -> dict[tuple[str, int], list[tuple[float, float]]]:
    floor_client = redis.Redis.from_url(url)
    trivial = floor_client.register_script("return 1")
    budget = BudgetManager(BudgetConfig(redis_url=url))
    admin = redis.Redis.from_url(url)

    def floor(user: str) -> None:
        trivial()
        trivial()

    def ours(user: str) -> None:
        with budget.reserve(user, 0.01, project_id="proj_alpha", model="gpt-4o") as r:
            r.commit(0.004)

    subjects = {"floor": floor, "ours": ours}
    out: dict[tuple[str, int], list[tuple[float, float]]] = {}
    try:
        for fn in subjects.values():
            run(fn, 1, 200)  # connections made, script loaded
        for r in range(rounds):
            for threads in THREADS:
                order = list(subjects) if r % 2 == 0 else list(subjects)[::-1]
                for name in order:
                    admin.config_resetstat()
                    per_pair = run(subjects[name], threads, pairs // threads)
                    stats = admin.info("commandstats")["cmdstat_evalsha"]
                    server_us = stats["usec"] / (stats["calls"] / 2)
                    out.setdefault((name, threads), []).append((per_pair * 1e6, server_us))
    finally:
        budget.close()
        floor_client.close()
    return out


def section(res: dict[tuple[str, int], list[tuple[float, float]]], info: dict[str, str]) -> str:
    rounds = len(res[("ours", 1)])
    lines = [
        TITLE,
        "",
        "`python -m benchmarks.user_floor --write` (rewrites this section only; "
        f"{rounds} rounds, ours and the floor alternating). The floor as a user measures it: "
        "`redis.Redis.from_url(url)` (redis-py's default client and pool) running two EVALSHAs "
        "of `return 1`; ours: the README's `with budget.reserve(user, 0.01, project_id=..., "
        "model=...) as r: r.commit(...)` on `BudgetManager(BudgetConfig(redis_url=url))`. "
        "Time per pair from wall time over all threads; ratio: the median of the rounds' "
        "side-by-side ratios; server µs per pair: `INFO commandstats`.",
        "",
        f"Machine: {info.get('cores', '?')} cores, load average at start "
        f"{info.get('load average at start', '?')}, Python {info.get('Python', '?')}, Redis "
        f"{info.get('Redis server', '?')}, {info.get('redis-py', '?')}, "
        f"{info.get('date (UTC)', '?')} UTC.",
        "",
        "| threads | floor µs/pair | ours µs/pair | ours / floor (rounds) | target | "
        "server µs/pair floor / ours |",
        "|--:|--:|--:|--:|---|--:|",
    ]
    for threads in THREADS:
        floor, ours = res[("floor", threads)], res[("ours", threads)]
        ratios = [o[0] / f[0] for o, f in zip(ours, floor, strict=True)]
        ratio = statistics.median(ratios)
        lines.append(
            f"| {threads} | {statistics.median(f[0] for f in floor):.1f} | "
            f"{statistics.median(o[0] for o in ours):.1f} | **{ratio:.2f}** "
            f"({min(ratios):.2f}-{max(ratios):.2f}) | "
            f"{'met' if ratio <= TARGET else '**not met**'} (<= {TARGET}) | "
            f"{statistics.median(f[1] for f in floor):.1f} / "
            f"{statistics.median(o[1] for o in ours):.1f} |"
        )
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    from benchmarks.report import on_a_server, publish, section_parser

    parser = section_parser(__doc__)
    parser.add_argument("--pairs", type=int, default=2400, help="per run (over all threads)")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    res, info = on_a_server("user floor", lambda url: measure(url, args.pairs, args.rounds))
    publish(TITLE, section(res, info), args.write)


if __name__ == "__main__":
    main()
