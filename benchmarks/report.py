"""
``python -m benchmarks.report``: run every benchmark and rewrite ``benchmarks/RESULTS.md``.

One command, one run, so every ratio in the file compares numbers taken on the
same machine under the same load: absolute times on a shared machine are noise,
ratios measured side by side are not. Takes about 3-4 minutes on 2 cores
(``--quick`` for a rough pass in about half that).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any, TypeVar

import redis
import redis.utils

from benchmarks import contention, hot_path, startup
from benchmarks._harness import Run, interleaved
from benchmarks._roundtrips import Trips, count
from benchmarks._subjects import (
    COMPARED,
    FLOOR_CALLS,
    OP_TITLES,
    OPS,
    Subjects,
    build_subjects,
)
from tests.redis_server import RedisServer

HERE = Path(__file__).resolve().parent
T = TypeVar("T")
THREADS = (1, 4, 16)
#: The spec's targets.
MAX_FLOOR_RATIO = 1.25
MAX_IMPORT_MS = 150
MIN_PRICING_SPEEDUP = 20


def machine(url: str) -> dict[str, str]:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    client = redis.Redis.from_url(url)
    server = client.info("server")
    client.close()
    return {
        "date (UTC)": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M"),
        "cores": str(os.cpu_count()),
        "CPU": cpu,
        "load average at start": " ".join(f"{x:.1f}" for x in os.getloadavg()),
        "Python": platform.python_version(),
        "Redis server": str(server["redis_version"]),
        "redis-py": version("redis") + (" + hiredis" if redis.utils.HIREDIS_AVAILABLE else ""),
        "limits": version("limits"),
        "litellm": version("litellm"),
    }


def pytest_benchmarks(max_time: float) -> tuple[dict[str, Any], int]:
    """Run ``pytest benchmarks --benchmark-only`` and return its JSON and exit status."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                str(HERE),
                "--benchmark-only",
                f"--benchmark-json={out}",
                f"--benchmark-max-time={max_time}",
                "-q",
                "-p",
                "no:cacheprovider",
            ],
            cwd=HERE.parent,
            capture_output=True,
            text=True,
        )
        data = json.loads(out.read_text()) if out.exists() else {"benchmarks": []}
    if proc.returncode:
        print(proc.stdout[-3000:], file=sys.stderr)
    return data, proc.returncode


def speed_tables(
    url: str, seconds: float, rounds: int
) -> tuple[dict[Any, Run], dict[Any, Trips], dict[str, list[float]]]:
    """
    The best run of each (op, subject, threads), round trips per (op, subject), and
    ours / floor per round at one thread, per op.
    """
    subjects = build_subjects(url)
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        trips = {
            (op, name): count(client, subjects.op(name, op, "u-trips"))
            for op in OPS
            for name in COMPARED
        }
        runs: dict[Any, Run] = {}
        paired: dict[str, list[float]] = {}
        for op in OPS:
            for threads in THREADS:
                makers = {name: _maker(subjects, name, op) for name in COMPARED}
                print(f"  {op}, {threads} threads", file=sys.stderr)
                measured = interleaved(makers, threads, seconds, rounds)
                for name, result in measured.best().items():
                    runs[(op, name, threads)] = result
                if threads == 1:
                    paired[op] = measured.paired("ours", "floor")
        return runs, trips, paired
    finally:
        client.close()
        subjects.close()


def _maker(subjects: Subjects, name: str, op: str) -> Callable[[int], Callable[[], object]]:
    """Thread i acts as user u<i>: threads share the project and global counters only."""
    return lambda i: subjects.op(name, op, f"u{i}")


# -- rendering --------------------------------------------------------------------------


def op_section(op: str, runs: dict[Any, Run], trips: dict[Any, Trips]) -> str:
    head = "| | round trips | server commands |" + "".join(
        f" {t} thr ops/s | p50 µs | p99 µs |" for t in THREADS
    )
    floor = f"floor = {FLOOR_CALLS[op]} EVALSHA" + ("s" if FLOOR_CALLS[op] > 1 else "")
    lines = [
        f"### {OP_TITLES[op]} ({floor})",
        "",
        head,
        "|---|--:|--:|" + "--:|--:|--:|" * len(THREADS),
    ]
    for name in COMPARED:
        t = trips[(op, name)]
        cells = "".join(
            f" {r.ops_per_s:,.0f} | {r.p50_us:.0f} | {r.p99_us:.0f} |"
            for r in (runs[(op, name, n)] for n in THREADS)
        )
        lines.append(f"| {name} | {t.round_trips:g} | {t.server_commands:g} |{cells}")
    lines += ["", "| time per op, ratio |" + "".join(f" {t} thr |" for t in THREADS)]
    lines.append("|---|" + "--:|" * len(THREADS))
    for other, label in (
        ("floor", "ours / floor"),
        ("limits", "limits / ours"),
        ("plain", "plain / ours"),
    ):
        cells = []
        for n in THREADS:
            ours, them = runs[(op, "ours", n)].ops_per_s, runs[(op, other, n)].ops_per_s
            cells.append(f" {(them / ours if other == 'floor' else ours / them):.2f} |")
        lines.append(f"| {label} |" + "".join(cells))
    lines += ["", "Commands per op, as the server counted them:", ""]
    lines += [f"- {name}: {trips[(op, name)].breakdown}" for name in COMPARED]
    return "\n".join(lines)


def floor_ratio(op: str, paired: dict[str, list[float]]) -> float:
    """
    ours / floor at one thread by median latency (floor = FLOOR_CALLS[op] EVALSHAs):
    the median over rounds of each round's side-by-side ratio, which load that
    comes and goes cannot tilt the way it can tilt two separately chosen best runs.
    """
    return statistics.median(paired[op])


def peers_beaten(runs: dict[Any, Run]) -> list[str]:
    """Every (op, threads, peer) where ours had lower throughput."""
    return [
        f"{OP_TITLES[op]} at {n} thr vs {peer} "
        f"({runs[(op, 'ours', n)].ops_per_s:,.0f} vs {runs[(op, peer, n)].ops_per_s:,.0f} ops/s)"
        for op in OPS
        for n in THREADS
        for peer in ("limits", "plain")
        if runs[(op, "ours", n)].ops_per_s <= runs[(op, peer, n)].ops_per_s
    ]


def pytest_section(data: dict[str, Any], status: int) -> tuple[str, float | None]:
    benches = data.get("benchmarks", [])
    by_group: dict[str, list[dict[str, Any]]] = {}
    for b in benches:
        by_group.setdefault(b["group"] or "", []).append(b)
    lines = [
        "Single thread, each benchmark run on its own (not interleaved), so these ratios are "
        "more exposed to load changes than the harness's. `pytest exit status: "
        f"{status}`.",
        "",
        "| operation | subject | min µs | median µs | median / floor | round trips |",
        "|---|---|--:|--:|--:|--:|",
    ]
    speedup = None
    for group in [OP_TITLES[op] for op in OPS]:
        rows = {b["param"].split("-", 1)[1]: b for b in by_group.get(group, [])}
        floor = rows.get("floor")
        for name in COMPARED:
            b = rows.get(name)
            if b is None:
                continue
            s = b["stats"]
            ratio = s["median"] / floor["stats"]["median"] if floor else float("nan")
            lines.append(
                f"| {group} | {name} | {s['min'] * 1e6:.1f} | {s['median'] * 1e6:.1f} "
                f"| {ratio:.2f} | {b['extra_info'].get('round_trips', '?')} |"
            )
    for b in benches:
        if b["name"] == "test_speed_ratio":
            speedup = b["extra_info"]["speedup"]
            lines += [
                "",
                f"`pricing.calculate`: {b['extra_info']['ours_us_per_call']} µs per call, "
                f"`litellm.cost_per_token`: {b['extra_info']['litellm_us_per_call']} µs per "
                f"call: **{speedup}x** faster, same cost to the nano-dollar on every benchmark "
                "call (asserted by `benchmarks/test_bench_pricing.py`).",
            ]
    return "\n".join(lines), speedup


def ladder_section(ladders: list[hot_path.Ladder], profile: str) -> str:
    names = list(hot_path.STEPS)
    lines = [
        "Each step adds one thing to the floor; one thread, median of interleaved rounds, µs per "
        "call as *wall / CPU*, where CPU is this process's CPU time plus the server's EVALSHA "
        "time: on a loaded, shared machine CPU time is the steadier measure of cost.",
        "",
        "| step | what it adds |" + "".join(f" {ld.op} |" for ld in ladders),
        "|---|---|" + "--:|" * len(ladders),
    ]
    for step in names:
        cells = "".join(f" {ld.us[step]:.1f} / {ld.cpu_us[step]:.1f} |" for ld in ladders)
        lines.append(f"| {step} | {hot_path.STEPS[step]} |{cells}")
    cells = "".join(
        f" {ld.server_us['floor']:.2f} / {ld.server_us['ours']:.2f} |" for ld in ladders
    )
    lines.append(f"| server µs per EVALSHA | floor / ours (commandstats usec_per_call) |{cells}")
    lines += [
        "",
        "cProfile of `check_availability` (5000 calls; own time, biggest first):",
        "",
        "```",
        profile,
        "```",
    ]
    return "\n".join(lines)


def verdict(ok: bool) -> str:
    return "met" if ok else "**not met**"


def render(
    info: dict[str, str],
    runs: dict[Any, Run],
    trips: dict[Any, Trips],
    paired: dict[str, list[float]],
    pytest_text: str,
    speedup: float | None,
    races: list[contention.Outcome],
    boot: startup.Startup,
    ladders: list[hot_path.Ladder],
    profile: str,
    args: argparse.Namespace,
) -> str:
    ratios = {op: floor_ratio(op, paired) for op in ("check", "record_spend", "reserve_commit")}
    losses = peers_beaten(runs)
    ours_races = [o for o in races if o.guard == "ours"]
    ours_exact = all(o.over_user_usd == 0 == o.over_project_usd for o in ours_races)
    peers_over = {
        o.guard: max(o.over_user_usd, o.over_project_usd) for o in races if o.guard != "ours"
    }
    targets = [
        (
            f"ours / floor <= {MAX_FLOOR_RATIO} (1 thread, median latency; floor = one "
            "EVALSHA per round trip; median of the rounds' side-by-side ratios)",
            ", ".join(
                f"{OP_TITLES[op]} {r:.2f} (rounds {min(paired[op]):.2f}-{max(paired[op]):.2f})"
                for op, r in ratios.items()
            )
            + "".join(
                f"; {OP_TITLES[op]}: {above} of {len(paired[op])} rounds above the target"
                for op in ratios
                if (above := sum(r > MAX_FLOOR_RATIO for r in paired[op]))
            )
            + "; by CPU per call (see Where the time goes): "
            + ", ".join(
                f"{OP_TITLES[ld.op]} {ld.cpu_us['ours'] / ld.cpu_us['floor']:.2f}" for ld in ladders
            ),
            all(r <= MAX_FLOOR_RATIO for r in ratios.values()),
        ),
        (
            "ours faster than both peers at every thread count (throughput)",
            "all faster" if not losses else "slower in: " + "; ".join(losses),
            not losses,
        ),
        (
            "zero overspend under contention where peers overspend",
            f"ours ${max(max(o.over_user_usd, o.over_project_usd) for o in ours_races):.2f}; "
            + ", ".join(f"{g} up to ${v:.2f}" for g, v in peers_over.items()),
            ours_exact,
        ),
        (
            f"`import coreason_budget` < {MAX_IMPORT_MS} ms",
            f"{boot.import_ms:.0f} ms",
            boot.import_ms < MAX_IMPORT_MS,
        ),
        (
            "no litellm import on the hot path",
            ", ".join(boot.litellm_modules_on_hot_path) or "none imported",
            not boot.litellm_modules_on_hot_path,
        ),
        (
            f"`pricing.calculate` >= {MIN_PRICING_SPEEDUP}x `litellm.cost_per_token`, "
            "identical results",
            f"{speedup}x" if speedup is not None else "not measured (pytest failed)",
            speedup is not None and speedup >= MIN_PRICING_SPEEDUP,
        ),
    ]
    out = [
        "# coreason-budget benchmarks",
        "",
        "Generated by `python -m benchmarks.report` "
        f"(harness: {args.seconds:g} s per run, {args.rounds} interleaved rounds: throughput "
        "from each subject's best round, ours / floor latency from the median of the rounds' "
        "side-by-side ratios). "
        "Do not edit by hand. Absolute times depend on the machine and its load; "
        "compare the ratios, which were all measured in this one run.",
        "",
        "| machine | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in info.items()],
        "",
        "## Targets",
        "",
        "| target | measured | |",
        "|---|---|---|",
        *[f"| {t} | {m} | {verdict(ok)} |" for t, m, ok in targets],
        "",
        "## What is compared",
        "",
        "Every subject does the same job over three scopes (user, project, global), against "
        "one real redis-server started by the benchmark, each on its own "
        "`redis.BlockingConnectionPool` built with `coreason_budget._store._pool_kwargs` "
        "(the manager's own pool settings), so all use the same reply parser (hiredis, a core "
        "dependency, when installed: see the machine table). Threads share one instance of "
        "each subject.",
        "",
        "- **ours**: `BudgetManager` (`check_availability`, `reserve` + `commit`, "
        "`record_spend`, `usage`).",
        "- **floor**: one EVALSHA of a registered `return 1` per round trip ours makes "
        "(two for reserve + commit).",
        "- **limits**: `limits` fixed window with cost, `RedisStorage`, one "
        "`RateLimitItemPerDay` per scope. check = `test()` each scope; record_spend = "
        "`hit()` each scope; reserve + commit = `test()` each scope with the estimate, then "
        "`hit()` each with the actual cost (it cannot hold and refund); usage = "
        "`get_window_stats()` each scope. Not atomic across scopes.",
        "- **plain**: the home-made guard: `GET` each scope's daily key, compare; "
        "`INCRBYFLOAT` each scope to charge.",
        "",
        "## Operations",
        "",
        *[op_section(op, runs, trips) + "\n" for op in OPS],
        "## Single thread, pytest-benchmark",
        "",
        pytest_text,
        "",
        "## Contention",
        "",
        f"`python -m benchmarks.contention`: {args.processes} processes x {args.threads} "
        f"threads, {args.attempts} attempts each, against {contention.USERS} users in one "
        f"project (user ${contention.USER_LIMIT_CENTS / 100:.2f}, project "
        f"${contention.PROJECT_LIMIT_CENTS / 100:.2f}), $0.01 a call; 'LLM call' is a sleep "
        "between admitting and settling. Overspend is what admitted calls cost beyond the "
        "limits. limits-hit-each hits every scope up front: it cannot overspend, but a refused "
        "call stays charged where it was admitted (see the store's total).",
        "",
        contention.table(races),
        "",
        "## Start-up",
        "",
        f"`import coreason_budget` in a fresh interpreter: **{boot.import_ms:.0f} ms** "
        f"(best of fresh runs, minus {boot.bare_ms:.0f} ms for a bare `python -c pass`). "
        "Biggest imports (`-X importtime`, cumulative, ms):",
        "",
        ", ".join(f"{name} {ms:.0f}" for name, ms in startup_rows(boot)),
        "",
        "litellm modules imported after every hot-path operation in a fresh interpreter: "
        f"{', '.join(boot.litellm_modules_on_hot_path) or 'none'}.",
        "",
        "## Where the time goes",
        "",
        ladder_section(ladders, profile),
        "",
    ]
    return "\n".join(out)


def startup_rows(boot: startup.Startup) -> list[tuple[str, float]]:
    return boot.top_imports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs, rougher numbers")
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args()
    args.seconds, args.rounds = (0.25, 1) if args.quick else (0.25, 6)
    args.processes, args.threads, args.attempts = 4, 8, 40 if args.quick else 100

    server = RedisServer()
    server.start()
    try:
        info = machine(server.url)
        print("speed tables...", file=sys.stderr)
        runs, trips, paired = speed_tables(server.url, args.seconds, args.rounds)
        print("where the time goes...", file=sys.stderr)
        ladders = [hot_path.ladder(server.url, op) for op in hot_path.CALLS]
        profile = hot_path.profile(server.url)
        print("contention...", file=sys.stderr)
        races = contention.run_all(
            server.url, args.processes, args.threads, args.attempts, call_ms=(0.0, 20.0)
        )
        print("start-up...", file=sys.stderr)
        boot = startup.measure(server.url)
    finally:
        server.stop()
    print("pytest-benchmark...", file=sys.stderr)
    data, status = pytest_benchmarks(0.2 if args.quick else 0.5)
    pytest_text, speedup = pytest_section(data, status)
    text = render(
        info, runs, trips, paired, pytest_text, speedup, races, boot, ladders, profile, args
    )
    if args.output.exists():
        text = text.rstrip("\n") + "\n" + kept_sections(args.output.read_text(encoding="utf-8"))
    args.output.write_text(text, encoding="utf-8")
    print(f"wrote {args.output}", file=sys.stderr)


#: Sections other scripts write (``benchmarks.async_ops --write``, ``benchmarks.service``,
#: ``benchmarks.windows``, ``benchmarks.memory``, ``benchmarks.user_floor``,
#: ``benchmarks.cluster``, each ``--write``):
#: a rewrite keeps them as they are.
OTHER_SCRIPTS = (
    "## Async manager vs the async floor",
    "## Service: before and after async routes",
    "## Budget windows",
    "## Memory per operation",
    "## Reserve + commit as a user measures it",
    "## Cluster: one prefix's ceiling",
)


def section_parser(doc: str | None) -> argparse.ArgumentParser:
    """The command line of a script owning one section of RESULTS.md: --write, and its own."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="update RESULTS.md")
    return parser


def on_a_server(what: str, measure: Callable[[str], T]) -> tuple[T, dict[str, str]]:
    """
    Start a redis-server, read the machine's facts, run *measure* on its URL,
    stop it: what each section-owning script does. (litellm never downloads.)
    """
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    server = RedisServer()
    server.start()
    try:
        info = machine(server.url)
        print(f"{what}...", file=sys.stderr)
        return measure(server.url), info
    finally:
        server.stop()


def publish(title: str, text: str, write: bool) -> None:
    """Print a section; with *write*, put it in RESULTS.md in place of the old one."""
    print(text)
    if write:
        path = HERE / "RESULTS.md"
        write_section(title, text, path)
        print(f"wrote the section to {path}", file=sys.stderr)


def write_section(title: str, text: str, path: Path = HERE / "RESULTS.md") -> None:
    """
    Replace the section *title* of *path* with *text* (appended when absent),
    leaving every other section as it is: for the scripts in OTHER_SCRIPTS.
    """
    current = path.read_text(encoding="utf-8")
    start = current.find(title + "\n")
    if start < 0:
        path.write_text(current.rstrip("\n") + "\n\n" + text, encoding="utf-8")
        return
    end = current.find("\n## ", start + len(title))
    rest = current[end + 1 :] if end >= 0 else ""
    path.write_text(current[:start] + text + ("\n" + rest if rest else ""), encoding="utf-8")


def kept_sections(old: str) -> str:
    """The sections of *old* that other scripts own, each up to the next ``## `` heading."""
    kept = []
    for heading in OTHER_SCRIPTS:
        start = old.find("\n" + heading + "\n")
        if start < 0:
            continue
        end = old.find("\n## ", start + 1)
        kept.append(old[start : len(old) if end < 0 else end].rstrip("\n") + "\n")
    return "".join(kept)


if __name__ == "__main__":
    main()
