"""
Bad input, fuzzed: every public call either does what it says or raises one of our exceptions.

Hypothesis throws ids of any text, bytes, length and type (lone surrogates, 200,000 characters,
None, ints), amounts of any type and value (nan, inf, -0.0, subnormals, huge ints, Decimal NaN,
sNaN and Infinity, strings, bools, Fractions), scopes, on_error values, reservation ids,
idempotency keys, token counts and prices, and arbitrary ``COREASON_BUDGET_*`` strings at the
public API, against the real test redis. Each call must either succeed, with exactly the
documented effect (oracles below compute the expected nano-dollars independently, with
Fractions), or raise a :class:`~coreason_budget.BudgetError` (:class:`InvalidInputError` /
:class:`ConfigError` for bad input): never a raw redis, cattrs, TypeError or decimal exception.
A refused call must leave every key in the store exactly as it was.

The bugs this found were fixed; :class:`TestRegressions` keeps one input for each.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import attrs
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coreason_budget import (
    BudgetConfig,
    BudgetError,
    BudgetManager,
    BudgetUnavailableError,
    ConfigError,
    InvalidInputError,
    PricingEngine,
    UnknownModelError,
    UnknownReservationError,
)

from .conftest import ManagerFactory
from .redis_server import snapshot

PREFIX = "fuzz"
MAX_AMOUNT_NANO = 1_000_000 * 10**9
MAX_LIMIT_NANO = 9_000_000 * 10**9
MAX_ID_LENGTH = 256
MODEL = "fuzz-llm"  # priced by an override: no litellm table is needed
MODEL_PRICES = (Decimal(3), Decimal(15), Decimal("1.5"))  # input, output, cached; per Mtok
SEED_RESERVATION = "seed-res"

FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)

# -- strategies ------------------------------------------------------------------------------

surrogate = st.characters(categories=["Cs"])
any_text = st.text(max_size=40)
#: Text with at least one lone surrogate somewhere in it.
with_surrogate = st.tuples(any_text, surrogate, any_text).map("".join)
valid_ids = st.one_of(
    st.sampled_from(["alice", "bob", "proj", "m", SEED_RESERVATION, "seed", "{fuzz}:day", "a b"]),
    st.text(min_size=1, max_size=12),
)
anything = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.decimals(),
    st.fractions(),
    st.binary(max_size=10),
    st.complex_numbers(max_magnitude=10),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
    st.builds(object),
)
ids = st.one_of(
    valid_ids,
    st.text(max_size=300),  # empty and over-long too
    st.integers(MAX_ID_LENGTH - 3, MAX_ID_LENGTH + 3).map(lambda n: "\U0001d11e" * n),
    st.integers(MAX_ID_LENGTH + 1, 200_000).map(lambda n: "x" * n),
    with_surrogate,
    anything,
)


def _ordinary(value: object) -> bool:
    """
    False for Decimals whose exact value would make this test's own oracle (Fractions)
    enormous: more than 19 significant digits, or an exponent near the context's limits.
    Those are covered one by one in TestRegressions.
    """
    if not isinstance(value, Decimal) or not value.is_finite():
        return True
    return len(value.as_tuple().digits) <= 19 and -990_000 < value.adjusted() < 990_000


SPECIAL_AMOUNTS: list[object] = [
    Decimal("NaN"),
    Decimal("-NaN"),
    Decimal("sNaN"),
    Decimal("-sNaN"),
    Decimal("Infinity"),
    Decimal("-Infinity"),
    Decimal("-0"),
    Decimal("0E-30"),
    Decimal("1E-9"),
    Decimal("1E-10"),
    Decimal("-1E-10"),
    Decimal("1000000"),
    Decimal("1000000.000000001"),
    Decimal("1000000.0000000001"),
    Decimal("9000000"),
    Decimal("9000000.000000001"),
    5e-324,
    2.2250738585072014e-308,
    -0.0,
    0.1,
    1e6,
    1e6 + 1e-9,
    9e6,
    sys.float_info.max,
    10**400,
    -(10**400),
    Fraction(1, 3),
    "1",
    "nan",
    True,
    False,
]
amounts = st.one_of(
    st.sampled_from(SPECIAL_AMOUNTS),
    st.floats(),  # nan, inf, -0.0, subnormals
    st.floats(min_value=0, max_value=2e6),
    st.integers(),
    st.integers(min_value=-5, max_value=2_000_000),
    st.decimals(),
    st.decimals(min_value=0, max_value=2_000_000),
    anything,
    any_text,
).filter(_ordinary)
token_counts = st.one_of(
    st.integers(min_value=0, max_value=10**9),
    st.integers(min_value=-(10**3), max_value=10**3),
    st.sampled_from([0, 1, -1, True, False, 1.0, "10", None, Decimal(5), 10**9]),
    anything,
)

# -- oracles ---------------------------------------------------------------------------------


def valid_id(value: object) -> bool:
    """The documented rule: non-empty text of at most 256 characters (and encodable)."""
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ID_LENGTH:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def usd(value: object) -> Fraction | None:
    """The exact USD amount an int, float or Decimal means, or None when it is not a money value."""
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal):
        return None
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        exact = Fraction(Decimal(repr(value)))  # a float means its shortest decimal form
    elif isinstance(value, Decimal) and not value.is_finite():
        return None
    else:
        exact = Fraction(value)
    return exact if exact >= 0 else None


def expected_nano(value: object, maximum: int = MAX_AMOUNT_NANO) -> int | None:
    """What the ledger must charge for *value* (rounded up), or None when it must be refused."""
    exact = usd(value)
    if exact is None or exact * 10**9 > maximum:
        return None
    return math.ceil(exact * 10**9)


def expected_price(value: object) -> Fraction | None:
    exact = usd(value)
    return None if exact is None or exact > 1_000_000 else exact


def expected_tokens(inp: object, out: object, cached: object) -> tuple[int, int, int] | None:
    counts = (inp, out, cached)
    if any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts):
        return None
    i, o, c = (int(x) for x in counts)
    return (i, o, c) if c <= i else None


def price_nano(prices: tuple[Fraction, Fraction, Fraction], tokens: tuple[int, int, int]) -> int:
    (pin, pout, pcached), (inp, out, cached) = prices, tokens
    return math.ceil(((inp - cached) * pin + cached * pcached + out * pout) * 10**9 / 10**6)


# -- the store -------------------------------------------------------------------------------


class Store:
    """The test redis, a manager on it, and a fresh, seeded ledger for every example."""

    def __init__(self, manager: BudgetManager, client: redis.Redis) -> None:
        self.m = manager
        self.client = client

    def reset(self) -> None:
        """Empty the store, then give it some state that a bad call could damage."""
        self.client.flushall()
        self.m.record_spend("alice", 1.5, project_id="proj", model="m", idempotency_key="seed")
        self.m.reserve("bob", 0.5, project_id="proj", model=MODEL, reservation_id=SEED_RESERVATION)
        self.m.set_limit("user", "carol", 3)

    def snapshot(self) -> dict[str, Any]:
        snap = snapshot(self.client)
        # No id, whatever it holds, may put a key outside the prefix's hash tag.
        assert all(key.startswith("{" + PREFIX + "}:") for key in snap), list(snap)
        return snap

    def attempt(self, call: Callable[[], object], *, valid: bool) -> object:
        """
        Run *call*: a valid one must not be refused as invalid, an invalid one must be, and a
        refused one must not have written anything. Returns the result, or the BudgetError.
        """
        before = self.snapshot()
        error: BudgetError | None = None
        try:
            result = call()
        except BudgetError as e:
            error = e
        if error is None:
            assert valid, f"accepted invalid input, returning {result!r}"
            return result
        assert not isinstance(error, BudgetUnavailableError), f"the store is up: {error!r}"
        assert isinstance(error, InvalidInputError) == (not valid), repr(error)
        assert self.snapshot() == before, f"{error!r} but the store changed"
        return error

    def spent(self, user: str = "fuzz-user", project: str = "fuzz-proj") -> dict[str, int]:
        return {k: u.spent_nano for k, u in self.m.usage(user, project).items()}


@pytest.fixture
def store(
    make_manager: ManagerFactory,
    redis_client: redis.Redis,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Store:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))  # any default path stays in here
    monkeypatch.setitem(sys.modules, "litellm", None)  # as if not installed: overrides only
    top = MAX_LIMIT_NANO // 10**9
    manager = make_manager(
        key_prefix=PREFIX,
        daily_user_limit_usd=top,
        daily_project_limit_usd=top,
        daily_global_limit_usd=top,
    )
    manager.pricing.set_price(
        MODEL,
        input_per_mtok=MODEL_PRICES[0],
        output_per_mtok=MODEL_PRICES[1],
        cached_input_per_mtok=MODEL_PRICES[2],
    )
    return Store(manager, redis_client)


# -- the properties --------------------------------------------------------------------------


class TestAmounts:
    """Costs, estimates and limits of any type and value: charged exactly, or refused cleanly."""

    @FUZZ
    @given(
        amount=amounts,
        call=st.sampled_from(
            ["check_availability", "record_spend", "reserve", "set_limit", "commit"]
        ),
    )
    def test_amounts(self, store: Store, amount: object, call: str) -> None:
        """Every accepted amount is charged rounded up to the nano-dollar, nothing else."""
        store.reset()
        m = store.m
        maximum = MAX_LIMIT_NANO if call == "set_limit" else MAX_AMOUNT_NANO
        nano = expected_nano(amount, maximum)
        removal = call == "set_limit" and amount is None  # None removes an override
        held = m.reserve("fuzz-user", 1, project_id="fuzz-proj") if call == "commit" else None
        spent = store.spent()
        calls: dict[str, Callable[[], object]] = {
            "check_availability": lambda: m.check_availability(
                "fuzz-user", amount, project_id="fuzz-proj"
            ),
            "record_spend": lambda: m.record_spend("fuzz-user", amount, project_id="fuzz-proj"),
            "reserve": lambda: m.reserve("fuzz-user", amount, project_id="fuzz-proj"),
            "set_limit": lambda: m.set_limit("user", "fuzz-user", amount),
            "commit": lambda: held.commit(amount),
        }
        result = store.attempt(calls[call], valid=nano is not None or removal)
        if isinstance(result, BudgetError):
            assert nano is None, f"{result!r}: the limits are far above any single amount"
            if call == "commit":
                assert held is not None
                assert held.state == "held"
            return
        if removal:
            assert m.usage("fuzz-user")["user"].limit_nano == MAX_LIMIT_NANO  # the default
            return
        assert nano is not None
        after = store.spent()
        if call == "check_availability":
            assert after == spent
        elif call == "set_limit":
            assert m.usage("fuzz-user")["user"].limit_nano == nano
        elif call == "commit":
            assert held is not None
            assert held.state == "committed"
            assert after == {k: v - 10**9 + nano for k, v in spent.items()}
        else:
            if call == "reserve":
                assert result.estimate_nano == nano
            assert after == {k: v + nano for k, v in spent.items()}


class TestIds:
    """User, project, model, reservation ids and idempotency keys of any type and length."""

    @FUZZ
    @given(
        user_id=ids,
        project_id=st.one_of(st.none(), ids),
        model=st.one_of(st.none(), ids),
        key=st.one_of(st.none(), ids),
        call=st.sampled_from(
            [
                "check_availability",
                "record_spend",
                "reserve",
                "usage",
                "reservation",
                "set_limit_user",
                "set_limit_project",
                "set_limit_global",
            ]
        ),
    )
    def test_ids(
        self, store: Store, user_id: Any, project_id: Any, model: Any, key: Any, call: str
    ) -> None:
        """Valid ids are accepted (any characters at all); anything else is InvalidInputError."""
        store.reset()
        m = store.m

        def optional(value: object) -> bool:
            return value is None or valid_id(value)

        cases: dict[str, tuple[Callable[[], object], bool]] = {
            "check_availability": (
                lambda: m.check_availability(user_id, 0.01, project_id=project_id),
                valid_id(user_id) and optional(project_id),
            ),
            # The seeded ids, used again for another amount ($0.01, not $1.50 or $0.50),
            # are refused as conflicts: InvalidInputErrors that write nothing.
            "record_spend": (
                lambda: m.record_spend(user_id, 0.01, project_id, model, idempotency_key=key),
                valid_id(user_id)
                and optional(project_id)
                and optional(model)
                and optional(key)
                and key != "seed",
            ),
            "reserve": (
                lambda: m.reserve(user_id, 0.01, project_id, model, reservation_id=key),
                valid_id(user_id)
                and optional(project_id)
                and optional(model)
                and optional(key)
                and key != SEED_RESERVATION,
            ),
            "usage": (
                lambda: m.usage(user_id, project_id),
                valid_id(user_id) and optional(project_id),
            ),
            "reservation": (lambda: m.reservation(key), valid_id(key)),
            "set_limit_user": (lambda: m.set_limit("user", user_id, 2), valid_id(user_id)),
            "set_limit_project": (
                lambda: m.set_limit("project", project_id, 2),
                valid_id(project_id),
            ),
            "set_limit_global": (lambda: m.set_limit("global", key, 9e6), key is None),
        }
        call_it, valid = cases[call]
        result = store.attempt(call_it, valid=valid)
        if isinstance(result, BudgetError) and valid:
            # The only refusal a valid id may meet: no such reservation.
            assert call == "reservation", repr(result)
            assert isinstance(result, UnknownReservationError)
            assert key != SEED_RESERVATION
        if call == "reservation" and key == SEED_RESERVATION:
            assert result.user_id == "bob"
            assert result.estimate_nano == 500_000_000


class TestChoices:
    """Scopes, on_error values, a report's size, and settling twice."""

    @FUZZ
    @given(
        scope=st.one_of(st.sampled_from(["user", "project", "global"]), st.text(), anything),
        entity=st.one_of(st.none(), valid_ids),
        on_error=st.one_of(st.sampled_from(["charge", "release"]), st.text(), anything),
        top=st.one_of(st.none(), st.integers(min_value=0, max_value=10**30)),
        settle=st.lists(st.sampled_from(["commit", "release", "exit", "exit_raising"]), max_size=3),
    )
    def test_choices(
        self,
        store: Store,
        scope: Any,
        entity: Any,
        on_error: Any,
        top: int | None,
        settle: list[str],
    ) -> None:
        """Unknown choices are InvalidInputError; a reservation settles once, whatever follows."""
        store.reset()
        m = store.m
        scope_ok = (scope == "global" and entity is None) or (
            scope in ("user", "project") and valid_id(entity)
        )
        store.attempt(lambda: m.set_limit(scope, entity, 7), valid=scope_ok)

        on_error_ok = isinstance(on_error, str) and on_error in ("charge", "release")
        held = store.attempt(
            lambda: m.reserve("fuzz-user", 2, on_error=on_error), valid=on_error_ok
        )
        if on_error_ok:
            first = settle[0] if settle else None
            for step in settle:
                if step == "commit":
                    held.commit(1)
                elif step == "release":
                    held.release()
                elif step == "exit":
                    with held:
                        pass
                else:
                    with pytest.raises(KeyError), held:
                        raise KeyError("the call failed")
            expected = {
                None: 2 * 10**9,
                "commit": 10**9,
                "release": 0,
                "exit": 2 * 10**9,
                "exit_raising": 0 if on_error == "release" else 2 * 10**9,
            }[first]
            assert m.usage("fuzz-user")["user"].spent_nano == expected

        if top is not None and top > 1000:  # every face's bound on a report's lists
            with pytest.raises(InvalidInputError, match="from 0 to 1000"):
                m.report(top)
            return
        report = m.report(top)
        for part in (report.users, report.projects, report.models):
            assert top is None or len(part) <= top


class TestPricing:
    """Token counts and prices of any type and value, priced exactly or refused."""

    @FUZZ
    @given(
        model=st.one_of(st.just(MODEL), ids),
        prices=st.tuples(amounts, amounts, st.one_of(st.none(), amounts)),
        tokens=st.tuples(token_counts, token_counts, token_counts),
    )
    def test_set_price_and_calculate(
        self,
        store: Store,
        model: Any,
        prices: tuple[Any, Any, Any],
        tokens: tuple[Any, Any, Any],
    ) -> None:
        """calculate() agrees with exact arithmetic; bad input is InvalidInputError."""
        pricing = PricingEngine()  # fresh: no price set by an earlier example
        pricing.set_price(
            MODEL,
            input_per_mtok=MODEL_PRICES[0],
            output_per_mtok=MODEL_PRICES[1],
            cached_input_per_mtok=MODEL_PRICES[2],
        )
        default = tuple(Fraction(p) for p in MODEL_PRICES)
        pin, pout, pcached = (expected_price(p) for p in prices)
        price_ok = (
            valid_id(model)
            and pin is not None
            and pout is not None
            and (prices[2] is None or pcached is not None)
        )
        try:
            pricing.set_price(
                model,
                input_per_mtok=prices[0],
                output_per_mtok=prices[1],
                cached_input_per_mtok=prices[2],
            )
        except InvalidInputError:
            assert not price_ok
            known = {MODEL: default}
        else:
            assert price_ok
            assert pin is not None
            assert pout is not None
            known = {MODEL: default, model: (pin, pout, pin if pcached is None else pcached)}

        counts = expected_tokens(*tokens)
        for name in [MODEL] if isinstance(model, str) and model == MODEL else [model, MODEL]:
            try:
                nano = pricing.calculate_nano(name, *tokens)
                usd_ = pricing.calculate(name, *tokens)
            except InvalidInputError:
                assert counts is None or not valid_id(name)
                continue
            except UnknownModelError:
                assert counts is not None
                assert valid_id(name)
                assert name not in known
                continue
            assert counts is not None
            assert isinstance(name, str)
            assert name in known
            assert nano == price_nano(known[name], counts)
            assert usd_ == Decimal(nano).scaleb(-9)

    @FUZZ
    @given(tokens=st.tuples(token_counts, token_counts, token_counts))
    def test_commit_usage(self, store: Store, tokens: tuple[Any, Any, Any]) -> None:
        """commit_usage charges exactly the tokens' price, or refuses and leaves the hold."""
        store.reset()
        held = store.m.reserve("fuzz-user", 1, project_id="fuzz-proj", model=MODEL)
        counts = expected_tokens(*tokens)
        prices = tuple(Fraction(p) for p in MODEL_PRICES)
        spent = store.spent()
        result = store.attempt(
            lambda: held.commit_usage(
                input_tokens=tokens[0], output_tokens=tokens[1], cached_input_tokens=tokens[2]
            ),
            # A price above the $1M single-amount maximum is refused like any other amount.
            valid=counts is not None and price_nano(prices, counts) <= MAX_AMOUNT_NANO,
        )
        if isinstance(result, BudgetError):
            assert held.state == "held"
            return
        assert counts is not None
        cost = price_nano(prices, counts)
        assert store.spent() == {k: v - 10**9 + cost for k, v in spent.items()}


ENV_NAMES = [f.name for f in attrs.fields(BudgetConfig)]
env_value = st.one_of(
    st.text(max_size=30),
    with_surrogate,
    st.floats().map(str),
    st.integers().map(str),
    st.decimals().map(str),
    st.sampled_from(
        [
            "nan",
            "inf",
            "-0",
            "1e-320",
            "1e400",
            "0x10",
            "1_000",
            " 5 ",
            "",
            "\uff11\uff12",
            "1.5",
            "off",
        ]
    ),
    st.builds(
        "{}://{}".format,
        st.sampled_from(["redis", "rediss", "unix", "embedded", "memory", "http", "REDIS"]),
        st.text(max_size=20),
    ),
)


class TestConfiguration:
    """COREASON_BUDGET_* variables with any text at all, and BudgetConfig with any values."""

    @FUZZ
    @given(
        environ=st.dictionaries(
            st.one_of(
                st.sampled_from(ENV_NAMES).map(lambda n: "COREASON_BUDGET_" + n.upper()),
                st.sampled_from(["COREASON_BUDGET_", "COREASON_BUDGET_NOPE", "OTHER", "API_KEYS"]),
            ),
            env_value,
            max_size=len(ENV_NAMES),
        ),
    )
    def test_from_env(
        self, environ: dict[str, str], redis_url: str, tmp_path: Path, store: Store
    ) -> None:
        """Any strings: a config or a ConfigError naming a variable; a config that works."""
        try:
            config = BudgetConfig.from_env(environ=environ, env_file=None)
        except ConfigError as e:
            problem = str(e)
        else:
            problem = ""
        if problem:
            assert "COREASON_BUDGET_" in problem, problem  # the message names the variable
            return
        # It must run: on the test store (a fuzzed URL may name anything), never spooling
        # outside the test's directory.
        changes: dict[str, Any] = {"redis_url": redis_url, "key_prefix": config.key_prefix}
        if "spool_dir" in ENV_NAMES:
            changes["spool_dir"] = str(tmp_path / "spool")
        try:
            manager = BudgetManager(attrs.evolve(config, **changes))
        except ConfigError:
            manager = None
        if manager is None:
            assert config.pricing_file is not None  # the only thing left to go wrong
            return
        with manager:
            manager.usage("alice")

    @FUZZ
    @given(values=st.dictionaries(st.sampled_from(ENV_NAMES), st.one_of(anything, amounts)))
    def test_constructor(self, values: dict[str, Any]) -> None:
        """BudgetConfig(**anything) builds or raises ConfigError (not TypeError & co)."""
        with contextlib.suppress(ConfigError):
            BudgetConfig(**values)


class TestRegressions:
    """Bugs the fuzzing found (and that were fixed), one input each."""

    @pytest.mark.parametrize("amount", [Decimal("1E+999999999"), Decimal("1E+999991")])
    def test_decimal_with_a_huge_exponent_is_invalid_input(
        self, store: Store, amount: Decimal
    ) -> None:
        """to_nano multiplies before it compares: Decimal('1E+999999999') raises Overflow."""
        store.reset()
        try:
            store.attempt(lambda: store.m.record_spend("u", amount), valid=False)
        except BudgetError:
            raise
        except Exception as e:
            raise AssertionError(f"raw {type(e).__name__}: {e}") from e

    @pytest.mark.parametrize(
        ("amount", "nano"),
        [
            (Decimal("1.000000000000000000000000000000001"), 1_000_000_001),
            (Decimal("0.00000000100000000000000000000000000001"), 2),
            (Decimal("1E-999999999"), 1),
        ],
    )
    def test_amount_is_always_rounded_up(self, store: Store, amount: Decimal, nano: int) -> None:
        """
        More than 19 significant digits (or an exponent past the context's Emin) and
        ``dec * 10**9`` is rounded half-even (or flushed to 0) *before* the ceiling.
        """
        store.reset()
        store.m.record_spend("u", amount)
        assert store.m.usage("u")["user"].spent_nano == nano

    def test_commit_usage_cost_is_bounded(self, store: Store) -> None:
        """
        commit_usage commits calculate_nano()'s result unchecked: 10**12 tokens at $15/Mtok
        is $15M, above the $1M maximum, and past 2**63 nano the Lua counters wrap negative,
        voiding every budget (the service's /commit takes token counts from clients).
        """
        store.reset()
        held = store.m.reserve("fuzz-user", 1, model=MODEL)
        with pytest.raises(InvalidInputError):
            held.commit_usage(input_tokens=0, output_tokens=10**12)
        assert store.m.usage("fuzz-user")["global"].spent_nano >= 0

    @pytest.mark.parametrize("top", ["3", 1.5, Decimal(2)])
    def test_report_top_of_the_wrong_type_is_invalid_input(self, store: Store, top: Any) -> None:
        with pytest.raises(InvalidInputError):
            store.m.report(top)

    def test_key_prefix_must_be_encodable(self, redis_url: str) -> None:
        """Accepted, then every call raises UnicodeEncodeError from redis-py's encoder."""
        with pytest.raises(ConfigError):
            BudgetConfig.from_env(environ={"COREASON_BUDGET_KEY_PREFIX": "a\udcffb"}, env_file=None)

    @pytest.mark.parametrize("prefix", [5, b"bytes", ["a"]])
    def test_key_prefix_of_the_wrong_type_is_config_error(self, prefix: Any) -> None:
        """
        The validator calls len() and ``in`` on it before checking that it is text: an int is
        a TypeError, bytes a TypeError, and a list of text is accepted as a prefix.
        """
        with pytest.raises(ConfigError, match="key_prefix"):
            BudgetConfig(key_prefix=prefix)

    @pytest.mark.parametrize("name", ["connect_timeout", "socket_timeout", "pool_timeout"])
    def test_huge_int_timeout_is_config_error(self, name: str) -> None:
        """_positive_seconds calls math.isfinite, which converts an int to float first."""
        with pytest.raises(ConfigError, match=name):
            BudgetConfig(**{name: 10**400})

    @pytest.mark.parametrize(
        "url", ["redis://localhost:abc", "redis://localhost:99999", "redis://h?db=x"]
    )
    def test_malformed_redis_url_is_config_error(self, url: str) -> None:
        """BudgetConfig checks only the scheme; redis-py's ValueError escapes BudgetManager()."""
        with pytest.raises(ConfigError):
            BudgetManager(BudgetConfig(redis_url=url)).close()

    @pytest.mark.parametrize("url", ["redis://[::1", 123, 1.5])
    def test_unparseable_redis_url_is_config_error(self, url: Any) -> None:
        """urlsplit's ValueError/AttributeError escape the validator."""
        with pytest.raises(ConfigError, match="redis_url"):
            BudgetConfig(redis_url=url)

    def test_unparseable_redis_url_from_env_names_the_variable(self) -> None:
        with pytest.raises(ConfigError, match="COREASON_BUDGET_REDIS_URL"):
            BudgetConfig.from_env(
                environ={"COREASON_BUDGET_REDIS_URL": "redis://[x"}, env_file=None
            )

    @pytest.mark.parametrize("path", ["prices\x00.json", "prices\ud800.json"])
    def test_unopenable_pricing_file_is_config_error(self, path: str, redis_url: str) -> None:
        """Only OSError is caught; NUL or an unencodable path raises ValueError."""
        with pytest.raises(ConfigError):
            BudgetManager(BudgetConfig(redis_url=redis_url, pricing_file=path)).close()
