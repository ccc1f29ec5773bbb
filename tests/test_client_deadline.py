"""
BudgetClient bounds each whole attempt by its timeout, not each read.

A fake HTTP server in a thread of the test trickles its answer one byte every
0.1 s: httpx's per-read timeouts never fire on it, so only the client's own
per-attempt deadline can end the call. The elapsed-time bounds are correctness
bounds (the unbounded call takes 8 s and more), with slack for a loaded machine.
"""

from __future__ import annotations

import datetime
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from coreason_budget import BudgetExceededError, BudgetUnavailableError
from coreason_budget._http_deadline import _environment_proxy, attempt_deadline
from coreason_budget.client import BudgetClient

BODY = b'{"status": "allowed"}'
GOOD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
    b"content-length: %d\r\n\r\n" % len(BODY) + BODY
)
#: A valid status line and headers promising a body far longer than ~80 s of trickle.
SLOW_BODY_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 800\r\n\r\n"

Answer = Callable[[socket.socket], None]


class FakeServer:
    """Answers every request with *answer*, a thread per connection."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.requests = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        """Keep-alive: answer requests on this connection until the client closes it."""
        with conn:
            conn.settimeout(5)
            buffered = b""
            try:
                while True:
                    while b"\r\n\r\n" not in buffered:
                        chunk = conn.recv(65536)
                        if not chunk:
                            return
                        buffered += chunk
                    head, _, buffered = buffered.partition(b"\r\n\r\n")
                    length = 0
                    for line in head.split(b"\r\n")[1:]:
                        name, _, value = line.partition(b":")
                        if name.strip().lower() == b"content-length":
                            length = int(value)
                    while len(buffered) < length:
                        buffered += conn.recv(65536)
                    buffered = buffered[length:]
                    self.requests += 1
                    self.answer(conn)
            except OSError:  # the client gave up and closed: expected
                pass

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.sock.close()


def send_slowly(conn: socket.socket, data: bytes, every: float = 0.1) -> None:
    for i in range(len(data)):
        conn.sendall(data[i : i + 1])
        time.sleep(every)


def trickled_headers(conn: socket.socket) -> None:
    send_slowly(conn, GOOD)


def trickled_body(conn: socket.socket) -> None:
    conn.sendall(SLOW_BODY_HEAD)
    send_slowly(conn, b" " * 800)


def prompt(conn: socket.socket) -> None:
    conn.sendall(GOOD)


#: The service's 429, as it crosses the wire: a week's budget, reset at the next Monday.
REFUSAL = {
    "detail": "Budget exceeded for User u: spent $4.50 of $5.00 weekly limit, requested $1.00",
    "scope": "user",
    "entity_id": "u",
    "limit_nano": 5_000_000_000,
    "spent_nano": 4_500_000_000,
    "requested_nano": 1_000_000_000,
    "window": "week",
    "resets_at": "2026-11-30T00:00:00+00:00",
    "retry_after_seconds": 3600,
}
RESETS_AT = datetime.datetime(2026, 11, 30, tzinfo=datetime.UTC)


def refusing(body: dict[str, object]) -> Answer:
    """Answer every request with a 429 carrying *body* (and Retry-After), at once."""
    data = json.dumps(body).encode()
    head = (
        b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\n"
        b"retry-after: 3600\r\ncontent-length: %d\r\n\r\n" % len(data)
    )
    return lambda conn: conn.sendall(head + data)


@pytest.fixture
def serve() -> Iterator[Callable[[Answer], FakeServer]]:
    servers: list[FakeServer] = []

    def start(answer: Answer) -> FakeServer:
        servers.append(FakeServer(answer))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def timed_check(client: BudgetClient) -> tuple[float, BudgetUnavailableError]:
    start = time.monotonic()
    with pytest.raises(BudgetUnavailableError) as info:
        client.check_availability("u", 0.01)
    return time.monotonic() - start, info.value


class TestDeadline:
    """A trickling peer cannot hold a call past about (retries + 1) * timeout."""

    @pytest.mark.parametrize("answer", [trickled_headers, trickled_body], ids=["head", "body"])
    def test_one_attempt_ends_by_its_deadline(
        self, serve: Callable[[Answer], FakeServer], answer: Answer
    ) -> None:
        """
        The status line, headers or body arriving a byte per 0.1 s: the answer is
        due within 1 s, and the call fails closed soon after, not 8 s later.
        """
        server = serve(answer)
        with BudgetClient(server.url, "key", timeout=1, retries=0) as client:
            elapsed, error = timed_check(client)
        assert 0.9 <= elapsed < 3, elapsed
        assert "within the 1 s deadline of this attempt" in str(error), error
        assert "refusing" in str(error)
        assert server.requests == 1

    @pytest.mark.parametrize("answer", [trickled_headers, trickled_body], ids=["head", "body"])
    def test_each_retry_has_its_own_deadline(
        self, serve: Callable[[Answer], FakeServer], answer: Answer
    ) -> None:
        """A deadline hit is a transport error: retried, each attempt bounded alike."""
        server = serve(answer)
        with BudgetClient(server.url, "key", timeout=1, retries=1) as client:
            elapsed, error = timed_check(client)
        assert 1.9 <= elapsed < 2 * 1 + 1.5, elapsed
        assert "deadline" in str(error)
        assert server.requests == 2

    def test_later_calls_are_unaffected(self, serve: Callable[[Answer], FakeServer]) -> None:
        """A deadline ends with its attempt: the next calls have their own."""
        answers = iter([trickled_headers, prompt, prompt])
        server = serve(lambda conn: next(answers)(conn))
        with BudgetClient(server.url, "key", timeout=1, retries=0) as client:
            timed_check(client)
            client.check_availability("u", 0.01)
            client.check_availability("u", 0.01)

    def test_a_slow_but_timely_answer_is_accepted(
        self, serve: Callable[[Answer], FakeServer]
    ) -> None:
        """Trickled, but complete within the deadline: an answer like any other."""
        server = serve(lambda conn: send_slowly(conn, GOOD, every=0.002))
        with BudgetClient(server.url, "key", timeout=2, retries=0) as client:
            client.check_availability("u", 0.01)

    def test_a_supplied_transport_is_used_as_given(self) -> None:
        """transport= replaces the deadline transport (tests, custom TLS): httpx's timeouts."""
        seen: list[str] = []

        def handler(request: httpx.Request) -> httpx.Response:
            seen.append(request.url.path)
            return httpx.Response(200, json={"status": "allowed"})

        with BudgetClient("http://budget", "key", transport=httpx.MockTransport(handler)) as client:
            client.check_availability("u", 0.01)
        assert seen == ["/check"]

    def test_deadline_is_per_thread(self, serve: Callable[[Answer], FakeServer]) -> None:
        """Another thread's expired deadline does not touch this thread's call."""
        server = serve(prompt)
        with BudgetClient(server.url, "key", timeout=1, retries=0) as client:
            errors: list[BaseException] = []

            def expired() -> None:
                with attempt_deadline(0.0):
                    time.sleep(0.3)

            other = threading.Thread(target=expired)
            other.start()
            try:
                for _ in range(5):
                    client.check_availability("u", 0.01)
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)
            other.join()
        assert not errors


class TestRefusalOverTheWire:
    """A 429 read through the deadline transport: the service's refusal, all of it."""

    def test_a_429_is_exceeded_with_its_window_and_reset(
        self, serve: Callable[[Answer], FakeServer]
    ) -> None:
        server = serve(refusing(REFUSAL))
        with BudgetClient(server.url, "key", timeout=1) as client:
            with pytest.raises(BudgetExceededError) as caught:
                client.check_availability("u", 1)
            e = caught.value
            assert (e.scope, e.entity_id, e.window, e.resets_at, e.retry_after_seconds) == (
                "user",
                "u",
                "week",
                RESETS_AT,
                3600,
            )
            assert (e.limit_usd, e.spent_usd, e.requested_usd) == (5.0, 4.5, 1.0)
            assert server.requests == 1  # an answer: not retried

    def test_a_malformed_resets_at_fails_closed(
        self, serve: Callable[[Answer], FakeServer]
    ) -> None:
        server = serve(refusing({**REFUSAL, "resets_at": "next monday"}))
        with BudgetClient(server.url, "key", timeout=1) as client:
            with pytest.raises(BudgetUnavailableError, match="429 but no budget details"):
                client.check_availability("u", 1)
            assert server.requests == 1


class TestEnvironmentProxy:
    """The deadline transport keeps httpx's reading of HTTP(S)_PROXY / NO_PROXY."""

    @pytest.mark.parametrize(
        ("env", "url", "proxy"),
        [
            ({}, "http://budget.internal:8000", None),
            ({"HTTP_PROXY": "http://p:3128"}, "http://budget.internal:8000", "http://p:3128"),
            ({"HTTP_PROXY": "p:3128"}, "http://budget.internal", "http://p:3128"),
            ({"HTTPS_PROXY": "http://p:3128"}, "http://budget.internal", None),
            ({"ALL_PROXY": "http://p:3128"}, "https://budget.internal", "http://p:3128"),
            ({"HTTP_PROXY": "http://p", "NO_PROXY": "*"}, "http://budget.internal", None),
            ({"HTTP_PROXY": "http://p", "NO_PROXY": "internal"}, "http://budget.internal", None),
            ({"HTTP_PROXY": "http://p", "NO_PROXY": ".internal"}, "http://budget.internal",
             None),
            ({"HTTP_PROXY": "http://p", "NO_PROXY": "budget.internal"}, "http://budget.internal",
             None),
            ({"HTTP_PROXY": "http://p", "NO_PROXY": "other.internal"}, "http://budget.internal",
             "http://p"),
            ({"HTTP_PROXY": "http://p", "NO_PROXY": "10.0.0.0/8"}, "http://10.1.2.3:8000",
             None),
            ({"HTTP_PROXY": "http://p", "NO_PROXY": "10.0.0.0/8"}, "http://11.1.2.3", "http://p"),
        ],
    )  # fmt: skip
    def test_environment_proxy(
        self, monkeypatch: pytest.MonkeyPatch, env: dict[str, str], url: str, proxy: str | None
    ) -> None:
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
            monkeypatch.delenv(name, raising=False)
            monkeypatch.delenv(name.lower(), raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        found = _environment_proxy(url)
        assert (None if found is None else str(found.url).rstrip("/")) == proxy
