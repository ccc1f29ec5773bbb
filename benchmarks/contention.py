"""
Contention: many threads in several processes race for a small budget.

``python -m benchmarks.contention`` starts a redis-server and, for each guard,
the same race: every thread of every process repeatedly asks to make a $0.01
call (admit), makes it (optionally sleeping ``--call-ms`` for the LLM call)
and settles its cost. Four users share one project; a user may spend $1.00, the
project $2.00, so a correct guard admits exactly 200 calls and nobody more than
100. Overspend is what the admitted calls cost beyond those limits, counted by
the callers (what was really spent), not by the store. Ours must show zero.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import threading
import time
from collections import Counter
from typing import Any

import attrs

USERS = 4
CALL_CENTS = 1
USER_LIMIT_CENTS = 100
PROJECT_LIMIT_CENTS = 200
GLOBAL_LIMIT_CENTS = 100_000
GUARDS = ("ours", "limits", "limits-hit-each", "plain")


@attrs.frozen
class Outcome:
    guard: str
    call_ms: float
    attempts: int
    admitted: int
    refused: int
    seconds: float
    over_user_usd: float  # sum over users of spend beyond their limit
    over_project_usd: float  # project spend beyond its limit
    recorded_project_usd: float  # what the store believes the project spent

    @property
    def ops_per_s(self) -> float:
        return self.attempts / self.seconds

    @property
    def ideal_admitted(self) -> int:
        return min(PROJECT_LIMIT_CENTS, USERS * USER_LIMIT_CENTS) // CALL_CENTS


def _worker(
    url: str,
    guard: str,
    proc: int,
    threads: int,
    attempts: int,
    call_ms: float,
    barrier: Any,
    results: Any,
) -> None:
    """One process: *threads* threads sharing one guard, started together with the others."""
    from benchmarks._subjects import KINDS, config

    cost = CALL_CENTS / 100
    limits = (USER_LIMIT_CENTS / 100, PROJECT_LIMIT_CENTS / 100, GLOBAL_LIMIT_CENTS / 100)
    subject = KINDS[guard](config(url, limits))
    admitted: Counter[str] = Counter()
    refused = [0]
    lock = threading.Lock()
    go = threading.Barrier(threads + 1)

    def race(user: str) -> None:
        subject.usage(user)  # opens this thread's connection before the race
        go.wait()
        mine = refused_here = 0
        for _ in range(attempts):
            token = subject.admit(user, cost)
            if token is None:
                refused_here += 1
                continue
            if call_ms:
                time.sleep(call_ms / 1000)
            subject.settle(token, user, cost)
            mine += 1
        with lock:
            admitted[user] += mine
            refused[0] += refused_here

    pool = [
        threading.Thread(target=race, args=(f"u{(proc * threads + t) % USERS}",))
        for t in range(threads)
    ]
    try:
        for t in pool:
            t.start()
        barrier.wait()
        start = time.time()
        go.wait()
        for t in pool:
            t.join()
        results.put((dict(admitted), refused[0], start, time.time(), None))
    except BaseException as e:
        results.put(({}, 0, 0.0, 0.0, repr(e)))
    finally:
        subject.close()


def race(
    url: str, guard: str, processes: int, threads: int, attempts: int, call_ms: float
) -> Outcome:
    """One race of *guard* on an emptied store."""
    import redis

    from benchmarks._subjects import KINDS, config

    admin = redis.Redis.from_url(url)
    admin.flushall()
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(processes)
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=_worker,
            args=(url, guard, p, threads, attempts, call_ms, barrier, results),
        )
        for p in range(processes)
    ]
    for p in procs:
        p.start()
    replies = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join()
    errors = [r[4] for r in replies if r[4]]
    if errors:
        raise RuntimeError(f"{guard}: a worker failed: {errors[0]}")
    admitted: Counter[str] = Counter()
    for counts, *_ in replies:
        admitted.update(counts)
    limits = (USER_LIMIT_CENTS / 100, PROJECT_LIMIT_CENTS / 100, GLOBAL_LIMIT_CENTS / 100)
    probe = KINDS[guard](config(url, limits))
    try:
        recorded = probe.project_spent_usd()
    finally:
        probe.close()
        admin.close()
    total = sum(admitted.values())
    return Outcome(
        guard=guard,
        call_ms=call_ms,
        attempts=processes * threads * attempts,
        admitted=total,
        refused=sum(r[1] for r in replies),
        seconds=max(r[3] for r in replies) - min(r[2] for r in replies),
        over_user_usd=sum(max(0, n * CALL_CENTS - USER_LIMIT_CENTS) for n in admitted.values())
        / 100,
        over_project_usd=max(0, total * CALL_CENTS - PROJECT_LIMIT_CENTS) / 100,
        recorded_project_usd=round(recorded, 6),
    )


def run_all(
    url: str,
    processes: int = 4,
    threads: int = 8,
    attempts: int = 40,
    call_ms: tuple[float, ...] = (0.0, 2.0),
) -> list[Outcome]:
    return [
        race(url, guard, processes, threads, attempts, ms) for ms in call_ms for guard in GUARDS
    ]


def table(outcomes: list[Outcome]) -> str:
    rows = [
        "| guard | LLM call | attempts | ops/s | admitted (ideal) | refused "
        "| overspend: users | overspend: project | store's project total |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for o in outcomes:
        rows.append(
            f"| {o.guard} | {o.call_ms:g} ms | {o.attempts} | {o.ops_per_s:,.0f} "
            f"| {o.admitted} ({o.ideal_admitted}) | {o.refused} | ${o.over_user_usd:.2f} "
            f"| ${o.over_project_usd:.2f} | ${o.recorded_project_usd:.2f} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--attempts", type=int, default=40, help="per thread")
    parser.add_argument("--call-ms", type=float, action="append", help="repeatable")
    args = parser.parse_args()

    from tests.redis_server import RedisServer

    server = RedisServer()
    server.start()
    try:
        outcomes = run_all(
            server.url,
            args.processes,
            args.threads,
            args.attempts,
            tuple(args.call_ms or (0.0, 2.0)),
        )
    finally:
        server.stop()
    print(table(outcomes))
    bad = [o for o in outcomes if o.guard == "ours" and (o.over_user_usd or o.over_project_usd)]
    if bad:
        raise SystemExit(f"ours overspent: {bad}")


if __name__ == "__main__":
    main()
