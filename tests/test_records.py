"""
Settled records are small: a settled reservation and a spend's operation id
are each a field of a compact per-day hash (a bucket), and every guarantee
about them holds: a retried settle or spend charges nothing, a re-reserve of a
settled id holds nothing, a spool replayed days later charges once.
"""

from __future__ import annotations

import time

import pytest
import redis

from coreason_budget import BudgetManager, IdempotencyConflictError

from .conftest import ManagerFactory, marked

NANO = 1_000_000_000
DAY = 86_400.0


def buckets(client: redis.Redis) -> dict[str, dict[str, str]]:
    return {key: client.hgetall(key) for key in client.scan_iter("{coreason_budget}:ops:*")}


class TestASettledReservation:
    """Its record is gone; one field of its day's bucket says how it was settled."""

    def test_is_one_small_field(self, budget: BudgetManager, redis_client: redis.Redis) -> None:
        with budget.reserve("alice", 2.0, project_id="p", reservation_id="r1") as r:
            r.commit(1.5)
        assert not redis_client.exists("{coreason_budget}:res:r1")
        ((key, fields),) = buckets(redis_client).items()
        ((field, value),) = fields.items()
        assert (len(field), len(value), value[0]) == (12, 9, "c")
        assert key.split(":")[2] == str(int(r.held_at.timestamp()) // 86400)
        assert redis_client.object("encoding", key) in ("listpack", "ziplist")  # compact

    def test_answers_every_retry(self, budget: BudgetManager, make_manager: ManagerFactory) -> None:
        r = budget.reserve("alice", 2.0, project_id="p", reservation_id="r1")
        assert r.commit(1.5).status == "recorded"
        other = make_manager()
        # Another worker's handle, as the service makes one from what a client sends:
        again = other.reservation(
            "r1", user_id="alice", project_id="p", held_at=r.held_at, lookup=False
        )
        assert again.commit(1.5).status == "duplicate"
        assert again.release().status == "duplicate"  # settled: holds nothing
        bare = other.reservation("r1", lookup=False)  # by id alone
        assert bare.commit(0.1).status == "duplicate"
        assert other.reservation("r1").state == "committed"
        held = other.reserve("alice", 2.0, project_id="p", reservation_id="r1")
        assert (held.state, held.estimate_nano) == ("committed", 0)
        with pytest.raises(IdempotencyConflictError):
            other.reserve("alice", 3.0, project_id="p", reservation_id="r1")
        assert budget.usage("alice", "p")["user"].spent_nano == 1_500_000_000


class TestASpendsMarker:
    """A field of the bucket of its day, found by a retry on any day of the TTL."""

    def test_a_retry_the_next_days_charges_nothing(
        self, make_manager: ManagerFactory, redis_client: redis.Redis
    ) -> None:
        now = [time.time()]
        budget = make_manager(clock=lambda: now[0], retention_seconds=30 * 86400)
        assert budget.record_spend("alice", 1.0, idempotency_key="k1").status == "recorded"
        assert marked(redis_client, budget, "k1", int(now[0] * 1000))
        for days in (0.5, 1.0, 1.9):  # within the 2-day idempotency TTL
            now[0] = time.time() + days * DAY
            receipt = budget.record_spend("alice", 1.0, idempotency_key="k1")
            assert receipt.status == "duplicate", days
        with pytest.raises(IdempotencyConflictError):
            budget.record_spend("alice", 2.0, idempotency_key="k1")

    def test_a_spool_replayed_days_later_charges_once(
        self, make_manager: ManagerFactory, redis_client: redis.Redis
    ) -> None:
        """The replay names the day it was made: its marker is found there, past the TTL."""
        made = time.time() - 5 * DAY
        then = make_manager(clock=lambda: made)
        then.record_spend("alice", 1.0, idempotency_key="k-late")
        budget = make_manager()
        replayed = budget._run(
            budget._core.ledger.replay_spend(
                budget._core.scopes("alice", None, None), NANO, "k-late", int(made * 1000)
            )
        )
        assert replayed == "duplicate"
