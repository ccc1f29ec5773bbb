"""
A small threaded load harness: N threads share one subject, each timing every call.

pytest-benchmark times one thread; a budget guard lives in a threaded web
worker, where what matters is throughput and the tail latency once threads
queue for the GIL, the pool and the server. Runs of the compared subjects are
interleaved round by round, so that noise from other work on a shared machine
hits them alike: throughput compares each subject's best round, latency ratios
the median of the rounds' side-by-side pairs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import attrs

#: Unmeasured calls per thread before the clock starts: opens its pool connection.
WARMUP_CALLS = 3


@attrs.frozen
class Run:
    threads: int
    ops: int
    seconds: float
    p50_us: float
    p99_us: float

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.seconds


def run(make_op: Callable[[int], Callable[[], object]], threads: int, seconds: float) -> Run:
    """Call ``make_op(i)()`` in a loop on thread i for *seconds*; all threads start together."""
    ops = [make_op(i) for i in range(threads)]
    latencies: list[list[int]] = [[] for _ in range(threads)]
    spans: list[tuple[float, float]] = [(0.0, 0.0)] * threads
    errors: list[BaseException] = []
    start = threading.Barrier(threads)

    def work(i: int) -> None:
        op, mine, clock = ops[i], latencies[i], time.perf_counter_ns
        try:
            for _ in range(WARMUP_CALLS):
                op()
            start.wait()
            begin = time.perf_counter()
            deadline = clock() + int(seconds * 1e9)
            now = clock()
            while now < deadline:
                op()
                after = clock()
                mine.append(after - now)
                now = after
            spans[i] = (begin, time.perf_counter())
        except BaseException as e:  # reported after join, not lost in the thread
            errors.append(e)
            start.abort()

    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    if errors:
        raise errors[0]
    merged = sorted(x for lat in latencies for x in lat)
    wall = max(end for _, end in spans) - min(begin for begin, _ in spans)
    return Run(
        threads=threads,
        ops=len(merged),
        seconds=wall,
        p50_us=percentile(merged, 0.50) / 1e3,
        p99_us=percentile(merged, 0.99) / 1e3,
    )


def percentile(ordered: list[int], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not ordered:
        return float("nan")
    return float(ordered[min(len(ordered) - 1, int(q * len(ordered)))])


@attrs.frozen
class Rounds:
    """Every run of each subject, in round order: run i of each was taken side by side."""

    runs: dict[str, list[Run]]

    def best(self) -> dict[str, Run]:
        """The best (highest ops/s) run of each subject."""
        return {name: max(runs, key=lambda r: r.ops_per_s) for name, runs in self.runs.items()}

    def paired(self, a: str, b: str) -> list[float]:
        """a's median latency over b's, round by round: each pair ran back to back."""
        return [x.p50_us / y.p50_us for x, y in zip(self.runs[a], self.runs[b], strict=True)]


def interleaved(
    makers: dict[str, Callable[[int], Callable[[], object]]],
    threads: int,
    seconds: float,
    rounds: int,
) -> Rounds:
    """Each subject once per round, rounds interleaved."""
    runs: dict[str, list[Run]] = {name: [] for name in makers}
    for _ in range(rounds):
        for name, make_op in makers.items():
            runs[name].append(run(make_op, threads, seconds))
    return Rounds(runs)
