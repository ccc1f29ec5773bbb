"""
PricingEngine.calculate against litellm.cost_per_token on the same inputs.

Run with ``pytest benchmarks/test_bench_pricing.py --benchmark-only``. Each
benchmark also checks that both give the same cost, to the nano-dollar, and
``test_speed_ratio`` prints and records how many times faster we are (the spec
asks for at least 20x). Timing assertions live here only, never in tests/.
"""

from __future__ import annotations

import os
import timeit
from collections.abc import Callable
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

import pytest

from coreason_budget._pricing import PricingEngine

MIN_SPEEDUP = 20

#: Chat calls of several shapes: plain, cache reads, a long-context tier, provider prefixes.
CALLS = [
    ("gpt-4o", 1200, 350, 0),
    ("gpt-4o", 1000, 100, 400),
    ("gpt-4o-mini", 300, 50, 0),
    ("gpt-4", 1200, 350, 0),
    ("claude-sonnet-4-5", 5000, 800, 2000),
    ("azure/gpt-4o", 2000, 500, 0),
    ("gemini/gemini-2.5-pro", 250_000, 2000, 10_000),
]


@pytest.fixture(scope="module")
def litellm() -> Any:
    # Never fetch the price map: benchmarks run offline too.
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    module = pytest.importorskip("litellm")
    module.suppress_debug_info = True
    return module


@pytest.fixture(scope="module")
def calls(litellm: Any) -> list[tuple[str, int, int, int]]:
    present = [c for c in CALLS if c[0] in litellm.model_cost]
    assert len(present) >= 4, "litellm's table lost the benchmark models"
    return present


@pytest.fixture(scope="module")
def engine(calls: list[tuple[str, int, int, int]]) -> PricingEngine:
    engine = PricingEngine()
    for call in calls:  # warm: the benchmark measures the steady state
        engine.calculate(*call)
    return engine


def ours(engine: PricingEngine, calls: list[tuple[str, int, int, int]]) -> Callable[[], list[Any]]:
    """What is timed for us: calculate(), returning USD as a Decimal."""
    calculate = engine.calculate

    def run() -> list[Any]:
        return [calculate(m, i, o, c) for m, i, o, c in calls]

    return run


def theirs(litellm: Any, calls: list[tuple[str, int, int, int]]) -> Callable[[], list[Any]]:
    """What is timed for litellm: cost_per_token() alone, returning two floats."""
    cost_per_token = litellm.cost_per_token

    def run() -> list[Any]:
        return [
            cost_per_token(model=m, prompt_tokens=i, completion_tokens=o, cache_read_input_tokens=c)
            for m, i, o, c in calls
        ]

    return run


def assert_identical(our_costs: list[Decimal], their_costs: list[tuple[float, float]]) -> None:
    """Same cost to the nano-dollar. litellm's floats are rounded to the nearest nano: their
    noise is far below half a nano, and these costs are whole nanos, so this recovers litellm's
    exact answer."""
    for ours_usd, (prompt, completion) in zip(our_costs, their_costs, strict=True):
        usd = Decimal(repr(prompt)) + Decimal(repr(completion))
        assert ours_usd == usd.quantize(Decimal("1e-9"), rounding=ROUND_HALF_EVEN)


def test_bench_calculate(benchmark: Any, engine: PricingEngine, litellm: Any, calls: Any) -> None:
    benchmark.group = "price a call"
    result = benchmark(ours(engine, calls))
    assert_identical(result, theirs(litellm, calls)())


def test_bench_litellm_cost_per_token(
    benchmark: Any, engine: PricingEngine, litellm: Any, calls: Any
) -> None:
    benchmark.group = "price a call"
    result = benchmark(theirs(litellm, calls))
    assert_identical(ours(engine, calls)(), result)


def test_speed_ratio(benchmark: Any, engine: PricingEngine, litellm: Any, calls: Any) -> None:
    """Both timed the same way (best of 5 runs), so the ratio does not depend on benchmark mode."""
    run_ours, run_theirs = ours(engine, calls), theirs(litellm, calls)
    assert_identical(run_ours(), run_theirs())
    benchmark.group = "speed ratio"
    benchmark(run_ours)

    def per_call(run: Callable[[], object], number: int) -> float:
        return min(timeit.repeat(run, number=number, repeat=5)) / number / len(calls)

    ours_s = per_call(run_ours, 2000)
    theirs_s = per_call(run_theirs, 50)
    ratio = theirs_s / ours_s
    benchmark.extra_info.update(
        ours_us_per_call=round(ours_s * 1e6, 3),
        litellm_us_per_call=round(theirs_s * 1e6, 3),
        speedup=round(ratio, 1),
    )
    print(
        f"\ncalculate: {ours_s * 1e6:.2f} us/call, litellm.cost_per_token: "
        f"{theirs_s * 1e6:.1f} us/call -> {ratio:.0f}x faster"
    )
    assert ratio >= MIN_SPEEDUP
