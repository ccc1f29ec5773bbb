"""
``python -m benchmarks.windows``: what a second budget window costs.

``check_availability`` and ``reserve`` + ``commit`` with the day alone kept,
and with the day and the month kept (a monthly user limit set), each against
the floor (one EVALSHA of a registered ``return 1`` per round trip ours makes,
through the same kind of pool), one thread, on one real redis-server this
script starts. Subjects alternate round by round so load on a shared machine
hits them alike; ratios are the medians of the rounds' side-by-side ratios.
Round trips and server time per operation come from the server's own
counters (``INFO commandstats``): a window adds work inside the one script
call, never a round trip.

``--write`` replaces the "Budget windows" section of ``benchmarks/RESULTS.md``
(appending it when absent) and leaves every other section as it is.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import attrs
import redis

from benchmarks._subjects import ACTUAL, COST, ESTIMATE, PROJECT, config, same_pool_client
from coreason_budget import BudgetManager

TITLE = "## Budget windows"
OPS = {"check": ("check_availability", 1), "reserve_commit": ("reserve + commit", 2)}
SUBJECTS = ("floor", "day only", "day + month")


@attrs.frozen
class Sample:
    us: float  # wall µs per op
    server_us: float  # EVALSHA server µs per op
    round_trips: float


def timed(fn: Callable[[str], object], admin: redis.Redis, n: int) -> Sample:
    for i in range(50):
        fn(f"w{i % 50}")
    admin.config_resetstat()
    start = time.perf_counter()
    for i in range(n):
        fn(f"w{i % 50}")
    wall = time.perf_counter() - start
    stats = admin.info("commandstats").get("cmdstat_evalsha", {"calls": 0, "usec": 0})
    return Sample(wall / n * 1e6, stats["usec"] / n, stats["calls"] / n)


def subjects(url: str) -> tuple[dict[str, dict[str, Callable[[str], object]]], list[object]]:
    floor_client = same_pool_client(config(url))
    trivial = floor_client.register_script("return 1")
    day = BudgetManager(config(url))
    month = BudgetManager(attrs.evolve(config(url), monthly_user_limit_usd=9e6))
    assert month._core.ledger.windows == ("day", "month")

    def floor_op(calls: int) -> Callable[[str], object]:
        def op(user: str) -> None:
            for _ in range(calls):
                trivial()

        return op

    def ours(m: BudgetManager) -> dict[str, Callable[[str], object]]:
        def reserve_commit(user: str) -> None:
            m.reserve(user, ESTIMATE, project_id=PROJECT).commit(ACTUAL)

        return {
            "check": lambda user: m.check_availability(user, COST, project_id=PROJECT),
            "reserve_commit": reserve_commit,
        }

    table = {
        "floor": {op: floor_op(calls) for op, (_, calls) in OPS.items()},
        "day only": ours(day),
        "day + month": ours(month),
    }
    return table, [floor_client, day, month]


def measure(url: str, n: int, rounds: int) -> dict[tuple[str, str], list[Sample]]:
    table, closers = subjects(url)
    admin = redis.Redis.from_url(url)
    out: dict[tuple[str, str], list[Sample]] = {}
    try:
        for r in range(rounds):
            order = SUBJECTS if r % 2 == 0 else SUBJECTS[::-1]
            for op in OPS:
                for subject in order:
                    out.setdefault((op, subject), []).append(timed(table[subject][op], admin, n))
    finally:
        for c in closers:
            c.close()  # type: ignore[attr-defined]
    return out


def section(res: dict[tuple[str, str], list[Sample]], info: dict[str, str], n: int) -> str:
    rounds = len(next(iter(res.values())))
    lines = [
        TITLE,
        "",
        f"`python -m benchmarks.windows --write` (rewrites this section only; {n} calls per "
        f"run, {rounds} rounds, subjects alternating). One thread, `BudgetManager` with the day "
        "alone kept, and with the day and the month kept (a monthly user limit), against the "
        "floor (one EVALSHA of `return 1` per round trip ours makes, same pool settings). "
        "Ratios: the median of the rounds' side-by-side ratios of wall time per operation. "
        "Round trips and server µs per operation: the server's `INFO commandstats`.",
        "",
        f"Machine: {info.get('cores', '?')} cores, load average at start "
        f"{info.get('load average at start', '?')}, Python {info.get('Python', '?')}, Redis "
        f"{info.get('Redis server', '?')}, {info.get('date (UTC)', '?')} UTC.",
        "",
        "| operation | subject | µs per op | ours / floor | round trips | server µs per op |",
        "|---|---|--:|--:|--:|--:|",
    ]
    for op, (title, _) in OPS.items():
        floor = res[(op, "floor")]
        for subject in SUBJECTS:
            samples = res[(op, subject)]
            ratio = statistics.median(s.us / f.us for s, f in zip(samples, floor, strict=True))
            lines.append(
                f"| {title} | {subject} | {statistics.median(s.us for s in samples):.1f} | "
                f"{ratio:.2f} | {statistics.median(s.round_trips for s in samples):.1f} | "
                f"{statistics.median(s.server_us for s in samples):.1f} |"
            )
    lines += [
        "",
        "The month costs each charge one more counter write per scope (and a check one more "
        "read of the limits and the counters), inside the same script call: the round trips "
        "stay one per call.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    from benchmarks.report import on_a_server, publish, section_parser

    parser = section_parser(__doc__)
    parser.add_argument("--calls", type=int, default=1500, help="per run")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    res, info = on_a_server("windows", lambda url: measure(url, args.calls, args.rounds))
    publish(TITLE, section(res, info, args.calls), args.write)


if __name__ == "__main__":
    main()
