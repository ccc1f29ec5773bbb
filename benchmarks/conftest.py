"""
Fixtures for ``pytest benchmarks``: one real redis-server and the subjects built on it.

The repository root goes on sys.path so ``tests.redis_server`` (the suite's own
way of starting redis-server) is importable however pytest was invoked.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Pricing must never reach the network, in benchmarks least of all.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from benchmarks._subjects import Subjects, build_subjects  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def subjects(redis_server: RedisServer) -> Iterator[Subjects]:
    built = build_subjects(redis_server.url)
    yield built
    built.close()
