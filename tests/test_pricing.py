"""
Tests of PricingEngine: exact prices, litellm agreement over its whole table, overrides, estimates.

Tests that need litellm skip without it; none of them may touch the network, and
the conftest sets ``LITELLM_LOCAL_MODEL_COST_MAP`` so importing litellm does not.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
from decimal import ROUND_CEILING, ROUND_HALF_EVEN, Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coreason_budget import _pricing
from coreason_budget._pricing import PricingEngine
from coreason_budget.exceptions import (
    BudgetError,
    ConfigError,
    InvalidInputError,
    UnknownModelError,
)

NANO = Decimal(10**9)
REPO = Path(__file__).resolve().parent.parent


def ceil_nano(usd: Decimal) -> int:
    return int((usd * NANO).to_integral_value(rounding=ROUND_CEILING))


def d(value: float) -> Decimal:
    """A table float as the decimal it was written as."""
    return Decimal(repr(value))


@pytest.fixture(scope="module")
def litellm() -> Any:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    return pytest.importorskip("litellm")


@pytest.fixture(scope="module")
def engine(litellm: Any) -> PricingEngine:
    """One engine per module: the table is built once, as in production."""
    return PricingEngine()


def synthetic_engine(model_cost: dict[str, Any], *, fireworks_ratio: float = 0.5) -> PricingEngine:
    """An engine over a made-up table, so rules are tested independently of litellm's data."""
    fake = SimpleNamespace(
        model_cost=model_cost,
        constants=SimpleNamespace(FIREWORKS_AI_DEFAULT_CACHE_READ_RATE_RATIO=fireworks_ratio),
    )
    engine = PricingEngine()
    engine._table = _pricing._Table(fake)
    return engine


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "LITELLM_LOCAL_MODEL_COST_MAP"}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env=env,
        check=False,
    )


class TestLazyImport:
    """litellm is heavy (seconds to import): only a lookup that needs it may import it."""

    def test_importing_the_module_does_not_import_litellm(self) -> None:
        result = run_python(
            """
            import sys
            import coreason_budget._pricing
            assert "litellm" not in sys.modules, "importing _pricing imported litellm"
            print("ok")
            """
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "ok"

    def test_overridden_models_are_priced_without_litellm(self, tmp_path: Path) -> None:
        prices = tmp_path / "prices.json"
        prices.write_text('{"local-llama": {"input_per_mtok": 0, "output_per_mtok": 0}}')
        result = run_python(
            f"""
            import sys
            from coreason_budget._pricing import PricingEngine
            engine = PricingEngine({str(prices)!r})
            engine.set_price("mine", input_per_mtok=1, output_per_mtok=2)
            assert engine.calculate_nano("local-llama", 10, 10) == 0
            assert engine.calculate_nano("mine", 10**6, 10**6) == 3 * 10**9
            assert "litellm" not in sys.modules
            print("ok")
            """
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "ok"

    def test_first_use_is_silent_and_offline(self, litellm: Any) -> None:
        """A fresh process: importing litellm through us prints nothing and fetches no price map."""
        result = run_python(
            """
            import socket
            def no_network(*args, **kwargs):
                raise AssertionError(f"network access: {args!r}")
            socket.socket.connect = no_network
            socket.getaddrinfo = no_network
            from coreason_budget._pricing import PricingEngine
            from coreason_budget.exceptions import UnknownModelError
            engine = PricingEngine()
            engine.set_price("meta-llama/Llama-3-70b", input_per_mtok=1, output_per_mtok=1)
            engine.calculate("gpt-4o", 1200, 350, 100)
            engine.estimate("gpt-4o", [{"role": "user", "content": "hi"}], 10)
            engine.estimate("meta-llama/Llama-3-70b", [{"role": "user", "content": "hi"}], 10)
            try:
                engine.calculate("no-such-model-xyz", 1, 1)
            except UnknownModelError:
                pass
            """
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout == ""
        assert result.stderr == ""


class TestCalculate:
    """Known prices, model-name forms and the exact arithmetic."""

    def test_gpt4_known_price(self, engine: PricingEngine) -> None:
        # gpt-4: $30 / $60 per million tokens.
        cost = engine.calculate(model="gpt-4", input_tokens=1200, output_tokens=350)
        assert cost == Decimal("0.057")
        assert cost.as_tuple().exponent == -9  # quantized to the nano-dollar
        assert engine.calculate_nano("gpt-4", 1200, 350) == 57_000_000

    def test_calculate_is_calculate_nano_in_usd(self, engine: PricingEngine) -> None:
        for args in [("gpt-4o", 1, 1, 0), ("gpt-4o-mini", 12345, 678, 90), ("gpt-4", 0, 0, 0)]:
            assert engine.calculate(*args) == Decimal(engine.calculate_nano(*args)) / NANO

    def test_cached_tokens_are_part_of_input_and_priced_as_cache_reads(
        self, engine: PricingEngine, litellm: Any
    ) -> None:
        entry = litellm.model_cost["gpt-4o"]
        expected = (
            900 * d(entry["input_cost_per_token"])
            + 300 * d(entry["cache_read_input_token_cost"])
            + 350 * d(entry["output_cost_per_token"])
        )
        assert engine.calculate("openai/gpt-4o", 1200, 350, cached_input_tokens=300) == expected
        assert engine.calculate("gpt-4o", 1200, 350, 300) < engine.calculate("gpt-4o", 1200, 350)

    def test_model_without_cache_price_bills_cache_reads_as_input(
        self, engine: PricingEngine, litellm: Any
    ) -> None:
        assert "cache_read_input_token_cost" not in litellm.model_cost["gpt-4"]
        assert engine.calculate("gpt-4", 1000, 10, 1000) == engine.calculate("gpt-4", 1000, 10)

    @pytest.mark.parametrize(
        ("written", "entry"),
        [
            ("gpt-4o-mini", "gpt-4o-mini"),  # bare
            ("openai/gpt-4o", "gpt-4o"),  # provider prefix, bare entry
            ("anthropic/claude-sonnet-4-5", "claude-sonnet-4-5"),
            ("azure/gpt-4o", "azure/gpt-4o"),  # prefixed entry of its own
            ("gemini/gemini-2.5-pro", "gemini/gemini-2.5-pro"),
            ("gpt-4o-2024-08-06", "gpt-4o-2024-08-06"),  # dated entry keeps its own price
            ("anthropic/claude-sonnet-4-5-20250929", "claude-sonnet-4-5-20250929"),
            ("gpt-4o-2099-01-31", "gpt-4o"),  # a snapshot newer than the table: its family
            ("openai/gpt-4o-mini-20991231", "gpt-4o-mini"),
        ],
    )
    def test_model_names_as_users_write_them(
        self, engine: PricingEngine, litellm: Any, written: str, entry: str
    ) -> None:
        if entry not in litellm.model_cost:
            pytest.skip(f"{entry} is not in this litellm's table")
        prices = litellm.model_cost[entry]
        expected = 1000 * d(prices["input_cost_per_token"]) + 100 * d(
            prices["output_cost_per_token"]
        )
        assert engine.calculate(written, 1000, 100) == expected

    def test_long_context_threshold(self, engine: PricingEngine, litellm: Any) -> None:
        entry = litellm.model_cost["gemini/gemini-2.5-pro"]
        at = engine.calculate("gemini/gemini-2.5-pro", 200_000, 1000)
        above = engine.calculate("gemini/gemini-2.5-pro", 200_001, 1000)
        assert at == 200_000 * d(entry["input_cost_per_token"]) + 1000 * d(
            entry["output_cost_per_token"]
        )
        assert above == 200_001 * d(entry["input_cost_per_token_above_200k_tokens"]) + 1000 * d(
            entry["output_cost_per_token_above_200k_tokens"]
        )

    def test_sub_nano_remainders_are_rounded_up(self) -> None:
        engine = PricingEngine()
        engine.set_price("tiny", input_per_mtok=Decimal("0.000001"), output_per_mtok=0)
        assert engine.calculate_nano("tiny", 1, 0) == 1  # 1e-12 USD is charged as 1 nano
        assert engine.calculate_nano("tiny", 1000, 0) == 1
        assert engine.calculate_nano("tiny", 1001, 0) == 2
        assert engine.calculate_nano("tiny", 0, 0) == 0

    def test_float_prices_are_exact(self) -> None:
        engine = PricingEngine()
        engine.set_price("m", input_per_mtok=0.1, output_per_mtok=0.2)
        assert engine.calculate("m", 1_000_000, 1_000_000) == Decimal(
            "0.3"
        )  # not 0.30000000000000004

    @pytest.mark.parametrize(
        "tokens",
        [(True, 1, 0), (1, False, 0), (1, 1, True), (-1, 0, 0), (0, -1, 0), (5, 0, -1), (1.0, 1, 0),
         ("1", 1, 0), (None, 1, 0), (Decimal(1), 1, 0)],
    )  # fmt: skip
    def test_token_counts_must_be_non_negative_ints(self, tokens: tuple[Any, Any, Any]) -> None:
        engine = PricingEngine()
        engine.set_price("m", input_per_mtok=1, output_per_mtok=1)
        with pytest.raises(InvalidInputError):
            engine.calculate("m", *tokens)

    def test_cached_tokens_cannot_exceed_input_tokens(self) -> None:
        engine = PricingEngine()
        engine.set_price("m", input_per_mtok=1, output_per_mtok=1)
        with pytest.raises(InvalidInputError, match="cached_input_tokens"):
            engine.calculate("m", 10, 0, 11)

    def test_int_subclasses_other_than_bool_are_accepted(self) -> None:
        class Count(int):
            pass

        engine = PricingEngine()
        engine.set_price("m", input_per_mtok=1, output_per_mtok=1)
        assert engine.calculate_nano("m", Count(1000), Count(1000), Count(0)) == 2_000_000

    @pytest.mark.parametrize("model", ["", "x" * 257, None, 42, ["gpt-4"]])
    def test_model_must_be_a_valid_id(self, model: Any) -> None:
        with pytest.raises(InvalidInputError):
            PricingEngine().calculate(model, 1, 1)


class TestUnknownAndFree:
    """An unknown model is an error, never $0; a declared-free model is exactly $0."""

    def test_unknown_model_raises_naming_the_model_and_the_fix(self, engine: PricingEngine) -> None:
        with pytest.raises(UnknownModelError) as info:
            engine.calculate("my-company/secret-model-7", 100, 100)
        message = str(info.value)
        assert "'my-company/secret-model-7'" in message
        assert "set_price" in message
        assert "overrides file" in message
        assert isinstance(info.value, BudgetError)
        assert isinstance(info.value, LookupError)

    def test_unknown_model_keeps_raising(self, engine: PricingEngine) -> None:
        for _ in range(2):  # the failure is not cached as a price
            with pytest.raises(UnknownModelError):
                engine.calculate("still-unknown-model", 1, 1)

    def test_declared_free_model_costs_exactly_zero(self) -> None:
        engine = PricingEngine()
        engine.set_price("ollama/llama3", input_per_mtok=0, output_per_mtok=0)
        assert engine.calculate("ollama/llama3", 10**9, 10**9) == Decimal(0)
        assert engine.calculate_nano("ollama/llama3", 10**9, 10**9) == 0

    def test_table_entries_without_token_prices_are_unknown(self, litellm: Any) -> None:
        """Per-second, per-image, per-query entries cannot be priced by tokens: error, not $0."""
        engine = PricingEngine()
        table = engine._load_table()
        checked = 0
        for key, entry in litellm.model_cost.items():
            if key == "sample_spec" or not isinstance(entry, dict) or table.price(key) is not None:
                continue
            # A name whose family or provider-less form is priced is priced through it.
            fallbacks = [n for group in _pricing._candidate_names(key) for n in group][1:]
            if any(table.price(n) is not None for n in fallbacks):
                continue
            with pytest.raises(UnknownModelError):
                engine.calculate(key, 100, 100)
            checked += 1
        assert checked > 0

    def test_without_litellm_unoverridden_models_are_unknown(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setitem(sys.modules, "litellm", None)  # makes `import litellm` fail
        engine = PricingEngine()
        engine.set_price("mine", input_per_mtok=1, output_per_mtok=1)
        assert engine.calculate_nano("mine", 1000, 0) == 1_000_000
        with pytest.raises(UnknownModelError, match=r"'gpt-4o'.*litellm is not installed"):
            engine.calculate("gpt-4o", 1, 1)


class TestTableRules:
    """The table rules, on a made-up table so they do not depend on litellm's current data."""

    def test_threshold_tier_applies_strictly_above(self) -> None:
        engine = synthetic_engine(
            {
                "m": {
                    "litellm_provider": "gemini",
                    "input_cost_per_token": 1e-06,
                    "output_cost_per_token": 2e-06,
                    "cache_read_input_token_cost": 1e-07,
                    "input_cost_per_token_above_200k_tokens": 3e-06,
                    "output_cost_per_token_above_200k_tokens": 4e-06,
                }
            }
        )
        # 1000 nano a token in, 100 a cache read, 2000 out.
        assert engine.calculate_nano("m", 200_000, 10, 100) == 199_900_000 + 10_000 + 20_000
        # Above: input and output at the tier's rates; the tier has no cache price of its own,
        # so the flat cache-read price stays.
        assert engine.calculate_nano("m", 200_001, 10, 100) == 599_703_000 + 10_000 + 40_000

    def test_highest_crossed_threshold_wins_and_inherits_missing_rates(self) -> None:
        engine = synthetic_engine(
            {
                "m": {
                    "input_cost_per_token": 1e-06,
                    "output_cost_per_token": 1e-06,
                    "input_cost_per_token_above_128k_tokens": 2e-06,
                    "output_cost_per_token_above_128k_tokens": 5e-06,
                    "input_cost_per_token_above_256k_tokens": 3e-06,
                }
            }
        )
        assert engine.calculate_nano("m", 300_000, 1000) == 900_000_000 + 5_000_000

    def test_xai_tier_starts_at_the_threshold(self) -> None:
        entry = {
            "input_cost_per_token": 1e-06,
            "output_cost_per_token": 0.0,
            "input_cost_per_token_above_128k_tokens": 2e-06,
        }
        xai = synthetic_engine({"m": {**entry, "litellm_provider": "xai"}})
        other = synthetic_engine({"m": {**entry, "litellm_provider": "openai"}})
        assert xai.calculate_nano("m", 128_000, 0) == 256_000_000
        assert other.calculate_nano("m", 128_000, 0) == 128_000_000
        assert xai.calculate_nano("m", 127_999, 0) == 127_999_000

    def test_ranged_tiered_pricing(self) -> None:
        engine = synthetic_engine(
            {
                "qwen": {
                    "litellm_provider": "dashscope",
                    "tiered_pricing": [
                        {"input_cost_per_token": 5e-08, "output_cost_per_token": 4e-07,
                         "range": [0, 256000.0]},
                        {"input_cost_per_token": 2.5e-07, "output_cost_per_token": 2e-06,
                         "range": [256000.0, 1000000.0]},
                    ],
                }
            }
        )  # fmt: skip
        assert engine.calculate_nano("qwen", 256_000, 100) == 12_800_000 + 40_000
        assert engine.calculate_nano("qwen", 256_001, 100) == 64_000_250 + 200_000
        assert engine.calculate_nano("qwen", 2_000_000, 0) == 500_000_000  # past the last range
        # No flat prices: output with no input is billed at the first tier, never free.
        assert engine.calculate_nano("qwen", 0, 100) == 40_000

    def test_fireworks_cache_reads_default_to_a_share_of_input(self) -> None:
        entry = {"input_cost_per_token": 1e-06, "output_cost_per_token": 1e-06}
        engine = synthetic_engine(
            {"fw": {**entry, "litellm_provider": "fireworks_ai"}, "other": entry}
        )
        assert engine.calculate_nano("fw", 1000, 0, 1000) == 500_000
        assert engine.calculate_nano("other", 1000, 0, 1000) == 1_000_000

    def test_service_tier_and_batch_prices_are_ignored(self) -> None:
        engine = synthetic_engine(
            {
                "m": {
                    "input_cost_per_token": 1e-06,
                    "output_cost_per_token": 1e-06,
                    "input_cost_per_token_priority": 9e-06,
                    "input_cost_per_token_above_200k_tokens_priority": 9e-06,
                    "input_cost_per_token_above_200k_tokens_batches": 9e-06,
                }
            }
        )
        assert engine.calculate_nano("m", 300_000, 0) == 300_000_000

    def test_prices_with_many_digits_stay_exact(self) -> None:
        engine = synthetic_engine(
            {"m": {"input_cost_per_token": 1 / 6 * 1e-06, "output_cost_per_token": 3.3e-10}}
        )
        exact = 10**6 * d(1 / 6 * 1e-06) + 7 * d(3.3e-10)
        assert engine.calculate_nano("m", 10**6, 7) == ceil_nano(exact)

    def test_string_and_missing_prices(self) -> None:
        engine = synthetic_engine(
            {
                "str": {"input_cost_per_token": "3e-07", "output_cost_per_token": None},
                "none": {"input_cost_per_token": None, "mode": "chat"},
                "junk": {"input_cost_per_token": "n/a", "output_cost_per_token": -1.0},
            }
        )
        assert engine.calculate_nano("str", 10, 10) == 3000
        for model in ("none", "junk"):
            with pytest.raises(UnknownModelError):
                engine.calculate(model, 1, 1)

    def test_table_is_a_snapshot(self) -> None:
        model_cost = {"m": {"input_cost_per_token": 1e-06, "output_cost_per_token": 0.0}}
        engine = synthetic_engine(model_cost)
        model_cost["late"] = model_cost["m"]
        with pytest.raises(UnknownModelError):
            engine.calculate("late", 1, 1)


#: (input, output, cached) counts for the agreement walk: small, with cache reads, and on
#: both sides of every long-context threshold in the table (32k ... 512k).
AGREEMENT_CASES = [
    (1200, 350, 0),
    (1000, 100, 400),
    (32_001, 100, 1000),
    (128_000, 10, 0),  # at a threshold: xAI's tier starts here, everyone else's above
    (200_000, 1, 0),
    (272_001, 7, 1),
    (1_000_000, 10_000, 200_000),
]


@pytest.fixture
def litellm_standard_rates(litellm: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """
    litellm with off-peak windows closed.

    litellm swaps in DeepSeek's off-peak discount when the wall clock is inside
    its window; we always charge the standard rate (see the module docstring),
    so the comparison is against litellm's standard rate at any time of day.
    """
    from litellm.litellm_core_utils.llm_cost_calc import utils

    monkeypatch.setattr(utils, "_open_off_peak_block", lambda *a, **k: None, raising=False)
    return litellm


def walk_table(
    litellm: Any,
    engine: PricingEngine,
    input_tokens: int,
    output_tokens: int,
    cached: int,
    cache_writes: int = 0,
) -> None:
    """Price one usage with every chat model of the table, by us and by litellm.cost_per_token."""
    model_cost = litellm.model_cost
    table = engine._load_table()
    usage = {
        "prompt_tokens": input_tokens,
        "completion_tokens": output_tokens,
        "cache_read_input_tokens": cached,
        "cache_creation_input_tokens": cache_writes,
    }
    failures = []
    compared = 0
    for key, entry in model_cost.items():
        if not isinstance(entry, dict) or entry.get("mode") != "chat":
            continue
        if table.price(key) is None:
            continue  # no per-token price: see test_table_entries_without_token_prices...
        provider = entry.get("litellm_provider")
        kwargs: dict[str, Any] = {}
        if provider == "github_copilot":
            # Inferring this provider from the name makes litellm log in to GitHub.
            kwargs["custom_llm_provider"] = provider
        try:
            prompt_cost, completion_cost = litellm.cost_per_token(model=key, **usage, **kwargs)
        except Exception:
            # litellm cannot infer the provider of some keys from the name alone: tell it,
            # unless it would then price a different entry ("<provider>/<key>").
            if f"{provider}/{key}" in model_cost:
                continue
            prompt_cost, completion_cost = litellm.cost_per_token(
                model=key, **usage, custom_llm_provider=provider
            )
        ours = engine.calculate_nano(key, input_tokens, output_tokens, cached, cache_writes)
        # litellm's components are floats: each carries a relative error of a few 1e-16,
        # far below a nano-dollar for any cost here, yet enough to cross a nano boundary
        # (0.015000000000000001 rounds up to 15_000_001 nano). Both sides are rounded up
        # the same way, so they may differ by that one crossing, never more.
        theirs = ceil_nano(d(prompt_cost) + d(completion_cost))
        if abs(ours - theirs) > 1:
            failures.append((key, ours, theirs, prompt_cost, completion_cost))
        compared += 1
    assert not failures, f"{len(failures)} disagreements, first: {failures[:5]}"
    assert compared > 2000  # the walk really covered the table


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydantic, on litellm's provider modules
class TestAgreementWithLitellm:
    """Every chat model in litellm's table, priced by us and by litellm.cost_per_token."""

    @pytest.mark.parametrize("tokens", AGREEMENT_CASES, ids=lambda t: "-".join(map(str, t)))
    def test_whole_table(
        self, litellm_standard_rates: Any, engine: PricingEngine, tokens: tuple[int, int, int]
    ) -> None:
        walk_table(litellm_standard_rates, engine, *tokens)

    def test_agreement_is_exact_where_floats_are(
        self, litellm_standard_rates: Any, engine: PricingEngine
    ) -> None:
        """Rounded to the nearest nano (float noise cannot reach 0.5 nano) the two are identical."""
        litellm = litellm_standard_rates
        for model in ["gpt-4", "gpt-4o", "gpt-4o-mini", "claude-sonnet-4-5", "azure/gpt-4o"]:
            if model not in litellm.model_cost:
                continue
            for tokens in [(1200, 350, 0), (1000, 100, 400), (250_000, 1000, 1000)]:
                p, c = litellm.cost_per_token(
                    model=model,
                    prompt_tokens=tokens[0],
                    completion_tokens=tokens[1],
                    cache_read_input_tokens=tokens[2],
                )
                nearest = ((d(p) + d(c)) * NANO).to_integral_value(rounding=ROUND_HALF_EVEN)
                assert engine.calculate_nano(model, *tokens) == nearest


class TestOverrides:
    """set_price and the overrides file win over litellm."""

    def test_set_price_wins_over_litellm_and_covers_prefixed_names(self, litellm: Any) -> None:
        engine = PricingEngine()
        before = engine.calculate("openai/gpt-4o", 1000, 1000)
        engine.set_price("gpt-4o", input_per_mtok=1, output_per_mtok=2)
        assert engine.calculate("gpt-4o", 10**6, 10**6) == Decimal(3)
        assert engine.calculate("openai/gpt-4o", 10**6, 10**6) == Decimal(3)
        assert engine.calculate("openai/gpt-4o", 1000, 1000) != before

    def test_prefixed_override_covers_only_that_name(self, litellm: Any) -> None:
        engine = PricingEngine()
        plain = engine.calculate("gpt-4o", 1000, 1000)
        engine.set_price("azure/gpt-4o", input_per_mtok=100, output_per_mtok=100)
        assert engine.calculate("azure/gpt-4o", 10**6, 0) == Decimal(100)
        assert engine.calculate("gpt-4o", 1000, 1000) == plain

    def test_exact_table_entry_beats_family_override(self, litellm: Any) -> None:
        engine = PricingEngine()
        engine.set_price("gpt-4o", input_per_mtok=1, output_per_mtok=1)
        table = engine.calculate("gpt-4o-2024-08-06", 1000, 0)
        assert table == 1000 * d(litellm.model_cost["gpt-4o-2024-08-06"]["input_cost_per_token"])
        # A snapshot the table does not know falls back to the family, override included.
        assert engine.calculate("gpt-4o-2099-12-31", 10**6, 0) == Decimal(1)

    def test_cached_price_defaults_to_input_price(self) -> None:
        engine = PricingEngine()
        engine.set_price("a", input_per_mtok=4, output_per_mtok=8)
        engine.set_price("b", input_per_mtok=4, output_per_mtok=8, cached_input_per_mtok=1)
        assert engine.calculate_nano("a", 10**6, 0, 10**6) == 4 * 10**9
        assert engine.calculate_nano("b", 10**6, 0, 10**6) == 1 * 10**9
        assert engine.calculate_nano("b", 10**6, 0, 500_000) == 2_500_000_000

    def test_set_price_replaces_an_earlier_price(self) -> None:
        engine = PricingEngine()
        engine.set_price("m", input_per_mtok=1, output_per_mtok=1)
        assert engine.calculate_nano("m", 10**6, 0) == 10**9
        engine.set_price("m", input_per_mtok=2, output_per_mtok=1)
        assert engine.calculate_nano("m", 10**6, 0) == 2 * 10**9

    @pytest.mark.parametrize(
        "bad",
        [-1, float("nan"), float("inf"), Decimal("NaN"), Decimal("-0.01"), True, "1", None,
         10**7],
    )  # fmt: skip
    def test_set_price_rejects_bad_prices(self, bad: Any) -> None:
        engine = PricingEngine()
        with pytest.raises(InvalidInputError):
            engine.set_price("m", input_per_mtok=bad, output_per_mtok=1)
        with pytest.raises(InvalidInputError):
            engine.set_price("m", input_per_mtok=1, output_per_mtok=bad)
        if bad is not None:
            with pytest.raises(InvalidInputError):
                engine.set_price(
                    "m", input_per_mtok=1, output_per_mtok=1, cached_input_per_mtok=bad
                )

    def test_set_price_rejects_bad_model(self) -> None:
        with pytest.raises(InvalidInputError):
            PricingEngine().set_price("", input_per_mtok=1, output_per_mtok=1)

    def test_set_price_is_thread_safe(self) -> None:
        """Readers see the old or the new price, never a mix; writers lose no update."""
        engine = PricingEngine()
        engine.set_price("m", input_per_mtok=1, output_per_mtok=1)
        allowed = {2 * 10**9, 4 * 10**9}
        seen: set[int] = set()
        stop = threading.Event()
        errors: list[BaseException] = []

        def read() -> None:
            try:
                while not stop.is_set():
                    seen.add(engine.calculate_nano("m", 10**6, 10**6))
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)

        def write(index: int) -> None:
            for i in range(200):
                price = 2 if i % 2 else 1
                engine.set_price("m", input_per_mtok=price, output_per_mtok=price)
                engine.set_price(f"w{index}-{i}", input_per_mtok=1, output_per_mtok=1)

        readers = [threading.Thread(target=read) for _ in range(4)]
        writers = [threading.Thread(target=write, args=(n,)) for n in range(4)]
        for t in readers + writers:
            t.start()
        for t in writers:
            t.join()
        stop.set()
        for t in readers:
            t.join()
        assert not errors
        assert seen <= allowed
        for n in range(4):  # no set_price was lost to a concurrent one
            for i in range(200):
                assert engine.calculate_nano(f"w{n}-{i}", 10**6, 0) == 10**9
        # The last write of every writer was price 2: the state settles on it.
        assert engine.calculate_nano("m", 10**6, 10**6) == 4 * 10**9


class TestOverridesFile:
    """The overrides file: JSON or TOML, checked at construction."""

    def test_json_file(self, tmp_path: Path) -> None:
        path = tmp_path / "prices.json"
        path.write_text(
            json.dumps(
                {
                    "openai/gpt-4o": {
                        "input_per_mtok": 2.5,
                        "output_per_mtok": 10,
                        "cached_input_per_mtok": 1.25,
                    },
                    "llama3-local": {"input_per_mtok": 0, "output_per_mtok": 0},
                }
            )
        )
        engine = PricingEngine(path)
        assert engine.calculate("openai/gpt-4o", 10**6, 10**6, 10**6) == Decimal("11.25")
        assert engine.calculate("llama3-local", 5000, 5000) == 0

    def test_toml_file(self, tmp_path: Path) -> None:
        path = tmp_path / "prices.toml"
        path.write_text(
            textwrap.dedent(
                """
                ["openai/gpt-4o"]
                input_per_mtok = 2.5
                output_per_mtok = 10
                cached_input_per_mtok = 1.25

                ["gpt-3.5-turbo"]
                input_per_mtok = 0.5
                output_per_mtok = 1.5

                [llama3-local]
                input_per_mtok = 0
                output_per_mtok = 0
                """
            )
        )
        engine = PricingEngine(str(path))
        assert engine.calculate("openai/gpt-4o", 10**6, 10**6, 10**6) == Decimal("11.25")
        assert engine.calculate("gpt-3.5-turbo", 10**6, 10**6) == Decimal(2)
        assert engine.calculate("llama3-local", 5000, 5000) == 0

    def test_file_decimals_are_exact(self, tmp_path: Path) -> None:
        path = tmp_path / "prices.json"
        path.write_text('{"m": {"input_per_mtok": 0.1, "output_per_mtok": 0.2}}')
        assert PricingEngine(path).calculate("m", 10**6, 10**6) == Decimal("0.3")

    def test_file_override_wins_over_litellm(self, tmp_path: Path, litellm: Any) -> None:
        path = tmp_path / "prices.json"
        path.write_text('{"gpt-4": {"input_per_mtok": 1, "output_per_mtok": 1}}')
        assert PricingEngine(path).calculate("gpt-4", 10**6, 0) == Decimal(1)

    @pytest.mark.parametrize(
        ("name", "content", "match"),
        [
            ("p.json", "{not json", "not valid json"),
            ("p.json", "[1, 2]", "must map model names"),
            ("p.json", '{"m": 5}', "'m'.*must be a table"),
            ("p.json", '{"m": {"input_per_mtok": 1}}', "'m'.*missing output_per_mtok"),
            ("p.json", '{"m": {"output_per_mtok": 1}}', "'m'.*missing input_per_mtok"),
            ("p.json", '{"m": {"input_per_mtok": 1, "output_per_mtok": 1, "cache": 1}}',
             "'m'.*unknown field.*cache"),
            ("p.json", '{"m": {"input_per_mtok": -1, "output_per_mtok": 1}}',
             "'m'.*input_per_mtok.*negative"),
            ("p.json", '{"m": {"input_per_mtok": "1", "output_per_mtok": 1}}',
             "'m'.*input_per_mtok.*number"),
            ("p.json", '{"m": {"input_per_mtok": true, "output_per_mtok": 1}}', "'m'.*number"),
            ("p.json", '{"m": {"input_per_mtok": NaN, "output_per_mtok": 1}}', "'m'.*finite"),
            ("p.json", '{"m": {"input_per_mtok": 1, "output_per_mtok": 1e9}}', "'m'.*above"),
            ("p.json", '{"m": {"input_per_mtok": 1, "output_per_mtok": 1, '
                       '"cached_input_per_mtok": null}}', "'m'.*cached_input_per_mtok"),
            ("p.json", '{"": {"input_per_mtok": 1, "output_per_mtok": 1}}', "entry ''"),
            ("p.json", '{"m": {"input_per_mtok": 1, "output_per_mtok": 1},'
                       ' "m": {"input_per_mtok": 2, "output_per_mtok": 2}}', "duplicate key 'm'"),
            ("p.toml", "[m]\ninput_per_mtok = 1\noutput_per_mtok = ", "not valid toml"),
            ("p.toml", "[gpt-3.5-turbo]\ninput_per_mtok = 1\noutput_per_mtok = 1\n",
             "'gpt-3'.*quote model names"),
            ("p.yaml", "m: {}", "must end in .json or .toml"),
        ],
    )  # fmt: skip
    def test_malformed_file_is_a_config_error_naming_file_and_entry(
        self, tmp_path: Path, name: str, content: str, match: str
    ) -> None:
        path = tmp_path / name
        path.write_text(content)
        with pytest.raises(ConfigError, match=match) as info:
            PricingEngine(path)
        assert name in str(info.value)

    def test_missing_file(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match=r"nowhere\.json"):
            PricingEngine(tmp_path / "nowhere.json")

    def test_not_utf8(self, tmp_path: Path) -> None:
        path = tmp_path / "p.toml"
        path.write_bytes(b"\xff\xfe[m]")
        with pytest.raises(ConfigError, match=r"p\.toml"):
            PricingEngine(path)


class TestEstimate:
    """Worst case of a call before making it: counted prompt plus maximum output."""

    MESSAGES: ClassVar[list[dict[str, str]]] = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Summarise the history of the Roman Empire in one line."},
    ]

    def test_counted_prompt_plus_max_output(self, engine: PricingEngine, litellm: Any) -> None:
        prompt = litellm.token_counter(model="gpt-4o", messages=self.MESSAGES)
        assert 10 < prompt < 100
        est = engine.estimate(model="gpt-4o", messages=self.MESSAGES, max_output_tokens=512)
        assert est == engine.calculate("gpt-4o", prompt, 512)

    def test_max_output_is_capped_at_the_models_maximum(
        self, engine: PricingEngine, litellm: Any
    ) -> None:
        limit = litellm.model_cost["gpt-4"]["max_output_tokens"]
        capped = engine.estimate("gpt-4", self.MESSAGES, max_output_tokens=10**9)
        assert capped == engine.estimate("gpt-4", self.MESSAGES, max_output_tokens=limit)
        assert capped == engine.estimate("gpt-4", self.MESSAGES)  # None: the model's maximum
        assert engine.estimate("gpt-4", self.MESSAGES, 1) < capped

    def test_override_uses_the_tables_maximum(self, litellm: Any) -> None:
        engine = PricingEngine()
        engine.set_price("gpt-4", input_per_mtok=0, output_per_mtok=1)
        limit = litellm.model_cost["gpt-4"]["max_output_tokens"]
        assert engine.estimate("gpt-4", self.MESSAGES) == Decimal(limit) / 10**6

    def test_unknown_maximum_needs_max_output_tokens(self) -> None:
        engine = PricingEngine()
        engine.set_price("local-xyz", input_per_mtok=0, output_per_mtok=1)
        with pytest.raises(InvalidInputError, match="max_output_tokens is required"):
            engine.estimate("local-xyz", self.MESSAGES)
        assert engine.estimate("local-xyz", self.MESSAGES, 1000) == Decimal("0.001")

    def test_unknown_model(self, engine: PricingEngine) -> None:
        with pytest.raises(UnknownModelError):
            engine.estimate("no-such-model-abc", self.MESSAGES, 10)

    @pytest.mark.parametrize("bad", [-1, True, 1.5, "10"])
    def test_bad_max_output_tokens(self, engine: PricingEngine, bad: Any) -> None:
        with pytest.raises(InvalidInputError):
            engine.estimate("gpt-4o", self.MESSAGES, bad)

    @pytest.mark.parametrize("bad", ["hello", None, [1, 2], {"role": "user"}])
    def test_bad_messages(self, engine: PricingEngine, bad: Any) -> None:
        with pytest.raises(InvalidInputError):
            engine.estimate("gpt-4o", bad, 10)

    def test_fallback_when_counting_fails(
        self, engine: PricingEngine, litellm: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        def broken(**kwargs: Any) -> int:
            raise RuntimeError("tokenizer unavailable")

        monkeypatch.setattr(litellm, "token_counter", broken)
        text = json.dumps(self.MESSAGES, ensure_ascii=False)
        expected_prompt = -(-len(text) // 3)
        assert engine.estimate("gpt-4o", self.MESSAGES, 7) == engine.calculate(
            "gpt-4o", expected_prompt, 7
        )
        # The fallback errs high: more tokens than the tokenizer counts.
        monkeypatch.undo()
        assert expected_prompt > litellm.token_counter(model="gpt-4o", messages=self.MESSAGES)

    def test_counting_never_uses_the_network(
        self, litellm: Any, monkeypatch: pytest.MonkeyPatch, capfd: Any
    ) -> None:
        """Models whose litellm tokenizer lives on the Hugging Face hub, and image URLs."""

        def no_network(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError(f"network access: {args!r}")

        monkeypatch.setattr(socket.socket, "connect", no_network)
        monkeypatch.setattr(socket, "getaddrinfo", no_network)
        image = [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
                ],
            }
        ]
        engine = PricingEngine()
        engine.set_price("meta-llama/Llama-3-70b", input_per_mtok=1, output_per_mtok=1)
        engine.set_price("command-r-plus", input_per_mtok=1, output_per_mtok=1)
        for model in ["gpt-4o", "claude-sonnet-4-5", "meta-llama/Llama-3-70b", "command-r-plus"]:
            # Counted by a tokenizer, not the fallback (which gives a third of the JSON length).
            prompt = engine._count_prompt_tokens(model, self.MESSAGES)
            assert 0 < prompt < len(json.dumps(self.MESSAGES)) // 3
            assert engine._count_prompt_tokens(model, image) > 0
            engine.estimate(model, image, 10)
        out, err = capfd.readouterr()
        assert out == ""
        assert err == ""


class TestSilence:
    """Nothing of ours makes litellm print, warm or failing."""

    def test_no_output(self, engine: PricingEngine, capfd: Any) -> None:
        engine.calculate("gpt-4o", 1, 1)
        engine.calculate("anthropic/claude-sonnet-4-5", 1, 1, 1)
        engine.estimate("gpt-4o", [{"role": "user", "content": "hi"}], 5)
        with pytest.raises(UnknownModelError):
            engine.calculate("provider-less-unknown", 1, 1)
        with pytest.raises(UnknownModelError):
            engine.estimate("bogus/unknown", [{"role": "user", "content": "hi"}], 5)
        out, err = capfd.readouterr()
        assert out == ""
        assert err == ""


#: Anthropic's ``usage`` of a call that wrote a 10,000-token prompt prefix to the cache
#: and read a 3,000-token one: ``input_tokens`` excludes both.
ANTHROPIC_USAGE = {
    "input_tokens": 200,
    "cache_creation_input_tokens": 10_000,
    "cache_read_input_tokens": 3_000,
    "output_tokens": 500,
}


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydantic, on litellm's provider modules
class TestCacheWrites:
    """
    Prompt-cache writes (``cache_creation_input_tokens``) at the cache-write price.

    Like cache reads they are counted within ``input_tokens``, which is how
    ``litellm.cost_per_token`` reads ``prompt_tokens``; priced exactly, overridable,
    and carried by ``commit_usage`` through the HTTP service.
    """

    def test_claude_cache_writes_are_priced_from_the_table(
        self, litellm: Any, engine: PricingEngine
    ) -> None:
        """200 plain, 10,000 written and 3,000 read input tokens, 500 out: at the table's rates."""
        entry = litellm.model_cost["claude-sonnet-4-5"]
        assert d(entry["cache_creation_input_token_cost"]) > d(entry["input_cost_per_token"])
        expected = (
            200 * d(entry["input_cost_per_token"])
            + 10_000 * d(entry["cache_creation_input_token_cost"])
            + 3_000 * d(entry["cache_read_input_token_cost"])
            + 500 * d(entry["output_cost_per_token"])
        )
        for model in ("claude-sonnet-4-5", "anthropic/claude-sonnet-4-5"):
            got = engine.calculate(
                model,
                input_tokens=13_200,
                output_tokens=500,
                cached_input_tokens=3_000,
                cache_creation_input_tokens=10_000,
            )
            assert got == expected
        # Before this, the writes were billed as plain input: under-charged.
        assert engine.calculate("claude-sonnet-4-5", 13_200, 500, 3_000) < expected

    def test_exactly_as_litellm_cost_per_token(
        self, litellm_standard_rates: Any, engine: PricingEngine
    ) -> None:
        """Rounded to the nearest nano (float noise cannot reach 0.5 nano) the two are identical."""
        litellm = litellm_standard_rates
        models = ["claude-sonnet-4-5", "claude-haiku-4-5", "anthropic/claude-sonnet-4-5", "gpt-4o"]
        usages = [(13_200, 500, 3_000, 10_000), (10_000, 0, 0, 10_000), (250_000, 1000, 0, 249_000)]
        for model in models:
            for inp, out, read, write in usages:
                p, c = litellm.cost_per_token(
                    model=model,
                    prompt_tokens=inp,
                    completion_tokens=out,
                    cache_read_input_tokens=read,
                    cache_creation_input_tokens=write,
                )
                nearest = ((d(p) + d(c)) * NANO).to_integral_value(rounding=ROUND_HALF_EVEN)
                assert engine.calculate_nano(model, inp, out, read, write) == nearest, model

    def test_anthropic_usage_is_counted_as_litellm_counts_it(
        self, litellm_standard_rates: Any, engine: PricingEngine
    ) -> None:
        """
        Anthropic's ``input_tokens`` excludes cache reads and writes; litellm's own
        translation of that usage adds both back into ``prompt_tokens``, and
        ``completion_cost`` of the result is what we charge for the same sum.
        """
        litellm = litellm_standard_rates
        from litellm.llms.anthropic.chat.transformation import AnthropicConfig

        usage = AnthropicConfig().calculate_usage(ANTHROPIC_USAGE, None)
        u = ANTHROPIC_USAGE
        total_input = u["input_tokens"] + u["cache_read_input_tokens"]
        total_input += u["cache_creation_input_tokens"]
        assert usage.prompt_tokens == total_input
        response = litellm.ModelResponse(model="claude-sonnet-4-5", usage=usage)
        theirs = litellm.completion_cost(
            completion_response=response, model="anthropic/claude-sonnet-4-5"
        )
        ours = engine.calculate_nano(
            "anthropic/claude-sonnet-4-5",
            input_tokens=total_input,
            output_tokens=u["output_tokens"],
            cached_input_tokens=u["cache_read_input_tokens"],
            cache_creation_input_tokens=u["cache_creation_input_tokens"],
        )
        assert ours == (d(theirs) * NANO).to_integral_value(rounding=ROUND_HALF_EVEN)

    @pytest.mark.parametrize(
        "tokens", [(1000, 100, 400, 200), (250_000, 1000, 1000, 50_000)], ids=str
    )
    def test_whole_table_with_cache_writes(
        self,
        litellm_standard_rates: Any,
        engine: PricingEngine,
        tokens: tuple[int, int, int, int],
    ) -> None:
        """Every chat model, below and above the long-context thresholds, agrees with litellm."""
        walk_table(litellm_standard_rates, engine, *tokens)

    def test_model_without_a_cache_write_price_bills_writes_as_input(
        self, litellm: Any, engine: PricingEngine
    ) -> None:
        """As litellm does: a table entry with no ``cache_creation_input_token_cost``."""
        assert "cache_creation_input_token_cost" not in litellm.model_cost["gpt-4o"]
        assert engine.calculate_nano("gpt-4o", 1000, 10, 0, 1000) == engine.calculate_nano(
            "gpt-4o", 1000, 10
        )

    def test_table_rules_for_cache_writes(self) -> None:
        """Long-context tiers: a tier's own write price, else the one below, else its input."""
        engine = synthetic_engine(
            {
                "own": {
                    "input_cost_per_token": 1e-06,
                    "output_cost_per_token": 2e-06,
                    "cache_creation_input_token_cost": 1.25e-06,
                    "input_cost_per_token_above_200k_tokens": 2e-06,
                    "cache_creation_input_token_cost_above_200k_tokens": 2.5e-06,
                },
                "kept": {
                    "input_cost_per_token": 1e-06,
                    "output_cost_per_token": 2e-06,
                    "cache_creation_input_token_cost": 1.25e-06,
                    "input_cost_per_token_above_200k_tokens": 2e-06,
                },
                "none": {
                    "input_cost_per_token": 1e-06,
                    "output_cost_per_token": 2e-06,
                    "input_cost_per_token_above_200k_tokens": 2e-06,
                },
                "ranged": {
                    "output_cost_per_token": 0.0,
                    "tiered_pricing": [
                        {"range": [0, 1000], "input_cost_per_token": 1e-06,
                         "cache_creation_input_token_cost": 3e-06},
                        {"range": [1000, 10**6], "input_cost_per_token": 2e-06},
                    ],
                },
            }
        )  # fmt: skip
        # 1000 nano a token of input below the threshold, 2000 above; writes in between.
        assert engine.calculate_nano("own", 10, 0, 0, 10) == 12_500
        assert engine.calculate_nano("own", 200_001, 0, 0, 200_000) == 2000 + 200_000 * 2500
        assert engine.calculate_nano("kept", 200_001, 0, 0, 200_000) == 2000 + 200_000 * 1250
        assert engine.calculate_nano("none", 10, 0, 0, 10) == 10_000
        assert engine.calculate_nano("none", 200_001, 0, 0, 200_000) == 200_001 * 2000
        assert engine.calculate_nano("ranged", 10, 0, 0, 10) == 30_000
        assert engine.calculate_nano("ranged", 2000, 0, 0, 1000) == 2000 * 2000

    def test_set_price_takes_a_cache_write_price(self) -> None:
        engine = PricingEngine()
        engine.set_price("a", input_per_mtok=3, output_per_mtok=15)
        engine.set_price(
            "b",
            input_per_mtok=3,
            output_per_mtok=15,
            cached_input_per_mtok=Decimal("0.3"),
            cache_creation_input_per_mtok=Decimal("3.75"),
        )
        # Without one, writes cost what input costs.
        assert engine.calculate_nano("a", 10**6, 0, 0, 10**6) == 3 * 10**9
        assert engine.calculate_nano("b", 10**6, 0, 0, 10**6) == 3_750_000_000
        # 1 plain + 2 read + 3 written tokens of 6: 3 + 0.6 + 11.25 micro-dollars.
        assert engine.calculate("b", 6, 0, 2, 3) == Decimal("0.000014850")

    @pytest.mark.parametrize(
        "bad", [-1, float("nan"), float("inf"), Decimal("-0.01"), True, "1", 10**7]
    )
    def test_set_price_rejects_a_bad_cache_write_price(self, bad: Any) -> None:
        with pytest.raises(InvalidInputError, match="cache_creation_input_per_mtok"):
            PricingEngine().set_price(
                "m", input_per_mtok=1, output_per_mtok=1, cache_creation_input_per_mtok=bad
            )

    def test_overrides_file_takes_a_cache_write_price(self, tmp_path: Path) -> None:
        toml = tmp_path / "prices.toml"
        toml.write_text(
            textwrap.dedent(
                """
                ["anthropic/claude-sonnet-4-5"]
                input_per_mtok = 3
                output_per_mtok = 15
                cached_input_per_mtok = 0.3
                cache_creation_input_per_mtok = 3.75
                """
            )
        )
        js = tmp_path / "prices.json"
        js.write_text(
            '{"m": {"input_per_mtok": 1, "output_per_mtok": 1,'
            ' "cache_creation_input_per_mtok": 1.25}}'
        )
        engine = PricingEngine(toml)
        assert engine.calculate("anthropic/claude-sonnet-4-5", 10**6, 0, 0, 10**6) == Decimal(
            "3.75"
        )
        assert PricingEngine(js).calculate("m", 10**6, 0, 0, 10**6) == Decimal("1.25")

    @pytest.mark.parametrize(
        ("content", "match"),
        [
            ('{"m": {"input_per_mtok": 1, "output_per_mtok": 1, '
             '"cache_creation_input_per_mtok": -1}}', "cache_creation_input_per_mtok.*negative"),
            ('{"m": {"input_per_mtok": 1, "output_per_mtok": 1, '
             '"cache_creation_input_per_mtok": null}}', "cache_creation_input_per_mtok"),
            ('{"m": {"input_per_mtok": 1, "output_per_mtok": 1, "cache_write_per_mtok": 1}}',
             "unknown field.*cache_write_per_mtok.*expected.*cache_creation_input_per_mtok"),
        ],
    )  # fmt: skip
    def test_overrides_file_rejects_a_bad_cache_write_price(
        self, tmp_path: Path, content: str, match: str
    ) -> None:
        path = tmp_path / "p.json"
        path.write_text(content)
        with pytest.raises(ConfigError, match=match):
            PricingEngine(path)

    @pytest.mark.parametrize(
        ("args", "match"),
        [
            ((10, 0, 0, -1), "cache_creation_input_tokens must not be negative"),
            ((10, 0, 0, 1.0), "cache_creation_input_tokens must be an int"),
            ((10, 0, 0, True), "cache_creation_input_tokens must be an int"),
            ((10, 0, 0, "1"), "cache_creation_input_tokens must be an int"),
            ((10, 0, 0, None), "cache_creation_input_tokens must be an int"),
            ((10, 0, 0, 11), r"cache_creation_input_tokens \(0 \+ 11\) cannot exceed"),
            ((10, 0, 6, 5), r"\(6 \+ 5\) cannot exceed input_tokens \(10\).*Anthropic"),
        ],
    )
    def test_bad_cache_write_counts_are_refused(self, args: tuple[Any, ...], match: str) -> None:
        engine = PricingEngine()
        engine.set_price("m", input_per_mtok=1, output_per_mtok=1)
        with pytest.raises(InvalidInputError, match=match):
            engine.calculate_nano("m", *args)
        with pytest.raises(InvalidInputError, match=match):
            engine.calculate("m", *args)

    def test_int_subclass_counts_are_accepted(self) -> None:
        class Count(int):
            pass

        engine = PricingEngine()
        engine.set_price("m", input_per_mtok=1, output_per_mtok=1, cache_creation_input_per_mtok=2)
        assert engine.calculate_nano("m", Count(10), 0, 0, Count(10)) == 20_000

    @settings(max_examples=300, deadline=None)
    @given(
        st.decimals(min_value=0, max_value=1000, places=6),
        st.none() | st.decimals(min_value=0, max_value=1000, places=6),
        st.integers(min_value=0, max_value=10**9),
        st.data(),
    )
    def test_matches_exact_decimal_formula(
        self, input_price: Decimal, write_price: Decimal | None, inp: int, data: st.DataObject
    ) -> None:
        """Any prices and counts: the exact decimal sum, rounded up to the nano once."""
        read = data.draw(st.integers(min_value=0, max_value=inp))
        write = data.draw(st.integers(min_value=0, max_value=inp - read))
        engine = PricingEngine()
        engine.set_price(
            "m",
            input_per_mtok=input_price,
            output_per_mtok=1,
            cached_input_per_mtok=Decimal("0.1"),
            cache_creation_input_per_mtok=write_price,
        )
        per_write = input_price if write_price is None else write_price
        exact = (inp - read - write) * input_price + read * Decimal("0.1") + write * per_write
        assert engine.calculate_nano("m", inp, 0, read, write) == ceil_nano(exact / 10**6)

    def test_commit_usage_through_the_http_service(self, redis_url: str, spool_dir: Any) -> None:
        """
        A BudgetClient reservation's commit_usage sends the writes (only when there are
        some), and the service's commit prices them; more writes than input is refused at
        both ends.
        """
        testclient = pytest.importorskip("fastapi.testclient")
        import httpx

        from coreason_budget.client import BudgetClient
        from coreason_budget.server import ServerSettings, create_app

        from .service_support import async_managers

        manager = async_managers(redis_url, spool_dir)(daily_user_limit_usd=10.0)
        manager.pricing.set_price(
            "claude-house",
            input_per_mtok=3,
            output_per_mtok=15,
            cached_input_per_mtok=Decimal("0.3"),
            cache_creation_input_per_mtok=Decimal("3.75"),
        )
        app = create_app(manager, ServerSettings(api_keys=frozenset({"k"})))
        sent: list[dict[str, Any]] = []
        with testclient.TestClient(app) as api:

            def forward(request: httpx.Request) -> httpx.Response:
                """The client's requests, answered by the app in process."""
                if request.url.path.endswith("/commit"):
                    sent.append(json.loads(request.content))
                r = api.request(
                    request.method,
                    request.url.raw_path.decode(),
                    content=request.content,
                    headers=dict(request.headers),
                )
                return httpx.Response(r.status_code, headers=r.headers, content=r.content)

            with BudgetClient(
                "http://budget", "k", transport=httpx.MockTransport(forward)
            ) as client:
                r = client.reserve("u", 1, model="claude-house")
                with pytest.raises(InvalidInputError, match="cannot exceed input_tokens"):
                    r.commit_usage(input_tokens=10, output_tokens=0, cache_creation_input_tokens=11)
                assert sent == []
                # The service checks too: a raw request with more writes than input.
                raw = api.post(
                    f"/reservations/{r.id}/commit",
                    headers={"Authorization": "Bearer k"},
                    json={
                        "input_tokens": 10,
                        "output_tokens": 0,
                        "cache_creation_input_tokens": 11,
                    },
                )
                assert raw.status_code == 422, raw.text
                assert "cache_creation_input_tokens" in raw.json()["detail"]
                r.commit_usage(
                    input_tokens=13_200,
                    output_tokens=500,
                    cached_input_tokens=3_000,
                    cache_creation_input_tokens=10_000,
                )
                assert r.state == "committed"
                # 200 * 3 + 3000 * 0.3 + 10000 * 3.75 + 500 * 15 micro-dollars.
                assert client.usage("u")["user"].spent_nano == 46_500_000
                plain = client.reserve("u", 1, model="claude-house")
                plain.commit_usage(input_tokens=100, output_tokens=5)
        assert manager.pricing.calculate_nano("claude-house", 13_200, 500, 3_000, 10_000) == (
            46_500_000
        )
        assert [{k: b[k] for k in b if k.endswith("_tokens")} for b in sent] == [
            {"input_tokens": 13_200, "output_tokens": 500, "cached_input_tokens": 3_000,
             "cache_creation_input_tokens": 10_000},
            {"input_tokens": 100, "output_tokens": 5, "cached_input_tokens": 0},
        ]  # fmt: skip


# -- properties -----------------------------------------------------------------------------------

prices = st.decimals(min_value=0, max_value=1000, places=6, allow_nan=False, allow_infinity=False)
counts = st.integers(min_value=0, max_value=10**9)


class TestProperties:
    """Exactness and monotonicity for arbitrary prices and token counts."""

    @settings(max_examples=300, deadline=None)
    @given(prices, prices, st.none() | prices, counts, counts, st.data())
    def test_matches_exact_decimal_formula(
        self,
        input_price: Decimal,
        output_price: Decimal,
        cached_price: Decimal | None,
        input_tokens: int,
        output_tokens: int,
        data: st.DataObject,
    ) -> None:
        cached_tokens = data.draw(st.integers(min_value=0, max_value=input_tokens))
        engine = PricingEngine()
        engine.set_price(
            "m",
            input_per_mtok=input_price,
            output_per_mtok=output_price,
            cached_input_per_mtok=cached_price,
        )
        cached = input_price if cached_price is None else cached_price
        exact = (
            (input_tokens - cached_tokens) * input_price
            + cached_tokens * cached
            + output_tokens * output_price
        ) / 10**6
        nano = engine.calculate_nano("m", input_tokens, output_tokens, cached_tokens)
        assert nano == ceil_nano(exact)
        assert (
            engine.calculate("m", input_tokens, output_tokens, cached_tokens)
            == Decimal(nano) / NANO
        )

    @settings(max_examples=200, deadline=None)
    @given(st.floats(min_value=0, max_value=1000, allow_nan=False), counts, counts)
    def test_float_prices_mean_their_shortest_decimal(
        self, price: float, input_tokens: int, output_tokens: int
    ) -> None:
        engine = PricingEngine()
        engine.set_price("m", input_per_mtok=price, output_per_mtok=price)
        exact = (input_tokens + output_tokens) * Decimal(repr(price)) / 10**6
        assert engine.calculate_nano("m", input_tokens, output_tokens) == ceil_nano(exact)

    @settings(max_examples=200, deadline=None)
    @given(st.sampled_from(["gpt-4o", "gemini/gemini-2.5-pro", "claude-sonnet-4-5", "gpt-4"]),
           counts, counts, counts, counts)  # fmt: skip
    def test_more_tokens_never_cost_less(
        self, model: str, a: int, b: int, extra_in: int, extra_out: int
    ) -> None:
        """More input or output never costs less (tier prices are higher, never lower)."""
        engine = _shared_engine()
        base = engine.calculate_nano(model, a, b)
        assert engine.calculate_nano(model, a + extra_in, b) >= base
        assert engine.calculate_nano(model, a, b + extra_out) >= base

    @settings(max_examples=200, deadline=None)
    @given(counts, counts, st.data())
    def test_cache_reads_never_cost_more(
        self, input_tokens: int, output_tokens: int, data: st.DataObject
    ) -> None:
        cached = data.draw(st.integers(min_value=0, max_value=input_tokens))
        engine = _shared_engine()
        for model in ["gpt-4o", "claude-sonnet-4-5", "gpt-4"]:
            assert engine.calculate_nano(
                model, input_tokens, output_tokens, cached
            ) <= engine.calculate_nano(model, input_tokens, output_tokens)

    @settings(max_examples=100, deadline=None)
    @given(
        st.dictionaries(
            st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=30),
            st.tuples(prices, prices),
            min_size=1,
            max_size=5,
        )
    )
    def test_json_file_round_trip(
        self, tmp_path_factory: pytest.TempPathFactory, models: dict[str, tuple[Decimal, Decimal]]
    ) -> None:
        path = tmp_path_factory.mktemp("prices") / "prices.json"
        # Written by hand so the prices are JSON numbers with exactly these digits.
        entries = (
            f'{json.dumps(m)}: {{"input_per_mtok": {i}, "output_per_mtok": {o}}}'
            for m, (i, o) in models.items()
        )
        path.write_text("{" + ", ".join(entries) + "}")
        engine = PricingEngine(path)
        for model, (i, o) in models.items():
            assert engine.calculate_nano(model, 10**6, 10**6) == ceil_nano(i + o)


_SHARED: list[PricingEngine] = []


def _shared_engine() -> PricingEngine:
    """Hypothesis tests cannot take function-scoped fixtures; share one litellm-backed engine."""
    pytest.importorskip("litellm")
    if not _SHARED:
        _SHARED.append(PricingEngine())
    return _SHARED[0]
