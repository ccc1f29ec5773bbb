"""
Single-thread pytest-benchmark of every operation: ours, the floor and both peers.

Run with ``pytest benchmarks --benchmark-only``; one group per operation.
Each benchmark records the operation's round trips, counted on the server, in
``extra_info`` (and so in ``--benchmark-json``). Multi-threaded numbers come
from ``python -m benchmarks.report``, which has its own harness.
"""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks._roundtrips import count
from benchmarks._subjects import COMPARED, OP_TITLES, OPS, Subjects
from tests.redis_server import RedisServer


@pytest.mark.parametrize("subject", COMPARED)
@pytest.mark.parametrize("op", OPS)
def test_op(
    benchmark: Any, subjects: Subjects, redis_server: RedisServer, op: str, subject: str
) -> None:
    benchmark.group = OP_TITLES[op]
    call = subjects.op(subject, op, "u-bench")
    client = redis_server.client()
    try:
        trips = count(client, call)
    finally:
        client.close()
    benchmark.extra_info.update(
        round_trips=trips.round_trips,
        server_commands=trips.server_commands,
        commands=trips.breakdown,
    )
    benchmark(call)
