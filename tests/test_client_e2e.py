"""
BudgetClient against the real service, over real HTTP.

Fast tests run the app with uvicorn in a thread of the test process, or
against scripted transports; the slow ones start the service the way it is
deployed (``coreason-budget serve`` in its own process) and drive it from many
threads, and through a store outage.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import uvicorn

from coreason_budget import (
    BudgetError,
    BudgetExceededError,
    BudgetManager,
    BudgetUnavailableError,
    ConfigError,
    IdempotencyConflictError,
    InvalidInputError,
    Reservation,
    ScopeUsage,
    UnknownModelError,
    UnknownReservationError,
)
from coreason_budget.client import BudgetClient
from coreason_budget.server import ServerSettings, create_app

from .conftest import ManagerFactory
from .redis_server import RedisServer, free_port
from .service_support import async_managers

USER_KEY = "e2e-user-key"
ADMIN_KEY = "e2e-admin-key"
LIMITS = {
    "daily_user_limit_usd": 10.0,
    "daily_project_limit_usd": 20.0,
    "daily_global_limit_usd": 50.0,
}
#: The scenario's windows besides the day: the week (with a default user limit) and
#: the month; the hour is not kept (asking about it is the manager's error, on every face).
WINDOWS = {"windows": "week,month", "weekly_user_limit_usd": 5.0}
NANO = 1_000_000_000

Budget = BudgetManager | BudgetClient


# -- the same code against the manager and the client ------------------------------------


def outcome(call: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[str, Any]:
    """What a call did: ("ok", its result) or (the error class, its message)."""
    try:
        return ("ok", call(*args, **kwargs))
    except BudgetError as e:
        return (type(e).__name__, str(e))


def handle(r: Any) -> tuple[Any, ...]:
    return (r.id, r.user_id, r.project_id, r.model, r.state, r.estimate_usd, r.estimate_nano)


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def check_refusal(e: BudgetExceededError) -> tuple[Any, ...]:
    """
    A refusal as a transcript keeps it. When it resets is the same on every face
    (the period's end); the seconds until then are checked against it, not kept
    (they tick while the scenario runs).
    """
    assert e.resets_at is not None
    assert e.resets_at.utcoffset() == datetime.timedelta(0)
    assert e.retry_after_seconds is not None
    left = (e.resets_at - now()).total_seconds()
    assert left - 5 <= e.retry_after_seconds <= left + 5, (e.retry_after_seconds, left)
    return (e.scope, e.entity_id, e.limit_nano, e.spent_nano, e.requested_nano, e.window,
            e.resets_at, str(e))  # fmt: skip


def scenario(b: Budget) -> list[Any]:
    """
    A day of one team, written against the manager's API; returns everything it saw.

    Run on a fresh store; the transcript must not depend on which kind of *b* ran it.
    """
    seen: list[Any] = []
    b.set_limit("user", "alice", 1.0)
    b.check_availability("alice", 0.5, project_id="p")
    b.record_spend("alice", 0.25, project_id="p", model="house-llm", idempotency_key="k1")
    b.record_spend("alice", 0.25, project_id="p", model="house-llm", idempotency_key="k1")
    with b.reserve("alice", 0.5, project_id="p", model="house-llm") as r:
        r.commit(Decimal("0.125"))
        r.commit(0.4)
    seen.append(r.state)
    with b.reserve("alice", 0.25) as r:
        pass
    seen.append(r.state)
    with pytest.raises(RuntimeError), b.reserve("alice", 0.25, on_error="release") as r:
        raise RuntimeError("the LLM call failed")
    seen.append(r.state)
    with pytest.raises(RuntimeError), b.reserve("alice", 0.125) as r:
        raise RuntimeError("the LLM call failed, maybe after billing")
    seen.append(r.state)
    seen.append(b.usage("alice", "p"))
    # 0.75 of alice's 1.00 is gone.
    seen.append(outcome(b.check_availability, "alice", 0.5))
    with pytest.raises(BudgetExceededError) as refused:
        b.reserve("alice", 0.3, project_id="p")
    e = refused.value
    seen += [check_refusal(e), (e.limit_usd, e.spent_usd, e.requested_usd)]
    seen.append(outcome(lambda: b.reserve("alice", 0.25).state))  # exactly fits
    seen.append(outcome(b.check_availability, "alice", 0))  # an exhausted scope refuses 0
    seen.append(outcome(b.record_spend, "alice", -1))
    seen.append(outcome(b.record_spend, "alice", float("nan")))
    seen.append(outcome(b.check_availability, "", 1))
    seen.append(outcome(b.check_availability, "x" * 257, 1))
    seen.append(outcome(b.reserve, "alice", 1, on_error="ignore"))  # type: ignore[arg-type]
    seen.append(outcome(b.reservation, "nope"))
    seen.append(outcome(b.set_limit, "global", "x", 1))
    seen.append(outcome(b.set_limit, "team", "x", 1))  # type: ignore[arg-type]
    seen.append(outcome(b.set_limit, "user", "bob", -5))

    first = b.reserve("bob", 2, project_id="q", model="house-llm", reservation_id="req-1")
    again = b.reserve("bob", 2, project_id="q", model="house-llm", reservation_id="req-1")
    looked_up = b.reservation("req-1")
    seen += [handle(first), handle(again), handle(looked_up)]
    # One moment, by the store's clock, however the handle was got.
    assert first.held_at == again.held_at == looked_up.held_at
    assert first.held_at_ms == looked_up.held_at_ms
    assert abs(first.held_at - now()) < datetime.timedelta(minutes=1)
    assert first.held_at.tzinfo == datetime.UTC
    looked_up.commit_usage(input_tokens=1000, output_tokens=200, cached_input_tokens=100)
    first.release()  # this handle still thinks "held"; the store knows better
    seen += [handle(looked_up), handle(first), handle(b.reservation("req-1"))]
    plain = b.reserve("bob", 1)
    seen.append(outcome(plain.commit_usage, input_tokens=1, output_tokens=1))
    seen.append(outcome(plain.commit, -1))
    plain.release()
    seen.append(plain.state)

    b.set_limit("project", "q", 0.5)
    seen.append(outcome(b.check_availability, "bob", 0, project_id="q"))
    b.set_limit("project", "q", None)
    seen.append(outcome(b.check_availability, "bob", 0, project_id="q"))
    b.record_spend("carol", 3, model="claude")
    seen.append(b.usage("bob", "q"))
    seen.append(b.report())
    seen.append(b.report(top=1))

    # Budget windows: limits, usage, refusals and reports of the week and the month.
    b.set_limit("user", "dave", 0.5, window="week")
    b.record_spend("dave", 0.375, model="house-llm")
    seen += [b.usage("dave", window="week"), b.usage("dave", "q", window="month")]
    seen.append(outcome(b.check_availability, "dave", 0.125))  # fits the day and the week
    with pytest.raises(BudgetExceededError) as refused:
        b.check_availability("dave", 0.25)  # the day's $10 would take it; the week's $0.50 not
    assert (refused.value.scope, refused.value.window) == ("user", "week")
    seen.append(check_refusal(refused.value))
    b.set_limit("model", "house-llm", 0.5, "month")  # spent on it this month: more
    with pytest.raises(BudgetExceededError) as refused:
        b.reserve("erin", 0.01, model="house-llm")
    assert (refused.value.scope, refused.value.window) == ("model", "month")
    seen.append(check_refusal(refused.value))
    b.set_limit("model", "house-llm", None, "month")
    seen.append(outcome(lambda: b.reserve("erin", 0.01, model="house-llm").release().status))
    seen.append(b.report(window="week"))
    seen.append(b.report(top=1, window="month"))
    seen.append(b.report(window="week", period=now()))  # the current week, named by a moment
    seen.append(b.report(period=now().date()))
    seen.append(b.report(2, window="month", period=datetime.date(2000, 2, 29)))  # long gone
    seen.append(outcome(b.usage, "dave", window="hour"))  # not kept: the service says so
    seen.append(outcome(b.usage, "dave", window="year"))
    seen.append(outcome(b.report, window="fortnight"))
    seen.append(outcome(b.report, period=datetime.datetime(2026, 1, 1)))  # naive
    seen.append(outcome(b.report, period="2026-01-01"))
    seen.append(outcome(b.set_limit, "user", "dave", 1, "hour"))
    seen.append(outcome(b.set_limit, "model", None, 1, "month"))
    # Several faults: the same one is reported first, on every face.
    seen.append(outcome(b.usage, "", window="year"))
    seen.append(outcome(b.set_limit, "org", "x", 1, "year"))
    seen.append(outcome(b.set_limit, "user", "dave", -1, "year"))
    seen.append(outcome(b.report, 1001, window="year", period="today"))
    seen.append(outcome(b.report, window="year", period="today"))
    return seen


@pytest.fixture
def prices(tmp_path: Path) -> str:
    """A price override for the scenario's model (so pricing needs no litellm import)."""
    path = tmp_path / "prices.json"
    spec = {"input_per_mtok": 3, "output_per_mtok": 15, "cached_input_per_mtok": 0.3}
    path.write_text(json.dumps({"house-llm": spec}))
    return str(path)


def test_scenario_against_manager_and_client(
    make_manager: ManagerFactory, live: LiveFactory, prices: str
) -> None:
    """Code written against the manager works against the client, with the same results."""
    config = {"pricing_file": prices, **LIMITS, **WINDOWS}
    direct = scenario(make_manager(key_prefix="direct", **config))
    with BudgetClient(live(key_prefix="served", **config).url, ADMIN_KEY) as client:
        served = scenario(client)
    assert served == direct


# -- a service in this process ---------------------------------------------------------


class Live:
    def __init__(self, app: Any) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert self.thread.is_alive(), "uvicorn did not start"
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


LiveFactory = Callable[..., Live]


@pytest.fixture
def live(redis_url: str, spool_dir: Path) -> Iterator[LiveFactory]:
    """
    Serve the app with uvicorn in a thread: real HTTP, without a process to start.

    Each app has an AsyncBudgetManager of its own, as the service does (on the
    test's store unless ``redis_url`` is given); the app closes it when it stops.
    """
    started: list[Live] = []
    make_manager = async_managers(redis_url, spool_dir)

    def start(settings: ServerSettings | None = None, **config: Any) -> Live:
        manager = make_manager(**{**LIMITS, **config})
        settings = settings or ServerSettings(
            api_keys=frozenset({USER_KEY}), admin_api_keys=frozenset({ADMIN_KEY})
        )
        server = Live(create_app(manager, settings))
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def client(live: LiveFactory) -> Iterator[BudgetClient]:
    with BudgetClient(live().url, USER_KEY) as c:
        yield c


class TestAgainstTheService:
    """The client's calls and errors, against the real app over HTTP."""

    def test_reserve_commit_and_usage(self, client: BudgetClient) -> None:
        with client.reserve("u", 0.05, project_id="p", model="house-llm") as r:
            assert isinstance(r, Reservation)
            assert r.state == "held"
            assert len(r.id) == 32
            assert client.usage("u", "p")["user"].spent_nano == 50_000_000
            r.commit(0.031)
        assert r.state == "committed"
        usage = client.usage("u", project_id="p")
        assert {k: v.spent_nano for k, v in usage.items()} == {
            "user": 31_000_000,
            "project": 31_000_000,
            "global": 31_000_000,
        }
        assert usage["user"].remaining_usd == pytest.approx(9.969)

    def test_over_budget(self, client: BudgetClient) -> None:
        client.record_spend("user_123", 9.99)
        with pytest.raises(BudgetExceededError) as caught:
            client.check_availability("user_123", estimated_cost=0.05)
        e = caught.value
        midnight = datetime.datetime.combine(
            now().date() + datetime.timedelta(days=1), datetime.time(), datetime.UTC
        )
        assert (e.window, e.resets_at) == ("day", midnight)
        assert e.resets_at is not None
        assert e.retry_after_seconds is not None
        assert abs(e.retry_after_seconds - (midnight - now()).total_seconds()) < 5
        assert str(e) == (
            "Budget exceeded for User user_123: spent $9.99 of $10.00 daily limit, requested $0.05"
        )
        assert (e.scope, e.entity_id, e.limit_usd, e.spent_usd, e.requested_usd) == (
            "user",
            "user_123",
            10.0,
            9.99,
            0.05,
        )
        with pytest.raises(BudgetExceededError):
            client.reserve("user_123", 0.02)

    def test_unknown_reservation(self, client: BudgetClient) -> None:
        with pytest.raises(UnknownReservationError, match="no reservation 'nope'"):
            client.reservation("nope")

    def test_unpriced_model(self, live: LiveFactory) -> None:
        # A long timeout: looking a model up in litellm's table first imports
        # litellm, seconds on a cold service.
        with BudgetClient(live().url, USER_KEY, timeout=60) as client:
            r = client.reserve("u", 1, model="no-such-model-xyz")
            # The service answers 422 without naming the error class, so the client
            # can only say InvalidInputError (the manager says UnknownModelError).
            with pytest.raises((UnknownModelError, InvalidInputError), match="No price known"):
                r.commit_usage(input_tokens=1, output_tokens=1)
            assert r.state == "held"
            assert client.reservation(r.id).state == "held"

    def test_ids_with_url_special_characters(self, client: BudgetClient) -> None:
        for rid in ("%41", "..", ".", "a b", "ü?#&", "\\", " "):
            r = client.reserve("u", 0.01, reservation_id=rid)
            assert client.reservation(rid).state == "held"
            r.release()
            assert client.reservation(rid).state == "released"
        for uid in ("..", "%2F", "a b?c"):
            client.record_spend(uid, 1)
            assert client.usage(uid)["user"].spent_nano == NANO
            assert client.usage(uid)["user"].entity_id == uid

    @pytest.mark.parametrize(
        "uid",
        [
            "org/alice", "/", "//", "a//b", "/lead", "trail/", "..", "../x", "./.", "%", "%2F",
            "%25", "a?b#c&d=e", "ü/ß", "日本/語", "\U0001f600/x", " ", "a b+c", "\\", "line\nbreak",
            "tab\tx", "nul\x00x", "commit", "x/commit", "x/release", "reservations/1",
        ],
    )  # fmt: skip
    def test_every_id_the_library_takes(self, client: BudgetClient, uid: str) -> None:
        """Issue 11.5: user, project and reservation ids that need URL encoding, on every route."""
        client.record_spend(uid, 1, project_id=uid, model=uid)
        usage = client.usage(uid, project_id=uid)
        assert usage["user"].entity_id == uid
        assert usage["user"].spent_nano == NANO
        assert (usage["project"].entity_id, usage["project"].spent_nano) == (uid, NANO)
        r = client.reserve(uid, 2, project_id=uid, reservation_id=uid)
        assert r.id == uid
        looked_up = client.reservation(uid)
        assert (looked_up.state, looked_up.user_id, looked_up.project_id) == ("held", uid, uid)
        assert r.commit(0.5).status == "recorded"
        assert client.reservation(uid).state == "committed"
        r.release()  # after the commit: changes nothing
        assert client.reservation(uid).state == "committed"
        assert client.usage(uid)["user"].spent_nano == NANO + NANO // 2
        other = client.reserve(uid, 1, reservation_id=uid + "/2")
        other.release()
        assert client.reservation(uid + "/2").state == "released"

    def test_slash_in_a_reservation_id(self, client: BudgetClient) -> None:
        """The service routes reservation ids as paths, so a '/' in one is settled too."""
        r = client.reserve("u", 1, reservation_id="a/b/commit")
        assert client.reservation("a/b/commit").state == "held"
        r.commit(0.5)
        assert client.reservation("a/b/commit").state == "committed"
        assert client.usage("u")["user"].spent_nano == NANO // 2

    def test_with_block_semantics(self, client: BudgetClient) -> None:
        with client.reserve("u", 1) as r:
            pass
        assert (r.state, client.reservation(r.id).state) == ("committed", "committed")
        with pytest.raises(KeyError), client.reserve("u", 1) as r:
            raise KeyError
        assert client.reservation(r.id).state == "committed"
        with pytest.raises(KeyError), client.reserve("u", 1, on_error="release") as r:
            raise KeyError
        assert client.reservation(r.id).state == "released"
        with client.reserve("u", 1) as r:
            r.release()
        assert client.usage("u")["user"].spent_nano == 2 * NANO

    def test_settling_on_exit_with_the_service_down_keeps_the_callers_error(
        self, live: LiveFactory, own_redis: RedisServer, caplog: pytest.LogCaptureFixture
    ) -> None:
        handles: list[Reservation] = []

        def failing_call(c: BudgetClient) -> None:
            with c.reserve("u", 1) as r:
                handles.append(r)
                own_redis.kill()
                raise KeyError("the caller's own error")

        url = live(redis_url=own_redis.url, spool_dir="off").url
        with BudgetClient(url, USER_KEY, retries=0) as c:
            with pytest.raises(KeyError, match="the caller's own error"):
                failing_call(c)
            assert "Could not settle reservation" in caplog.text
            [r] = handles
            assert r.state == "held"
            with pytest.raises(BudgetUnavailableError) as down:
                r.commit(0.5)
            assert down.value.reservation_id == r.id
            assert r.state == "held"
            own_redis.start()  # empty: the store had no persistence
            # The hold's record was lost; the handle tells the service whose
            # and which day it was, so the actual cost is recorded once.
            assert r.commit(0.5).status == "recorded"
            assert r.state == "committed"
            assert c.usage("u")["user"].spent_nano == NANO // 2
            assert c.reservation(r.id).state == "committed"
            assert c.reservation(r.id).commit(0.5).status == "duplicate"
            assert c.usage("u")["user"].spent_nano == NANO // 2

    def test_receipts_and_id_reuse(self, client: BudgetClient) -> None:
        """The service's receipts, and its 409, as the manager gives them."""
        first = client.record_spend("alice", 5, idempotency_key="invoice-1")
        assert (first.status, first.idempotency_key, first.amount_nano) == (
            "recorded",
            "invoice-1",
            5 * NANO,
        )
        assert client.record_spend("alice", 5, idempotency_key="invoice-1").status == "duplicate"
        with pytest.raises(IdempotencyConflictError, match="invoice-1"):
            client.record_spend("bob", 7, idempotency_key="invoice-1")
        held = client.reserve("alice", 1, reservation_id="r1")
        with pytest.raises(IdempotencyConflictError):
            client.reserve("bob", 1, reservation_id="r1")
        receipt = held.commit(0.5)
        assert (receipt.status, receipt.kind, receipt.idempotency_key) == (
            "recorded",
            "commit",
            "r1",
        )
        assert held.commit(0.75) is receipt
        assert client.usage("bob")["user"].spent_nano == 0
        assert client.usage("alice")["user"].spent_nano == 5 * NANO + NANO // 2

    def test_report_needs_an_admin_key(self, live: LiveFactory) -> None:
        url = live().url
        with BudgetClient(url, USER_KEY) as client, BudgetClient(url, ADMIN_KEY) as admin:
            client.record_spend("a", 1, project_id="p", model="house-llm")
            client.record_spend("b", 2, model="house-llm")
            # Every user's spend: not for a plain API key.
            with pytest.raises(BudgetError, match=r"refused the API key for GET /report \(403"):
                client.report()
            report = admin.report()
            assert report.total.spent_nano == 3 * NANO
            assert [u.entity_id for u in report.users] == ["b", "a"]
            assert [(m.scope, m.entity_id, m.spent_nano) for m in report.models] == [
                ("model", "house-llm", 3 * NANO)
            ]
            assert (report.window, report.period) == ("day", now().date().isoformat())
            assert len(admin.report(top=1).users) == 1
            assert admin.report(top=0).users == ()  # the total alone, as the manager's

    def test_limits_need_an_admin_key(self, live: LiveFactory) -> None:
        url = live().url
        with BudgetClient(url, USER_KEY) as user, BudgetClient(url, ADMIN_KEY) as admin:
            with pytest.raises(BudgetError, match=r"refused the API key for PUT /limits \(403"):
                user.set_limit("user", "u", 1)
            admin.set_limit("user", "u", 1)
            with pytest.raises(BudgetExceededError):
                user.check_availability("u", 2)

    def test_wrong_or_missing_key(self, live: LiveFactory) -> None:
        url = live().url
        for key in ("wrong", None):
            with BudgetClient(url, key) as c, pytest.raises(BudgetError) as caught:
                c.check_availability("u", 1)
            # Plain BudgetError: not "over budget", not "store down", but still a "no".
            assert type(caught.value) is BudgetError
            assert "401" in str(caught.value)
            with BudgetClient(url, key) as c:
                c.ping()  # /health needs no key

    def test_insecure_server_without_a_key(self, live: LiveFactory) -> None:
        with BudgetClient(live(ServerSettings(insecure_no_auth=True)).url, None) as c:
            c.set_limit("global", None, 100)
            c.check_availability("u", 1)

    def test_store_down_is_unavailable(self, live: LiveFactory, own_redis: RedisServer) -> None:
        with BudgetClient(live(redis_url=own_redis.url, spool_dir="off").url, ADMIN_KEY) as c:
            c.ping()
            own_redis.kill()
            for call in (
                lambda: c.ping(),
                lambda: c.check_availability("u", 1),
                lambda: c.reserve("u", 1),
                lambda: c.usage("u"),
                lambda: c.report(),
            ):
                with pytest.raises(BudgetUnavailableError):
                    call()
            # Nothing saved: the error names the key that makes the retry safe.
            with pytest.raises(BudgetUnavailableError) as info:
                c.record_spend("u", 1, idempotency_key="k")
            assert info.value.idempotency_key == "k"

    def test_a_spend_the_service_spooled_is_charged_once(
        self, live: LiveFactory, own_redis: RedisServer
    ) -> None:
        """
        With the store down the service saves the spend: the client says
        "spooled" with the key, and the natural retry with it charges once
        (it raised BudgetUnavailableError, and the retry charged twice).
        """
        with BudgetClient(live(redis_url=own_redis.url).url, USER_KEY) as c:
            c.ping()
            own_redis.kill()
            receipt = c.record_spend("alice", 0.05)
            assert receipt.status == "spooled"
            again = c.record_spend("alice", 0.05, idempotency_key=receipt.idempotency_key)
            assert again.status == "spooled"
            own_redis.start()
            c.ping()  # a call that reaches the store starts the service's replay
            deadline = time.monotonic() + 10
            while c.usage("alice")["user"].spent_nano == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert c.usage("alice")["user"].spent_nano == 50_000_000
            key = receipt.idempotency_key
            assert c.record_spend("alice", 0.05, idempotency_key=key).status == "duplicate"
            assert c.usage("alice")["user"].spent_nano == 50_000_000

    def test_threads_share_one_client(self, client: BudgetClient) -> None:
        errors: list[BaseException] = []

        def work(i: int) -> None:
            try:
                for j in range(10):
                    client.record_spend(f"t{i}", 0.01, idempotency_key=f"{i}-{j}")
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert client.usage("u")["global"].spent_nano == 8 * 10 * 10_000_000


# -- no service needed ---------------------------------------------------------------------


def unreachable() -> BudgetClient:
    """A client whose every request would fail: any error but a validation one hit the wire."""
    return BudgetClient(f"http://127.0.0.1:{free_port()}", "k", retries=0, timeout=0.5)


class TestValidatedBeforeSending:
    """Bad input raises InvalidInputError (the manager's message) and sends nothing."""

    @pytest.mark.parametrize(
        ("call", "message"),
        [
            (lambda c: c.check_availability("u", -1), "estimated_cost must not be negative"),
            (lambda c: c.check_availability("u", float("nan")), "estimated_cost must be finite"),
            (lambda c: c.check_availability("u", float("inf")), "estimated_cost must be finite"),
            (lambda c: c.check_availability("u", 1_000_001), "above the maximum"),
            (lambda c: c.check_availability("u", "1"), "must be a number of USD"),
            (lambda c: c.check_availability("u", True), "must be a number of USD"),
            (lambda c: c.check_availability("", 1), "user_id must not be empty"),
            (lambda c: c.check_availability("u" * 257, 1), "user_id is 257 characters"),
            (lambda c: c.check_availability("u", 1, project_id=""), "project_id must not be"),
            (lambda c: c.check_availability(7, 1), "user_id must be a str"),
            (lambda c: c.check_availability("\ud800", 1), "not valid unicode"),
            (lambda c: c.record_spend("u", Decimal("-0.01")), "cost must not be negative"),
            (lambda c: c.record_spend("u", 1, model=""), "model must not be empty"),
            (lambda c: c.record_spend("u", 1, idempotency_key=""), "idempotency_key must not"),
            (lambda c: c.reserve("u", -1), "estimate must not be negative"),
            (lambda c: c.reserve("u", 1, on_error="skip"), "on_error must be"),
            (lambda c: c.reserve("u", 1, reservation_id=""), "reservation_id must not be"),
            (lambda c: c.reservation(""), "reservation_id must not be empty"),
            (lambda c: c.usage(""), "user_id must not be empty"),
            (lambda c: c.usage("u", "x" * 300), "project_id is 300 characters"),
            (lambda c: c.set_limit("global", "x", 1), "global scope takes no entity id"),
            (lambda c: c.set_limit("user", None, 1), "user_id must be a str"),
            (lambda c: c.set_limit("org", "x", 1), "scope must be 'user', 'project', 'model' or"),
            (lambda c: c.set_limit("model", None, 1), "model must be a str"),
            (lambda c: c.set_limit("model", "", 1), "model must not be empty"),
            (lambda c: c.set_limit("user", "u", 9_000_001), "above the maximum"),
            (lambda c: c.set_limit("user", "u", 1, "year"), "window must be one of hour, day,"),
            (lambda c: c.set_limit("org", "x", 1, "year"), "scope must be"),  # the scope first
            (lambda c: c.set_limit("user", "u", -1, "year"), "window must be"),  # then the window
            (lambda c: c.usage("u", window="Day"), "window must be one of hour, day, week, month"),
            (lambda c: c.usage("u", window=None), "window must be one of"),
            (lambda c: c.usage("", window="year"), "window must be one of"),  # the window first
            (lambda c: c.report(top=1001), "top must be None or a whole number"),
            (lambda c: c.report(top=1001, window="year"), "top must be"),
            (lambda c: c.report(window="year", period=1), "window must be one of"),
            (lambda c: c.report(period="2026-11-29"), "period must be a date or an aware datetime"),
            (lambda c: c.report(period=datetime.datetime(2026, 11, 29)), "expected an aware"),
        ],
    )
    def test_invalid(self, call: Callable[[BudgetClient], Any], message: str) -> None:
        with unreachable() as c, pytest.raises(InvalidInputError, match=message):
            call(c)

    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"input_tokens": -1, "output_tokens": 1}, "input_tokens must not be negative"),
            ({"input_tokens": 1, "output_tokens": 1.0}, "output_tokens must be an int"),
            ({"input_tokens": 1, "output_tokens": 10**9}, "above the maximum"),
            ({"input_tokens": 1, "output_tokens": 1, "cached_input_tokens": 2}, "cannot exceed"),
        ],
    )
    def test_invalid_token_counts(self, kwargs: dict[str, Any], message: str) -> None:
        c, sent = scripted(lambda _: httpx.Response(200, json=held_answer("r")))
        with c:
            r = c.reserve("u", 1, model="house-llm", reservation_id="r")
            with pytest.raises(InvalidInputError, match=message):
                r.commit_usage(**kwargs)
        assert [s.url.path for s in sent] == ["/reservations"]  # the commit was never sent

    @pytest.mark.parametrize(
        "kwargs",
        [
            {"base_url": "localhost:8000"},
            {"base_url": "ftp://x"},
            {"base_url": "http://"},
            {"timeout": 0},
            {"timeout": float("nan")},
            {"retries": -1},
            {"retries": True},
            {"pool_size": 0},
            {"api_key": ""},
            {"api_key": "ключ"},
            {"api_key": "a\nb"},
        ],
    )
    def test_bad_configuration(self, kwargs: dict[str, Any]) -> None:
        args = {"base_url": "http://127.0.0.1:1", "api_key": "k", **kwargs}
        with pytest.raises(ConfigError):
            BudgetClient(**args)


def scripted(
    respond: Callable[[httpx.Request], httpx.Response], **kwargs: Any
) -> tuple[BudgetClient, list[httpx.Request]]:
    """A client whose requests *respond* answers; the list collects every attempt."""
    sent: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return respond(request)

    kwargs.setdefault("retries", 2)
    client = BudgetClient(
        "http://budget.test", "k", transport=httpx.MockTransport(handler), **kwargs
    )
    return client, sent


#: What a settlement leaves a hold in.
STATE = {"commit": "committed", "release": "released"}
#: When scripted periods end.
DECEMBER = datetime.datetime(2026, 12, 1, tzinfo=datetime.UTC)
#: When a scripted service says a hold was taken (as the service writes it: UTC, ms).
HELD_AT = "2026-11-29T10:20:30.456+00:00"
HELD_AT_MS = 1_795_947_630_456


def spend_receipt(key: str, status: str = "recorded") -> dict[str, Any]:
    """The service's answer to a $1 POST /spend."""
    return {
        "status": status,
        "kind": "spend",
        "idempotency_key": key,
        "amount_usd": 1.0,
        "amount_nano": NANO,
    }


def held_answer(rid: str, estimate_usd: float = 1.0, **fields: Any) -> dict[str, Any]:
    """The service's answer to a POST /reservations that held *estimate_usd*."""
    answer = {"reservation_id": rid, "state": "held", "estimate_usd": estimate_usd}
    return {**answer, "held_at": HELD_AT, **fields}


def exceeded_answer(**fields: Any) -> dict[str, Any]:
    """The service's 429 body: a week's $5 user limit refusing $1 more than its $4.50."""
    return {
        "detail": "Budget exceeded for User u: ...",
        "scope": "user",
        "entity_id": "u",
        "limit_nano": 5 * NANO,
        "spent_nano": 9 * NANO // 2,
        "requested_nano": NANO,
        "window": "week",
        "resets_at": "2026-11-30T00:00:00+00:00",
        "retry_after_seconds": 49_170,
        **fields,
    }


def usage_answer(entity_id: str | None, window: str = "day", **fields: Any) -> dict[str, Any]:
    """One scope of a GET /usage (or a row of a GET /report): $1 spent of no limit."""
    return {
        "entity_id": entity_id,
        "spent_usd": 1.0,
        "limit_usd": None,
        "remaining_usd": None,
        "spent_nano": NANO,
        "limit_nano": None,
        "remaining_nano": None,
        "window": window,
        "resets_at": "2026-12-01T00:00:00+00:00",
        **fields,
    }


def report_answer(window: str = "month", **fields: Any) -> dict[str, Any]:
    """A GET /report's answer: November 2026 (UTC), a user, a project and a model."""
    return {
        "window": window,
        "period": "2026-11",
        "starts_at": "2026-11-01T00:00:00+00:00",
        "resets_at": "2026-12-01T00:00:00+00:00",
        "total": usage_answer(None, window),
        "users": [usage_answer("alice", window)],
        "projects": [usage_answer("p", window, limit_nano=7, limit_usd=7e-9)],
        "models": [usage_answer("house-llm", window)],
        **fields,
    }


def body_of(request: httpx.Request) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(request.content)
    return result


class TestTransport:
    """Retries that cannot double-charge, and fail-closed answers to everything unexpected."""

    def test_retried_reserve_sends_the_same_reservation_id(self) -> None:
        def respond(request: httpx.Request) -> httpx.Response:
            if len(sent) < 3:
                raise httpx.ReadTimeout("lost", request=request)
            rid = body_of(request)["reservation_id"]
            return httpx.Response(200, json=held_answer(rid, 0.5))

        client, sent = scripted(respond)
        r = client.reserve("u", 0.5)
        assert len(sent) == 3
        assert {body_of(s)["reservation_id"] for s in sent} == {r.id}
        assert r.estimate_nano == NANO // 2
        assert sent[0].headers["Authorization"] == "Bearer k"

    def test_retried_spend_sends_the_same_idempotency_key(self) -> None:
        def respond(request: httpx.Request) -> httpx.Response:
            if len(sent) < 2:
                raise httpx.ConnectError("refused", request=request)
            key = body_of(request)["idempotency_key"]
            return httpx.Response(200, json=spend_receipt(key))

        client, sent = scripted(respond)
        client.record_spend("u", 1)
        keys = {body_of(s)["idempotency_key"] for s in sent}
        assert len(sent) == 2
        assert len(keys) == 1
        client.record_spend("u", 1)
        assert body_of(sent[-1])["idempotency_key"] not in keys
        client.record_spend("u", 1, idempotency_key="mine")
        assert body_of(sent[-1])["idempotency_key"] == "mine"

    def test_a_reserve_whose_answers_are_lost_is_released(self) -> None:
        """The service may hold it: the client releases that id, and the error names it."""

        def respond(request: httpx.Request) -> httpx.Response:
            if request.url.path == "/reservations":
                raise httpx.ReadTimeout("lost", request=request)
            body = body_of(request)
            assert body["user_id"] == "u"
            return httpx.Response(
                200,
                json={
                    "status": "recorded",
                    "kind": "release",
                    "idempotency_key": "r1",
                    "amount_usd": 0.0,
                    "amount_nano": 0,
                    "state": "released",
                },
            )

        client, sent = scripted(respond, retries=1)
        with pytest.raises(BudgetUnavailableError) as info:
            client.reserve("u", 1, reservation_id="r1")
        assert info.value.reservation_id == "r1"
        deadline = time.monotonic() + 5
        while not any(r.url.path == "/reservations/r1/release" for r in sent):
            assert time.monotonic() < deadline, "the hold was never released"
            time.sleep(0.01)
        # Released by id, the hold named by its ids and by when the client gave up on it
        # (only a tombstone's moment: the record's own wins where there is one).
        [release] = [body_of(r) for r in sent if r.url.path == "/reservations/r1/release"]
        assert set(release) == {"user_id", "held_at"}
        held_at = datetime.datetime.fromisoformat(release["held_at"])
        assert held_at.utcoffset() == datetime.timedelta(0)
        assert abs(held_at - now()) < datetime.timedelta(minutes=1)

    def test_a_reserve_that_never_left_is_not_released(self) -> None:
        def respond(request: httpx.Request) -> httpx.Response:
            raise httpx.ConnectError("refused", request=request)

        client, sent = scripted(respond, retries=0)
        with pytest.raises(BudgetUnavailableError) as info:
            client.reserve("u", 1, reservation_id="r1")
        assert info.value.reservation_id == "r1"
        time.sleep(0.1)
        assert [r.url.path for r in sent] == ["/reservations"]

    def test_retries_are_bounded(self) -> None:
        def respond(request: httpx.Request) -> httpx.Response:
            raise httpx.ConnectError("refused", request=request)

        client, sent = scripted(respond, retries=2)
        with pytest.raises(BudgetUnavailableError, match="did not answer POST /check"):
            client.check_availability("u", 1)
        assert len(sent) == 3
        client, sent = scripted(respond, retries=0)
        with pytest.raises(BudgetUnavailableError):
            client.usage("u")
        assert len(sent) == 1

    @pytest.mark.parametrize(
        "response",
        [
            httpx.Response(503, json={"detail": "store down"}),
            httpx.Response(500, text="Internal Server Error"),
            httpx.Response(502, text="<html>Bad Gateway</html>"),
            httpx.Response(200, text="<html>login</html>"),
            httpx.Response(200, json={"status": "maybe"}),
            httpx.Response(200, json=["allowed"]),
            httpx.Response(307, headers={"Location": "http://elsewhere/check"}),
            httpx.Response(404, json={"detail": "Not Found"}),
            httpx.Response(429, text="Too Many Requests"),
            httpx.Response(429, json={"detail": "slow down", "scope": "user"}),
            httpx.Response(400, json={"detail": "?"}),
            httpx.Response(
                200, headers={"Content-Encoding": "gzip"}, stream=httpx.ByteStream(b"not gzip")
            ),
        ],
    )
    def test_anything_but_a_yes_is_a_no(self, response: httpx.Response) -> None:
        client, sent = scripted(lambda _: response)
        with pytest.raises(BudgetUnavailableError):
            client.check_availability("u", 1)
        assert len(sent) == 1  # answers are not retried

    def test_malformed_answers_to_reads(self) -> None:
        answers = {
            "/usage/u": {"user": {"entity_id": "u", "spent_nano": "1", "limit_nano": 1}},
            "/report": {"day": "yesterday"},
            "/reservations/r": {"reservation_id": "other"},
        }
        client, _ = scripted(lambda req: httpx.Response(200, json=answers[req.url.path]))
        with pytest.raises(BudgetUnavailableError):
            client.usage("u")
        with pytest.raises(BudgetUnavailableError):
            client.report()
        with pytest.raises(BudgetUnavailableError):
            client.reservation("r")

    @pytest.mark.parametrize(
        "answer",
        [
            {"user": usage_answer("u"), "global": usage_answer(None, "week")},  # another window
            {"user": usage_answer("u")},  # a scope missing
            {"user": usage_answer("u"), "global": usage_answer(None), "project": usage_answer("p")},
            {"user": usage_answer("u", resets_at="2026-12-01T00:00"), "global": usage_answer(None)},
            {"user": usage_answer("u", resets_at="soon"), "global": usage_answer(None)},
            {"user": usage_answer("u", resets_at=None), "global": usage_answer(None)},
            {"user": usage_answer("u", limit_nano=1.5), "global": usage_answer(None)},
            {"user": usage_answer("u"), "global": usage_answer("g")},  # global names nobody
            {"user": usage_answer(None), "global": usage_answer(None)},
            {"user": usage_answer("u", window=None), "global": usage_answer(None)},
            {"user": [], "global": usage_answer(None)},
        ],
    )  # fmt: skip
    def test_malformed_usage(self, answer: dict[str, Any]) -> None:
        """Only the scopes asked about, in the window asked about, each well formed."""
        client, _ = scripted(lambda _: httpx.Response(200, json=answer))
        with pytest.raises(BudgetUnavailableError, match="unexpected answer to GET /usage"):
            client.usage("u")

    @pytest.mark.parametrize(
        "fields",
        [
            {"window": "week"},
            {"window": None},
            {"period": None},
            {"period": 2026},
            {"starts_at": "2026-11-01"},
            {"resets_at": "9999-12-31T23:00:00-05:00"},  # past the last UTC datetime
            {"total": usage_answer("someone", "month")},
            {"users": [usage_answer("alice", "day")]},
            {"users": [usage_answer(None, "month")]},
            {"projects": usage_answer("p", "month")},
            {"models": [{"model": "house-llm", "spent_usd": 1.0, "spent_nano": NANO}]},
            {"models": None},
        ],
    )
    def test_malformed_report(self, fields: dict[str, Any]) -> None:
        client, _ = scripted(lambda _: httpx.Response(200, json=report_answer(**fields)))
        with pytest.raises(BudgetUnavailableError, match="unexpected answer to GET /report"):
            client.report(window="month")

    @pytest.mark.parametrize(
        "held_at",
        [
            None,
            "2026-11-29",
            "2026-11-29T10:20:30",  # naive: no instant
            "yesterday",
            1_795_947_630_456,
            "1960-01-01T00:00:00+00:00",  # before any store's clock
        ],
    )
    def test_a_malformed_held_at_fails_closed(self, held_at: object) -> None:
        client, _ = scripted(
            lambda req: httpx.Response(200, json=held_answer("r", held_at=held_at))
        )
        with pytest.raises(BudgetUnavailableError, match="held_at"):
            client.reserve("u", 1, reservation_id="r")

    def test_a_handle_knows_when_it_was_held_and_says_so_when_settling(self) -> None:
        """held_at is the service's; every settlement sends it back as it came."""

        def respond(request: httpx.Request) -> httpx.Response:
            if request.method == "GET":
                return httpx.Response(
                    200, json={**held_answer("r"), "user_id": "u", "project_id": None, "model": "m"}
                )
            if request.url.path == "/reservations":
                return httpx.Response(
                    200, json=held_answer("r", held_at="2026-11-29T11:20:30.456+01:00")
                )
            kind = request.url.path.rsplit("/", 1)[1]
            receipt = {"status": "recorded", "kind": kind, "idempotency_key": "r"}
            return httpx.Response(200, json={**receipt, "amount_nano": 0, "state": STATE[kind]})

        client, sent = scripted(respond)
        r = client.reserve("u", 1, model="m", reservation_id="r")
        expected = datetime.datetime(2026, 11, 29, 10, 20, 30, 456_000, datetime.UTC)
        assert (r.held_at, r.held_at_ms, r.held_at.tzinfo) == (expected, HELD_AT_MS, datetime.UTC)
        r.release()
        assert body_of(sent[-1]) == {"user_id": "u", "model": "m", "held_at": HELD_AT}
        looked_up = client.reservation("r")
        assert (looked_up.held_at, looked_up.model) == (expected, "m")
        looked_up.commit(0.5)
        assert body_of(sent[-1]) == {
            "actual_cost": 0.5,
            "user_id": "u",
            "model": "m",
            "held_at": HELD_AT,
        }

    def test_429_is_exceeded_with_its_window_and_reset(self) -> None:
        """The service's 429: which scope and window refused, the amounts, and when it resets."""
        answer = exceeded_answer(resets_at="2026-11-30T01:00:00+01:00")
        headers = {"Retry-After": "49170"}
        client, sent = scripted(lambda _: httpx.Response(429, json=answer, headers=headers))
        with pytest.raises(BudgetExceededError) as caught:
            client.check_availability("u", 1)
        e = caught.value
        assert (e.scope, e.entity_id, e.limit_nano, e.spent_nano, e.requested_nano) == (
            "user",
            "u",
            5 * NANO,
            9 * NANO // 2,
            NANO,
        )
        assert (e.window, e.resets_at, e.retry_after_seconds) == (
            "week",
            datetime.datetime(2026, 11, 30, tzinfo=datetime.UTC),
            49_170,
        )
        assert e.resets_at is not None
        assert e.resets_at.tzinfo == datetime.UTC
        assert str(e) == (
            "Budget exceeded for User u: spent $4.50 of $5.00 weekly limit, requested $1.00"
        )
        assert e.to_json() == {
            k: v for k, v in exceeded_answer().items() if k != "detail"
        }  # the service's body, as the manager's error would give it
        assert len(sent) == 1  # a refusal is an answer: not retried
        with pytest.raises(BudgetExceededError, match="weekly limit"):
            client.reserve("u", 1)

    @pytest.mark.parametrize(
        "fields",
        [
            {"resets_at": "tomorrow"},
            {"resets_at": "2026-11-30T00:00:00"},  # naive
            {"resets_at": "2026-11-30"},
            {"resets_at": 1_796_083_200},
            {"resets_at": "9999-12-31T23:00:00-05:00"},
            {"window": "year"},
            {"window": None},
            {"retry_after_seconds": "60"},
            {"retry_after_seconds": 0},
            {"retry_after_seconds": True},
            {"retry_after_seconds": 1.5},
            {"scope": 7},
            {"limit_nano": 5.0},
        ],
    )
    def test_a_malformed_429_fails_closed(self, fields: dict[str, Any]) -> None:
        """A 429 whose details are not the service's is no budget decision: still a no."""
        client, _ = scripted(lambda _: httpx.Response(429, json=exceeded_answer(**fields)))
        with pytest.raises(BudgetUnavailableError, match="429 but no budget details"):
            client.check_availability("u", 1)

    @pytest.mark.parametrize("missing", ["window", "resets_at", "retry_after_seconds", "scope"])
    def test_a_429_missing_a_detail_fails_closed(self, missing: str) -> None:
        answer = {k: v for k, v in exceeded_answer().items() if k != missing}
        client, _ = scripted(lambda _: httpx.Response(429, json=answer))
        with pytest.raises(BudgetUnavailableError, match="429 but no budget details"):
            client.check_availability("u", 1)

    def test_a_429_may_say_it_does_not_know_when_it_resets(self) -> None:
        """null resets_at and retry_after_seconds: what the error's to_json says without them."""
        answer = exceeded_answer(resets_at=None, retry_after_seconds=None)
        client, _ = scripted(lambda _: httpx.Response(429, json=answer))
        with pytest.raises(BudgetExceededError) as caught:
            client.check_availability("u", 1)
        assert (caught.value.resets_at, caught.value.retry_after_seconds) == (None, None)

    def test_windows_and_periods_are_sent(self) -> None:
        """usage, report and set_limit name the window (and the period) they are about."""

        def respond(request: httpx.Request) -> httpx.Response:
            window = request.url.params.get("window", "day")
            if request.url.path == "/usage/u":
                usage = {"user": usage_answer("u", window)}
                if "project_id" in request.url.params:
                    usage["project"] = usage_answer(request.url.params["project_id"], window)
                return httpx.Response(200, json={**usage, "global": usage_answer(None, window)})
            if request.url.path == "/report":
                return httpx.Response(200, json=report_answer(window))
            return httpx.Response(200, json={"status": "updated"})

        client, sent = scripted(respond)
        usage = client.usage("u", window="week")
        assert dict(sent[-1].url.params) == {"window": "week"}
        assert usage == {
            "user": ScopeUsage("user", "u", NANO, None, "week", DECEMBER),
            "global": ScopeUsage("global", None, NANO, None, "week", DECEMBER),
        }
        assert usage["user"].remaining_nano is None
        client.usage("u", "q", window="hour")  # any window: the service says if kept
        assert dict(sent[-1].url.params) == {"project_id": "q", "window": "hour"}
        client.usage("u")
        assert dict(sent[-1].url.params) == {"window": "day"}

        report = client.report(window="month")
        assert dict(sent[-1].url.params) == {"top": "1000", "window": "month"}
        november = datetime.datetime(2026, 11, 1, tzinfo=datetime.UTC)
        assert (report.window, report.period, report.starts_at, report.resets_at) == (
            "month",
            "2026-11",
            november,
            DECEMBER,
        )
        assert report.total == ScopeUsage("global", None, NANO, None, "month", DECEMBER)
        assert report.users == (ScopeUsage("user", "alice", NANO, None, "month", DECEMBER),)
        assert report.projects == (ScopeUsage("project", "p", NANO, 7, "month", DECEMBER),)
        assert report.models == (ScopeUsage("model", "house-llm", NANO, None, "month", DECEMBER),)
        client.report(3, window="week", period=datetime.date(2026, 11, 29))
        assert dict(sent[-1].url.params) == {"top": "3", "window": "week", "period": "2026-11-29"}
        tokyo = datetime.timezone(datetime.timedelta(hours=9))
        moment = datetime.datetime(2026, 11, 29, 14, 30, tzinfo=tokyo)
        client.report(period=moment)
        assert sent[-1].url.params["period"] == "2026-11-29T14:30:00+09:00"
        assert "%2B09%3A00" in str(sent[-1].url)  # the offset's "+" survives the query string
        assert datetime.datetime.fromisoformat(sent[-1].url.params["period"]) == moment

        client.set_limit("model", "house-llm", 100, "month")
        assert body_of(sent[-1]) == {
            "scope": "model",
            "entity_id": "house-llm",
            "limit_nano": 100 * NANO,
            "window": "month",
        }
        client.set_limit("user", "u", None, window="hour")
        assert body_of(sent[-1]) == {"scope": "user", "entity_id": "u", "limit_nano": None,
                                     "window": "hour"}  # fmt: skip
        # The day: as an older service took it (it refuses a field it does not know).
        client.set_limit("global", None, 2)
        assert body_of(sent[-1]) == {"scope": "global", "entity_id": None, "limit_nano": 2 * NANO}

    def test_413_is_bad_input(self) -> None:
        """A body over the service's bound is the caller's to fix, not a store outage."""
        client, _ = scripted(lambda _: httpx.Response(413, json={"detail": "body too large"}))
        with pytest.raises(InvalidInputError, match="body too large"):
            client.check_availability("u", 1)

    def test_422_names_its_error_class(self) -> None:
        def respond(request: httpx.Request) -> httpx.Response:
            if request.url.path == "/reservations":
                rid = body_of(request)["reservation_id"]
                return httpx.Response(200, json=held_answer(rid))
            return httpx.Response(422, json={"detail": "No price", "error": "UnknownModelError"})

        client, _ = scripted(respond)
        r = client.reserve("u", 1, model="m")
        with pytest.raises(UnknownModelError, match="No price"):
            r.commit_usage(input_tokens=1, output_tokens=1)
        assert r.state == "held"

    def test_amounts_are_sent_as_the_float_of_their_nano_dollars(self) -> None:
        client, sent = scripted(lambda _: httpx.Response(200, json={"status": "allowed"}))
        client.check_availability("u", Decimal("0.1000000001"))
        assert body_of(sent[0])["estimated_cost"] == 0.100000001

    def test_a_stalled_service_times_out(self) -> None:
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(16)  # accepted by the kernel, never answered
            port = listener.getsockname()[1]
            client = BudgetClient(f"http://127.0.0.1:{port}", "k", timeout=0.2, retries=1)
            start = time.monotonic()
            with pytest.raises(BudgetUnavailableError, match="ReadTimeout"):
                client.check_availability("u", 1)
            assert time.monotonic() - start < 2
            client.close()

    def test_refused_connection_fails_fast(self) -> None:
        with unreachable() as c:
            start = time.monotonic()
            with pytest.raises(BudgetUnavailableError, match="ConnectError"):
                c.check_availability("u", 1)
            assert time.monotonic() - start < 1


def test_imports_need_no_server_packages() -> None:
    """The client needs httpx only, and the library needs neither httpx nor FastAPI."""
    code = (
        "import sys\n"
        "import coreason_budget\n"
        "assert 'httpx' not in sys.modules and 'fastapi' not in sys.modules\n"
        "import coreason_budget.client\n"
        "assert 'fastapi' not in sys.modules and 'uvicorn' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# -- the deployed service, in its own process ----------------------------------------------


class Service:
    """``coreason-budget serve`` (as ``python -m coreason_budget serve``) on a free port."""

    def __init__(self, tmp_path: Path, redis_url: str, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp_path / f"serve-{self.port}.log"
        environ = {k: v for k, v in os.environ.items() if not k.startswith("COREASON_BUDGET_")}
        environ.update(
            COREASON_BUDGET_REDIS_URL=redis_url,
            COREASON_BUDGET_API_KEYS=USER_KEY,
            COREASON_BUDGET_ADMIN_API_KEYS=ADMIN_KEY,
            COREASON_BUDGET_LOG_PATH=str(tmp_path / "logs" / "app.log"),
            LITELLM_LOCAL_MODEL_COST_MAP="True",
        )
        environ.update(env)
        args = [
            sys.executable, "-m", "coreason_budget", "serve",
            "--host", "127.0.0.1", "--port", str(self.port),
        ]  # fmt: skip
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                args, env=environ, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT
            )

    def wait_ready(self) -> Service:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"service exited: {self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=0.5).status_code in (200, 503):
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"service did not start: {self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:  # pragma: no cover
                self.proc.kill()
                self.proc.wait()


ServiceFactory = Callable[..., Service]


@pytest.fixture
def service(tmp_path: Path) -> Iterator[ServiceFactory]:
    started: list[Service] = []

    def start(redis_url: str, **env: str) -> Service:
        s = Service(tmp_path, redis_url, **env)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


def day_counter(client: redis.Redis, prefix: str, field: str) -> int:
    keys = list(client.scan_iter(match=f"{{{prefix}}}:day:*"))
    assert len(keys) == 1, keys
    return int(client.hget(keys[0], field) or 0)


@pytest.mark.slow
class TestDeployedService:
    """The service as deployed: its own process, configured from the environment only."""

    def test_scenario_matches_the_manager(
        self, service: ServiceFactory, redis_url: str, make_manager: ManagerFactory, prices: str
    ) -> None:
        env = {
            "COREASON_BUDGET_PRICING_FILE": prices,
            "COREASON_BUDGET_KEY_PREFIX": "served",
            "COREASON_BUDGET_DAILY_USER_LIMIT_USD": "10",
            "COREASON_BUDGET_DAILY_PROJECT_LIMIT_USD": "20",
            "COREASON_BUDGET_DAILY_GLOBAL_LIMIT_USD": "50",
            "COREASON_BUDGET_WINDOWS": "week,month",
            "COREASON_BUDGET_WEEKLY_USER_LIMIT_USD": "5",
        }
        s = service(redis_url, **env).wait_ready()
        config = {"pricing_file": prices, **LIMITS, **WINDOWS}
        direct = scenario(make_manager(key_prefix="direct", **config))
        with BudgetClient(s.url, ADMIN_KEY) as client:
            assert scenario(client) == direct
        assert (s.log.parent / "logs" / "app.log").exists()

    def test_contention_never_overspends(
        self, service: ServiceFactory, redis_url: str, redis_client: redis.Redis
    ) -> None:
        """16 threads race for a $1.00 budget in $0.07 holds: exactly 14 win."""
        env = {"COREASON_BUDGET_KEY_PREFIX": "race", "COREASON_BUDGET_DAILY_USER_LIMIT_USD": "1"}
        s = service(redis_url, **env).wait_ready()
        threads, attempts = 16, 4
        barrier = threading.Barrier(threads)
        won: list[str] = []
        refused: list[BudgetExceededError] = []
        other: list[BaseException] = []
        lock = threading.Lock()

        with BudgetClient(s.url, USER_KEY, timeout=10) as client:

            def race() -> None:
                barrier.wait()
                for _ in range(attempts):
                    try:
                        r = client.reserve("alice", 0.07, project_id="p")
                        with lock:
                            won.append(r.id)
                    except BudgetExceededError as e:
                        with lock:
                            refused.append(e)
                    except BaseException as e:  # pragma: no cover - reported below
                        with lock:
                            other.append(e)

            workers = [threading.Thread(target=race) for _ in range(threads)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            assert other == []
            assert len(won) == 14
            assert len(set(won)) == 14
            assert len(refused) == threads * attempts - 14
            assert {(e.scope, e.entity_id) for e in refused} == {("user", "alice")}
            assert client.usage("alice")["user"].spent_nano == 14 * 70_000_000
        for field in ("u:alice", "p:p", "g"):
            assert day_counter(redis_client, "race", field) == 14 * 70_000_000
        assert len(list(redis_client.scan_iter(match="{race}:res:*"))) == 14

    def test_store_outage_fails_closed_and_recovers(
        self, service: ServiceFactory, own_redis: RedisServer
    ) -> None:
        s = service(own_redis.url).wait_ready()
        with BudgetClient(s.url, USER_KEY) as client:
            held = client.reserve("u", 1)
            own_redis.kill()
            assert httpx.get(s.url + "/health").status_code == 503
            start = time.monotonic()
            for call in (
                client.ping,
                lambda: client.check_availability("u", 0.01),
                lambda: client.reserve("u", 0.01),
                lambda: client.usage("u"),
            ):
                with pytest.raises(BudgetUnavailableError):
                    call()
            # Writes the service saved to its spool: "spooled", charged once it is back.
            assert client.record_spend("u", 0.01).status == "spooled"
            assert held.commit(0.5).status == "spooled"
            assert time.monotonic() - start < 10
            assert held.state == "committed"

            own_redis.start()  # empty: the store had no persistence
            deadline = time.monotonic() + 10
            while True:
                try:
                    client.ping()
                    break
                except BudgetUnavailableError:
                    assert time.monotonic() < deadline, "service did not recover"
                    time.sleep(0.1)
            client.check_availability("u", 0.01)
            with client.reserve("u", 0.5) as r:
                r.commit(0.25)
            # The $0.01 spend and the $0.50 commit saved during the outage are replayed
            # in the background once the store is back (the commit records its cost
            # although the store lost the hold): nothing recorded is lost.
            deadline = time.monotonic() + 10
            while client.usage("u")["user"].spent_nano != 760_000_000:
                assert time.monotonic() < deadline, client.usage("u")
                time.sleep(0.05)

    def test_service_down_fails_closed(self, service: ServiceFactory, redis_url: str) -> None:
        s = service(redis_url).wait_ready()
        with BudgetClient(s.url, USER_KEY, timeout=1) as client:
            client.check_availability("u", 1)
            s.stop()
            start = time.monotonic()
            with pytest.raises(BudgetUnavailableError, match="did not answer"):
                client.check_availability("u", 1)
            assert time.monotonic() - start < 2

    def test_a_taken_port_is_exit_2_not_3(self, redis_url: str) -> None:
        """uvicorn's own start-up failure (3) must not read as "store unavailable" (3)."""
        with socket.create_server(("127.0.0.1", 0)) as taken:
            port = taken.getsockname()[1]
            environ = {
                **{k: v for k, v in os.environ.items() if not k.startswith("COREASON_BUDGET_")},
                "COREASON_BUDGET_REDIS_URL": redis_url,
                "COREASON_BUDGET_API_KEYS": USER_KEY,
                "COREASON_BUDGET_LOG_PATH": "off",
            }
            done = subprocess.run(
                [sys.executable, "-m", "coreason_budget", "serve", "--port", str(port)],
                env=environ,
                capture_output=True,
                text=True,
                timeout=60,
            )
        assert done.returncode == 2, done.stderr
        assert "could not start" in done.stderr

    def test_refuses_to_start_without_keys(self, service: ServiceFactory, redis_url: str) -> None:
        s = service(redis_url, COREASON_BUDGET_API_KEYS="", COREASON_BUDGET_ADMIN_API_KEYS="")
        assert s.proc.wait(30) != 0
        assert "No API keys configured" in s.output()

    def test_keys_from_dot_env(
        self, service: ServiceFactory, redis_url: str, tmp_path: Path
    ) -> None:
        """Issue 11.6: serve reads .env (in its working directory) as every other command does."""
        (tmp_path / ".env").write_text(
            f"COREASON_BUDGET_API_KEYS={USER_KEY}\nCOREASON_BUDGET_ADMIN_API_KEYS={ADMIN_KEY}\n"
        )
        s = service(
            redis_url, COREASON_BUDGET_API_KEYS="", COREASON_BUDGET_ADMIN_API_KEYS=""
        ).wait_ready()
        with BudgetClient(s.url, ADMIN_KEY) as admin, BudgetClient(s.url, "wrong") as stranger:
            admin.set_limit("user", "u", 1)
            with pytest.raises(BudgetError, match="401"):
                stranger.check_availability("u", 0.5)

    def test_insecure_mode_with_keys_refuses_to_start(
        self, service: ServiceFactory, redis_url: str
    ) -> None:
        """Issue 11.4: a stray COREASON_BUDGET_INSECURE_NO_AUTH cannot switch keys off."""
        s = service(redis_url, COREASON_BUDGET_INSECURE_NO_AUTH="1")
        assert s.proc.wait(30) == 2
        assert "COREASON_BUDGET_API_KEYS" in s.output()

    def test_insecure_mode_from_env(self, service: ServiceFactory, redis_url: str) -> None:
        s = service(
            redis_url,
            COREASON_BUDGET_API_KEYS="",
            COREASON_BUDGET_ADMIN_API_KEYS="",
            COREASON_BUDGET_INSECURE_NO_AUTH="1",
        ).wait_ready()
        with BudgetClient(s.url, None) as client:
            client.set_limit("user", "u", 1)
            with pytest.raises(BudgetExceededError):
                client.check_availability("u", 2)
        assert "AUTHENTICATION IS DISABLED" in s.output()
