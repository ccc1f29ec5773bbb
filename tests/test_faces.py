"""
One behaviour suite, four faces: every test runs on BudgetManager, AsyncBudgetManager,
BudgetClient and AsyncBudgetClient (the last two against the real service over HTTP).

The README promises that every face gives the same answer for the same event; each
test here states one such answer once and checks it on all four, through the sync
adapter of ``faces_support`` (which only calls: it never translates an answer). The
ledger is read independently, by a sync BudgetManager on the same store and prefix
(``face.ledger``) and by a snapshot of every key in the store (``face.snapshot()``).

A face that disagrees with the others is marked ``xfail(strict=True)`` on the test
that shows it, with what each face does in the reason.
"""

from __future__ import annotations

import datetime
import json
import re
import time
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from coreason_budget import (
    BudgetExceededError,
    BudgetUnavailableError,
    IdempotencyConflictError,
    InvalidInputError,
    Receipt,
    UnknownReservationError,
)

from .faces_support import FACES, HOUSE_PRICES, NANO, Face, Faces, join_stopped

USER_LIMIT, PROJECT_LIMIT, GLOBAL_LIMIT = 10 * NANO, 20 * NANO, 50 * NANO
MODEL = "house-llm"  # priced by an override ($3 in, $15 out per million tokens)
CONFLICT = (
    "{} '{}' was already used for a different charge (another user, scopes or amount); "
    "nothing was written. Use a new id for a new charge."
)


@pytest.fixture(scope="module", autouse=True)
def _services_stopped() -> Iterator[None]:
    """Every service the module's tests started has stopped when it ends."""
    yield
    join_stopped()


@pytest.fixture(params=FACES)
def face(
    request: pytest.FixtureRequest, redis_url: str, spool_dir: Path, tmp_path: Path
) -> Iterator[Face]:
    """
    The face under test on a fresh prefix of the test's (flushed) store, with
    $10 per user, $20 per project and $50 globally; ``face.ledger`` and
    ``face.snapshot()`` read that ledger without going through the face, and
    ``face.unreachable()`` is the same face with nothing to reach.
    """
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps(HOUSE_PRICES))
    made = Faces(redis_url, str(spool_dir), str(prices))
    try:
        yield made.face(request.param, f"faces-{request.param}-{uuid.uuid4().hex[:8]}")
    finally:
        made.close()


def spent(usage: dict[str, Any]) -> dict[str, int]:
    """What each scope of a ``usage()`` answer has spent, in nano-dollars."""
    return {scope: u.spent_nano for scope, u in usage.items()}


def both(face: Face, user_id: str, project_id: str | None = None) -> dict[str, int]:
    """Spent per scope as the face says it, checked against the ledger read directly."""
    said = spent(face.usage(user_id, project_id))
    assert said == spent(face.ledger.usage(user_id, project_id))
    return said


def everywhere(nano: int, project: bool = True) -> dict[str, int]:
    scopes = ["user", "project", "global"] if project else ["user", "global"]
    return dict.fromkeys(scopes, nano)


def today() -> set[datetime.date]:
    """Today (UTC), and tomorrow too near midnight: the store's clock decides."""
    now = datetime.datetime.now(datetime.UTC)
    return {now.date(), (now + datetime.timedelta(seconds=5)).date()}


def refusal(e: BudgetExceededError) -> tuple[Any, ...]:
    return (e.scope, e.entity_id, e.limit_nano, e.spent_nano, e.requested_nano)


class TestReservations:
    """reserve, then commit or release: the hold, the refund, and settling once."""

    def test_commit_refunds_the_difference(self, face: Face) -> None:
        """The hold counts as spent until committed; the commit charges exactly the actual cost."""
        r = face.reserve("u", 0.05, project_id="p", model=MODEL)
        assert (r.state, r.estimate_nano, r.on_error, r.receipt) == (
            "held",
            50_000_000,
            "charge",
            None,
        )
        assert re.fullmatch("[0-9a-f]{32}", r.id)
        assert r.held_at.date() in today()
        assert both(face, "u", "p") == everywhere(50_000_000)
        receipt = r.commit(0.031)
        assert receipt == Receipt("recorded", "commit", r.id, 31_000_000)
        assert (r.state, r.receipt) == ("committed", receipt)
        assert both(face, "u", "p") == everywhere(31_000_000)
        assert [(m.entity_id, m.spent_nano) for m in face.ledger.report().models] == [
            (MODEL, 31_000_000)
        ]

    def test_commit_above_the_estimate_is_charged_in_full(self, face: Face) -> None:
        """A cost above the estimate was spent: recorded in full, even past the limit."""
        face.record_spend("u", 9)
        r = face.reserve("u", 1)  # exactly fits the $10
        receipt = r.commit(Decimal("2.5"))
        assert receipt == Receipt("recorded", "commit", r.id, 2_500_000_000)
        usage = face.usage("u")
        assert (usage["user"].spent_nano, usage["user"].remaining_nano) == (11_500_000_000, 0)
        assert both(face, "u") == everywhere(11_500_000_000, project=False)

    def test_release_gives_everything_back(self, face: Face) -> None:
        """A release returns the whole hold in every scope; the receipt charges nothing."""
        r = face.reserve("u", 2, project_id="p")
        assert both(face, "u", "p") == everywhere(2 * NANO)
        assert r.release() == Receipt("recorded", "release", r.id, 0)
        assert r.state == "released"
        assert both(face, "u", "p") == everywhere(0)
        assert face.reservation(r.id).state == "released"

    def test_settling_twice_is_a_no_op(self, face: Face) -> None:
        """The first settlement wins: later commits and releases return its very receipt."""
        r = face.reserve("u", 1, project_id="p")
        first = r.commit(0.5)
        assert r.commit(0.9) is first
        assert r.release() is first
        assert r.state == "committed"
        assert both(face, "u", "p") == everywhere(500_000_000)

    def test_commit_after_release_is_a_duplicate(self, face: Face) -> None:
        """A handle for a released hold commits nothing: "duplicate", amount 0."""
        r = face.reserve("u", 1, project_id="p")
        released = r.release()
        assert r.commit(1) is released  # this handle: the first settlement's receipt
        again = face.reservation(r.id)
        assert (again.state, again.receipt) == ("released", None)
        assert again.commit(1) == Receipt("duplicate", "commit", r.id, 0)
        assert again.state == "released"
        assert both(face, "u", "p") == everywhere(0)

    def test_a_stale_handle_settles_nothing(self, face: Face) -> None:
        """Two handles on one hold: the second settlement is a duplicate and learns the state."""
        first = face.reserve("u", 1, reservation_id="req-1")
        second = face.reserve("u", 1, reservation_id="req-1")
        assert first.commit(0.25) == Receipt("recorded", "commit", "req-1", 250_000_000)
        assert second.state == "held"  # as it was when it was made
        assert second.release() == Receipt("duplicate", "release", "req-1", 0)
        assert second.state == "committed"
        assert both(face, "u") == everywhere(250_000_000, project=False)

    def test_reservation_by_id(self, face: Face) -> None:
        """reservation(id) describes the hold as it was made, from the store."""
        r = face.reserve("u", 0.125, project_id="p", model=MODEL, reservation_id="by-id")
        found = face.reservation("by-id")
        fields = ("id", "user_id", "project_id", "model", "state", "estimate_nano", "held_at")
        assert [getattr(found, f) for f in fields] == [getattr(r, f) for f in fields]
        assert found.on_error == "charge"
        assert found.commit(0.1) == Receipt("recorded", "commit", "by-id", 100_000_000)
        assert face.reservation("by-id").state == "committed"

    def test_commit_usage_prices_the_model(self, face: Face) -> None:
        """Tokens are priced for the reservation's model: 1000 in, 200 out = $0.006."""
        r = face.reserve("u", 0.05, model=MODEL)
        receipt = r.commit_usage(input_tokens=1000, output_tokens=200)
        assert receipt == Receipt("recorded", "commit", r.id, 6_000_000)
        assert both(face, "u") == everywhere(6_000_000, project=False)
        # A handle looked up by id knows the model too; cache reads at the input price.
        looked_up = face.reservation(face.reserve("u", 0.05, model=MODEL).id)
        assert looked_up.model == MODEL
        receipt = looked_up.commit_usage(
            input_tokens=1000, output_tokens=200, cached_input_tokens=500
        )
        assert receipt == Receipt("recorded", "commit", looked_up.id, 6_000_000)


class TestWithBlock:
    """The with-block (async with on the async faces): what leaving it settles."""

    def test_a_normal_exit_commits_the_estimate(self, face: Face) -> None:
        """Left unsettled without an error: the call was made, the estimate is charged."""
        with face.hold("u", 0.25, project_id="p") as r:
            assert r.state == "held"
            assert both(face, "u", "p") == everywhere(250_000_000)
        assert (r.state, r.receipt) == (
            "committed",
            Receipt("recorded", "commit", r.id, 250_000_000),
        )
        assert face.reservation(r.id).state == "committed"
        assert both(face, "u", "p") == everywhere(250_000_000)

    def test_an_error_with_on_error_release_releases(self, face: Face) -> None:
        """on_error="release": an exception gives the hold back."""
        with pytest.raises(RuntimeError), face.hold("u", 1, on_error="release") as r:
            raise RuntimeError("the LLM call failed")
        assert r.on_error == "release"
        assert (r.state, r.receipt) == ("released", Receipt("recorded", "release", r.id, 0))
        assert both(face, "u") == everywhere(0, project=False)

    def test_an_error_by_default_charges_the_estimate(self, face: Face) -> None:
        """By default an exception charges the estimate: a failed call may have been billed."""
        with pytest.raises(RuntimeError), face.hold("u", 0.125) as r:
            raise RuntimeError("the LLM call failed, maybe after billing")
        assert (r.state, r.receipt) == (
            "committed",
            Receipt("recorded", "commit", r.id, 125_000_000),
        )
        assert both(face, "u") == everywhere(125_000_000, project=False)

    @pytest.mark.parametrize("on_error", ["charge", "release"])
    def test_the_error_propagates_unchanged(self, face: Face, on_error: Any) -> None:
        """The block's exception reaches the caller as it was raised, whatever on_error says."""
        error = KeyError("mine")
        with pytest.raises(KeyError) as caught, face.hold("u", 1, on_error=on_error):
            raise error
        assert caught.value is error

    def test_settled_inside_the_block_stays_settled(self, face: Face) -> None:
        """A commit inside the block is final: leaving it (even by an error) charges no more."""
        with pytest.raises(RuntimeError) as caught, face.hold("u", 1) as r:
            raise RuntimeError(r.commit(0.1))  # the call failed after the commit
        first = caught.value.args[0]
        assert first == Receipt("recorded", "commit", r.id, 100_000_000)
        assert (r.state, r.receipt) == ("committed", first)
        assert both(face, "u") == everywhere(100_000_000, project=False)

    def test_a_refused_hold_never_enters_the_block(self, face: Face) -> None:
        """Over budget: BudgetExceededError on entry, the body never runs, nothing is held."""
        entered = []
        with pytest.raises(BudgetExceededError), face.hold("u", 10.5):
            entered.append(True)
        assert entered == []
        assert both(face, "u") == everywhere(0, project=False)


class TestFitRule:
    """A request fits a scope when spent + amount <= limit and spent < limit."""

    def test_exactly_at_the_limit_fits(self, face: Face) -> None:
        """$7.50 spent of $10: $2.50 fits, checked and held."""
        face.record_spend("u", 7.5)
        face.check_availability("u", 2.5)
        r = face.reserve("u", Decimal("2.5"))
        assert r.state == "held"
        assert both(face, "u") == everywhere(USER_LIMIT, project=False)

    def test_one_nano_above_is_refused(self, face: Face) -> None:
        """$2.500000001 on $7.50 of $10 is refused by check and reserve; nothing written."""
        face.record_spend("u", 7.5)
        before = face.snapshot()
        for call in (face.check_availability, face.reserve):
            with pytest.raises(BudgetExceededError) as caught:
                call("u", Decimal("2.500000001"))
            assert refusal(caught.value) == ("user", "u", USER_LIMIT, 7_500_000_000, 2_500_000_001)
        assert face.snapshot() == before

    def test_an_exhausted_scope_refuses_even_zero(self, face: Face) -> None:
        """At its limit a scope refuses a zero estimate (check and reserve), nothing written."""
        face.record_spend("u", 10)
        before = face.snapshot()
        for call in (face.check_availability, face.reserve):
            with pytest.raises(BudgetExceededError) as caught:
                call("u", 0)
            assert refusal(caught.value) == ("user", "u", USER_LIMIT, USER_LIMIT, 0)
        assert face.snapshot() == before
        face.check_availability("v", 0)  # another user still may

    def test_a_zero_limit_blocks_everything(self, face: Face) -> None:
        """A limit of 0 refuses even a zero estimate."""
        face.set_limit("project", "p", 0)
        with pytest.raises(BudgetExceededError) as caught:
            face.check_availability("u", 0, project_id="p")
        assert refusal(caught.value) == ("project", "p", 0, 0, 0)
        face.check_availability("u", 0)

    def test_the_narrowest_refusing_scope_is_reported(self, face: Face) -> None:
        """User before project before global, each with its own exact amounts."""
        face.record_spend("alice", 9.5, project_id="p")
        face.record_spend("bob", 10, project_id="p")
        face.record_spend("carol", 30)
        assert both(face, "alice", "p") == {
            "user": 9_500_000_000,
            "project": 19_500_000_000,
            "global": 49_500_000_000,
        }
        cases = [
            (("alice", 1, "p"), ("user", "alice", USER_LIMIT, 9_500_000_000, NANO)),
            (("dave", 1, "p"), ("project", "p", PROJECT_LIMIT, 19_500_000_000, NANO)),
            (("dave", 1, None), ("global", None, GLOBAL_LIMIT, 49_500_000_000, NANO)),
        ]
        before = face.snapshot()
        for (user, amount, project), expected in cases:
            for call in (face.check_availability, face.reserve):
                with pytest.raises(BudgetExceededError) as caught:
                    call(user, amount, project_id=project)
                assert refusal(caught.value) == expected
        assert face.snapshot() == before


class TestErrors:
    """Each error, and the fields it carries."""

    def test_budget_exceeded_carries_the_scope_and_amounts(self, face: Face) -> None:
        """The README's example: the message and every field, exact and as floats."""
        face.record_spend("user_123", 9.99)
        with pytest.raises(BudgetExceededError) as caught:
            face.check_availability("user_123", estimated_cost=0.05)
        e = caught.value
        assert str(e) == (
            "Budget exceeded for User user_123: spent $9.99 of $10.00 daily limit, requested $0.05"
        )
        assert e.window == "day"
        assert e.resets_at is not None
        assert e.resets_at.time() == datetime.time()  # UTC midnight
        assert e.resets_at.date() - datetime.timedelta(days=1) in today()
        assert e.retry_after_seconds is not None
        left = (e.resets_at - datetime.datetime.now(datetime.UTC)).total_seconds()
        assert abs(e.retry_after_seconds - left) <= 5
        assert refusal(e) == ("user", "user_123", USER_LIMIT, 9_990_000_000, 50_000_000)
        assert (e.limit_usd, e.spent_usd, e.requested_usd) == (10.0, 9.99, 0.05)
        assert e.to_json() == {
            "scope": "user",
            "entity_id": "user_123",
            "limit_nano": USER_LIMIT,
            "spent_nano": 9_990_000_000,
            "requested_nano": 50_000_000,
            "window": "day",
            "resets_at": e.resets_at.isoformat(),
            "retry_after_seconds": e.retry_after_seconds,
        }

    def test_a_key_reused_for_another_spend_conflicts(self, face: Face) -> None:
        """The same idempotency key for another amount, user or scope: refused, nothing written."""
        face.record_spend("u", 1, project_id="p", idempotency_key="k")
        before = face.snapshot()
        for args, kwargs in [
            (("u", 2), {"project_id": "p"}),
            (("v", 1), {"project_id": "p"}),
            (("u", 1), {}),
            (("u", 1), {"project_id": "q"}),
        ]:
            with pytest.raises(
                IdempotencyConflictError, match=re.escape(CONFLICT.format("idempotency_key", "k"))
            ):
                face.record_spend(*args, idempotency_key="k", **kwargs)
        assert face.snapshot() == before
        assert both(face, "u", "p") == everywhere(NANO)

    def test_a_reservation_id_reused_for_another_hold_conflicts(self, face: Face) -> None:
        """The same reservation id for another estimate or user: refused, nothing written."""
        face.reserve("u", 1, reservation_id="r1")
        before = face.snapshot()
        for user, estimate in [("u", 2), ("v", 1)]:
            with pytest.raises(
                IdempotencyConflictError, match=re.escape(CONFLICT.format("reservation_id", "r1"))
            ):
                face.reserve(user, estimate, reservation_id="r1")
        assert face.snapshot() == before

    def test_an_unknown_reservation(self, face: Face) -> None:
        """reservation() of an id never made raises UnknownReservationError (a LookupError)."""
        with pytest.raises(UnknownReservationError) as caught:
            face.reservation("nope")
        assert str(caught.value) == "no reservation 'nope' (never made, or expired)"
        assert isinstance(caught.value, LookupError)

    def test_unreachable_names_the_ids_to_retry_with(self, face: Face) -> None:
        """
        Nothing to reach and no spool: BudgetUnavailableError, fast, naming the
        spend's idempotency key (given, or generated) or the reservation id.
        """
        dead = face.unreachable()
        started = time.monotonic()
        with pytest.raises(BudgetUnavailableError) as caught:
            dead.record_spend("u", 0.5, idempotency_key="inv-1")
        assert (caught.value.idempotency_key, caught.value.reservation_id) == ("inv-1", None)
        with pytest.raises(BudgetUnavailableError) as caught:
            dead.record_spend("u", 0.5)
        assert re.fullmatch("[0-9a-f]{32}", caught.value.idempotency_key or "")
        with pytest.raises(BudgetUnavailableError) as caught:
            dead.reserve("u", 0.5, reservation_id="res-1")
        assert (caught.value.idempotency_key, caught.value.reservation_id) == (None, "res-1")
        for call, args in [
            (dead.check_availability, ("u", 0.5)),
            (dead.usage, ("u",)),
            (dead.ping, ()),
            (dead.set_limit, ("user", "u", 1)),
            (dead.report, ()),
        ]:
            with pytest.raises(BudgetUnavailableError):
                call(*args)
        assert time.monotonic() - started < 5
        assert face.snapshot() == {}


#: Amounts that are not a USD amount, with what the error says.
BAD_AMOUNTS: list[tuple[Any, str]] = [
    (-1, "must not be negative"),
    (Decimal("-0.000000001"), "must not be negative"),
    (float("nan"), "must be finite"),
    (float("inf"), "must be finite"),
    (float("-inf"), "must be finite"),
    (Decimal("NaN"), "must be finite"),
    (Decimal("Infinity"), "must be finite"),
    (True, "must be a number"),
    (False, "must be a number"),
    (1_000_001, "above the maximum"),
    (Decimal("1000000.000000001"), "above the maximum"),
    ("5", "must be a number"),
    (None, "must be a number"),
    ([1], "must be a number"),
]
#: Ids that are not ids.
BAD_IDS: list[tuple[Any, str]] = [
    ("", "must not be empty"),
    ("x" * 257, "the maximum is 256"),
    (5, "must be a str"),
    (b"u", "must be a str"),
    (["u"], "must be a str"),
    ("\ud800", "not valid unicode"),
]


class TestBadInput:
    """Bad input raises InvalidInputError on every face and changes nothing in the store."""

    @staticmethod
    def refused(face: Face, calls: list[tuple[Callable[[], Any], str]]) -> None:
        """Each call raises InvalidInputError saying *what*; the store is as it was."""
        before = face.snapshot()
        assert before  # a ledger with something in it
        for call, what in calls:
            with pytest.raises(InvalidInputError) as caught:
                call()
            assert type(caught.value) is InvalidInputError, call
            assert what in str(caught.value), (what, str(caught.value))
        assert face.snapshot() == before

    def test_amounts(self, face: Face) -> None:
        """Negative, NaN, infinite, bool, huge, str and None amounts, in every call taking one."""
        face.record_spend("u", 1, project_id="p")
        held = face.reserve("u", 1, project_id="p")
        calls: list[tuple[Callable[[], Any], str]] = []
        for amount, what in BAD_AMOUNTS:
            calls += [
                (partial(face.check_availability, "u", amount), what),
                (partial(face.record_spend, "u", amount, idempotency_key="k"), what),
                (partial(face.reserve, "u", amount, reservation_id="r"), what),
                (partial(held.commit, amount), what),
            ]
            if amount is not None and what != "above the maximum":
                # None removes a limit; a limit's maximum is $9,000,000.
                calls.append((partial(face.set_limit, "user", "u", amount), what))
        calls.append((partial(face.set_limit, "user", "u", 9_000_001), "above the maximum"))
        self.refused(face, calls)
        assert held.state == "held"
        assert held.commit(0.5) == Receipt("recorded", "commit", held.id, 500_000_000)

    def test_ids(self, face: Face) -> None:
        """Empty, too long, non-str and unencodable ids, in every place an id goes."""
        face.record_spend("u", 1, project_id="p")
        face.reserve("u", 1, reservation_id="held")
        calls: list[tuple[Callable[[], Any], str]] = []
        for bad, what in BAD_IDS:
            calls += [
                (partial(face.check_availability, bad, 1), what),
                (partial(face.check_availability, "u", 1, project_id=bad), what),
                (partial(face.record_spend, bad, 1), what),
                (partial(face.record_spend, "u", 1, project_id=bad), what),
                (partial(face.record_spend, "u", 1, model=bad), what),
                (partial(face.record_spend, "u", 1, idempotency_key=bad), what),
                (partial(face.reserve, bad, 1), what),
                (partial(face.reserve, "u", 1, project_id=bad), what),
                (partial(face.reserve, "u", 1, model=bad), what),
                (partial(face.reserve, "u", 1, reservation_id=bad), what),
                (partial(face.reservation, bad), what),
                (partial(face.usage, bad), what),
                (partial(face.usage, "u", bad), what),
                (partial(face.set_limit, "user", bad, 1), what),
                (partial(face.set_limit, "project", bad, 1), what),
            ]
        self.refused(face, calls)

    def test_scopes_and_choices(self, face: Face) -> None:
        """An unknown scope, an id for the global scope, none for a user, a bad on_error."""
        face.record_spend("u", 1)
        self.refused(
            face,
            [
                (lambda: face.set_limit("team", "x", 1), "scope must be"),
                (lambda: face.set_limit("global", "x", 1), "takes no entity id"),
                (lambda: face.set_limit("user", None, 1), "must be a str"),
                (lambda: face.set_limit("project", None, None), "must be a str"),
                (lambda: face.reserve("u", 1, on_error="ignore"), "on_error must be"),
                (lambda: face.hold("u", 1, on_error="ignore").__enter__(), "on_error must be"),
            ],
        )

    def test_top(self, face: Face) -> None:
        """report(top=...) of the wrong type or below 0."""
        face.record_spend("u", 1)
        calls: list[tuple[Callable[[], Any], str]] = [
            (partial(face.report, top), "top must be")
            for top in (-1, True, False, 1.5, "3", Decimal(2))
        ]
        self.refused(face, calls)

    def test_tokens(self, face: Face) -> None:
        """commit_usage with bad token counts, or on a hold without a model; the hold stays."""
        face.record_spend("u", 1)
        priced = face.reserve("u", 1, model=MODEL)
        unpriced = face.reserve("u", 1)
        self.refused(
            face,
            [
                (lambda: priced.commit_usage(input_tokens=-1, output_tokens=1), "input_tokens"),
                (lambda: priced.commit_usage(input_tokens=1, output_tokens=True), "output_tokens"),
                (lambda: priced.commit_usage(input_tokens=1.5, output_tokens=1), "input_tokens"),
                (
                    lambda: priced.commit_usage(
                        input_tokens=1, output_tokens=1, cached_input_tokens=2
                    ),
                    "cached_input_tokens",
                ),
                (
                    lambda: unpriced.commit_usage(input_tokens=1, output_tokens=1),
                    "needs a reservation made with model",
                ),
            ],
        )
        assert (priced.state, unpriced.state) == ("held", "held")


class TestIdempotency:
    """Retries with the same key or id charge once."""

    def test_a_spend_retried_with_its_key_is_charged_once(self, face: Face) -> None:
        """recorded, then duplicate (amount 0); the money is in every scope once."""
        first = face.record_spend("u", 0.25, project_id="p", model=MODEL, idempotency_key="inv-1")
        again = face.record_spend("u", 0.25, project_id="p", model=MODEL, idempotency_key="inv-1")
        assert first == Receipt("recorded", "spend", "inv-1", 250_000_000)
        assert again == Receipt("duplicate", "spend", "inv-1", 0)
        assert both(face, "u", "p") == everywhere(250_000_000)

    def test_a_generated_key_is_named_and_safe_to_retry(self, face: Face) -> None:
        """Without a key each spend gets its own; retrying with the receipt's key is a duplicate."""
        first = face.record_spend("u", 0.5)
        second = face.record_spend("u", 0.5)
        assert (first.status, second.status) == ("recorded", "recorded")
        assert first.idempotency_key != second.idempotency_key
        assert all(re.fullmatch("[0-9a-f]{32}", r.idempotency_key) for r in (first, second))
        retry = face.record_spend("u", 0.5, idempotency_key=first.idempotency_key)
        assert retry == Receipt("duplicate", "spend", first.idempotency_key, 0)
        assert both(face, "u") == everywhere(NANO, project=False)

    def test_a_reserve_retried_with_its_id_holds_once(self, face: Face) -> None:
        """The same reservation_id twice returns the same hold: one charge."""
        first = face.reserve("u", 2, project_id="p", model=MODEL, reservation_id="req-1")
        again = face.reserve("u", 2, project_id="p", model=MODEL, reservation_id="req-1")
        fields = ("id", "state", "estimate_nano", "held_at", "user_id", "project_id", "model")
        assert [getattr(again, f) for f in fields] == [getattr(first, f) for f in fields]
        assert both(face, "u", "p") == everywhere(2 * NANO)

    def test_a_reserve_retried_after_settling_holds_nothing(self, face: Face) -> None:
        """Reserving a settled id again gives a handle in its settled state, charging nothing."""
        face.reserve("u", 2, reservation_id="req-1").commit(1)
        again = face.reserve("u", 2, reservation_id="req-1")
        assert again.state == "committed"
        assert again.commit(2) == Receipt("duplicate", "commit", "req-1", 0)
        assert both(face, "u") == everywhere(NANO, project=False)


class TestExactMoney:
    """Integer nano-dollars: float and Decimal amounts sum exactly, also over HTTP."""

    @pytest.mark.parametrize(
        "amounts",
        [
            [0.1, 0.2],
            [Decimal("0.1"), Decimal("0.2")],
            [0.1, Decimal("0.2")],
            [0.1 + 0.2],  # float arithmetic: 0.30000000000000004, rounded up
        ],
        ids=["floats", "decimals", "mixed", "float-error"],
    )
    def test_a_tenth_and_two_tenths(self, face: Face, amounts: list[Any]) -> None:
        """0.1 + 0.2 is 300,000,000 nano-dollars, not 0.30000000000000004 (that rounds up)."""
        receipts = [face.record_spend("u", a, project_id="p") for a in amounts]
        expected = 300_000_000 if len(amounts) > 1 else 300_000_001
        assert sum(r.amount_nano for r in receipts) == expected
        assert both(face, "u", "p") == everywhere(expected)
        assert face.usage("u", "p")["user"].spent_usd == expected / NANO

    def test_many_small_amounts(self, face: Face) -> None:
        """Twenty spends of $0.05 are $1, exactly; a sub-nano amount is rounded up to 1 nano."""
        for _ in range(20):
            face.record_spend("u", 0.05)
        assert both(face, "u") == everywhere(NANO, project=False)
        assert face.record_spend("u", 1e-10).amount_nano == 1
        assert face.record_spend("u", Decimal("0.0000000011")).amount_nano == 2
        assert both(face, "u") == everywhere(NANO + 3, project=False)

    def test_the_largest_amount_is_exact(self, face: Face) -> None:
        """$999,999.999999999 is recorded to the nano-dollar."""
        receipt = face.record_spend("big", Decimal("999999.999999999"))
        assert receipt.amount_nano == 999_999_999_999_999
        assert both(face, "big") == everywhere(999_999_999_999_999, project=False)

    def test_settlements_are_exact(self, face: Face) -> None:
        """Holds and commits of float and Decimal amounts leave exact sums."""
        a = face.reserve("u", 0.3)
        b = face.reserve("u", Decimal("0.7"))
        assert both(face, "u") == everywhere(NANO, project=False)
        assert a.commit(0.1).amount_nano == 100_000_000
        assert b.commit(Decimal("0.2")).amount_nano == 200_000_000
        assert both(face, "u") == everywhere(300_000_000, project=False)

    def test_numpy_scalars_are_their_plain_value(self, face: Face) -> None:
        """numpy's float64 and int64 amounts are the float and int they hold."""
        numpy = pytest.importorskip("numpy")
        assert face.record_spend("u", numpy.float64(0.1)).amount_nano == 100_000_000
        assert face.record_spend("u", numpy.int64(2)).amount_nano == 2 * NANO
        assert face.reserve("u", numpy.float64(0.2)).commit(numpy.float64(0.1)).amount_nano == (
            100_000_000
        )
        assert both(face, "u") == everywhere(2_200_000_000, project=False)

    def test_a_limit_is_exact_to_the_nano_dollar(self, face: Face) -> None:
        """Limits up to the $9,000,000 maximum are kept to the nano-dollar, as amounts are."""
        face.set_limit("user", "u", Decimal("8999999.999999999"))
        face.set_limit("project", "p", Decimal("1234567.000000001"))
        limits = {k: u.limit_nano for k, u in face.ledger.usage("u", "p").items()}
        assert limits == {
            "user": 8_999_999_999_999_999,
            "project": 1_234_567_000_000_001,
            "global": GLOBAL_LIMIT,
        }


#: Ids with what a URL, a path or a key might take for syntax: all fine as ids.
ODD_IDS = ["a/b", "..", ".", "%2F", "?#&=", "a b", "\\", "ünï 🙂", "\n", "\x00", "+", "x" * 256]


class TestIds:
    """Any id the library accepts means the same on every face (over HTTP: in paths too)."""

    def test_odd_ids(self, face: Face) -> None:
        """As user, project, model, idempotency key and reservation id: the same ledger."""
        for odd in ODD_IDS:
            receipt = face.record_spend(odd, 0.25, project_id=odd, model=odd, idempotency_key=odd)
            assert receipt == Receipt("recorded", "spend", odd, 250_000_000)
            r = face.reserve(odd, 0.5, project_id=odd, model=odd, reservation_id=odd)
            found = face.reservation(odd)
            assert (found.id, found.user_id, found.project_id, found.model) == (odd, odd, odd, odd)
            assert found.commit(0.125) == Receipt("recorded", "commit", odd, 125_000_000)
            assert r.release() == Receipt("duplicate", "release", odd, 0)
            face.set_limit("user", odd, 3)
            usage = face.usage(odd, odd)
            assert [(u.entity_id, u.spent_nano) for u in usage.values()] == [
                (odd, 375_000_000),
                (odd, 375_000_000),
                (None, 375_000_000 * (ODD_IDS.index(odd) + 1)),
            ]
            assert usage["user"].limit_nano == 3 * NANO
            assert usage == face.ledger.usage(odd, odd)
        report = face.report()
        assert sorted(m.entity_id for m in report.models) == sorted(ODD_IDS)
        assert {u.entity_id: u.limit_nano for u in report.users} == dict.fromkeys(ODD_IDS, 3 * NANO)


class TestUsageAndLimits:
    """usage() per scope, and set_limit's overrides."""

    def test_usage_names_every_scope(self, face: Face) -> None:
        """user, project (when given) and global, in that order, with ids, limits and spend."""
        face.record_spend("u", 1.25, project_id="p")
        usage = face.usage("u", project_id="p")
        assert list(usage) == ["user", "project", "global"]
        assert [(u.scope, u.entity_id, u.limit_nano, u.spent_nano) for u in usage.values()] == [
            ("user", "u", USER_LIMIT, 1_250_000_000),
            ("project", "p", PROJECT_LIMIT, 1_250_000_000),
            ("global", None, GLOBAL_LIMIT, 1_250_000_000),
        ]
        assert usage["user"].remaining_nano == 8_750_000_000
        assert usage == face.ledger.usage("u", project_id="p")
        assert list(face.usage("u")) == ["user", "global"]

    def test_open_holds_count_as_spent(self, face: Face) -> None:
        """A hold is spent until settled."""
        face.reserve("u", 4, project_id="p")
        assert face.usage("u", "p")["project"].remaining_nano == 16 * NANO

    def test_set_limit_overrides_and_none_removes(self, face: Face) -> None:
        """Overrides for a user, a project and the global scope apply at once; None removes."""
        face.set_limit("user", "u", 25)
        face.set_limit("project", "p", Decimal("0.5"))
        face.set_limit("global", None, 100.0)
        limits = {k: u.limit_nano for k, u in face.usage("u", "p").items()}
        assert limits == {"user": 25 * NANO, "project": NANO // 2, "global": 100 * NANO}
        assert face.ledger.usage("u", "p") == face.usage("u", "p")
        with pytest.raises(BudgetExceededError) as caught:
            face.reserve("u", 1, project_id="p")
        assert refusal(caught.value) == ("project", "p", NANO // 2, 0, NANO)
        assert face.usage("v")["user"].limit_nano == USER_LIMIT  # only u's
        for scope, entity in [("user", "u"), ("project", "p"), ("global", None)]:
            face.set_limit(scope, entity, None)
        limits = {k: u.limit_nano for k, u in face.usage("u", "p").items()}
        assert limits == {"user": USER_LIMIT, "project": PROJECT_LIMIT, "global": GLOBAL_LIMIT}
        face.reserve("u", 1, project_id="p")

    def test_a_lowered_limit_refuses_what_is_already_spent(self, face: Face) -> None:
        """A limit set below today's spend: the scope is exhausted, nothing more fits."""
        face.record_spend("u", 3)
        face.set_limit("user", "u", 2)
        usage = face.usage("u")["user"]
        assert (usage.limit_nano, usage.spent_nano, usage.remaining_nano) == (2 * NANO, 3 * NANO, 0)
        with pytest.raises(BudgetExceededError) as caught:
            face.check_availability("u", 0)
        assert refusal(caught.value) == ("user", "u", 2 * NANO, 3 * NANO, 0)


class TestReport:
    """The day's report: the total, then users, projects and models, biggest first."""

    @staticmethod
    def spend(face: Face) -> None:
        face.record_spend("ann", 3, project_id="p", model="m1")
        face.record_spend("bob", 5, project_id="q", model="m2")
        face.record_spend("cat", 1, project_id="p", model="m1")
        face.record_spend("cat", 1.5, model="m3")
        face.record_spend("dan", 2)
        face.set_limit("user", "bob", 7)

    def test_biggest_first(self, face: Face) -> None:
        """Every list is sorted by spend, largest first, with limits and the total."""
        self.spend(face)
        report = face.report()
        assert report.window == "day"
        assert datetime.date.fromisoformat(report.period) in today()
        assert (report.total.spent_nano, report.total.limit_nano) == (12_500_000_000, GLOBAL_LIMIT)
        assert [(u.entity_id, u.spent_nano, u.limit_nano) for u in report.users] == [
            ("bob", 5 * NANO, 7 * NANO),
            ("ann", 3 * NANO, USER_LIMIT),
            ("cat", 2_500_000_000, USER_LIMIT),
            ("dan", 2 * NANO, USER_LIMIT),
        ]
        assert [(p.entity_id, p.spent_nano) for p in report.projects] == [
            ("q", 5 * NANO),
            ("p", 4 * NANO),
        ]
        assert [(m.entity_id, m.spent_nano, m.limit_nano) for m in report.models] == [
            ("m2", 5 * NANO, None),
            ("m1", 4 * NANO, None),
            ("m3", 1_500_000_000, None),
        ]
        assert report == face.ledger.report()

    def test_top_cuts_each_list(self, face: Face) -> None:
        """top=N keeps the N biggest of each list; the total is the whole day's."""
        self.spend(face)
        report = face.report(top=2)
        assert [u.entity_id for u in report.users] == ["bob", "ann"]
        assert [p.entity_id for p in report.projects] == ["q", "p"]
        assert [m.entity_id for m in report.models] == ["m2", "m1"]
        assert report.total.spent_nano == 12_500_000_000
        assert report == face.ledger.report(top=2)

    def test_top_zero_lists_nobody(self, face: Face) -> None:
        """top=0: the total alone, every list empty."""
        self.spend(face)
        report = face.report(top=0)
        assert (report.users, report.projects, report.models) == ((), (), ())
        assert report.total.spent_nano == 12_500_000_000

    def test_top_above_a_thousand_is_refused(self, face: Face) -> None:
        """A report lists at most 1,000 rows per kind on every face (the service's bound)."""
        self.spend(face)
        with pytest.raises(InvalidInputError, match="from 0 to 1000"):
            face.report(top=1001)
        assert len(face.report(top=1000).users) == 4


def test_the_faces_are_what_they_say(face: Face) -> None:
    """Each face is the class its name says, and answers ping."""
    kinds = {
        "sync-manager": "BudgetManager",
        "async-manager": "AsyncBudgetManager",
        "sync-client": "BudgetClient",
        "async-client": "AsyncBudgetClient",
    }
    assert type(face.target).__name__ == kinds[face.name]
    face.ping()
