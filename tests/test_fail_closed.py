"""
Failing closed, quickly, and retrying safely.

A budget guard that lets calls through when its store is down guards nothing,
and one that hangs when the store stalls stalls every LLM call behind it. So:
every operation on an unreachable, dead or stalled store raises
BudgetUnavailableError within a bound derived from the configured timeouts,
the same manager recovers when the store comes back, and every write can be
retried without charging twice.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from coreason_budget import (
    AsyncBudgetManager,
    BudgetConfig,
    BudgetError,
    BudgetExceededError,
    BudgetManager,
    BudgetUnavailableError,
    Receipt,
)

from .conftest import ManagerFactory
from .redis_server import RedisServer, free_port

Operation = Callable[[BudgetManager], object]

OPERATIONS: dict[str, Operation] = {
    "check_availability": lambda m: m.check_availability("alice", 1.0, project_id="p"),
    "reserve": lambda m: m.reserve("alice", 1.0, project_id="p"),
    "record_spend": lambda m: m.record_spend("alice", 1.0, project_id="p", model="gpt-4o"),
    "usage": lambda m: m.usage("alice", "p"),
    "set_limit": lambda m: m.set_limit("user", "alice", 5.0),
    "remove_limit": lambda m: m.set_limit("project", "p", None),
}

#: The operations that run the ledger script.
SCRIPTED: dict[str, Operation] = {
    "check_availability": OPERATIONS["check_availability"],
    "reserve": OPERATIONS["reserve"],
    "record_spend": OPERATIONS["record_spend"],
    "usage": OPERATIONS["usage"],
    "report": lambda m: m.report(),
}

# Short timeouts keep the stalled-store tests fast; the bound scales with them.
FAST = {"connect_timeout": 0.1, "socket_timeout": 0.1, "retries": 1}


def hang_bound(config: BudgetConfig) -> float:
    """The longest a failing call may take: every attempt timing out, plus slack."""
    return (config.retries + 1) * (config.connect_timeout + config.socket_timeout) + 1.0


def assert_unavailable(manager: BudgetManager, operation: Operation) -> float:
    """
    Run *operation*, expect BudgetUnavailableError within the bound; return the time taken.

    A spend the store could not take may instead answer a receipt saying
    "spooled" (saved, recorded once the store is back): never "recorded".
    """
    start = time.monotonic()
    error: BudgetUnavailableError | None = None
    try:
        result = operation(manager)
    except BudgetUnavailableError as e:
        error = e
    elapsed = time.monotonic() - start
    if error is not None:
        assert not isinstance(error, BudgetExceededError)
        assert "unavailable" in str(error)
    else:
        assert isinstance(result, Receipt), result
        assert result.status == "spooled", result
    bound = hang_bound(manager.config)
    assert elapsed < bound, f"took {elapsed:.2f}s, bound {bound:.2f}s"
    return elapsed


class Blackhole:
    """A TCP listener that accepts connections and never answers: a stalled store."""

    def __init__(self) -> None:
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = int(self._listener.getsockname()[1])
        self.accepted: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        self._listener.settimeout(0.05)
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted.append(conn)  # held open, never read or written

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._listener.close()
        for conn in self.accepted:
            conn.close()


@pytest.fixture
def blackhole() -> Iterator[Blackhole]:
    hole = Blackhole()
    yield hole
    hole.close()


class TestUnreachableStore:
    """Nothing listens on the port: every operation refuses, fast."""

    @pytest.mark.parametrize("name", list(OPERATIONS))
    def test_operation_fails_closed(
        self, name: str, managers: Callable[..., BudgetManager]
    ) -> None:
        manager = managers(f"redis://127.0.0.1:{free_port()}")
        assert_unavailable(manager, OPERATIONS[name])

    def test_constructing_a_manager_does_not_connect(
        self, managers: Callable[..., BudgetManager]
    ) -> None:
        """A worker may start before its store; only calls fail."""
        start = time.monotonic()
        managers(f"redis://127.0.0.1:{free_port()}")
        assert time.monotonic() - start < 1.0

    def test_unix_socket_that_does_not_exist(
        self, managers: Callable[..., BudgetManager], tmp_path: Any
    ) -> None:
        manager = managers(f"unix://{tmp_path / 'absent.sock'}")
        assert_unavailable(manager, OPERATIONS["reserve"])

    def test_every_retry_fails_within_the_bound(
        self, managers: Callable[..., BudgetManager]
    ) -> None:
        manager = managers(f"redis://127.0.0.1:{free_port()}", retries=10)
        assert_unavailable(manager, OPERATIONS["record_spend"])

    def test_guarded_call_is_not_made(self, managers: Callable[..., BudgetManager]) -> None:
        """The caller's ``except BudgetError`` refuses the LLM call."""
        manager = managers(f"redis://127.0.0.1:{free_port()}")
        calls = []
        try:
            with manager.reserve("alice", 0.5) as r:
                calls.append("llm")
                r.commit(0.4)
        except BudgetError:
            pass
        assert calls == []


class TestStalledStore:
    """The store accepts connections and never replies: time out, never hang."""

    @pytest.mark.timeout(30)
    @pytest.mark.parametrize("name", list(OPERATIONS))
    def test_operation_times_out(
        self, name: str, blackhole: Blackhole, managers: Callable[..., BudgetManager]
    ) -> None:
        manager = managers(blackhole.url, **FAST)
        elapsed = assert_unavailable(manager, OPERATIONS[name])
        # It did wait for the store (the failure is a timeout, not a refusal).
        assert elapsed >= manager.config.socket_timeout * 0.9
        assert blackhole.accepted

    @pytest.mark.timeout(30)
    def test_default_config_times_out(
        self, blackhole: Blackhole, managers: Callable[..., BudgetManager]
    ) -> None:
        manager = managers(blackhole.url)
        assert_unavailable(manager, OPERATIONS["reserve"])

    @pytest.mark.timeout(30)
    def test_concurrent_callers_all_time_out(
        self, blackhole: Blackhole, managers: Callable[..., BudgetManager]
    ) -> None:
        """A burst of callers (beyond the pool) all fail, none waits forever."""
        manager = managers(blackhole.url, pool_size=2, pool_timeout=0.2, **FAST)
        errors: list[BaseException] = []
        lock = threading.Lock()

        def call() -> None:
            try:
                manager.check_availability("alice", 1.0)
            except BaseException as e:
                with lock:
                    errors.append(e)

        threads = [threading.Thread(target=call) for _ in range(6)]
        start = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=20)
        elapsed = time.monotonic() - start
        assert not any(t.is_alive() for t in threads)
        assert len(errors) == 6
        assert all(isinstance(e, BudgetUnavailableError) for e in errors), errors
        # Two connections at a time, each caller bounded: at most three rounds.
        assert elapsed < 3 * hang_bound(manager.config)


class TestStoreDiesAndComesBack:
    """Killing the store mid-run fails closed; restarting it heals the same manager."""

    @pytest.mark.timeout(60)
    def test_kill_then_restart(
        self, own_redis: RedisServer, managers: Callable[..., BudgetManager]
    ) -> None:
        manager = managers(own_redis.url, spool_dir="off")  # the spool: tests/test_spool.py
        manager.record_spend("alice", 1.0)
        held = manager.reserve("alice", 2.0, reservation_id="before-crash")
        assert manager.usage("alice")["user"].spent_usd == 3.0

        own_redis.kill()
        for operation in OPERATIONS.values():
            assert_unavailable(manager, operation)
        assert_unavailable(manager, lambda m: held.commit(1.5))
        assert held.state == "held"  # not settled: it can be retried
        assert_unavailable(manager, lambda m: held.release())
        assert held.state == "held"

        own_redis.start()  # same port, no persistence: an empty store
        for operation in OPERATIONS.values():
            operation(manager)  # scripts reload transparently (NOSCRIPT handled)
        # The hold's record was lost with the store: committing records the actual cost once.
        before = manager.usage("alice")["user"].spent_nano
        held.commit(1.5)
        assert held.state == "committed"
        assert manager.usage("alice")["user"].spent_nano - before == 1_500_000_000
        held.commit(1.5)
        assert manager.usage("alice")["user"].spent_nano - before == 1_500_000_000

    @pytest.mark.timeout(60)
    def test_context_manager_exit_on_a_dead_store_does_not_hide_the_caller_error(
        self,
        own_redis: RedisServer,
        managers: Callable[..., BudgetManager],
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        manager = managers(own_redis.url, spool_dir="off")
        r = manager.reserve("alice", 1.0)

        def fail_inside() -> None:
            with r:
                own_redis.kill()
                raise ZeroDivisionError

        with pytest.raises(ZeroDivisionError):
            fail_inside()
        assert r.state == "held"
        assert any("Could not settle" in rec.getMessage() for rec in caplog.records)

    @pytest.mark.timeout(60)
    def test_restart_repeatedly(
        self, own_redis: RedisServer, managers: Callable[..., BudgetManager]
    ) -> None:
        manager = managers(own_redis.url, **FAST)
        for _ in range(3):
            manager.record_spend("alice", 1.0)
            assert manager.usage("alice")["user"].spent_usd == 1.0
            own_redis.kill()
            assert_unavailable(manager, OPERATIONS["usage"])
            own_redis.start()

    def test_script_flush_is_transparent(
        self, make_manager: ManagerFactory, redis_client: redis.Redis
    ) -> None:
        manager = make_manager()
        manager.record_spend("alice", 1.0)
        for operation in OPERATIONS.values():
            redis_client.script_flush()
            operation(manager)
        r = manager.reserve("alice", 1.0)
        redis_client.script_flush()
        r.commit(0.5)
        assert r.state == "committed"
        usage = manager.usage("alice")["user"]
        # 1 spent + 1 spent (record_spend in OPERATIONS) + 1 held by "reserve" + 0.5 committed
        assert usage.spent_usd == 3.5
        assert usage.limit_usd == 5.0


#: Replies the script never sends: wrong types, wrong words, right words in the wrong
#: shape, and integers that are no instant in the periods the call named (a proxy's ":0").
MALFORMED: list[object] = [
    "OK",
    [],
    ["WHAT"],
    ["DONE", "held"],
    0,
    1,
    -1,
    ["NO"],
    ["NO", "x", "1", "0", "5", "0"],
    ["DUP", "held"],
    ["OK", "1"],
    ["NOW"],
    ["DAY", "1", "2"],
    ["BIG"],
    b"1",
    None,
]


class TestMalformedReply:
    """
    A reply the ledger script never sends is an unavailable store, never a
    success and never a stray exception (no spool here, so writes raise too).
    """

    @pytest.fixture
    def budget(self, make_manager: ManagerFactory) -> BudgetManager:
        return make_manager(daily_user_limit_usd=1.0, spool_dir="off")

    @pytest.mark.parametrize("reply", MALFORMED, ids=repr)
    @pytest.mark.parametrize("name", SCRIPTED)
    def test_operation(
        self, budget: BudgetManager, monkeypatch: pytest.MonkeyPatch, name: str, reply: object
    ) -> None:
        monkeypatch.setattr(budget._driver, "_evalsha", lambda keys, args: reply)
        with pytest.raises(BudgetUnavailableError, match="malformed reply"):
            SCRIPTED[name](budget)

    @pytest.mark.parametrize("reply", [*MALFORMED, ["NO", "1", "1", "0", "5", "0"]], ids=repr)
    def test_settle(
        self, budget: BudgetManager, monkeypatch: pytest.MonkeyPatch, reply: object
    ) -> None:
        held = budget.reserve("alice", 1.0)
        monkeypatch.setattr(budget._driver, "_evalsha", lambda keys, args: reply)
        with pytest.raises(BudgetUnavailableError, match="malformed reply"):
            held.commit(0.5)
        assert held.state == "held"

    @pytest.mark.parametrize("reply", [0, 1, 20000])
    def test_an_integer_that_is_not_the_day_lets_nothing_through(
        self, budget: BudgetManager, monkeypatch: pytest.MonkeyPatch, reply: int
    ) -> None:
        """A server answering ":0" to EVALSHA must not pass $5 on a $1 limit."""
        monkeypatch.setattr(budget._driver, "_evalsha", lambda keys, args: reply)
        with pytest.raises(BudgetUnavailableError):
            budget.check_availability("alice", 5.0)
        with pytest.raises(BudgetUnavailableError):
            budget.reserve("alice", 5.0)
        with pytest.raises(BudgetUnavailableError):
            budget.record_spend("alice", 5.0)

    def test_an_integer_reply_spools_the_spend(
        self, make_manager: ManagerFactory, monkeypatch: pytest.MonkeyPatch, redis_client: Any
    ) -> None:
        """With a spool, the spend answered by an impostor's ":0" is saved, not taken as done."""
        budget = make_manager()
        real = budget._driver._evalsha
        monkeypatch.setattr(budget._driver, "_evalsha", lambda keys, args: 0)
        receipt = budget.record_spend("alice", 5.0, idempotency_key="k")
        assert receipt.status == "spooled"
        monkeypatch.setattr(budget._driver, "_evalsha", real)
        assert budget.replay_spool().recorded == 1
        assert budget.usage("alice")["user"].spent_nano == 5_000_000_000


class TestRetrySafety:
    """Every write carries an id; repeating it does not charge twice."""

    def spent(self, manager: BudgetManager, user: str = "alice") -> float:
        return manager.usage(user, "p")["user"].spent_usd

    def test_record_spend_with_the_same_key_charges_once(self, budget: BudgetManager) -> None:
        budget.record_spend("alice", 1.25, project_id="p", idempotency_key="k")
        budget.record_spend("alice", 1.25, project_id="p", idempotency_key="k")
        usage = budget.usage("alice", "p")
        assert usage["user"].spent_usd == 1.25
        assert usage["project"].spent_usd == 1.25
        assert usage["global"].spent_usd == 1.25

    def test_same_key_from_another_manager_charges_once(self, make_manager: ManagerFactory) -> None:
        a, b = make_manager(), make_manager()
        a.record_spend("alice", 2.0, idempotency_key="k")
        b.record_spend("alice", 2.0, idempotency_key="k")
        assert a.usage("alice")["user"].spent_usd == 2.0

    def test_different_keys_charge_each(self, budget: BudgetManager) -> None:
        budget.record_spend("alice", 1.0, idempotency_key="k1")
        budget.record_spend("alice", 1.0, idempotency_key="k2")
        budget.record_spend("alice", 1.0)
        budget.record_spend("alice", 1.0)
        assert self.spent(budget) == 4.0

    @pytest.mark.parametrize("face", ["sync", "async"])
    def test_a_dropped_connection_is_retried_and_charges_once(
        self, make_manager: ManagerFactory, redis_client: redis.Redis, face: str
    ) -> None:
        """
        Script calls go straight to a pooled connection, with its retry policy:
        a connection the server dropped is retried on a new one, transparently,
        and every operation charges once.
        """

        def drop_ours() -> None:
            for client in redis_client.client_list():
                if client["name"] == "coreason-budget":
                    redis_client.client_kill_filter(_id=client["id"])

        if face == "sync":
            budget = make_manager(retries=1)
            for _ in range(3):
                assert budget.record_spend("alice", 1.0).status == "recorded"
                drop_ours()
            with budget.reserve("alice", 1.0) as r:
                drop_ours()
                assert r.commit(0.5).status == "recorded"
            assert budget.usage("alice")["user"].spent_usd == 3.5
            return

        async def main() -> None:
            config = BudgetConfig(redis_url=make_manager().config.redis_url, retries=1)
            async with AsyncBudgetManager(config) as budget:
                for _ in range(3):
                    assert (await budget.record_spend("alice", 1.0)).status == "recorded"
                    drop_ours()
                async with budget.reserve("alice", 1.0) as r:
                    drop_ours()
                    assert (await r.commit(0.5)).status == "recorded"
                assert (await budget.usage("alice"))["user"].spent_usd == 3.5

        asyncio.run(main())

    def test_reserve_with_the_same_id_holds_once(self, budget: BudgetManager) -> None:
        first = budget.reserve("alice", 3.0, project_id="p", reservation_id="r1")
        second = budget.reserve("alice", 3.0, project_id="p", reservation_id="r1")
        assert first.id == second.id == "r1"
        assert second.state == "held"
        assert second.estimate_nano == first.estimate_nano == 3_000_000_000
        assert second.held_at_ms == first.held_at_ms
        usage = budget.usage("alice", "p")
        assert usage["user"].spent_usd == 3.0
        assert usage["project"].spent_usd == 3.0
        assert usage["global"].spent_usd == 3.0

    def test_repeated_reserve_does_not_count_against_the_limit(self, budget: BudgetManager) -> None:
        """$6 held of $10: a retry of the same reservation still succeeds."""
        budget.reserve("alice", 6.0, reservation_id="r1")
        budget.reserve("alice", 6.0, reservation_id="r1")
        assert self.spent(budget) == 6.0

    def test_second_handle_settles_the_same_hold(self, budget: BudgetManager) -> None:
        first = budget.reserve("alice", 3.0, reservation_id="r1")
        second = budget.reserve("alice", 3.0, reservation_id="r1")
        second.commit(1.0)
        assert self.spent(budget) == 1.0
        first.commit(2.0)  # the first settlement won
        assert self.spent(budget) == 1.0
        assert first.state == "committed"

    def test_reserve_after_commit_returns_the_settled_hold(self, budget: BudgetManager) -> None:
        first = budget.reserve("alice", 3.0, reservation_id="r1")
        first.commit(1.0)
        again = budget.reserve("alice", 3.0, reservation_id="r1")
        assert again.state == "committed"
        again.commit(3.0)
        again.release()
        assert self.spent(budget) == 1.0

    def test_commit_twice_is_a_no_op(self, budget: BudgetManager) -> None:
        r = budget.reserve("alice", 3.0)
        r.commit(1.0)
        r.commit(2.5)
        assert r.state == "committed"
        assert self.spent(budget) == 1.0

    def test_release_after_commit_is_a_no_op(self, budget: BudgetManager) -> None:
        r = budget.reserve("alice", 3.0)
        r.commit(1.0)
        r.release()
        assert r.state == "committed"
        assert self.spent(budget) == 1.0

    def test_commit_after_release_is_a_no_op(self, budget: BudgetManager) -> None:
        r = budget.reserve("alice", 3.0)
        r.release()
        r.commit(1.0)
        assert r.state == "released"
        assert self.spent(budget) == 0.0

    def test_release_twice_is_a_no_op(self, budget: BudgetManager) -> None:
        budget.record_spend("alice", 1.0)
        r = budget.reserve("alice", 3.0)
        r.release()
        r.release()
        assert self.spent(budget) == 1.0


class TestVanishedReservation:
    """A hold whose record the store lost: its commit records the actual cost, once."""

    def test_commit_after_store_flush_records_actual_once(
        self, budget: BudgetManager, redis_client: redis.Redis
    ) -> None:
        first = budget.reserve("alice", 2.0, project_id="p", reservation_id="r1")
        second = budget.reserve("alice", 2.0, project_id="p", reservation_id="r1")
        redis_client.flushall()  # the store lost everything, counters included
        first.commit(3.0)
        assert first.state == "committed"
        usage = budget.usage("alice", "p")
        assert usage["user"].spent_usd == 3.0
        assert usage["project"].spent_usd == 3.0
        assert usage["global"].spent_usd == 3.0
        # A retry of the commit, from another handle for the same id, charges nothing.
        second.commit(3.0)
        assert second.state == "committed"
        assert budget.usage("alice", "p")["user"].spent_usd == 3.0

    def test_commit_after_record_deleted_records_actual_once(
        self, budget: BudgetManager, redis_client: redis.Redis
    ) -> None:
        first = budget.reserve("alice", 2.0, reservation_id="r1")
        second = budget.reserve("alice", 2.0, reservation_id="r1")
        assert redis_client.delete("{coreason_budget}:res:r1") == 1
        before = budget.usage("alice")["user"].spent_nano
        first.commit(3.0)
        second.commit(3.0)
        assert budget.usage("alice")["user"].spent_nano - before == 3_000_000_000

    def test_release_after_record_lost_charges_nothing(
        self, budget: BudgetManager, redis_client: redis.Redis
    ) -> None:
        first = budget.reserve("alice", 2.0, reservation_id="r1")
        second = budget.reserve("alice", 2.0, reservation_id="r1")
        redis_client.flushall()
        first.release()
        assert first.state == "released"
        second.commit(3.0)  # the release won; a late commit does not charge
        assert second.state == "released"
        assert budget.usage("alice")["user"].spent_usd == 0.0


class TestOneRoundTrip:
    """
    Each operation is one command from the client: one EVALSHA.

    Redis counts the commands a script runs in INFO commandstats too, so the
    commands the client itself sent are counted with MONITOR (which tags
    script commands "lua"), and commandstats confirms exactly one EVALSHA.
    """

    def evalsha_calls(self, client: redis.Redis) -> int:
        stats = client.info("commandstats")
        return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))

    def client_commands(
        self, server: RedisServer, client: redis.Redis, action: Callable[[], object]
    ) -> list[str]:
        """The commands clients sent while *action* ran, but for this test's own INFO."""
        marker = "coreason-budget-round-trip-marker"
        # One already-connected connection for INFO and the end marker, so that
        # the observer's own connection set-up does not show up.
        observer = redis.Redis(
            port=server.port, decode_responses=True, single_connection_client=True
        )
        try:
            observer.ping()
            with client.monitor() as monitor:
                before = self.evalsha_calls(observer)
                action()
                after = self.evalsha_calls(observer)
                observer.echo(marker)
                sent: list[str] = []
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    entry = monitor.next_command()
                    command = entry["command"]
                    if marker in command:
                        break
                    if entry["client_type"] != "lua" and not command.upper().startswith("INFO"):
                        sent.append(command)
        finally:
            observer.close()
        assert after - before == 1, f"EVALSHA calls went up by {after - before}"
        return sent

    @pytest.mark.parametrize(
        "name", ["reserve", "commit", "release", "check_availability", "record_spend", "usage"]
    )
    def test_one_command(
        self,
        name: str,
        make_manager: ManagerFactory,
        redis_server: RedisServer,
        redis_client: redis.Redis,
    ) -> None:
        manager = make_manager()
        manager.usage("warm-up")  # connect, load the script
        held = manager.reserve("alice", 1.0, project_id="p", model="gpt-4o")
        actions: dict[str, Callable[[], object]] = {
            "reserve": lambda: manager.reserve("bob", 1.0, project_id="p", model="gpt-4o"),
            "commit": lambda: held.commit(0.5),
            "release": held.release,
            "check_availability": lambda: manager.check_availability("bob", 1.0, "p"),
            "record_spend": lambda: manager.record_spend("bob", 1.0, "p", "gpt-4o"),
            "usage": lambda: manager.usage("bob", "p"),
        }
        sent = self.client_commands(redis_server, redis_client, actions[name])
        assert len(sent) == 1, sent
        assert sent[0].upper().startswith("EVALSHA")
