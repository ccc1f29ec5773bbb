"""
AsyncBudgetClient against the real service, over real HTTP.

The service runs with uvicorn in a thread of the test process (the fixtures of
``test_client_e2e``); each test drives the client on its own event loop with
``asyncio.run``. A few tests put a transport between the client and the
network that loses answers or holds requests back, to show what retries and
cancellations do to the money.
"""

from __future__ import annotations

import asyncio
import datetime
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import httpx
import pytest

from coreason_budget import (
    AsyncReservation,
    BudgetError,
    BudgetExceededError,
    BudgetUnavailableError,
    IdempotencyConflictError,
    InvalidInputError,
    ReservationRequest,
    UnknownModelError,
    UnknownReservationError,
)
from coreason_budget.client import AsyncBudgetClient, BudgetClient

from . import test_client_deadline, test_client_e2e
from .redis_server import RedisServer, free_port
from .test_client_deadline import (
    REFUSAL,
    RESETS_AT,
    Answer,
    FakeServer,
    refusing,
    trickled_body,
    trickled_headers,
)
from .test_client_e2e import (
    ADMIN_KEY,
    DECEMBER,
    HELD_AT,
    NANO,
    USER_KEY,
    LiveFactory,
    body_of,
    exceeded_answer,
    handle,
    held_answer,
    report_answer,
    usage_answer,
)

T = TypeVar("T")

# The fixtures of the sync client's tests: a service in a thread, a trickling fake.
live = test_client_e2e.live
serve = test_client_deadline.serve


def run(main: Callable[[], Awaitable[T]], bound: float = 60) -> T:
    """Run *main* on a new event loop, failing the test past *bound* seconds."""

    async def bounded() -> T:
        async with asyncio.timeout(bound):
            return await main()

    return asyncio.run(bounded())


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 10) -> None:
    """Poll *check* until it holds (what a background task does takes a moment)."""
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "never happened"
        await asyncio.sleep(0.02)


class Network(httpx.AsyncBaseTransport):
    """
    The real network, with faults: *lose* the answers to a path (the service
    did the work, the client never hears of it), or *delay* the requests to a
    path before they are sent (``waiting`` is set when one starts waiting).
    """

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.sent: list[str] = []
        self.lose: dict[str, int] = {}
        self.delay: dict[str, float] = {}
        self.waiting = asyncio.Event()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self.sent.append(f"{request.method} {path}")
        for suffix, seconds in list(self.delay.items()):
            if path.endswith(suffix):
                self.waiting.set()
                await asyncio.sleep(seconds)
        response = await self.inner.handle_async_request(request)
        if self.lose.get(path, 0) > 0:
            self.lose[path] -= 1
            await response.aread()
            await response.aclose()
            raise httpx.ReadTimeout("the answer was lost", request=request)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


def unreachable() -> AsyncBudgetClient:
    """A client whose every request would fail: any error but a validation one hit the wire."""
    return AsyncBudgetClient(f"http://127.0.0.1:{free_port()}", "k", retries=0, timeout=0.5)


class TestAgainstTheService:
    """The client's calls, awaited, against the real app over HTTP."""

    def test_reserve_commit_release_and_usage(self, live: LiveFactory) -> None:
        url = live().url

        async def main() -> None:
            async with AsyncBudgetClient(url, USER_KEY) as c:
                request = c.reserve("u", 0.05, project_id="p", model="house-llm")
                assert isinstance(request, ReservationRequest)
                r = await request
                assert isinstance(r, AsyncReservation)
                assert (r.state, len(r.id), r.estimate_nano) == ("held", 32, 50_000_000)
                assert (await c.usage("u", "p"))["user"].spent_nano == 50_000_000
                receipt = await r.commit(0.031)
                assert (receipt.status, receipt.kind, receipt.idempotency_key) == (
                    "recorded",
                    "commit",
                    r.id,
                )
                assert await r.commit(0.5) is receipt  # once
                assert r.state == "committed"
                other = await c.reserve("u", 1)
                assert (await other.release()).status == "recorded"
                assert (await c.reservation(other.id)).state == "released"
                usage = await c.usage("u", project_id="p")
                assert {k: v.spent_nano for k, v in usage.items()} == {
                    "user": 31_000_000,
                    "project": 31_000_000,
                    "global": 31_000_000,
                }

        run(main)

    def test_async_with_semantics(self, live: LiveFactory) -> None:
        """As the sync with-block: exit commits the estimate, an error too unless "release"."""
        url = live().url

        async def main() -> None:
            async with AsyncBudgetClient(url, USER_KEY) as c:
                async with c.reserve("u", 1) as r:
                    assert r.state == "held"
                assert (r.state, (await c.reservation(r.id)).state) == ("committed", "committed")
                with pytest.raises(KeyError):
                    async with c.reserve("u", 1, on_error="release") as r:
                        raise KeyError
                assert (r.state, (await c.reservation(r.id)).state) == ("released", "released")
                with pytest.raises(KeyError):
                    async with c.reserve("u", 1) as r:
                        raise KeyError  # the call may have been billed: charged
                assert (await c.reservation(r.id)).state == "committed"
                async with c.reserve("u", 1) as r:
                    await r.release()
                assert (await c.usage("u"))["user"].spent_nano == 2 * NANO

        run(main)

    def test_a_handle_by_id_and_a_lost_record(self, live: LiveFactory) -> None:
        """A handle got by id settles once; a settled one holds nothing."""
        url = live().url

        async def main() -> None:
            async with AsyncBudgetClient(url, USER_KEY) as c:
                first = await c.reserve("bob", 2, project_id="q", model="m", reservation_id="r1")
                again = await c.reserve("bob", 2, project_id="q", model="m", reservation_id="r1")
                looked_up = await c.reservation("r1")
                assert handle(first) == handle(again) == handle(looked_up)
                assert (looked_up.user_id, looked_up.project_id, looked_up.model) == (
                    "bob",
                    "q",
                    "m",
                )
                assert (await looked_up.commit(0.5)).status == "recorded"
                assert (await first.release()).status == "duplicate"
                settled = await c.reservation("r1")
                assert settled.state == "committed"
                assert (await settled.commit(1)).status == "duplicate"
                assert (await c.usage("bob"))["user"].spent_nano == NANO // 2

        run(main)

    def test_receipts_limits_and_report(self, live: LiveFactory) -> None:
        url = live().url

        async def main() -> None:
            async with AsyncBudgetClient(url, ADMIN_KEY) as admin:
                first = await admin.record_spend("alice", 5, model="m", idempotency_key="inv-1")
                assert (first.status, first.idempotency_key, first.amount_nano) == (
                    "recorded",
                    "inv-1",
                    5 * NANO,
                )
                again = await admin.record_spend("alice", 5, model="m", idempotency_key="inv-1")
                assert again.status == "duplicate"
                with pytest.raises(IdempotencyConflictError, match="inv-1"):
                    await admin.record_spend("bob", 7, idempotency_key="inv-1")
                await admin.set_limit("user", "alice", 6)
                assert (await admin.usage("alice"))["user"].limit_nano == 6 * NANO
                report = await admin.report(top=1)
                assert (report.total.spent_nano, [u.entity_id for u in report.users]) == (
                    5 * NANO,
                    ["alice"],
                )
                assert [(m.scope, m.entity_id, m.spent_nano) for m in report.models] == [
                    ("model", "m", 5 * NANO)
                ]
                await admin.set_limit("user", "alice", None)
                await admin.ping()

        run(main)

    def test_many_tasks_share_one_client(self, live: LiveFactory) -> None:
        url = live().url

        async def main() -> int:
            async with AsyncBudgetClient(url, USER_KEY) as c:
                await asyncio.gather(
                    *(c.record_spend(f"t{i}", 0.01, idempotency_key=f"k{i}") for i in range(40))
                )
                return (await c.usage("u"))["global"].spent_nano

        assert run(main) == 40 * 10_000_000

    def test_same_answers_as_the_sync_client(self, live: LiveFactory) -> None:
        """One sequence of calls, through each client on its own service: the same outcomes."""
        calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = [
            ("set_limit", ("user", "alice", 1.0), {}),
            ("check_availability", ("alice", 0.5), {"project_id": "p"}),
            ("record_spend", ("alice", 0.25, "p", "m", "k1"), {}),
            ("record_spend", ("alice", 0.25, "p", "m", "k1"), {}),
            ("check_availability", ("alice", 0.9), {}),
            ("reserve", ("alice", 0.25), {"reservation_id": "r1"}),
            ("reserve", ("alice", 0.75), {}),
            ("reservation", ("r1",), {}),
            ("reservation", ("nope",), {}),
            ("usage", ("alice", "p"), {}),
            ("record_spend", ("alice", -1), {}),
            ("reserve", ("alice", 1), {"on_error": "skip"}),
            ("set_limit", ("team", "x", 1), {}),
            ("report", (), {"top": 1}),
            ("set_limit", ("user", "bob", 0.5, "week"), {}),
            ("set_limit", ("model", "m", 0.25), {"window": "month"}),
            ("record_spend", ("bob", 0.375, None, "m", "k2"), {}),
            ("check_availability", ("bob", 0.25), {}),  # the week refuses
            ("reserve", ("carol", 0.01, None, "m"), {}),  # the model's month refuses
            ("usage", ("bob",), {"window": "week"}),
            ("usage", ("bob",), {"window": "hour"}),  # not kept
            ("usage", ("bob",), {"window": "year"}),
            ("report", (), {"window": "month"}),
            ("report", (1,), {"window": "week", "period": datetime.datetime.now(datetime.UTC)}),
            ("report", (), {"period": datetime.date(2000, 1, 1)}),
            ("report", (), {"period": datetime.datetime(2000, 1, 1)}),
            ("set_limit", ("user", "bob", 1, "hour"), {}),
        ]

        def seen(result: Any) -> Any:
            return handle(result) if hasattr(result, "estimate_nano") else result

        windows = "week,month"
        sync_url = live(key_prefix="sync", windows=windows).url
        async_url = live(key_prefix="async", windows=windows).url
        with BudgetClient(sync_url, ADMIN_KEY) as client:
            expected = []
            for name, args, kwargs in calls:
                try:
                    expected.append(seen(getattr(client, name)(*args, **kwargs)))
                except BudgetExceededError as e:
                    expected.append((str(e), e.window, e.resets_at))
                except BudgetError as e:
                    expected.append((type(e).__name__, str(e)))

        async def main() -> list[Any]:
            got = []
            async with AsyncBudgetClient(async_url, ADMIN_KEY) as c:
                for name, args, kwargs in calls:
                    try:
                        got.append(seen(await getattr(c, name)(*args, **kwargs)))
                    except BudgetExceededError as e:
                        got.append((str(e), e.window, e.resets_at))
                    except BudgetError as e:
                        got.append((type(e).__name__, str(e)))
            return got

        got = run(main)
        assert [type(x) for x in got] == [type(x) for x in expected]
        # Generated reservation ids differ; everything else is the same.
        got[6], expected[6] = got[6][1:], expected[6][1:]
        assert got == expected
        # The windows' calls did what they say (the same on both clients, as above).
        assert (expected[17][1], expected[18][1]) == ("week", "month")
        assert (expected[19]["user"].window, expected[19]["user"].limit_nano) == ("week", NANO // 2)
        assert "not kept" in expected[20][1]


class TestErrors:
    """The service's refusals as the manager's exceptions; bad input never sent."""

    def test_over_budget_is_429_with_its_amounts(self, live: LiveFactory) -> None:
        url = live().url

        async def main() -> None:
            async with AsyncBudgetClient(url, USER_KEY) as c:
                await c.record_spend("user_123", 9.99)
                with pytest.raises(BudgetExceededError) as caught:
                    await c.check_availability("user_123", estimated_cost=0.05)
                e = caught.value
                assert (e.scope, e.entity_id, e.limit_usd, e.spent_usd, e.requested_usd) == (
                    "user",
                    "user_123",
                    10.0,
                    9.99,
                    0.05,
                )
                with pytest.raises(BudgetExceededError):
                    await c.reserve("user_123", 0.02)
                with pytest.raises(BudgetExceededError):
                    async with c.reserve("user_123", 0.02):
                        raise AssertionError("not entered")  # pragma: no cover

        run(main)

    def test_over_a_weekly_budget_is_429_with_its_window(self, live: LiveFactory) -> None:
        """The week refuses (the day would not): the error says so, and when it resets."""
        url = live(weekly_user_limit_usd=1.0, week_start="sunday").url

        async def main() -> None:
            async with AsyncBudgetClient(url, USER_KEY) as c:
                await c.record_spend("u", 0.75)
                with pytest.raises(BudgetExceededError) as caught:
                    await c.reserve("u", 0.5)
                e = caught.value
                today = datetime.datetime.now(datetime.UTC).date()
                sunday = today + datetime.timedelta(days=7 - (today.weekday() + 1) % 7)
                resets = datetime.datetime.combine(sunday, datetime.time(), datetime.UTC)
                assert (e.scope, e.entity_id, e.window, e.resets_at) == (
                    "user",
                    "u",
                    "week",
                    resets,
                )
                assert (e.limit_nano, e.spent_nano, e.requested_nano) == (
                    NANO,
                    3 * NANO // 4,
                    NANO // 2,
                )
                assert e.retry_after_seconds is not None
                left = (resets - datetime.datetime.now(datetime.UTC)).total_seconds()
                assert abs(e.retry_after_seconds - left) < 5
                assert str(e).endswith("weekly limit, requested $0.50")
                week = await c.usage("u", window="week")
                assert (week["user"].spent_nano, week["user"].limit_nano) == (3 * NANO // 4, NANO)
                assert week["user"].resets_at == resets
                assert (await c.usage("u"))["user"].remaining_nano == 10 * NANO - 3 * NANO // 4

        run(main)

    def test_a_429_is_exceeded_with_its_window_and_reset(self) -> None:
        answers = iter([exceeded_answer(), exceeded_answer(resets_at="2026-11-30T00:00:00")])

        async def respond(request: httpx.Request) -> httpx.Response:
            return httpx.Response(429, json=next(answers), headers={"Retry-After": "49170"})

        async def main() -> None:
            transport = httpx.MockTransport(respond)
            async with AsyncBudgetClient("http://budget.test", "k", transport=transport) as c:
                with pytest.raises(BudgetExceededError) as caught:
                    await c.check_availability("u", 1)
                e = caught.value
                assert (e.scope, e.entity_id, e.window, e.retry_after_seconds) == (
                    "user",
                    "u",
                    "week",
                    49_170,
                )
                assert e.resets_at == datetime.datetime(2026, 11, 30, tzinfo=datetime.UTC)
                assert (e.limit_nano, e.spent_nano, e.requested_nano) == (
                    5 * NANO,
                    9 * NANO // 2,
                    NANO,
                )
                # A naive resets_at is no instant: not the service's refusal, still a no.
                with pytest.raises(BudgetUnavailableError, match="429 but no budget details"):
                    await c.check_availability("u", 1)

        run(main)

    @pytest.mark.parametrize("resets_at", [REFUSAL["resets_at"], "2026-11-30T00:00:00", None])
    def test_a_429_over_the_wire(
        self, serve: Callable[[Answer], FakeServer], resets_at: object
    ) -> None:
        """A well-formed refusal is BudgetExceededError; a naive resets_at fails closed."""
        server = serve(refusing({**REFUSAL, "resets_at": resets_at}))

        async def main() -> None:
            async with AsyncBudgetClient(server.url, "k", timeout=1) as c:
                if resets_at == "2026-11-30T00:00:00":
                    with pytest.raises(BudgetUnavailableError, match="no budget details"):
                        await c.check_availability("u", 1)
                    return
                with pytest.raises(BudgetExceededError) as caught:
                    await c.reserve("u", 1)
                e = caught.value
                assert (e.window, e.retry_after_seconds) == ("week", 3600)
                assert e.resets_at == (None if resets_at is None else RESETS_AT)

        run(main)
        assert server.requests == 1

    def test_unknown_reservation_is_404(self, live: LiveFactory) -> None:
        url = live().url

        async def main() -> None:
            async with AsyncBudgetClient(url, USER_KEY) as c:
                with pytest.raises(UnknownReservationError, match="no reservation 'nope'"):
                    await c.reservation("nope")

        run(main)

    def test_422_names_its_error_class(self) -> None:
        async def respond(request: httpx.Request) -> httpx.Response:
            if request.url.path == "/reservations":
                rid = body_of(request)["reservation_id"]
                return httpx.Response(200, json=held_answer(rid))
            if request.url.path == "/check":
                return httpx.Response(422, json={"detail": "bad estimate"})
            return httpx.Response(422, json={"detail": "No price", "error": "UnknownModelError"})

        async def main() -> None:
            transport = httpx.MockTransport(respond)
            async with AsyncBudgetClient("http://budget.test", "k", transport=transport) as c:
                r = await c.reserve("u", 1, model="m")
                with pytest.raises(UnknownModelError, match="No price"):
                    await r.commit_usage(input_tokens=1, output_tokens=1)
                assert r.state == "held"
                with pytest.raises(InvalidInputError, match="bad estimate"):
                    await c.check_availability("u", 1)

        run(main)

    def test_wrong_or_missing_key_is_401(self, live: LiveFactory) -> None:
        url = live().url

        async def main() -> None:
            for key in ("wrong", None):
                async with AsyncBudgetClient(url, key) as c:
                    with pytest.raises(BudgetError) as caught:
                        await c.check_availability("u", 1)
                    # Plain BudgetError: not "over budget", not "store down", but still a "no".
                    assert type(caught.value) is BudgetError
                    assert "refused the API key for POST /check (401" in str(caught.value)
                    await c.ping()  # /health needs no key
            async with AsyncBudgetClient(url, USER_KEY) as c:
                with pytest.raises(BudgetError, match=r"for GET /report \(403"):
                    await c.report()

        run(main)

    def test_store_down_is_unavailable_naming_the_key(
        self, live: LiveFactory, own_redis: RedisServer
    ) -> None:
        url = live(redis_url=own_redis.url, spool_dir="off").url

        async def main() -> None:
            async with AsyncBudgetClient(url, USER_KEY) as c:
                await c.ping()
                own_redis.kill()
                with pytest.raises(BudgetUnavailableError):
                    await c.ping()
                with pytest.raises(BudgetUnavailableError) as info:
                    await c.record_spend("u", 1, idempotency_key="k")
                assert info.value.idempotency_key == "k"

        run(main)

    @pytest.mark.parametrize(
        ("call", "message"),
        [
            (lambda c: c.check_availability("u", -1), "estimated_cost must not be negative"),
            (lambda c: c.record_spend("u", float("nan")), "cost must be finite"),
            (lambda c: c.record_spend("u", 1, idempotency_key=""), "idempotency_key must not"),
            (lambda c: c.reserve("", 1), "user_id must not be empty"),
            (lambda c: c.reserve("u", 1, on_error="skip"), "on_error must be"),
            (lambda c: c.reservation(""), "reservation_id must not be empty"),
            (lambda c: c.usage("u", "x" * 300), "project_id is 300 characters"),
            (lambda c: c.set_limit("org", "x", 1), "scope must be 'user', 'project', 'model' or"),
            (lambda c: c.set_limit("model", "", 1, "month"), "model must not be empty"),
            (lambda c: c.set_limit("user", "u", 1, "year"), "window must be one of"),
            (lambda c: c.usage("u", window="weekly"), "window must be one of"),
            (lambda c: c.report(top=1001), "top must be None or a whole number"),
            (lambda c: c.report(window="year"), "window must be one of"),
            (lambda c: c.report(period=datetime.datetime(2026, 1, 1)), "expected an aware"),
            (lambda c: c.report(period=20260101), "period must be a date or an aware datetime"),
        ],
    )
    def test_invalid_input_is_refused_before_sending(
        self, call: Callable[[AsyncBudgetClient], Awaitable[Any]], message: str
    ) -> None:
        async def main() -> None:
            async with unreachable() as c:
                with pytest.raises(InvalidInputError, match=message):
                    await call(c)

        run(main)

    def test_invalid_token_counts_are_not_sent(self) -> None:
        sent: list[str] = []

        def respond(request: httpx.Request) -> httpx.Response:
            sent.append(request.url.path)
            return httpx.Response(200, json=held_answer("r"))

        async def main() -> None:
            transport = httpx.MockTransport(respond)
            async with AsyncBudgetClient("http://budget.test", "k", transport=transport) as c:
                r = await c.reserve("u", 1, model="m", reservation_id="r")
                with pytest.raises(InvalidInputError, match="above the maximum"):
                    await r.commit_usage(input_tokens=1, output_tokens=10**9)
                with pytest.raises(InvalidInputError, match="cannot exceed"):
                    await r.commit_usage(input_tokens=1, output_tokens=1, cached_input_tokens=2)

        run(main)
        assert sent == ["/reservations"]


class TestWindows:
    """usage, report and set_limit send their window and period; handles their held_at."""

    def test_windows_and_periods_are_sent(self) -> None:
        sent: list[httpx.Request] = []

        async def respond(request: httpx.Request) -> httpx.Response:
            sent.append(request)
            window = request.url.params.get("window", "day")
            if request.url.path == "/usage/u":
                usage = {"user": usage_answer("u", window), "global": usage_answer(None, window)}
                return httpx.Response(200, json=usage)
            if request.url.path == "/report":  # always the month's
                return httpx.Response(200, json=report_answer("month"))
            return httpx.Response(200, json={"status": "updated"})

        async def main() -> None:
            transport = httpx.MockTransport(respond)
            async with AsyncBudgetClient("http://budget.test", "k", transport=transport) as c:
                usage = await c.usage("u", window="month")
                assert dict(sent[-1].url.params) == {"window": "month"}
                assert (usage["user"].window, usage["user"].resets_at) == ("month", DECEMBER)
                assert usage["user"].limit_nano is None
                report = await c.report(5, window="month", period=datetime.date(2026, 11, 2))
                assert dict(sent[-1].url.params) == {
                    "top": "5",
                    "window": "month",
                    "period": "2026-11-02",
                }
                assert (report.period, report.resets_at) == ("2026-11", DECEMBER)
                assert [(m.scope, m.entity_id) for m in report.models] == [("model", "house-llm")]
                with pytest.raises(BudgetUnavailableError, match="unexpected answer"):
                    await c.report(window="week")  # answered about another window
                await c.set_limit("project", "p", 3, window="week")
                assert body_of(sent[-1]) == {
                    "scope": "project",
                    "entity_id": "p",
                    "limit_nano": 3 * NANO,
                    "window": "week",
                }

        run(main)

    def test_a_handle_sends_back_its_held_at(self) -> None:
        sent: list[httpx.Request] = []

        async def respond(request: httpx.Request) -> httpx.Response:
            sent.append(request)
            if request.url.path == "/reservations":
                return httpx.Response(200, json=held_answer("r"))
            receipt = {"status": "recorded", "kind": "commit", "idempotency_key": "r"}
            return httpx.Response(200, json={**receipt, "amount_nano": 1, "state": "committed"})

        async def main() -> None:
            transport = httpx.MockTransport(respond)
            c = AsyncBudgetClient("http://budget.test", "k", transport=transport)
            async with c, c.reserve("u", 1, project_id="p", reservation_id="r") as r:
                assert r.held_at == datetime.datetime(
                    2026, 11, 29, 10, 20, 30, 456_000, datetime.UTC
                )
                await r.commit(1e-9)
            assert body_of(sent[-1]) == {
                "actual_cost": 1e-9,
                "user_id": "u",
                "project_id": "p",
                "held_at": HELD_AT,
            }

        run(main)

    def test_a_malformed_held_at_fails_closed(self) -> None:
        async def respond(request: httpx.Request) -> httpx.Response:
            return httpx.Response(200, json=held_answer("r", held_at="2026-11-29T10:20:30"))

        async def main() -> None:
            transport = httpx.MockTransport(respond)
            async with AsyncBudgetClient("http://budget.test", "k", transport=transport) as c:
                with pytest.raises(BudgetUnavailableError, match="held_at"):
                    await c.reserve("u", 1, reservation_id="r")

        run(main)


class TestDeadService:
    """A service that does not answer fails closed within about (retries + 1) * timeout."""

    def test_a_silent_service_times_out_per_attempt(self) -> None:
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(16)  # accepted by the kernel, never answered
            url = f"http://127.0.0.1:{listener.getsockname()[1]}"

            async def main() -> float:
                async with AsyncBudgetClient(url, "k", timeout=0.3, retries=2) as c:
                    start = time.monotonic()
                    with pytest.raises(BudgetUnavailableError, match="did not answer POST /check"):
                        await c.check_availability("u", 1)
                    return time.monotonic() - start

            elapsed = run(main)
        assert 0.9 <= elapsed < 3 * 0.3 + 1.5, elapsed

    def test_a_refused_connection_fails_fast(self) -> None:
        async def main() -> float:
            async with unreachable() as c:
                start = time.monotonic()
                with pytest.raises(BudgetUnavailableError, match="ConnectError"):
                    await c.check_availability("u", 1)
                return time.monotonic() - start

        assert run(main) < 1

    @pytest.mark.parametrize("answer", [trickled_headers, trickled_body], ids=["head", "body"])
    @pytest.mark.parametrize("retries", [0, 1])
    def test_a_trickling_service_is_bounded_per_attempt(
        self, serve: Callable[[Answer], FakeServer], answer: Answer, retries: int
    ) -> None:
        """A byte every 0.1 s never trips a read timeout; each attempt still ends by 1 s."""
        server = serve(answer)

        async def main() -> tuple[float, BudgetUnavailableError]:
            async with AsyncBudgetClient(server.url, "k", timeout=1, retries=retries) as c:
                start = time.monotonic()
                with pytest.raises(BudgetUnavailableError) as info:
                    await c.check_availability("u", 0.01)
                return time.monotonic() - start, info.value

        elapsed, error = run(main)
        attempts = retries + 1
        assert 0.9 * attempts <= elapsed < attempts + 1.5, elapsed
        assert "within the 1 s deadline of this attempt" in str(error), error
        assert server.requests == attempts


class TestRetries:
    """Retries after lost answers find what the lost attempt did: nothing is charged twice."""

    def test_a_lost_spend_answer_is_retried_and_charged_once(self, live: LiveFactory) -> None:
        url = live().url
        network = Network()
        network.lose["/spend"] = 2

        async def main() -> None:
            async with AsyncBudgetClient(url, USER_KEY, transport=network) as c:
                receipt = await c.record_spend("u", 1)
                assert receipt.status == "duplicate"  # the first attempt recorded it
                assert network.sent == ["POST /spend"] * 3
                assert (await c.usage("u"))["user"].spent_nano == NANO

        run(main)

    def test_a_lost_reserve_answer_is_retried_and_held_once(self, live: LiveFactory) -> None:
        url = live().url
        network = Network()
        network.lose["/reservations"] = 1

        async def main() -> None:
            async with AsyncBudgetClient(url, USER_KEY, transport=network) as c:
                r = await c.reserve("u", 2)
                assert (await c.usage("u"))["user"].spent_nano == 2 * NANO
                await r.commit(0.5)
                assert (await c.usage("u"))["user"].spent_nano == NANO // 2

        run(main)

    def test_a_reserve_whose_answers_are_all_lost_is_released(self, live: LiveFactory) -> None:
        url = live().url
        network = Network()
        network.lose["/reservations"] = 2

        async def main() -> None:
            async with AsyncBudgetClient(url, USER_KEY, transport=network, retries=1) as c:
                with pytest.raises(BudgetUnavailableError) as info:
                    await c.reserve("u", 2, reservation_id="r1")
                assert info.value.reservation_id == "r1"
                assert "being released" in "".join(info.value.__notes__)
            # aclose() let the background release finish.
            assert network.sent[-1] == "POST /reservations/r1/release"
            async with AsyncBudgetClient(url, USER_KEY) as c:
                assert (await c.reservation("r1")).state == "released"
                assert (await c.usage("u"))["user"].spent_nano == 0

        run(main)

    def test_a_reserve_that_never_left_is_not_released(self) -> None:
        sent: list[str] = []

        def respond(request: httpx.Request) -> httpx.Response:
            sent.append(request.url.path)
            raise httpx.ConnectError("refused", request=request)

        async def main() -> None:
            transport = httpx.MockTransport(respond)
            async with AsyncBudgetClient("http://b", "k", transport=transport, retries=1) as c:
                with pytest.raises(BudgetUnavailableError) as info:
                    await c.reserve("u", 1, reservation_id="r1")
                assert info.value.reservation_id == "r1"

        run(main)
        assert sent == ["/reservations", "/reservations"]


class TestCancellation:
    """A write whose task is cancelled runs to its end: it lands once, and nothing leaks."""

    def test_a_cancelled_commit_still_lands_exactly_once(self, live: LiveFactory) -> None:
        url = live().url
        network = Network()
        network.delay["/commit"] = 0.3

        async def main() -> None:
            async with AsyncBudgetClient(url, USER_KEY, transport=network) as c:
                r = await c.reserve("u", 1)
                task = asyncio.create_task(r.commit(0.25))
                await network.waiting.wait()  # the commit is on its way
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task

                async def landed() -> bool:
                    return r.state == "committed"

                await eventually(landed)
                assert r.receipt is not None
                assert r.receipt.status == "recorded"
                assert await r.commit(0.25) is r.receipt  # the retry: nothing more sent
                assert network.sent.count(f"POST /reservations/{r.id}/commit") == 1
                assert (await c.reservation(r.id)).state == "committed"
                assert (await c.usage("u"))["user"].spent_nano == NANO // 4

        run(main)

    def test_a_cancelled_spend_still_lands_once(self, live: LiveFactory) -> None:
        url = live().url
        network = Network()
        network.delay["/spend"] = 0.3

        async def main() -> None:
            async with AsyncBudgetClient(url, USER_KEY, transport=network) as c:
                task = asyncio.create_task(c.record_spend("u", 1, idempotency_key="k"))
                await network.waiting.wait()
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task

                async def landed() -> bool:
                    return (await c.usage("u"))["user"].spent_nano == NANO

                await eventually(landed)
                assert (await c.record_spend("u", 1, idempotency_key="k")).status == "duplicate"
                assert (await c.usage("u"))["user"].spent_nano == NANO

        run(main)

    def test_a_cancelled_reserve_releases_its_hold(self, live: LiveFactory) -> None:
        url = live().url
        network = Network()
        network.delay["/reservations"] = 0.3

        async def main() -> None:
            async with AsyncBudgetClient(url, USER_KEY, transport=network) as c:
                task = asyncio.create_task(c.reserve("u", 2, reservation_id="r1").__aenter__())
                await network.waiting.wait()
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                network.delay.clear()

                async def released() -> bool:
                    try:
                        return (await c.reservation("r1")).state == "released"
                    except UnknownReservationError:
                        return False  # not taken yet

                await eventually(released)
                assert (await c.usage("u"))["user"].spent_nano == 0

        run(main)

    def test_a_block_left_by_cancellation_settles_as_on_error_says(self, live: LiveFactory) -> None:
        url = live().url

        async def main() -> None:
            async with AsyncBudgetClient(url, USER_KEY) as c:
                entered: dict[str, AsyncReservation] = {}

                async def call(on_error: Any) -> None:
                    async with c.reserve("u", 1, on_error=on_error) as r:
                        entered[on_error] = r
                        await asyncio.sleep(60)  # the LLM call, cancelled

                for on_error, state in (("release", "released"), ("charge", "committed")):
                    task = asyncio.create_task(call(on_error))
                    while on_error not in entered:
                        await asyncio.sleep(0.01)
                    task.cancel()
                    with pytest.raises(asyncio.CancelledError):
                        await task
                    r = entered[on_error]
                    assert (r.state, (await c.reservation(r.id)).state) == (state, state)
                assert (await c.usage("u"))["user"].spent_nano == NANO

        run(main)


def test_repr_and_configuration() -> None:
    """The constructor checks what BudgetClient's checks; the repr names the service."""
    client = AsyncBudgetClient("http://budget.test/", "k")
    assert repr(client) == "<AsyncBudgetClient http://budget.test>"
    assert (client.base_url, client.retries, client.timeout) == ("http://budget.test", 2, 2.0)
    run(client.aclose)
    with pytest.raises(BudgetError, match="base_url must be"):
        AsyncBudgetClient("localhost:8000", "k")
    with pytest.raises(BudgetError, match="retries must be"):
        AsyncBudgetClient("http://b", "k", retries=-1)


class TestEventLoops:
    """A client outlives the event loop it was first used on, as the manager does."""

    def test_a_second_asyncio_run_uses_the_same_client(self, live: LiveFactory) -> None:
        """
        httpx's pooled connections belong to the loop that made them; a call
        from a new loop gets a new pool instead of a RuntimeError from the old one.
        """
        client = AsyncBudgetClient(live().url, USER_KEY)

        async def spend(key: str) -> str:
            return (await client.record_spend("u", 0.25, idempotency_key=key)).status

        assert run(lambda: spend("k1")) == "recorded"
        assert run(lambda: spend("k2")) == "recorded"
        assert run(lambda: spend("k1")) == "duplicate"

        async def usage() -> int:
            try:
                return (await client.usage("u"))["user"].spent_nano
            finally:
                await client.aclose()

        assert run(usage) == 500_000_000

    def test_any_failure_of_the_http_library_is_unavailable(self) -> None:
        """Principle 7: not only httpx's errors; whatever the library raises fails closed."""

        class Broken(httpx.AsyncBaseTransport):
            async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
                raise RuntimeError("Event loop is closed")

        async def main() -> None:
            async with AsyncBudgetClient("http://budget", "k", transport=Broken()) as c:
                with pytest.raises(BudgetUnavailableError, match="HTTP client failed") as info:
                    await c.record_spend("u", 1, idempotency_key="k")
                assert info.value.idempotency_key == "k"

        run(main)
