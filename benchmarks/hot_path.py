"""
Where a call's time goes: the gap between ours and the floor, taken apart.

``python -m benchmarks.hot_path`` prints, for each operation, a ladder of
interleaved timings that each add one thing to the floor (see ``STEPS``) and
the cProfile entries that cost most, so that a proposed change to the hot path
can be judged by how much of the gap it could close. The report includes the
ladder, the server's own time per EVALSHA (``usec_per_call``) and the profile.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import attrs
import redis

from benchmarks._subjects import COST, PROJECT, Ours, config, same_pool_client
from coreason_budget import BudgetManager

STEPS = {
    "floor": "EVALSHA of `return 1`, no keys or args",
    "floor, ours' args": "the same script sent ours' exact KEYS and ARGV",
    "our script, direct": "our ledger script with those KEYS and ARGV, no Python wrapper",
    "ours": "the public call (argument checks, scopes, key names, reply parsing)",
    "ours, no I/O": "the public call with the script stubbed: our Python alone",
}

CALLS: dict[str, Callable[[BudgetManager], object]] = {
    "check": lambda m: m.check_availability("u-prof", COST, project_id=PROJECT),
    "record_spend": lambda m: m.record_spend("u-prof", COST, project_id=PROJECT),
    "usage": lambda m: m.usage("u-prof", PROJECT),
}


@attrs.frozen
class Ladder:
    op: str
    us: dict[str, float]  # step -> median over rounds of wall microseconds per call
    cpu_us: dict[str, float]  # step -> median over rounds of client CPU + server CPU per call
    server_us: dict[str, float]  # "ours" / "floor" -> server usec per EVALSHA


def _captured(manager: BudgetManager, call: Callable[[BudgetManager], object]) -> Any:
    """The exact keys and args ours sends for *call* (the last of them)."""
    ledger: Any = manager._driver
    real = ledger._evalsha
    seen: dict[str, Any] = {}

    def spy(keys: list[str], args: list[str]) -> Any:
        seen.update(keys=list(keys), args=list(args))
        return real(keys, args)

    ledger._evalsha = spy
    try:
        call(manager)
    finally:
        ledger._evalsha = real
    return seen


def _stubbed(manager: BudgetManager, reply: list[Any]) -> BudgetManager:
    """A manager whose ledger never leaves the process: times our Python alone."""
    ledger: Any = manager._driver
    ledger._evalsha = lambda keys, args: reply
    return manager


def _per_call(fn: Callable[[], object], n: int, admin: redis.Redis) -> tuple[float, float]:
    """Wall time and CPU time (this process's, plus the server's EVALSHA time) per call, µs.

    CPU time is what a call costs whatever else the machine is doing, so on a
    loaded, shared machine it separates ours from the floor more reliably than
    the wall clock; EVALSHA's usec already includes the commands its script ran.
    """
    fn()
    admin.config_resetstat()
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(n):
        fn()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    stats = admin.info("commandstats")
    server = sum(float(stats.get(f"cmdstat_{c}", {}).get("usec", 0)) for c in ("evalsha", "eval"))
    return wall / n * 1e6, (cpu * 1e6 + server) / n


def ladder(url: str, op: str, n: int = 400, rounds: int = 9) -> Ladder:
    cfg = config(url)
    ours = Ours(cfg)
    offline = Ours(cfg)
    client = same_pool_client(cfg)
    admin = redis.Redis.from_url(url, decode_responses=True)
    try:
        call = CALLS[op]
        sent = _captured(ours.manager, call)
        real_reply = ours.manager._driver._evalsha(sent["keys"], sent["args"])
        _stubbed(offline.manager, real_reply)
        trivial = client.register_script("return 1")
        script: Any = ours.manager._driver._evalsha
        steps: dict[str, Callable[[], object]] = {
            "floor": lambda: trivial(),
            "floor, ours' args": lambda: trivial(keys=sent["keys"], args=sent["args"]),
            "our script, direct": lambda: script(sent["keys"], sent["args"]),
            "ours": lambda: call(ours.manager),
            "ours, no I/O": lambda: call(offline.manager),
        }
        walls: dict[str, list[float]] = {name: [] for name in steps}
        cpus: dict[str, list[float]] = {name: [] for name in steps}
        for _ in range(rounds):
            for name, fn in steps.items():
                us, cpu = _per_call(fn, n, admin)
                walls[name].append(us)
                cpus[name].append(cpu)
        # Medians, not minima: a round that happens to run client and server on one
        # core is far faster, and a minimum would compare one step's lucky round
        # with another's ordinary ones.
        wall_us = {name: statistics.median(v) for name, v in walls.items()}
        cpu_us = {name: statistics.median(v) for name, v in cpus.items()}
        server = {}
        for name, fn in (("floor", steps["floor"]), ("ours", steps["our script, direct"])):
            admin.config_resetstat()
            for _ in range(500):
                fn()
            server[name] = float(admin.info("commandstats")["cmdstat_evalsha"]["usec_per_call"])
        return Ladder(op, wall_us, cpu_us, server)
    finally:
        for closing in (ours.close, offline.close, client.close, admin.close):
            closing()


def profile(url: str, op: str = "check", n: int = 5000, top: int = 18) -> str:
    """cProfile of *n* calls, the *top* entries by own time, as text."""
    ours = Ours(config(url))
    try:
        call = CALLS[op]
        call(ours.manager)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(n):
            call(ours.manager)
        prof.disable()
    finally:
        ours.close()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    text = out.getvalue()
    # Keep the table, drop the preamble and make paths short.
    table = text[text.index("   ncalls") :]
    for prefix in sorted({p for p in sys.path if p}, key=len, reverse=True):
        table = table.replace(prefix + "/", "")
    return table.rstrip()


def main() -> None:
    from tests.redis_server import RedisServer

    server = RedisServer()
    server.start()
    try:
        for op in CALLS:
            result = ladder(server.url, op)
            print(f"\n{op}:")
            for step, us in result.us.items():
                cpu = result.cpu_us[step]
                print(f"  {step:22s} {us:7.1f} us wall {cpu:7.1f} us cpu   {STEPS[step]}")
            print(f"  server time per EVALSHA: {result.server_us}")
        print("\n" + profile(server.url))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
