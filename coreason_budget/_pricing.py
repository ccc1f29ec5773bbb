"""
Token pricing: what an LLM call costs, exact to the nano-dollar, without litellm on the hot path.

:class:`PricingEngine` answers "how much did (or could) this call cost" from
litellm's model price table (``litellm.model_cost``) plus operator overrides.
litellm's own ``cost_per_token`` takes tens of microseconds a call because it
re-resolves the model and re-parses its entry every time; a budget check runs
on every request, so we turn each entry into integer rates once, on first use,
and a warm :meth:`PricingEngine.calculate` is a dict lookup and a few integer
multiplications.

Semantics (the places the spec is silent):

* **Cached tokens are part of ``input_tokens``**, as in OpenAI's ``usage``
  (``prompt_tokens`` includes ``prompt_tokens_details.cached_tokens``) and as
  ``litellm.cost_per_token(prompt_tokens=..., cache_read_input_tokens=...)``
  computes it: ``cached_input_tokens`` are billed at the cache-read price and
  the remaining ``input_tokens - cached_input_tokens`` at the input price. So
  ``cached_input_tokens > input_tokens`` is an error.
* **Cache writes are part of ``input_tokens`` too**: ``cache_creation_input_tokens``
  (Anthropic's prompt-caching writes, and the OpenAI-compatible
  ``prompt_tokens_details.cache_creation_tokens``) are billed at the cache-write
  price (``cache_creation_input_token_cost``) and only the remaining
  ``input_tokens - cached_input_tokens - cache_creation_input_tokens`` at the
  input price, exactly as ``litellm.cost_per_token(prompt_tokens=...,
  cache_read_input_tokens=..., cache_creation_input_tokens=...)`` prices a
  table model; a sum above ``input_tokens`` is an error. Anthropic's ``usage``
  reports ``input_tokens`` *without* cache reads and writes (litellm's
  ``prompt_tokens`` adds them back): pass ``input_tokens + cache_read_input_tokens
  + cache_creation_input_tokens``. Writes are priced at the default (5-minute)
  cache-write rate; a 1-hour write (``..._above_1hr``, 2x input at Anthropic) is
  not told apart by a token count and is under-charged by that difference.
* **A model without a cache-read or cache-write price** bills those tokens at
  its input price, which is what litellm does (Fireworks cache reads aside,
  below). Likewise an override without ``cached_input_per_mtok`` or
  ``cache_creation_input_per_mtok``.
* **Long-context prices**: when ``input_tokens`` exceeds a threshold in the
  table (``input_cost_per_token_above_200k_tokens`` and friends, or Dashscope's
  ``tiered_pricing`` ranges) the whole request is billed at that tier's rates,
  cached and output tokens included; a rate the tier does not list falls back
  as in litellm. xAI bills the tier from the threshold itself (``>=``), like
  litellm; everyone else strictly above it. A ``tiered_pricing`` model's first
  tier also prices requests with 0 input tokens (litellm falls back to flat
  rates there, usually absent, i.e. free output).
* **Fireworks** entries without a cache-read price bill cache reads at the
  share of the input price litellm's code applies (0.5), to agree with it.
* **Not modelled**, because they are not a function of token counts: priority /
  flex / batch service tiers, regional uplifts, audio / image /
  reasoning-token breakdowns, per-second and per-character prices, and time of
  day: DeepSeek's off-peak discount is ignored, so those models are charged the
  standard (higher) rate, which over- rather than under-charges a budget.
* **Exactness**: a table price is taken at its shortest decimal form
  (``repr(3e-05) == "3e-05"``), every rate is an integer in a per-model power
  of ten below the dollar, and the total is rounded *up* to whole nano-dollars
  once (a sub-nano remainder is charged, never given away).
* **Model names** are looked up as written and without their first
  ``provider/`` segment (``openai/gpt-4o`` -> ``gpt-4o``), overrides before
  the table; so an override for ``gpt-4o`` also prices ``openai/gpt-4o``, and
  one for ``azure/gpt-4o`` prices only that name. Only if neither knows the
  model, the same is tried without a trailing date (``-2024-08-06``,
  ``-20241022``, ``@20241022``): a snapshot newer than the installed table is
  priced as its family rather than refused. A dated name in the table keeps
  its own price.
* **Unknown models raise** :class:`UnknownModelError`; a model costs $0 only
  if an override (or the table) says its prices are 0. A table entry priced
  only per second, image or query is unknown here, not free.
* **Overrides are flat** prices: no long-context tiers.
* **Token counts** must be ``int`` (``bool`` rejected) and ``>= 0``.
* **Threads**: :meth:`calculate` and :meth:`estimate` may run from any number
  of threads. :meth:`set_price` swaps in a new immutable state under a lock,
  so a concurrent ``calculate`` sees either the old price or the new one.
* **The litellm table is read once**, on the first lookup that needs it; later
  edits of ``litellm.model_cost`` are not seen by an existing engine.
* **Estimates** are counted prompt tokens plus ``max_output_tokens`` capped at
  the model's ``max_output_tokens`` in the table (which an override of a
  table model keeps); ``None`` means that maximum, and is an
  :class:`InvalidInputError` for a model whose maximum is unknown. Prompts
  are counted with litellm's ``token_counter`` using only tokenizers that
  ship inside litellm (tiktoken's bundled encodings, and the bundled
  Anthropic / DeepSeek tokenizers), never one downloaded from the Hugging
  Face hub, and with image URLs not fetched. If counting fails, the prompt is
  charged one token per 3 characters of its JSON form, rounded up: English
  averages ~4 characters a token, so this errs high.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import threading
from collections.abc import Mapping, Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import attrs

from ._money import MAX_AMOUNT_USD, check_id
from .exceptions import ConfigError, InvalidInputError, UnknownModelError

__all__ = ["PricingEngine"]

_NANO_EXP = 9
_PER_MTOK_EXP = 6
#: A price above this (USD per million tokens) is a typo, not a price list.
_MAX_PER_MTOK = Decimal(MAX_AMOUNT_USD)
#: Providers that bill a long-context tier from the threshold itself (>=), as litellm does.
_INCLUSIVE_THRESHOLD_PROVIDERS = frozenset({"xai"})
_THRESHOLD_KEY_PREFIXES = tuple(
    f"{rate}_above_"
    for rate in (
        "input_cost_per_token",
        "output_cost_per_token",
        "cache_read_input_token_cost",
        "cache_creation_input_token_cost",
    )
)
#: Service-tier (priority, flex, ...) and batch variants of a price: not the standard rate.
_NON_STANDARD_SUFFIXES = ("_auto", "_flex", "_balanced", "_priority", "_fast", "_batches")
_THRESHOLD = re.compile(r"(\d+)(k?)")
_DATE_SUFFIX = re.compile(r"(?:-\d{4}-\d{2}-\d{2}|[-@]\d{8})$")
_OVERRIDE_FIELDS = frozenset(
    {"input_per_mtok", "output_per_mtok", "cached_input_per_mtok", "cache_creation_input_per_mtok"}
)
_MAX_CACHED_NAMES = 100_000
#: Characters per token assumed when a prompt cannot be tokenized; low on purpose.
_FALLBACK_CHARS_PER_TOKEN = 3


@attrs.frozen
class _Rates:
    """Per-token prices in units of ``10**-exp`` USD (``exp`` is per model, see :class:`_Price`)."""

    input: int
    output: int
    cached: int
    #: Cache writes (``cache_creation_input_token_cost``).
    creation: int


#: An override: input, output, cache-read and cache-write prices in USD per million tokens;
#: ``None`` for a cache price means the input price.
_Override = tuple[Decimal, Decimal, Decimal | None, Decimal | None]
#: A prepared tier: ``(threshold, input, output, cache read, cache write)`` in USD per token.
_Tier = tuple[int, Decimal, Decimal, Decimal, Decimal]


@attrs.frozen
class _Price:
    """Everything needed to price one model, prepared once."""

    base: _Rates
    #: ``(threshold, rates)`` ascending: rates apply when ``input_tokens > threshold``.
    tiers: tuple[tuple[int, _Rates], ...]
    #: ``10**(exp - 9)``: turns a total in ``10**-exp`` USD into nano-dollars.
    divisor: int
    max_output_tokens: int | None
    overridden: bool = False


@attrs.frozen
class _State:
    """Overrides plus the name -> price cache built from them; replaced whole, never mutated
    except for cache fills, so a reader never mixes two generations of overrides."""

    overrides: Mapping[str, _Override]
    cache: dict[str, _Price] = attrs.field(factory=dict)


class PricingEngine:
    """
    Prices LLM calls from litellm's model table and operator overrides.

    ``overrides_file`` (JSON or TOML, chosen by extension) maps model names to
    ``input_per_mtok``, ``output_per_mtok`` and optionally
    ``cached_input_per_mtok`` (cache reads) and ``cache_creation_input_per_mtok``
    (cache writes), in USD per million tokens::

        ["openai/gpt-4o"]
        input_per_mtok = 2.5
        output_per_mtok = 10
        cached_input_per_mtok = 1.25

        ["anthropic/claude-sonnet-4-5"]
        input_per_mtok = 3
        output_per_mtok = 15
        cached_input_per_mtok = 0.3
        cache_creation_input_per_mtok = 3.75

        [llama3-local]            # free: costs exactly $0
        input_per_mtok = 0
        output_per_mtok = 0

    The file is read and checked here, so a bad file fails at startup
    (:class:`ConfigError`) rather than on the first request; litellm is only
    imported when a model is not overridden.
    """

    def __init__(self, overrides_file: str | os.PathLike[str] | None = None) -> None:
        overrides = {} if overrides_file is None else _load_overrides_file(overrides_file)
        self._lock = threading.Lock()  # serialises set_price
        self._table_lock = threading.Lock()  # one thread builds the table, others wait for it
        self._state = _State(overrides)
        self._table: _Table | None = None

    def calculate(
        self,
        model: str,
        input_tokens: int,
        output_tokens: int,
        cached_input_tokens: int = 0,
        cache_creation_input_tokens: int = 0,
    ) -> Decimal:
        """The cost in USD, exact, rounded up to the nano-dollar (``Decimal('0.004750000')``)."""
        nano = self.calculate_nano(
            model, input_tokens, output_tokens, cached_input_tokens, cache_creation_input_tokens
        )
        return Decimal(nano).scaleb(-_NANO_EXP)

    def calculate_nano(
        self,
        model: str,
        input_tokens: int,
        output_tokens: int,
        cached_input_tokens: int = 0,
        cache_creation_input_tokens: int = 0,
    ) -> int:
        """
        The cost in nano-dollars (1e-9 USD), rounded up.

        ``cached_input_tokens`` (cache reads) and ``cache_creation_input_tokens``
        (cache writes) are part of ``input_tokens``, as in litellm's ``prompt_tokens``.
        """
        # type() is, not isinstance: the common case must stay cheap, and bool is an int.
        if not (
            type(input_tokens) is int
            and type(output_tokens) is int
            and type(cached_input_tokens) is int
            and type(cache_creation_input_tokens) is int
            and cached_input_tokens >= 0
            and cache_creation_input_tokens >= 0
            and cached_input_tokens + cache_creation_input_tokens <= input_tokens
            and output_tokens >= 0
        ):
            input_tokens, output_tokens, cached_input_tokens, cache_creation_input_tokens = (
                _check_tokens(
                    input_tokens, output_tokens, cached_input_tokens, cache_creation_input_tokens
                )
            )
        price = self._price(model)
        rates = price.base
        for threshold, tier in price.tiers:
            if input_tokens <= threshold:
                break
            rates = tier
        total = (
            (input_tokens - cached_input_tokens - cache_creation_input_tokens) * rates.input
            + cached_input_tokens * rates.cached
            + cache_creation_input_tokens * rates.creation
            + output_tokens * rates.output
        )
        return -(-total // price.divisor)

    def estimate(
        self,
        model: str,
        messages: Sequence[Mapping[str, Any]],
        max_output_tokens: int | None = None,
    ) -> Decimal:
        """
        The most a call can cost, for reserving budget before making it.

        Prompt tokens are counted from ``messages``; output is ``max_output_tokens``
        capped at the model's own output maximum, or that maximum when ``None``.
        A model whose maximum is unknown needs an explicit ``max_output_tokens``.
        """
        price = self._price(model)
        limit = self._max_output_tokens(model, price)
        if max_output_tokens is None:
            if limit is None:
                raise InvalidInputError(
                    f"max_output_tokens is required for model {model!r}: "
                    "its maximum output length is not known"
                )
            output = limit
        else:
            output = _check_count(max_output_tokens, "max_output_tokens")
            if limit is not None:
                output = min(output, limit)
        prompt = self._count_prompt_tokens(model, messages)
        return self.calculate(model, prompt, output)

    def set_price(
        self,
        model: str,
        *,
        input_per_mtok: float | Decimal,
        output_per_mtok: float | Decimal,
        cached_input_per_mtok: float | Decimal | None = None,
        cache_creation_input_per_mtok: float | Decimal | None = None,
    ) -> None:
        """
        Price ``model`` at these USD-per-million-token rates, ahead of litellm's table.

        ``cached_input_per_mtok=None`` bills cache reads, and
        ``cache_creation_input_per_mtok=None`` cache writes, at the input price
        (as litellm does for a model without those prices).
        Thread-safe; takes effect for every later call.
        """
        check_id(model, "model")

        def optional(value: float | Decimal | None, what: str) -> Decimal | None:
            return None if value is None else _price_decimal(value, what, InvalidInputError)

        entry: _Override = (
            _price_decimal(input_per_mtok, "input_per_mtok", InvalidInputError),
            _price_decimal(output_per_mtok, "output_per_mtok", InvalidInputError),
            optional(cached_input_per_mtok, "cached_input_per_mtok"),
            optional(cache_creation_input_per_mtok, "cache_creation_input_per_mtok"),
        )
        with self._lock:
            # A fresh cache too: any name may now resolve to this override.
            self._state = _State({**self._state.overrides, model: entry})

    # -- internals --------------------------------------------------------------------------------

    def _price(self, model: str) -> _Price:
        state = self._state
        try:
            return state.cache[model]
        except (KeyError, TypeError):
            pass
        check_id(model, "model")
        price = self._resolve(model, state.overrides)
        # Written into the state it was resolved from: if set_price replaced it meanwhile,
        # this entry is dropped along with the old state instead of going stale in the new one.
        # Capped because dated names resolve by pattern: endless made-up dates must not grow it.
        if len(state.cache) < _MAX_CACHED_NAMES:
            state.cache[model] = price
        return price

    def _resolve(self, model: str, overrides: Mapping[str, _Override]) -> _Price:
        table: _Table | None = None
        for names in _candidate_names(model):
            for name in names:
                if name in overrides:
                    return _override_price(*overrides[name])
            if table is None:
                try:
                    table = self._load_table()
                except UnknownModelError as e:  # no litellm: only overrides can price
                    raise UnknownModelError(f"No price known for model {model!r}: {e}") from e
            for name in names:
                price = table.price(name)
                if price is not None:
                    return price
        version = table.version if table is not None else "?"
        raise UnknownModelError(
            f"No price known for model {model!r}: it is not in litellm's model price table "
            f"(litellm {version}) and has no override. Add one with "
            f"pricing.set_price({model!r}, input_per_mtok=..., output_per_mtok=...) "
            "or an entry in the pricing overrides file."
        )

    def _max_output_tokens(self, model: str, price: _Price) -> int | None:
        """The model's output limit; an override borrows the table's, if litellm knows one."""
        if price.max_output_tokens is not None or not price.overridden:
            return price.max_output_tokens
        try:
            table = self._load_table()
        except UnknownModelError:  # litellm not installed: the limit is simply unknown
            return None
        for names in _candidate_names(model):
            limit = table.max_output_tokens(names)
            if limit is not None:
                return limit
        return None

    def preload(self) -> bool:
        """
        Load litellm's price table now rather than on the first priced call.

        For services: the first load imports litellm, which takes seconds.
        Returns False when litellm is not installed (only overrides can price).
        """
        try:
            self._load_table()
        except UnknownModelError:
            return False
        return True

    def loaded(self) -> bool:
        """Whether litellm's price table is loaded (so pricing imports nothing more)."""
        return self._table is not None

    def _load_table(self) -> _Table:
        table = self._table
        if table is None:
            with self._table_lock:
                table = self._table
                if table is None:
                    table = self._table = _Table(_import_litellm())
        return table

    def _count_prompt_tokens(self, model: str, messages: Sequence[Mapping[str, Any]]) -> int:
        if isinstance(messages, str | bytes) or not isinstance(messages, Sequence):
            raise InvalidInputError(
                f"messages must be a sequence of message mappings, got {type(messages).__name__}"
            )
        for message in messages:
            if not isinstance(message, Mapping):
                raise InvalidInputError(
                    f"each message must be a mapping, got {type(message).__name__}"
                )
        try:
            litellm = _import_litellm()
            count = litellm.token_counter(
                model=model,
                messages=[dict(m) for m in messages],
                custom_tokenizer=_offline_tokenizer(litellm, model),
                # Otherwise litellm downloads each image to measure it.
                use_default_image_token_count=True,
            )
        except Exception:  # any tokenizer failure falls back to the character rule
            count = None
        if type(count) is int and count >= 0:
            return count
        return _fallback_token_count(messages)


class _Table:
    """litellm's ``model_cost`` turned, entry by entry on demand, into :class:`_Price`."""

    def __init__(self, litellm: Any) -> None:
        self.version: str = _litellm_version()
        # Fireworks bills cache reads at a fixed share of the input price when its entry lists
        # none; litellm applies that rule in code, not in the table, so we read its constant
        # (absent in older litellm, which billed them as input, as we then do).
        self._cache_ratios: dict[str, Decimal] = {}
        ratio = getattr(
            getattr(litellm, "constants", None), "FIREWORKS_AI_DEFAULT_CACHE_READ_RATE_RATIO", None
        )
        if ratio is not None and (dec := _table_rate(ratio)) is not None:
            self._cache_ratios["fireworks_ai"] = dec
        # A shallow copy: later registrations by the application do not change our prices
        # half-way through a process, and the dict is not mutated under our iteration.
        self._raw: dict[str, Any] = dict(litellm.model_cost)
        self._raw.pop("sample_spec", None)
        self._prepared: dict[str, _Price | None] = {}

    def price(self, name: str) -> _Price | None:
        try:
            return self._prepared[name]
        except KeyError:
            pass
        entry = self._raw.get(name)
        price = _table_price(entry, self._cache_ratios) if isinstance(entry, Mapping) else None
        self._prepared[name] = price
        return price

    def max_output_tokens(self, names: Sequence[str]) -> int | None:
        for name in names:
            entry = self._raw.get(name)
            if isinstance(entry, Mapping):
                return _max_output(entry)
        return None


# -- building prices ------------------------------------------------------------------------------


def _table_price(entry: Mapping[str, Any], cache_ratios: Mapping[str, Decimal]) -> _Price | None:
    """Prepare one litellm entry; ``None`` when it has no per-token price at all."""
    raw_in = _table_rate(entry.get("input_cost_per_token"))
    raw_out = _table_rate(entry.get("output_cost_per_token"))
    base_in = raw_in if raw_in is not None else Decimal(0)
    base_out = raw_out if raw_out is not None else Decimal(0)
    tiers = _ranged_tiers(entry, base_out)
    if raw_in is None and raw_out is None and tiers is None:
        return None
    base_cached = _table_rate(entry.get("cache_read_input_token_cost"))
    ratio = cache_ratios.get(str(entry.get("litellm_provider")))
    if base_cached is None and raw_in is not None and ratio is not None:
        base_cached = raw_in * ratio
    # Cache writes: no provider-specific default, an absent price is the input price.
    base_creation = _table_rate(entry.get("cache_creation_input_token_cost"))
    base = (
        base_in,
        base_out,
        base_cached if base_cached is not None else base_in,
        base_creation if base_creation is not None else base_in,
    )
    if tiers is None:
        tiers = _threshold_tiers(entry, base_in, base_out, base_cached, base_creation)
    return _make_price(base, tiers, _max_output(entry))


def _threshold_tiers(
    entry: Mapping[str, Any],
    base_in: Decimal,
    base_out: Decimal,
    base_cached: Decimal | None,
    base_creation: Decimal | None,
) -> list[_Tier]:
    """
    Long-context prices (``input_cost_per_token_above_200k_tokens`` and the like).

    As in litellm, every ``<rate>_above_<N>_tokens`` key with a value declares a
    threshold, the highest one crossed wins, and a rate it does not list keeps
    the value from the tier below (a cache-read or cache-write rate absent
    everywhere is the tier's input rate). Service-tier and batch variants are
    not thresholds here.
    """
    thresholds: set[int] = set()
    for key, value in entry.items():
        if (
            key.startswith(_THRESHOLD_KEY_PREFIXES)
            and "_tokens" in key
            and not key.endswith(_NON_STANDARD_SUFFIXES)
            and _table_rate(value) is not None
        ):
            m = _THRESHOLD.fullmatch(key.rsplit("_above_", 1)[1].split("_tokens")[0])
            if m:
                thresholds.add(int(m[1]) * (1000 if m[2] else 1))
    inclusive = entry.get("litellm_provider") in _INCLUSIVE_THRESHOLD_PROVIDERS
    tiers: list[_Tier] = []
    tier_in, tier_out, tier_cached, tier_creation = base_in, base_out, base_cached, base_creation
    for threshold in sorted(thresholds):
        suffix = f"_above_{threshold // 1000}k_tokens" if threshold % 1000 == 0 else None
        keys = [f"_above_{threshold}_tokens", *([suffix] if suffix else [])]

        def rate(prefix: str, default: Decimal | None, keys: list[str] = keys) -> Decimal | None:
            for k in keys:
                found = _table_rate(entry.get(prefix + k))
                if found is not None:
                    return found
            return default

        tier_in = rate("input_cost_per_token", tier_in) or Decimal(0)
        tier_out = rate("output_cost_per_token", tier_out) or Decimal(0)
        tier_cached = rate("cache_read_input_token_cost", tier_cached)
        tier_creation = rate("cache_creation_input_token_cost", tier_creation)
        tiers.append(
            (
                # An integer count reaches N exactly when it is above N - 1.
                threshold - 1 if inclusive else threshold,
                tier_in,
                tier_out,
                tier_cached if tier_cached is not None else tier_in,
                tier_creation if tier_creation is not None else tier_in,
            )
        )
    return tiers


def _ranged_tiers(entry: Mapping[str, Any], base_out: Decimal) -> list[_Tier] | None:
    """
    Dashscope-style ``tiered_pricing``: ``[{"range": [lo, hi], "input_cost_per_token": ...}]``.

    litellm bills the first tier with ``lo < input_tokens <= hi`` and above the last range the
    last tier. For the contiguous ranges in the table this is "the highest ``lo`` below
    ``input_tokens``", which is how we store it. Ranges that do not start at 0 and tile the
    line are refused (``None`` makes the caller use the flat prices, and the agreement test
    would flag it).
    """
    raw = entry.get("tiered_pricing")
    if not isinstance(raw, list) or not raw:
        return None
    ranged: list[tuple[Decimal, Decimal, Mapping[str, Any]]] = []
    for tier in raw:
        bounds = tier.get("range") if isinstance(tier, Mapping) else None
        if not (isinstance(bounds, list | tuple) and len(bounds) == 2):
            continue
        low, high = (_table_rate(b) for b in bounds)
        if low is None or high is None:
            continue
        ranged.append((low, high, tier))
    ranged.sort(key=lambda r: r[0])
    if not ranged or ranged[0][0] != 0 or any(a[1] != b[0] for a, b in itertools.pairwise(ranged)):
        return None
    if any(_table_rate(t.get("input_cost_per_token")) is None for _, _, t in ranged):
        return None
    tiers: list[_Tier] = []
    for low, _, tier in ranged:
        tier_in = _rate_or(tier["input_cost_per_token"], Decimal(0))
        tiers.append(
            (
                # input_tokens > low for integer counts; the first tier also prices 0 input
                # tokens, where litellm uses the flat rates (often absent, i.e. free output).
                -1 if not tiers else math.floor(low),
                tier_in,
                _rate_or(tier.get("output_cost_per_token"), base_out),
                _rate_or(tier.get("cache_read_input_token_cost"), tier_in),
                _rate_or(tier.get("cache_creation_input_token_cost"), tier_in),
            )
        )
    return tiers


def _override_price(
    input_per_mtok: Decimal,
    output_per_mtok: Decimal,
    cached_per_mtok: Decimal | None,
    creation_per_mtok: Decimal | None,
) -> _Price:
    base = (
        input_per_mtok.scaleb(-_PER_MTOK_EXP),
        output_per_mtok.scaleb(-_PER_MTOK_EXP),
        (cached_per_mtok if cached_per_mtok is not None else input_per_mtok).scaleb(-_PER_MTOK_EXP),
        (creation_per_mtok if creation_per_mtok is not None else input_per_mtok).scaleb(
            -_PER_MTOK_EXP
        ),
    )
    return _make_price(base, [], None, overridden=True)


def _make_price(
    base: tuple[Decimal, Decimal, Decimal, Decimal],
    tiers: Sequence[_Tier],
    max_output_tokens: int | None,
    *,
    overridden: bool = False,
) -> _Price:
    """Choose the smallest power of ten that makes every rate an integer, and convert."""
    rates = [*base, *(r for t in tiers for r in t[1:])]
    exp = max([_NANO_EXP, *(_decimal_places(r) for r in rates)])

    def ints(i: Decimal, o: Decimal, c: Decimal, w: Decimal) -> _Rates:
        return _Rates(
            int(i.scaleb(exp)), int(o.scaleb(exp)), int(c.scaleb(exp)), int(w.scaleb(exp))
        )

    return _Price(
        base=ints(*base),
        tiers=tuple((t[0], ints(*t[1:])) for t in tiers),
        divisor=10 ** (exp - _NANO_EXP),
        max_output_tokens=max_output_tokens,
        overridden=overridden,
    )


def _table_rate(value: object, default: Decimal | None = None) -> Decimal | None:
    """A table number as its shortest exact decimal; ``default`` when absent or unusable."""
    if isinstance(value, bool) or value is None:
        return default
    try:
        if isinstance(value, float):
            dec = Decimal(repr(value))
        elif isinstance(value, int | str | Decimal):
            dec = Decimal(value)  # litellm accepts "3e-07" strings from YAML configs
        else:
            return default
    except (InvalidOperation, ValueError):
        return default
    if not dec.is_finite() or dec < 0:
        return default
    return dec


def _decimal_places(value: Decimal) -> int:
    """Digits after the point in the shortest form of a finite decimal (3E-5 -> 5, 2.5 -> 1)."""
    exponent = value.normalize().as_tuple().exponent
    assert isinstance(exponent, int)  # finite: checked when the rate was read
    return max(-exponent, 0)


def _rate_or(value: object, default: Decimal) -> Decimal:
    rate = _table_rate(value)
    return default if rate is None else rate


def _max_output(entry: Mapping[str, Any]) -> int | None:
    value = entry.get("max_output_tokens")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not math.isfinite(value) or value <= 0:
        return None
    return int(value)


def _candidate_names(model: str) -> list[list[str]]:
    """
    Names to try, in groups: first the name and its provider-less form (the same model),
    then the same without a date suffix (its family, a fallback for a newer snapshot).
    Within a group overrides are tried before the table.
    """
    same = [model]
    if "/" in model:
        same.append(model.split("/", 1)[1])
    family = []
    for name in same:
        undated = _DATE_SUFFIX.sub("", name)
        if undated != name and undated and undated not in family:
            family.append(undated)
    return [same, family] if family else [same]


# -- overrides file -------------------------------------------------------------------------------


def _load_overrides_file(path: str | os.PathLike[str]) -> dict[str, _Override]:
    """Read and validate an overrides file; every problem is a ConfigError naming file and entry."""
    try:
        file = Path(path)
    except TypeError as e:
        raise ConfigError(f"pricing overrides file must be a path, got {path!r}") from e
    suffix = file.suffix.lower()
    if suffix not in {".json", ".toml"}:
        raise ConfigError(f"pricing overrides file {str(file)!r} must end in .json or .toml")
    try:
        data = file.read_bytes()
    except (OSError, ValueError) as e:  # ValueError: a NUL or lone surrogate in the path
        raise ConfigError(f"cannot read pricing overrides file {str(file)!r}: {e}") from e
    try:
        if suffix == ".json":
            # parse_float=Decimal: "0.15" stays exactly 0.15, never a binary float.
            parsed: object = json.loads(
                data, parse_float=Decimal, object_pairs_hook=_no_duplicate_keys
            )
        else:
            import tomllib

            parsed = tomllib.loads(data.decode("utf-8"), parse_float=Decimal)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError/TOMLDecodeError are ValueErrors
        raise ConfigError(
            f"pricing overrides file {str(file)!r} is not valid {suffix[1:]}: {e}"
        ) from e
    if not isinstance(parsed, dict):
        raise ConfigError(
            f"pricing overrides file {str(file)!r} must map model names to prices, "
            f"got a {type(parsed).__name__}"
        )
    overrides: dict[str, _Override] = {}
    for model, spec in parsed.items():
        where = f"pricing overrides file {str(file)!r}, entry {model!r}"
        try:
            check_id(model, "model")
        except InvalidInputError as e:
            raise ConfigError(f"{where}: {e}") from e
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: must be a table of prices, got {type(spec).__name__}")
        unknown = set(spec) - _OVERRIDE_FIELDS
        if unknown:
            # TOML reads [gpt-3.5-turbo] as table "gpt-3" holding table "5-turbo".
            hint = (
                '; in TOML quote model names that contain dots: ["gpt-3.5-turbo"]'
                if suffix == ".toml" and any(isinstance(spec[k], dict) for k in unknown)
                else ""
            )
            raise ConfigError(
                f"{where}: unknown field(s) {', '.join(sorted(map(str, unknown)))}; "
                f"expected {', '.join(sorted(_OVERRIDE_FIELDS))}{hint}"
            )
        for required in ("input_per_mtok", "output_per_mtok"):
            if required not in spec:
                raise ConfigError(f"{where}: missing {required}")

        def price(name: str, spec: dict[str, Any] = spec, where: str = where) -> Decimal:
            return _price_decimal(spec[name], f"{where}: {name}", ConfigError)

        overrides[model] = (
            price("input_per_mtok"),
            price("output_per_mtok"),
            price("cached_input_per_mtok") if "cached_input_per_mtok" in spec else None,
            price("cache_creation_input_per_mtok")
            if "cache_creation_input_per_mtok" in spec
            else None,
        )
    return overrides


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json.loads keeps the last of two equal keys; a price file with both is a mistake."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _price_decimal(value: object, what: str, error: type[Exception]) -> Decimal:
    """A USD-per-million-token price: a finite, non-negative, sane number, exactly."""
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal):
        raise error(f"{what} must be a number of USD per million tokens, got {value!r}")
    dec = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    if not dec.is_finite():
        raise error(f"{what} must be finite, got {value!r}")
    if dec < 0:
        raise error(f"{what} must not be negative, got {value!r}")
    if dec > _MAX_PER_MTOK:
        raise error(f"{what} of {value!r} USD per million tokens is above {_MAX_PER_MTOK}")
    return dec


# -- input checks ---------------------------------------------------------------------------------


def _check_count(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInputError(f"{what} must be an int, got {type(value).__name__}")
    if value < 0:
        raise InvalidInputError(f"{what} must not be negative, got {value}")
    return int(value)


def _check_tokens(
    input_tokens: object,
    output_tokens: object,
    cached_input_tokens: object,
    cache_creation_input_tokens: object = 0,
) -> tuple[int, int, int, int]:
    """The slow path of calculate's checks: say exactly what is wrong (or accept int subclasses)."""
    inp = _check_count(input_tokens, "input_tokens")
    out = _check_count(output_tokens, "output_tokens")
    cached = _check_count(cached_input_tokens, "cached_input_tokens")
    creation = _check_count(cache_creation_input_tokens, "cache_creation_input_tokens")
    if cached > inp:
        raise InvalidInputError(
            f"cached_input_tokens ({cached}) cannot exceed input_tokens ({inp}): "
            "cached tokens are counted within input_tokens"
        )
    if cached + creation > inp:
        raise InvalidInputError(
            f"cached_input_tokens + cache_creation_input_tokens ({cached} + {creation}) cannot "
            f"exceed input_tokens ({inp}): cache reads and writes are counted within "
            "input_tokens (Anthropic reports input_tokens without them: add them)"
        )
    return inp, out, cached, creation


# -- litellm --------------------------------------------------------------------------------------

_import_lock = threading.Lock()


def _import_litellm() -> Any:
    """Import litellm on first use, never letting it fetch its price map from the network."""
    with _import_lock:
        # setdefault: an operator who deliberately wants the remote map keeps that choice.
        os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        try:
            import litellm
        except ImportError as e:
            raise UnknownModelError(
                "litellm is not installed, so only models with a price override can be priced; "
                "install coreason-budget[pricing] or set a price with pricing.set_price()"
            ) from e
    return litellm


def _litellm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("litellm")
    except PackageNotFoundError:  # pragma: no cover - vendored or renamed installs
        return "unknown version"


def _offline_tokenizer(litellm: Any, model: str) -> dict[str, Any] | None:
    """
    ``None`` (let litellm choose) when its choice ships with litellm; else force tiktoken.

    litellm fetches Llama and Cohere tokenizers from the Hugging Face hub, which
    would block an offline process and log a warning; the Anthropic and DeepSeek
    tokenizers and tiktoken's encodings are bundled with it.
    """
    try:
        from litellm.utils import huggingface_tokenizer_kind

        if huggingface_tokenizer_kind(model) in (None, "anthropic", "deepseek"):
            return None
    except Exception:  # older litellm or a surprise: take the always-offline route
        pass
    from litellm.litellm_core_utils.default_encoding import encoding

    return {"type": "openai_tokenizer", "tokenizer": encoding}


def _fallback_token_count(messages: Sequence[Mapping[str, Any]]) -> int:
    text = json.dumps([dict(m) for m in messages], default=str, ensure_ascii=False)
    return -(-len(text) // _FALLBACK_CHARS_PER_TOKEN)
