"""
Single-task pytest-benchmark of the async operations: AsyncBudgetManager and the async floor.

Run with ``pytest benchmarks/test_bench_async.py --benchmark-only``; one group per
operation. A benchmark round awaits ``BATCH`` sequential calls in one
``run_until_complete``, so the cost of entering the loop is spread over them:
divide the times by ``BATCH`` for one call. Each benchmark records the
operation's round trips, counted on the server, in ``extra_info``. The
interleaved numbers at 1 and 64 tasks, and the event loop's lag, come from
``python -m benchmarks.async_ops``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from benchmarks._roundtrips import count
from benchmarks._subjects import config
from benchmarks.async_ops import OP_TITLES, OPS, SUBJECTS, AsyncFloor, AsyncOurs
from tests.redis_server import RedisServer

#: Sequential calls per benchmark round.
BATCH = 50


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def async_subjects(
    redis_server: RedisServer, loop: asyncio.AbstractEventLoop
) -> Iterator[dict[str, Any]]:
    cfg = config(redis_server.url)
    subjects: dict[str, Any] = {"ours": AsyncOurs(cfg), "floor": AsyncFloor(cfg)}
    yield subjects
    for subject in subjects.values():
        loop.run_until_complete(subject.aclose())


@pytest.mark.parametrize("subject", SUBJECTS)
@pytest.mark.parametrize("op", OPS)
def test_async_op(
    benchmark: Any,
    async_subjects: dict[str, Any],
    redis_server: RedisServer,
    loop: asyncio.AbstractEventLoop,
    op: str,
    subject: str,
) -> None:
    benchmark.group = f"async {OP_TITLES[op]} ({BATCH} calls a round)"
    method = getattr(async_subjects[subject], op)

    async def batch() -> None:
        for _ in range(BATCH):
            await method("u-bench")

    client = redis_server.client()
    try:
        trips = count(client, lambda: loop.run_until_complete(method("u-bench")))
    finally:
        client.close()
    benchmark.extra_info.update(
        round_trips=trips.round_trips,
        server_commands=trips.server_commands,
        commands=trips.breakdown,
        calls_per_round=BATCH,
    )
    benchmark(lambda: loop.run_until_complete(batch()))
