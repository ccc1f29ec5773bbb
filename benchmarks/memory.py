"""
``python -m benchmarks.memory``: Redis memory per operation, and what a day of them holds.

Runs ``record_spend``, ``reserve`` + ``commit`` and ``reserve`` + ``release``
against one real redis-server this script starts (500 users, 20 projects, one
model, the default configuration), N operations of each kind on an empty
store, and reads ``used_memory`` (``INFO memory``) before and after: the bytes
an operation leaves in the store for as long as its records are kept.

Every operation is the library's own: the core builds each call (the same
keys, arguments and script as ``BudgetManager``), and the driver's registered
script runs it; only the sending is batched (a pipeline of 1,000 calls), so a
million operations take seconds, not an hour. Each reply is sent back into
its operation, which checks it as the manager would.

The projection: bytes per operation x operations per day x the days a record
is kept (``retention_seconds`` after its day, so about retention + 1 days on
average at a steady rate), for 10 million operations a day.

``--write`` replaces the "Memory per operation" section of
``benchmarks/RESULTS.md`` (appending it when absent).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import redis

from coreason_budget import BudgetConfig, BudgetManager
from coreason_budget._steps import Script

TITLE = "## Memory per operation"
KINDS = ("record_spend", "reserve + commit", "reserve + release")
BATCH = 1000
USERS, PROJECTS = 500, 20
PER_DAY = 10_000_000


def drive(manager: BudgetManager, steps: list[Any]) -> list[Any]:
    """
    Run each operation's steps to the end, their script calls pipelined: one
    batch of first steps, then their replies sent back in (each operation here
    makes one call).
    """
    script = manager._driver._script
    client = manager._store.client
    pipe = client.pipeline(transaction=False)
    firsts = [s.send(None) for s in steps]
    for step in firsts:
        assert type(step) is Script
        script(keys=step.keys, args=step.args, client=pipe)
    results = []
    for s, reply in zip(steps, pipe.execute(), strict=True):
        try:
            s.send(reply)
        except StopIteration as stop:
            results.append(stop.value)
        else:
            raise AssertionError("an operation made a second call")
    return results


def batches(n: int) -> Iterator[range]:
    for start in range(0, n, BATCH):
        yield range(start, min(n, start + BATCH))


def run(manager: BudgetManager, kind: str, n: int) -> None:
    """*n* operations of *kind*, a batch at a time."""
    core = manager._core
    for part in batches(n):
        ids = [(f"user-{i % USERS:04d}", f"project-{i % PROJECTS:02d}") for i in part]
        if kind == "record_spend":
            drive(manager, [core.record_spend(u, 0.001, p, "gpt-4o", None) for u, p in ids])
            continue
        reserves = [
            core.reserve(manager._handle, u, 0.01, p, "gpt-4o", "charge", None) for u, p in ids
        ]
        holds = drive(manager, reserves)
        actual, state = (5_000_000, "committed") if kind == "reserve + commit" else (0, "released")
        drive(manager, [core.settle(h, actual, state) for h in holds])


def measure(url: str, sizes: list[int]) -> dict[tuple[str, int], float]:
    admin = redis.Redis.from_url(url)
    out: dict[tuple[str, int], float] = {}
    # Limits out of the way (a million calls spend $5,000): only the memory is measured.
    config = BudgetConfig(
        redis_url=url,
        spool_dir="off",
        daily_user_limit_usd=9e6,
        daily_project_limit_usd=9e6,
        daily_global_limit_usd=9e6,
    )
    for kind in KINDS:
        for n in sizes:
            admin.flushall()
            with BudgetManager(config) as manager:
                manager.usage("warm-up")
                admin.flushall()
                before = admin.info("memory")["used_memory"]
                run(manager, kind, n)
                after = admin.info("memory")["used_memory"]
            out[(kind, n)] = (after - before) / n
            print(f"  {kind}, {n:,}: {out[(kind, n)]:.1f} bytes/op", file=sys.stderr)
    admin.flushall()
    return out


def section(res: dict[tuple[str, int], float], info: dict[str, str], retention_days: float) -> str:
    sizes = sorted({n for _, n in res})
    lines = [
        TITLE,
        "",
        "`python -m benchmarks.memory --write` (rewrites this section only). Each kind of "
        f"operation, N times on an empty store ({USERS} users, {PROJECTS} projects, one model, "
        "the default configuration, limits out of the way), through the library's own calls "
        "(pipelined 1,000 at a time); bytes per operation = the growth of `used_memory` "
        "(`INFO memory`) / N. "
        f"Projection: bytes x {PER_DAY:,} operations a day x {retention_days:g} days kept "
        "(the default retention, 7 days after its day, plus the day itself).",
        "",
        f"Redis {info.get('Redis server', '?')}, {info.get('date (UTC)', '?')} UTC.",
        "",
        "| operation | "
        + " | ".join(f"bytes/op at {n:,}" for n in sizes)
        + f" | held at {PER_DAY // 1_000_000}M ops/day |",
        "|---|" + "--:|" * (len(sizes) + 1),
    ]
    for kind in KINDS:
        per_op = [res[(kind, n)] for n in sizes]
        held = per_op[-1] * PER_DAY * retention_days / 1e9
        lines.append(
            f"| {kind} | " + " | ".join(f"{b:.0f}" for b in per_op) + f" | {held:.1f} GB |"
        )
    lines += [
        "",
        "Sizing rule: memory held = bytes per operation x operations per day x (retention "
        "days + 1). The counters (one field per user, project and model per period) are a few "
        "dozen bytes per active scope and do not grow with the number of operations.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    from benchmarks.report import on_a_server, publish, section_parser

    parser = section_parser(__doc__)
    parser.add_argument(
        "--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[100_000, 1_000_000]
    )
    args = parser.parse_args()
    res, info = on_a_server("memory", lambda url: measure(url, args.sizes))
    days = BudgetConfig().retention_seconds / 86400 + 1
    publish(TITLE, section(res, info, days), args.write)


if __name__ == "__main__":
    main()
