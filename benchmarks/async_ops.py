"""
``python -m benchmarks.async_ops``: AsyncBudgetManager against the async floor.

The async twin of the report's "ours / floor" tables. Each operation
(``check_availability``, ``record_spend``, ``reserve`` + ``commit``) runs on
one event loop, by 1 and by 64 concurrent tasks, against one real
redis-server this script starts, and so does the **async floor**: one
EVALSHA of a registered ``return 1`` through ``redis.asyncio`` per round trip
ours makes (two for reserve + commit), on a ``redis.asyncio``
BlockingConnectionPool built with the manager's own pool settings
(``_store._pool_kwargs`` with the asyncio classes). Runs of ours and of the
floor alternate round by round (which goes first alternates too), so load on
a shared machine hits both alike; the ratios are the medians of the rounds'
side-by-side ratios.

While every measured run goes, a ticker task sleeps 5 ms at a time and notes
how late it wakes: the event loop's lag, the time a task ready to run waited
for the loop. An idle loop's lag (the ticker alone) is the baseline; the cold
start (a new manager's first call, which opens its store in a worker thread)
and ``load_pricing()`` (litellm's import, in a worker thread) are measured
the same way. Untimed runs then time every callback the loop runs (the
longest is how long one step held the loop) and the garbage collector's runs.

At 64 tasks the 32-connection pool is shared by twice as many tasks: longer
runs (2 s, past the pool's 0.5 s timeout) show which tasks got connections
and how many calls failed waiting for one.

``--write`` replaces the "Async manager vs the async floor" section of
``benchmarks/RESULTS.md`` (appending it when absent) and leaves every other
section as it is; ``--profile`` adds where the time of one call goes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import io
import os
import pstats
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import redis
import redis.asyncio

from benchmarks._subjects import ACTUAL, COST, ESTIMATE, PROJECT, config
from coreason_budget import AsyncBudgetManager, BudgetConfig, BudgetError
from coreason_budget._store import _ASYNC, _pool_kwargs

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
TITLE = "## Async manager vs the async floor"

OPS = ("check", "record_spend", "reserve_commit")
OP_TITLES = {
    "check": "check_availability",
    "record_spend": "record_spend",
    "reserve_commit": "reserve + commit",
}
FLOOR_CALLS = {"check": 1, "record_spend": 1, "reserve_commit": 2}
TASKS = (1, 64)
SUBJECTS = ("ours", "floor")
#: The ticker's sleep, seconds.
TICK = 0.005
#: The spec's target for ours / floor at one task.
MAX_FLOOR_RATIO = 1.25
#: Unmeasured calls per task before the clock starts: opens its pool connection.
WARMUP_CALLS = 3

Op = Callable[[str], Awaitable[object]]
#: What a call may raise under load: no pool connection within pool_timeout (the floor
#: gets redis-py's ConnectionError, ours BudgetUnavailableError), counted as errors.
FAILURES = (redis.exceptions.RedisError, BudgetError)
#: The starvation runs: longer than pool_timeout, so a task starved of a connection fails.
LONG_SECONDS = 2.0
#: The untimed runs that time every callback.
HOLD_SECONDS = 1.0


# -- the subjects ------------------------------------------------------------------------


class AsyncOurs:
    """:class:`AsyncBudgetManager`, as an application awaits it."""

    name = "ours"

    def __init__(self, cfg: BudgetConfig) -> None:
        self.manager = AsyncBudgetManager(cfg)

    async def check(self, user: str) -> None:
        await self.manager.check_availability(user, COST, project_id=PROJECT)

    async def record_spend(self, user: str) -> None:
        await self.manager.record_spend(user, COST, project_id=PROJECT)

    async def reserve_commit(self, user: str) -> None:
        r = await self.manager.reserve(user, ESTIMATE, project_id=PROJECT)
        await r.commit(ACTUAL)

    async def aclose(self) -> None:
        await self.manager.aclose()


def same_async_pool_client(cfg: BudgetConfig) -> redis.asyncio.Redis:
    """A redis.asyncio client on the same kind of pool, with the same kwargs, as a manager's."""
    assert cfg.redis_url is not None
    pool = redis.asyncio.BlockingConnectionPool.from_url(
        cfg.redis_url, **_pool_kwargs(cfg, "redis", _ASYNC)
    )
    return redis.asyncio.Redis(connection_pool=pool)


class AsyncFloor:
    """One EVALSHA of ``return 1`` per round trip ours makes."""

    name = "floor"

    def __init__(self, cfg: BudgetConfig) -> None:
        self.client = same_async_pool_client(cfg)
        self.script = self.client.register_script("return 1")

    async def check(self, user: str) -> None:
        await self.script()

    async def reserve_commit(self, user: str) -> None:
        await self.script()
        await self.script()

    record_spend = check

    async def aclose(self) -> None:
        await self.client.aclose()
        await self.client.connection_pool.disconnect()


# -- the harness ---------------------------------------------------------------------------


@attrs.frozen
class Run:
    tasks: int
    ops: int
    seconds: float
    p50_us: float
    p99_us: float
    cpu_us: float  # this process's CPU time per op (client side only)
    server_us: float  # the server's EVALSHA time per op (commandstats)
    lag_max_ms: float  # the ticker's worst lateness during the run
    lag_p99_ms: float
    max_us: float  # the slowest call
    errors: int  # calls that raised (the pool's timeout: no connection within pool_timeout)
    task_calls: tuple[int, int, int]  # calls completed per task: fewest, median, most

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.seconds

    @property
    def us_per_op(self) -> float:
        """Time per op by throughput (wall time of the run / ops done in it)."""
        return self.seconds / self.ops * 1e6


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not ordered:
        return float("nan")
    return float(ordered[min(len(ordered) - 1, int(q * len(ordered)))])


class Ticker:
    """A task that sleeps TICK at a time and records how late each wake-up was."""

    def __init__(self) -> None:
        self.lags: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        clock = time.perf_counter
        while True:
            before = clock()
            await asyncio.sleep(TICK)
            self.lags.append(clock() - before - TICK)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._tick())

    async def stop(self) -> tuple[float, float]:
        """(worst, p99) lateness in ms."""
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        lags = sorted(self.lags) or [0.0]
        return lags[-1] * 1e3, percentile(lags, 0.99) * 1e3


class HoldMeter:
    """
    Times every callback the loop runs (each step of a task is one), as wall
    time and as this thread's CPU time: the longest CPU hold is how long our
    code kept the loop from everything else; a wall hold far above it is the
    machine (preemption, another thread holding the GIL), not the code. Also
    counts the garbage collector's runs and its longest (a full collection
    runs inside whichever callback allocated last, and holds the loop too).
    Wraps ``asyncio.events.Handle._run``, so it is used outside the timed runs.
    """

    def __init__(self) -> None:
        self.cpu_ms = 0.0
        self.wall_ms = 0.0
        self.callbacks = 0
        self.collections = 0
        self.gc_ms = 0.0
        self._gc_start = 0.0

    def _gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_start = time.thread_time()
        else:
            self.collections += 1
            self.gc_ms = max(self.gc_ms, (time.thread_time() - self._gc_start) * 1e3)

    def __enter__(self) -> HoldMeter:
        handle = asyncio.events.Handle
        self._original = original = handle._run
        wall, cpu = time.perf_counter, time.thread_time

        def timed(h: Any) -> None:
            w, c = wall(), cpu()
            try:
                original(h)
            finally:
                dc, dw = cpu() - c, wall() - w
                self.callbacks += 1
                self.cpu_ms = max(self.cpu_ms, dc * 1e3)
                self.wall_ms = max(self.wall_ms, dw * 1e3)

        handle._run = timed  # type: ignore[method-assign,assignment]
        gc.callbacks.append(self._gc)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._gc)
        asyncio.events.Handle._run = self._original  # type: ignore[method-assign]


async def run(op: Op, tasks: int, seconds: float, admin: redis.Redis) -> Run:
    """Await ``op(user)`` in a loop in each of *tasks* tasks for *seconds*; all start together."""
    users = [f"u{i}" for i in range(tasks)]

    errors = 0

    async def warm(user: str) -> None:
        nonlocal errors
        for _ in range(WARMUP_CALLS):
            try:
                await op(user)
            except FAILURES:
                errors += 1

    await asyncio.gather(*(warm(u) for u in users))
    latencies: list[list[int]] = [[] for _ in range(tasks)]
    go = asyncio.Event()
    clock = time.perf_counter_ns
    budget_ns = int(seconds * 1e9)

    async def work(i: int) -> None:
        nonlocal errors
        mine, user = latencies[i], users[i]
        await go.wait()
        now = clock()
        deadline = now + budget_ns
        while now < deadline:
            try:
                await op(user)
            except FAILURES:
                errors += 1  # counted, not timed
                now = clock()
                continue
            after = clock()
            mine.append(after - now)
            now = after

    errors = 0  # the warm-up's do not count
    admin.config_resetstat()  # blocks the loop, but no task is running yet
    workers = [asyncio.ensure_future(work(i)) for i in range(tasks)]
    await asyncio.sleep(0)  # every worker waits on go
    ticker = Ticker()
    ticker.start()
    cpu = time.process_time()
    begin = time.perf_counter()
    go.set()
    await asyncio.gather(*workers)
    wall = time.perf_counter() - begin
    cpu = time.process_time() - cpu
    lag_max, lag_p99 = await ticker.stop()
    stats = admin.info("commandstats")
    server = sum(float(stats.get(f"cmdstat_{c}", {}).get("usec", 0)) for c in ("evalsha", "eval"))
    merged = sorted(x for lat in latencies for x in lat)
    n = max(1, len(merged))
    per_task = sorted(len(lat) for lat in latencies)
    return Run(
        tasks=tasks,
        ops=n,
        seconds=wall,
        p50_us=percentile(merged, 0.50) / 1e3,
        p99_us=percentile(merged, 0.99) / 1e3,
        cpu_us=cpu / n * 1e6,
        server_us=server / n,
        lag_max_ms=lag_max,
        lag_p99_ms=lag_p99,
        max_us=(merged[-1] if merged else float("nan")) / 1e3,
        errors=errors,
        task_calls=(per_task[0], per_task[len(per_task) // 2], per_task[-1]),
    )


@attrs.frozen
class Results:
    #: (op, tasks, subject) -> every run, in round order (run i of ours and floor side by side)
    runs: dict[tuple[str, int, str], list[Run]]
    idle_lag_ms: tuple[float, float]  # (worst, p99) of the ticker alone
    cold_lag_ms: tuple[float, float, float]  # (first call ms, worst, p99)
    cold_hold_ms: tuple[float, float]  # (longest callback CPU, wall)
    pricing_lag_ms: tuple[float, float, float] | None  # (load_pricing ms, worst, p99)
    #: (op, tasks, subject) -> (longest callback CPU ms, longest callback wall ms,
    #: garbage collections, longest collection ms), one short run
    holds: dict[tuple[str, int, str], tuple[float, float, int, float]]
    pricing_hold_ms: tuple[float, float] | None
    #: (op, subject) -> one run of LONG_SECONDS at the most tasks
    long_runs: dict[tuple[str, str], Run]
    long_seconds: float
    seconds: float
    rounds: int

    def paired(self, op: str, tasks: int, measure: str) -> list[float]:
        """ours over floor, round by round, by *measure* (a Run attribute)."""
        ours, floor = self.runs[(op, tasks, "ours")], self.runs[(op, tasks, "floor")]
        return [getattr(a, measure) / getattr(b, measure) for a, b in zip(ours, floor, strict=True)]

    def ratio(self, op: str, tasks: int, measure: str) -> float:
        return statistics.median(self.paired(op, tasks, measure))

    def median(self, op: str, tasks: int, subject: str, measure: str) -> float:
        return float(
            statistics.median(getattr(r, measure) for r in self.runs[(op, tasks, subject)])
        )

    def worst_lag(self, subject: str | None = None) -> float:
        return max(
            r.lag_max_ms
            for (_, _, name), runs in self.runs.items()
            if subject is None or name == subject
            for r in runs
        )


async def idle_lag(seconds: float) -> tuple[float, float]:
    ticker = Ticker()
    ticker.start()
    await asyncio.sleep(seconds)
    return await ticker.stop()


async def timed_under_ticker(work: Awaitable[object]) -> tuple[float, float, float]:
    """(ms the work took, worst lag, p99 lag) with the ticker running meanwhile."""
    ticker = Ticker()
    ticker.start()
    begin = time.perf_counter()
    await work
    took = (time.perf_counter() - begin) * 1e3
    worst, p99 = await ticker.stop()
    return took, worst, p99


async def cold_start(cfg: BudgetConfig) -> tuple[tuple[float, float, float], tuple[float, float]]:
    """
    A new manager's first call (opens its store in a worker thread), under the
    ticker and the hold meter: ((ms, worst lag, p99 lag), (callback CPU, wall)).
    """
    fresh = AsyncBudgetManager(cfg)
    try:
        with HoldMeter() as meter:
            timing = await timed_under_ticker(fresh.check_availability("u-cold", COST, PROJECT))
        return timing, (meter.cpu_ms, meter.wall_ms)
    finally:
        await fresh.aclose()


async def pricing_load(
    cfg: BudgetConfig,
) -> tuple[tuple[float, float, float], tuple[float, float]] | None:
    """
    ``await load_pricing()`` (litellm imported in a worker thread), under the
    ticker and the hold meter: ((ms, worst lag, p99 lag), (callback CPU, wall)).
    """
    import importlib.util

    if "litellm" in sys.modules or importlib.util.find_spec("litellm") is None:
        return None  # already imported, or not installed: nothing to measure
    fresh = AsyncBudgetManager(cfg)
    try:
        with HoldMeter() as meter:
            timing = await timed_under_ticker(fresh.load_pricing())
        return timing, (meter.cpu_ms, meter.wall_ms)
    finally:
        await fresh.aclose()


async def holds(subjects: dict[str, Any], seconds: float) -> dict[tuple[str, int, str], Any]:
    """The longest single callback of each (op, tasks, subject), one short run each."""
    out = {}
    for op in OPS:
        for tasks in TASKS:
            for name in SUBJECTS:
                method = getattr(subjects[name], op)
                with HoldMeter() as meter:
                    await _loop_for(method, tasks, seconds)
                out[(op, tasks, name)] = (
                    meter.cpu_ms,
                    meter.wall_ms,
                    meter.collections,
                    meter.gc_ms,
                )
    return out


async def _loop_for(op: Op, tasks: int, seconds: float) -> None:
    async def work(user: str) -> None:
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            with contextlib.suppress(*FAILURES):
                await op(user)

    await asyncio.gather(*(work(f"u{i}") for i in range(tasks)))


async def measure(
    url: str, seconds: float, rounds: int, long_seconds: float = LONG_SECONDS
) -> Results:
    cfg = config(url)
    admin = redis.Redis.from_url(url, decode_responses=True)
    subjects: dict[str, Any] = {"ours": AsyncOurs(cfg), "floor": AsyncFloor(cfg)}
    try:
        idle = await idle_lag(seconds * 2)
        cold, cold_hold = await cold_start(cfg)
        runs: dict[tuple[str, int, str], list[Run]] = {}
        for op in OPS:
            for tasks in TASKS:
                print(f"  {OP_TITLES[op]}, {tasks} tasks", file=sys.stderr)
                for name in SUBJECTS:
                    runs[(op, tasks, name)] = []
                for i in range(rounds):
                    order = SUBJECTS if i % 2 == 0 else SUBJECTS[::-1]
                    for name in order:
                        method = getattr(subjects[name], op)
                        runs[(op, tasks, name)].append(await run(method, tasks, seconds, admin))
        held = await holds(subjects, HOLD_SECONDS)
        print(f"  {long_seconds:g} s runs at {TASKS[-1]} tasks", file=sys.stderr)
        long_runs = {
            (op, name): await run(getattr(subjects[name], op), TASKS[-1], long_seconds, admin)
            for op in OPS
            for name in SUBJECTS
        }
        priced = await pricing_load(cfg)
        return Results(
            runs,
            idle,
            cold,
            cold_hold,
            priced[0] if priced else None,
            held,
            priced[1] if priced else None,
            long_runs,
            long_seconds,
            seconds,
            rounds,
        )
    finally:
        for subject in subjects.values():
            await subject.aclose()
        admin.close()


# -- where the time goes -------------------------------------------------------------------

LADDER = {
    "floor": "EVALSHA of `return 1` through redis.asyncio (per round trip), no keys or args",
    "floor, ours' args": "the same script sent ours' exact KEYS and ARGV",
    "our script, direct": "our ledger script with those KEYS and ARGV (redis.asyncio), no wrapper",
    "driver, unshielded": "the core's steps run by the async driver, nothing shielded",
    "ours": "the public call (each write shielded: a task per write)",
    "driver, no I/O": "the steps run by the driver, the script stubbed, nothing shielded",
    "ours, no I/O": "the public call with the script stubbed: our Python and asyncio alone",
}
USER = "u-prof"


async def _unshielded(m: AsyncBudgetManager, op: str) -> None:
    """*op*'s steps run by the manager's driver as the public call runs them, minus the shields."""
    core, run_steps = m._core, m._driver.run
    if op == "check":
        await run_steps(core.check_availability(USER, COST, PROJECT))
    elif op == "record_spend":
        await run_steps(core.record_spend(USER, COST, PROJECT, None, None))
    else:
        r = await run_steps(core.reserve(m._handle, USER, ESTIMATE, PROJECT, None, "charge", None))
        await run_steps(r._commit_steps(core, ACTUAL))


async def _public(m: AsyncBudgetManager, op: str) -> None:
    if op == "check":
        await m.check_availability(USER, COST, project_id=PROJECT)
    elif op == "record_spend":
        await m.record_spend(USER, COST, project_id=PROJECT)
    else:
        r = await m.reserve(USER, ESTIMATE, project_id=PROJECT)
        await r.commit(ACTUAL)


@attrs.frozen
class Ladder:
    op: str
    us: dict[str, float]  # step -> median of rounds, wall µs per call
    cpu_us: dict[str, float]  # step -> median of rounds, client CPU µs per call
    turns: dict[str, float]  # step -> event-loop iterations per call


async def _turns(fn: Callable[[], Awaitable[object]], n: int = 200) -> float:
    """Event-loop iterations (``_run_once``) per call of *fn*."""
    loop: Any = asyncio.get_running_loop()
    original = loop._run_once
    count = 0

    def counted() -> None:
        nonlocal count
        count += 1
        original()

    loop._run_once = counted
    try:
        for _ in range(n):
            await fn()
    finally:
        del loop._run_once  # the class's method again
    return count / n


async def _per_call(fn: Callable[[], Awaitable[object]], n: int) -> tuple[float, float]:
    await fn()
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(n):
        await fn()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return wall / n * 1e6, cpu / n * 1e6


async def ladder(url: str, op: str, n: int = 400, rounds: int = 9) -> Ladder:
    """Interleaved steps that each add one thing to the floor (see LADDER), for *op*."""
    cfg = config(url)
    ours = AsyncBudgetManager(cfg)
    offline = AsyncBudgetManager(cfg)
    floor = same_async_pool_client(cfg)
    try:
        await _public(ours, op)
        await _public(offline, op)
        driver: Any = ours._driver
        real = driver._evalsha
        seen: dict[str, Any] = {}

        async def spy(keys: list[Any], args: list[Any]) -> Any:
            seen.update(keys=list(keys), args=list(args))
            reply = await real(keys, args)
            seen["reply"] = reply
            return reply

        driver._evalsha = spy
        await _public(ours, op)
        driver._evalsha = real

        async def stub(keys: list[Any], args: list[Any]) -> Any:
            return seen["reply"]  # the day booked: every op's success (commit's too)

        offline_driver: Any = offline._driver
        offline_driver._evalsha = stub
        trivial = floor.register_script("return 1")
        calls = FLOOR_CALLS[op]

        async def floor_op() -> None:
            for _ in range(calls):
                await trivial()

        steps: dict[str, Callable[[], Awaitable[object]]] = {"floor": floor_op}
        if calls == 1:  # replaying a reserve's args would take the retry path: not the same
            steps["floor, ours' args"] = lambda: trivial(keys=seen["keys"], args=seen["args"])
            steps["our script, direct"] = lambda: real(seen["keys"], seen["args"])
        steps["driver, unshielded"] = lambda: _unshielded(ours, op)
        steps["ours"] = lambda: _public(ours, op)
        steps["driver, no I/O"] = lambda: _unshielded(offline, op)
        steps["ours, no I/O"] = lambda: _public(offline, op)
        walls: dict[str, list[float]] = {name: [] for name in steps}
        cpus: dict[str, list[float]] = {name: [] for name in steps}
        for _ in range(rounds):
            for name, fn in steps.items():
                us, cpu = await _per_call(fn, n)
                walls[name].append(us)
                cpus[name].append(cpu)
        return Ladder(
            op,
            {name: statistics.median(v) for name, v in walls.items()},
            {name: statistics.median(v) for name, v in cpus.items()},
            {name: await _turns(fn) for name, fn in steps.items()},
        )
    finally:
        await ours.aclose()
        await offline.aclose()
        await floor.aclose()
        await floor.connection_pool.disconnect()


async def asyncio_costs(url: str, n: int = 20000) -> dict[str, float]:
    """µs per call of the asyncio machinery a write adds, on this loop, no I/O."""

    async def nothing() -> int:
        return 1

    manager = AsyncBudgetManager(config(url))  # never connected: only its driver's write()
    write: Any = manager._driver.write

    async def plain() -> None:
        await nothing()

    async def task() -> None:
        await asyncio.ensure_future(nothing())

    async def shield() -> None:
        await write(nothing())

    lock = asyncio.Lock()

    async def locked() -> None:
        async with lock:
            await nothing()

    out = {}
    for name, fn in (
        ("await a coroutine", plain),
        ("await a new task", task),
        ("the driver's write() (a task + asyncio.shield)", shield),
        ("asyncio.Lock acquire + release", locked),
    ):
        await fn()
        start = time.perf_counter()
        for _ in range(n):
            await fn()
        out[name] = (time.perf_counter() - start) / n * 1e6
    return out


async def profile(url: str, op: str = "record_spend", n: int = 5000, top: int = 22) -> str:
    """cProfile of *n* sequential calls on the loop, the *top* entries by own time."""
    m = AsyncBudgetManager(config(url))
    try:
        await _public(m, op)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(n):
            await _public(m, op)
        prof.disable()
    finally:
        await m.aclose()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    text = out.getvalue()
    table = text[text.index("   ncalls") :]
    for prefix in sorted({p for p in sys.path if p}, key=len, reverse=True):
        table = table.replace(prefix + "/", "")
    return table.rstrip()


# -- rendering -------------------------------------------------------------------------------


def section(res: Results, info: dict[str, str], extra: str = "") -> str:
    lines = [
        TITLE,
        "",
        "`python -m benchmarks.async_ops --write` (rewrites this section only; "
        f"{res.seconds:g} s per run, {res.rounds} rounds, ours and the floor alternating "
        "within each round). `AsyncBudgetManager` on one asyncio event loop against the "
        "**async floor**: one EVALSHA of a registered `return 1` through `redis.asyncio` per "
        "round trip ours makes (two for reserve + commit), each on its own "
        "`redis.asyncio.BlockingConnectionPool` built with `_pool_kwargs` (the manager's "
        "settings: 32 connections, so 64 tasks queue for them alike), against one real "
        "redis-server started by the run. Task i acts as user u<i>. Ratios are the median of "
        "the rounds' side-by-side ratios: *latency* compares median call latencies, *time per "
        "op* compares wall time per completed call (1 / throughput), *CPU* compares this "
        "process's CPU time per call (the server's time is not in it).",
        "",
        "| machine | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in info.items()],
        "",
    ]
    at_one = {op: res.ratio(op, 1, "p50_us") for op in OPS}
    met = all(r <= MAX_FLOOR_RATIO for r in at_one.values())
    lines += [
        "| target | measured | |",
        "|---|---|---|",
        f"| ours / floor <= {MAX_FLOOR_RATIO} at 1 task (median latency, median of rounds) | "
        + ", ".join(
            f"{OP_TITLES[op]} {r:.2f} (rounds {min(res.paired(op, 1, 'p50_us')):.2f}-"
            f"{max(res.paired(op, 1, 'p50_us')):.2f})"
            for op, r in at_one.items()
        )
        + "; by CPU per call: "
        + ", ".join(f"{OP_TITLES[op]} {res.ratio(op, 1, 'cpu_us'):.2f}" for op in OPS)
        + f" | {'met' if met else '**not met**'} |",
        "",
        "| operation | tasks | ours ops/s | p50 µs | p99 µs | floor ops/s | p50 µs | p99 µs "
        "| latency ours / floor | time per op ours / floor | CPU ours / floor "
        "| server µs/op ours / floor |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for op in OPS:
        for tasks in TASKS:

            def med(subject: str, measure: str, op: str = op, tasks: int = tasks) -> float:
                return res.median(op, tasks, subject, measure)

            lines.append(
                f"| {OP_TITLES[op]} | {tasks} "
                f"| {med('ours', 'ops_per_s'):,.0f} | {med('ours', 'p50_us'):.0f} "
                f"| {med('ours', 'p99_us'):.0f} "
                f"| {med('floor', 'ops_per_s'):,.0f} | {med('floor', 'p50_us'):.0f} "
                f"| {med('floor', 'p99_us'):.0f} "
                f"| **{res.ratio(op, tasks, 'p50_us'):.2f}** "
                f"| {res.ratio(op, tasks, 'us_per_op'):.2f} "
                f"| {res.ratio(op, tasks, 'cpu_us'):.2f} "
                f"| {med('ours', 'server_us'):.1f} / {med('floor', 'server_us'):.1f} |"
            )
    lines += [
        "",
        "(ops/s, p50 and p99: the median over rounds.)",
        "",
        "Reading the 64-task rows: `redis.asyncio`'s BlockingConnectionPool gives a released "
        "connection to whichever task asks next, not to the task that waited longest. A task "
        "that asks again without yielding to the loop in between (the floor) takes its "
        "connection straight back, so 32 tasks keep the 32 connections and the others wait "
        "until the run ends or the pool's 0.5 s timeout fails them; ours takes turns first "
        "come, first served (the driver's gate), so every task is served and its p50 is the "
        "wait of all 64. Compare *time per op* (throughput) at 64 tasks, and see the "
        "starvation runs below.",
        "",
        *starvation(res),
        "",
        f"Event-loop lag: how late a task sleeping {TICK * 1e3:g} ms at a time woke up "
        "(worst, and the median over rounds of each run's p99), during the timed runs. The "
        f"longest callback is from one untimed {HOLD_SECONDS:g} s run per row with every "
        "callback the loop ran timed (each step of a task is one callback), as this thread's "
        "CPU time (how long the "
        "code held the loop) and as wall time (preemption and other threads holding the GIL "
        "included), ms; in the same run, how often the garbage collector ran and its longest "
        "run (CPU ms), which holds the loop like any callback:",
        "",
        "| while | worst lag | p99 lag | longest callback CPU | longest callback wall "
        "| GC runs | longest GC |",
        "|---|--:|--:|--:|--:|--:|--:|",
        f"| the loop idle (the ticker alone, {res.seconds * 2:g} s) "
        f"| {res.idle_lag_ms[0]:.2f} | {res.idle_lag_ms[1]:.2f} | | | | |",
    ]
    for op in OPS:
        for tasks in TASKS:
            for name in SUBJECTS:
                runs = res.runs[(op, tasks, name)]
                worst = max(r.lag_max_ms for r in runs)
                p99 = statistics.median(r.lag_p99_ms for r in runs)
                cpu, wall, runs_gc, gc_ms = res.holds[(op, tasks, name)]
                lines.append(
                    f"| {name}: {OP_TITLES[op]}, {tasks} task{'s' if tasks > 1 else ''} "
                    f"| {worst:.2f} | {p99:.2f} | {cpu:.2f} | {wall:.2f} | {runs_gc} "
                    f"| {gc_ms:.2f} |"
                )
    took, worst, p99 = res.cold_lag_ms
    cpu, wall = res.cold_hold_ms
    # A first call shorter than a tick gives the ticker nothing to measure.
    lag = f"{worst:.2f} | {p99:.2f}" if took > 2 * TICK * 1e3 else "(shorter than a tick) |"
    lines.append(
        f"| a new manager's first call ({took:.1f} ms: the store opened in a worker thread, "
        f"connect and handshake awaited) | {lag} | {cpu:.2f} | {wall:.2f} | | |"
    )
    if res.pricing_lag_ms is not None:
        took, worst, p99 = res.pricing_lag_ms
        cpu, wall = res.pricing_hold_ms or (float("nan"), float("nan"))
        lines.append(
            f"| `await budget.load_pricing()` ({took:.0f} ms: litellm imported in a worker "
            f"thread) | {worst:.2f} | {p99:.2f} | {cpu:.2f} | {wall:.2f} | | |"
        )
    lines += [
        "",
        f"Worst lag over every timed run: ours {res.worst_lag('ours'):.2f} ms, the floor "
        f"{res.worst_lag('floor'):.2f} ms.",
    ]
    if extra:
        lines += ["", extra]
    return "\n".join(lines) + "\n"


def starvation(res: Results) -> list[str]:
    """The long runs: who got a connection, and who failed waiting for one."""
    tasks = TASKS[-1]
    lines = [
        f"Starvation: {tasks} tasks for {res.long_seconds:g} s each (longer than the pool's "
        "0.5 s timeout), one run per row: calls completed, calls that failed waiting for a pool "
        "connection, calls completed per task, and the slowest call that completed.",
        "",
        "| operation | subject | calls | errors | per task: fewest / median / most | slowest ms |",
        "|---|---|--:|--:|--:|--:|",
    ]
    for op in OPS:
        for name in SUBJECTS:
            r = res.long_runs[(op, name)]
            few, mid, most = r.task_calls
            lines.append(
                f"| {OP_TITLES[op]} | {name} | {r.ops:,} | {r.errors} | {few} / {mid} / {most} "
                f"| {r.max_us / 1e3:.0f} |"
            )
    errors = sum(r.errors for run_list in res.runs.values() for r in run_list)
    lines += ["", f"Errors in the timed runs above: {errors}."]
    return lines


def ladder_text(ladders: list[Ladder], costs: dict[str, float], prof: str) -> str:
    lines = [
        "Where the time goes (one task, sequential calls, median of interleaved rounds, "
        "µs per call as *wall / client CPU*, then the event loop's iterations per call):",
        "",
        "| step | what it is |" + "".join(f" {OP_TITLES[ld.op]} |" for ld in ladders),
        "|---|---|" + "--:|" * len(ladders),
    ]
    for step, what in LADDER.items():
        cells = "".join(
            f" {ld.us[step]:.1f} / {ld.cpu_us[step]:.1f} ({ld.turns[step]:g}) |"
            if step in ld.us
            else " n/a |"
            for ld in ladders
        )
        lines.append(f"| {step} | {what} |{cells}")
    lines += [
        "",
        "asyncio machinery on this loop, no I/O, µs per call: "
        + ", ".join(f"{k} {v:.1f}" for k, v in costs.items())
        + ".",
        "",
        "cProfile of `record_spend` (5000 sequential calls; own time, biggest first):",
        "",
        "```",
        prof,
        "```",
    ]
    return "\n".join(lines)


def machine(url: str) -> dict[str, str]:
    """The report's machine facts, and the event loop."""
    from benchmarks.report import machine as report_machine

    info = report_machine(url)
    info["event loop"] = f"asyncio ({type(asyncio.new_event_loop()).__name__})"
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=0.3, help="per run")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument(
        "--long-seconds", type=float, default=LONG_SECONDS, help="per starvation run"
    )
    parser.add_argument("--profile", action="store_true", help="add where the time goes")
    parser.add_argument("--write", action="store_true", help=f"update {RESULTS.name}")
    args = parser.parse_args()
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

    from tests.redis_server import RedisServer

    server = RedisServer()
    server.start()
    try:
        info = machine(server.url)
        print("async ops...", file=sys.stderr)
        res = asyncio.run(measure(server.url, args.seconds, args.rounds, args.long_seconds))
        extra = ""
        if args.profile:
            print("where the time goes...", file=sys.stderr)

            async def breakdown() -> str:
                ladders = [await ladder(server.url, op) for op in OPS]
                costs = await asyncio_costs(server.url)
                prof = await profile(server.url)
                return ladder_text(ladders, costs, prof)

            extra = asyncio.run(breakdown())
    finally:
        server.stop()
    text = section(res, info, extra)
    print(text)
    if args.write:
        from benchmarks.report import write_section

        write_section(TITLE, text, RESULTS)
        print(f"wrote the section to {RESULTS}", file=sys.stderr)


if __name__ == "__main__":
    main()
