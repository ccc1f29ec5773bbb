"""
Start-up cost: ``import coreason_budget`` in a fresh interpreter, and no litellm on the hot path.

A web worker imports the library at start and (under Gunicorn) again in every
forked worker's first request path, so import time is paid per process. The
time is the best of several fresh ``python -c 'import coreason_budget'`` runs
minus the best of as many ``python -c pass`` runs (interleaved, so load on a
shared machine hits both), and ``-X importtime`` names the biggest imports.
The hot-path check runs every benchmarked operation in a fresh interpreter
and reports whether anything imported litellm.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import attrs

HOT_PATH = """
import json, sys
from coreason_budget import BudgetConfig, BudgetManager
m = BudgetManager(BudgetConfig(redis_url=sys.argv[1], key_prefix="bench-import"))
m.check_availability("u", 0.01, project_id="p")
m.reserve("u", 0.01, project_id="p", model="gpt-4o").commit(0.005)
m.record_spend("u", 0.001, project_id="p", model="gpt-4o")
m.usage("u", "p")
m.close()
print(json.dumps(sorted(k for k in sys.modules if k.split(".")[0] == "litellm")[:5]))
"""


@attrs.frozen
class Startup:
    import_ms: float  # best import minus best bare interpreter
    bare_ms: float
    top_imports: list[tuple[str, float]]  # (module, cumulative ms), biggest first
    litellm_modules_on_hot_path: list[str]


def _best_ms(code: str, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, env=_env())
        out.append((time.perf_counter() - start) * 1e3)
    return out


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPROFILEIMPORTTIME", None)
    return env


def import_ms(runs: int = 9) -> tuple[float, float]:
    bare: list[float] = []
    full: list[float] = []
    for _ in range(runs):
        bare += _best_ms("pass", 1)
        full += _best_ms("import coreason_budget", 1)
    return min(full) - min(bare), min(bare)


def top_imports(n: int = 8) -> list[tuple[str, float]]:
    """Packages by cumulative import time (``-X importtime``), each at its first import."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import coreason_budget"],
        capture_output=True,
        text=True,
        check=True,
        env=_env(),
    )
    cumulative: dict[str, float] = {}
    for line in proc.stderr.splitlines():
        parts = line.removeprefix("import time:").split("|")
        if len(parts) != 3 or not parts[1].strip().isdigit():
            continue
        # A package's own line includes its submodules', so the max is the package.
        root = parts[2].strip().split(".")[0]
        cumulative[root] = max(cumulative.get(root, 0.0), int(parts[1]) / 1e3)
    return sorted(cumulative.items(), key=lambda kv: -kv[1])[:n]


def litellm_on_hot_path(url: str) -> list[str]:
    proc = subprocess.run(
        [sys.executable, "-c", HOT_PATH, url], capture_output=True, text=True, check=True
    )
    return list(json.loads(proc.stdout.strip().splitlines()[-1]))


def measure(url: str) -> Startup:
    ms, bare = import_ms()
    return Startup(ms, bare, top_imports(), litellm_on_hot_path(url))


def main() -> None:
    from tests.redis_server import RedisServer

    server = RedisServer()
    server.start()
    try:
        result = measure(server.url)
    finally:
        server.stop()
    print(
        f"import coreason_budget: {result.import_ms:.0f} ms (bare python {result.bare_ms:.0f} ms)"
    )
    for name, ms in result.top_imports:
        print(f"  {name:40s} {ms:7.1f} ms cumulative")
    print(
        f"litellm modules imported on the hot path: {result.litellm_modules_on_hot_path or 'none'}"
    )


if __name__ == "__main__":
    main()
