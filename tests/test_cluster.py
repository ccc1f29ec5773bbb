"""
The same promises on a real three-master Redis Cluster (``redis+cluster://``).

The core behaviour classes of test_manager, test_fail_closed and
test_concurrency run again here, unchanged: this module's ``redis_url`` names
the cluster and its ``redis_client`` is a RedisCluster, so conftest's
``make_manager`` and ``budget`` build cluster-backed managers. The tests after
them are the cluster's own: one slot per prefix, prefixes spread over shards,
failing closed when a shard dies or stalls, closing every node's pool.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from redis.cluster import RedisCluster

from coreason_budget import (
    BudgetConfig,
    BudgetExceededError,
    BudgetManager,
    BudgetUnavailableError,
    ConfigError,
    _store,
)

from . import test_concurrency, test_edges, test_fail_closed, test_manager
from .conftest import ManagerFactory
from .redis_cluster import RedisClusterServers, prefixes_on_distinct_masters, running_cluster
from .redis_server import free_port
from .test_fail_closed import FAST, OPERATIONS, assert_unavailable

NANO = 1_000_000_000


@pytest.fixture(scope="session")
def cluster() -> Iterator[RedisClusterServers]:
    """One three-master cluster per test process (each xdist worker has its own)."""
    with running_cluster() as servers:
        yield servers


@pytest.fixture
def redis_url(cluster: RedisClusterServers) -> str:
    """The cluster's URL, healthy and every master flushed: overrides conftest's server."""
    cluster.wait_ready(time.monotonic() + 30)  # in case a test left a master recovering
    cluster.flush()
    return cluster.url


@pytest.fixture
def redis_client(cluster: RedisClusterServers, redis_url: str) -> Iterator[RedisCluster]:
    """A cluster client: KEYS and DBSIZE ask every master, key commands go to the key's."""
    client = RedisCluster(host="127.0.0.1", port=cluster.ports[0], decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def manager_factory(make_manager: ManagerFactory) -> ManagerFactory:
    """test_concurrency's: robust timeouts, the fixed clock by default."""

    def make(clock: Any = test_concurrency.fixed_clock, **limits: Any) -> BudgetManager:
        return make_manager(clock=clock, **test_concurrency.ROBUST, **limits)

    return make


# -- the core suite, on the cluster ------------------------------------------------------


class TestReserve(test_manager.TestReserve):
    pass


class TestRecordSpend(test_manager.TestRecordSpend):
    pass


class TestCheckAvailability(test_manager.TestCheckAvailability):
    pass


class TestUsageAndLimits(test_manager.TestUsageAndLimits):
    pass


class TestBadInput(test_manager.TestBadInput):
    pass


class TestKeys(test_manager.TestKeys):
    pass


class TestOneClock(test_manager.TestOneClock):
    pass


class TestReport(test_manager.TestReport):
    pass


class TestReservationById(test_manager.TestReservationById):
    pass


class TestRetrySafety(test_fail_closed.TestRetrySafety):
    pass


class TestVanishedReservation(test_fail_closed.TestVanishedReservation):
    pass


class TestIdReuse(test_edges.TestIdReuse):
    pass


class TestCounterOverflow(test_edges.TestCounterOverflow):
    pass


class TestLostRecord(test_edges.TestLostRecord):
    pass


class TestThreadsReserveExactly(test_concurrency.TestThreadsReserveExactly):
    pass


class TestProcessesReserveExactly(test_concurrency.TestProcessesReserveExactly):
    """Slow, like its parent; includes a cluster client inherited across fork."""


class TestMixedThreads(test_concurrency.TestMixedThreads):
    pass


# -- the cluster's own -------------------------------------------------------------------


def keys_by_port(cluster: RedisClusterServers) -> dict[int, list[str]]:
    """Every key, by the master that holds it (asked directly, not through routing)."""
    out = {}
    for port, client in zip(cluster.ports, cluster.clients(), strict=True):
        out[port] = sorted(client.keys("*"))
        client.close()
    return out


def exercise(manager: BudgetManager) -> None:
    """Touch every kind of key: day counters, limits, reservations, operation ids."""
    manager.set_limit("user", "alice", 20.0)
    manager.reserve("alice", 1.0, project_id="alpha", model="gpt-4").commit(0.5)
    manager.reserve("bob", 2.0, reservation_id="held-1")
    manager.record_spend("carol", 1.0, project_id="beta", idempotency_key="op-1")


class TestSlots:
    """All of a prefix's keys are in one slot; different prefixes can live on different shards."""

    def test_a_prefix_is_one_slot(
        self, cluster: RedisClusterServers, make_manager: ManagerFactory
    ) -> None:
        exercise(make_manager(key_prefix="acme"))
        keys = [k for ks in keys_by_port(cluster).values() for k in ks]
        assert {k.split(":")[1] for k in keys} == {"day", "limits", "res", "ops"}
        assert {cluster.keyslot(k) for k in keys} == {cluster.keyslot("{acme}")}

    def test_prefixes_spread_over_the_masters(
        self, cluster: RedisClusterServers, make_manager: ManagerFactory
    ) -> None:
        """The scaling path: one prefix per tenant, each on the master that owns its slot."""
        prefixes = prefixes_on_distinct_masters(cluster)
        managers = [make_manager(key_prefix=p, daily_user_limit_usd=10.0) for p in prefixes]
        for i, manager in enumerate(managers):
            exercise(manager)
            manager.record_spend("alice", i + 1)
        by_port = keys_by_port(cluster)
        for port, prefix in zip(cluster.ports, prefixes, strict=True):
            assert by_port[port], f"nothing on {port}"
            assert all(k.startswith("{" + prefix + "}:") for k in by_port[port])
        # Each prefix is its own ledger: same ids, separate counters and overrides.
        for i, manager in enumerate(managers):
            usage = manager.usage("alice", "alpha")
            assert usage["user"].spent_nano == (i + 1) * NANO + NANO // 2
            assert usage["user"].limit_usd == 20.0
            report = manager.report()
            assert {u.entity_id for u in report.users} == {"alice", "bob", "carol"}
            assert manager.reservation("held-1").state == "held"

    def test_threads_on_three_shards_at_once_reserve_exactly(
        self, cluster: RedisClusterServers, make_manager: ManagerFactory
    ) -> None:
        """Racing callers on every shard at once: each prefix grants exactly its capacity."""
        prefixes = prefixes_on_distinct_masters(cluster)
        managers = [
            make_manager(key_prefix=p, daily_user_limit_usd=1.0, **test_concurrency.ROBUST)
            for p in prefixes
        ]
        threads_per_prefix, attempts = 8, 6  # 48 tries per prefix for a capacity of 14
        granted = [[0] * threads_per_prefix for _ in managers]
        refused = [[0] * threads_per_prefix for _ in managers]

        def worker(i: int) -> None:
            m, t = divmod(i, threads_per_prefix)
            for _ in range(attempts):
                try:
                    managers[m].reserve("alice", 0.07, project_id=f"p{t}")
                    granted[m][t] += 1
                except BudgetExceededError:
                    refused[m][t] += 1

        test_concurrency.run_threads(len(managers) * threads_per_prefix, worker)
        for m, manager in enumerate(managers):
            assert sum(granted[m]) == 14  # floor($1.00 / $0.07)
            assert sum(granted[m]) + sum(refused[m]) == threads_per_prefix * attempts
            assert manager.usage("alice")["user"].spent_nano == 14 * 70_000_000
            assert manager.report().total.spent_nano == 14 * 70_000_000

    def test_each_shard_runs_its_own_prefix(self, cluster: RedisClusterServers) -> None:
        """The script runs on the master of the prefix's slot, and only there."""
        prefixes = prefixes_on_distinct_masters(cluster)
        clients = cluster.clients()
        for client in clients:
            client.config_resetstat()
        try:
            for n, prefix in enumerate(prefixes):
                with BudgetManager(BudgetConfig(redis_url=cluster.url, key_prefix=prefix)) as m:
                    for _ in range(n + 1):
                        m.record_spend("alice", 0.01)
            calls = [
                int(c.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))
                for c in clients
            ]
            assert calls == [1, 2, 3]
        finally:
            for client in clients:
                client.close()


class TestClusterStore:
    """Configuration, laziness, scripts and closing."""

    def test_schemes_are_accepted(self) -> None:
        for url in ("redis+cluster://h:7000", "rediss+cluster://u:p@h:7000/0"):
            assert BudgetConfig(redis_url=url).redis_url == url

    @pytest.mark.parametrize(
        "url", ["redis+cluster://127.0.0.1:7000/3", "redis+cluster://127.0.0.1:port"]
    )
    def test_bad_urls_fail_at_start_up(self, url: str) -> None:
        with pytest.raises(ConfigError):
            BudgetManager(BudgetConfig(redis_url=url))

    def test_constructing_a_manager_does_not_connect(self) -> None:
        """A worker may start before its cluster; calls fail closed, quickly."""
        start = time.monotonic()
        with BudgetManager(BudgetConfig(redis_url=f"redis+cluster://127.0.0.1:{free_port()}")) as m:
            assert time.monotonic() - start < 1.0
            for operation in OPERATIONS.values():
                assert_unavailable(m, operation)
            assert_unavailable(m, lambda m: m.ping())
            assert_unavailable(m, lambda m: m.report())
            assert_unavailable(m, lambda m: m.reservation("r1"))

    def test_a_non_cluster_server_is_unavailable(self, redis_server: Any) -> None:
        with BudgetManager(
            BudgetConfig(redis_url=f"redis+cluster://127.0.0.1:{redis_server.port}")
        ) as m:
            assert_unavailable(m, OPERATIONS["reserve"])

    def test_tls_is_asked_for(self) -> None:
        """rediss+cluster:// opens with a TLS handshake (a ClientHello: 0x16 0x03)."""
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            listener.settimeout(10)
            port = listener.getsockname()[1]
            url = f"rediss+cluster://127.0.0.1:{port}"
            failures: list[BaseException] = []

            def call(m: BudgetManager) -> None:
                try:
                    assert_unavailable(m, OPERATIONS["usage"])
                except BaseException as e:
                    failures.append(e)

            with BudgetManager(BudgetConfig(redis_url=url, **FAST)) as m:
                caller = threading.Thread(target=call, args=(m,))
                caller.start()
                conn, _ = listener.accept()
                with conn:
                    conn.settimeout(10)
                    assert conn.recv(2) == b"\x16\x03"
                caller.join()
            assert failures == []

    def test_script_flush_is_transparent(
        self, budget: BudgetManager, redis_client: RedisCluster
    ) -> None:
        budget.record_spend("alice", 1.0)
        for operation in OPERATIONS.values():
            redis_client.script_flush()  # on every master
            operation(budget)
        r = budget.reserve("alice", 1.0)
        redis_client.script_flush()
        r.commit(0.5)
        # 1 spent, then OPERATIONS' reserve (held) and record_spend of 1 each, then 0.5
        assert budget.usage("alice")["user"].spent_usd == 3.5

    def test_ping_asks_every_master(
        self, budget: BudgetManager, cluster: RedisClusterServers
    ) -> None:
        budget.ping()
        clients = cluster.clients()
        try:
            counts = [int(c.info("commandstats")["cmdstat_ping"]["calls"]) for c in clients]
            budget.ping()
            after = [int(c.info("commandstats")["cmdstat_ping"]["calls"]) for c in clients]
        finally:
            for c in clients:
                c.close()
        assert [b - a for a, b in zip(counts, after, strict=True)] == [1, 1, 1]

    def test_close_disconnects_every_node(
        self, make_manager: ManagerFactory, cluster: RedisClusterServers
    ) -> None:
        def ours() -> int:
            n = 0
            for client in cluster.clients():
                n += sum(1 for c in client.client_list() if c.get("name") == "coreason-budget")
                client.close()
            return n

        budget = make_manager()
        budget.ping()  # a connection to every master
        assert ours() >= cluster.masters
        budget.close()
        deadline = time.monotonic() + 5  # a closed connection can stay listed for a moment
        while ours() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ours() == 0
        budget.close()  # twice is fine
        # The manager's next call connects afresh, as on a single Redis.
        budget.record_spend("alice", 1.0)
        assert budget.usage("alice")["user"].spent_usd == 1.0

    def test_pool_is_blocking_and_bounded_per_node(self, make_manager: ManagerFactory) -> None:
        manager = make_manager(pool_size=3, pool_timeout=0.3)
        manager.ping()
        client = manager._store.client
        for node in client.get_nodes():
            pool = node.redis_connection.connection_pool
            assert isinstance(pool, redis.BlockingConnectionPool)
            assert pool.max_connections == 3
            kwargs = pool.connection_kwargs
            assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (0.25, 0.25)
            assert kwargs["decode_responses"] is True
        assert client.retry.get_retries() == manager.config.retries


class TestShardFailures:
    """A dead or stalled shard fails its callers closed, within the timeouts, and heals."""

    @pytest.mark.timeout(60)
    def test_stalled_master_times_out_then_recovers(
        self, cluster: RedisClusterServers, make_manager: ManagerFactory
    ) -> None:
        manager = make_manager(**FAST)
        manager.record_spend("alice", 1.0)
        owner = cluster.ports.index(cluster.port_of_slot(cluster.keyslot("{coreason_budget}")))
        cluster.pause(owner)
        try:
            # Well inside the nodes' failure detection (2 s): the cluster stays "ok".
            elapsed = assert_unavailable(manager, OPERATIONS["reserve"])
            assert elapsed >= manager.config.socket_timeout * 0.9  # it did wait, then gave up
        finally:
            cluster.resume(owner)
        cluster.wait_ready(time.monotonic() + 30)
        # The timed-out reserve may still have run when the master woke up (an
        # unknown outcome, as on a single Redis); its retry carried the same id,
        # so it holds at most once.
        assert manager.usage("alice")["user"].spent_usd in (1.0, 2.0)

    @pytest.mark.slow
    @pytest.mark.timeout(120)
    def test_killed_master_fails_closed_and_its_restart_heals(self) -> None:
        """On a private cluster: kill the prefix's master, then bring it back empty."""
        with running_cluster() as servers:
            prefixes = prefixes_on_distinct_masters(servers)
            config = BudgetConfig(
                redis_url=servers.url, key_prefix=prefixes[0], spool_dir="off", **FAST
            )
            a = BudgetManager(config)  # (the spool: tests/test_spool.py)
            held = a.reserve("alice", 2.0, reservation_id="before-crash")
            servers.kill(0)
            try:
                for operation in OPERATIONS.values():
                    assert_unavailable(a, operation)
                assert_unavailable(a, lambda m: held.commit(1.5))
                assert held.state == "held"
                servers.restart(0)
                for operation in OPERATIONS.values():
                    operation(a)  # scripts reload on the restarted master
                before = a.usage("alice")["user"].spent_nano
                held.commit(1.5)  # the record was lost: the actual cost, once
                held.commit(1.5)
                assert a.usage("alice")["user"].spent_nano - before == 1_500_000_000
            finally:
                a.close()


def serves_exactly(manager: BudgetManager, user: str) -> None:
    """reserve, commit, record_spend and check_availability for a new *user*, to the nano-dollar."""
    manager.reserve(user, 1.0, project_id="p").commit(0.25)
    manager.record_spend(user, 0.5, project_id="p")
    manager.check_availability(user, 1.25, project_id="p")  # a $2 limit, $0.75 spent
    with pytest.raises(BudgetExceededError):
        manager.check_availability(user, 1.26, project_id="p")
    assert manager.usage(user, "p")["user"].spent_nano == 750_000_000


def coverage_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "cluster-require-full-coverage" in r.getMessage()]


def open_managers(url: str, prefixes: list[str]) -> dict[str, BudgetManager]:
    """A manager per prefix, with the FAST timeouts and a $2 daily limit a user."""
    return {
        p: BudgetManager(
            BudgetConfig(redis_url=url, key_prefix=p, daily_user_limit_usd=2.0, **FAST)
        )
        for p in prefixes
    }


class TestDeadShard:
    """
    A master down past cluster-node-timeout: which prefixes fail closed, how fast, and healing.

    Private clusters (a 1 s node timeout): the dead master's prefix fails
    closed at once. With ``cluster-require-full-coverage no`` the other
    prefixes never notice; with Redis's default (``yes``) every node refuses
    every key once the master is marked failed, so every prefix fails closed
    (within the timeouts, not a hang) until it is back, and the library warns.
    """

    @pytest.mark.slow
    @pytest.mark.timeout(120)
    def test_only_the_dead_shards_prefix_fails_closed(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """``no``: the healthy shards serve throughout, even with a hole in the slot map."""
        caplog.set_level(logging.WARNING, logger="coreason_budget")
        with running_cluster(node_timeout_ms=1000) as servers:
            prefixes = prefixes_on_distinct_masters(servers)
            dead, healthy = prefixes[0], prefixes[1:]
            managers = open_managers(servers.url, prefixes)
            fresh: dict[str, BudgetManager] = {}
            try:
                for manager in managers.values():
                    serves_exactly(manager, "before")
                servers.kill(0)
                servers.wait_failed(0)
                assert [servers.cluster_state(i) for i in (1, 2)] == ["ok", "ok"]
                for operation in OPERATIONS.values():
                    assert_unavailable(managers[dead], operation)
                for p in healthy:
                    serves_exactly(managers[p], "marked-failed")

                # An operator gives the shard up: its slots are unassigned. A client
                # that needs every slot covered (redis-py's default) would not
                # start; ours routes the rest and fails the hole closed, at once.
                servers.unassign_slots_of(0)
                fresh = open_managers(f"redis+cluster://127.0.0.1:{servers.ports[1]}", prefixes)
                for p in healthy:
                    serves_exactly(fresh[p], "hole-fresh")
                    serves_exactly(managers[p], "hole")
                for m in (managers[dead], fresh[dead]):
                    with pytest.raises(BudgetUnavailableError, match="not covered"):
                        m.reserve("alice", 1.0)
                    for operation in OPERATIONS.values():
                        assert assert_unavailable(m, operation) < 0.5

                # Back, empty, claiming its slots: every client finds it on its next call.
                servers.restart(0)
                for m in (managers[dead], fresh[dead]):
                    serves_exactly(m, f"back-{id(m)}")
                for p in healthy:
                    assert managers[p].usage("before", "p")["user"].spent_nano == 750_000_000
            finally:
                for m in (*managers.values(), *fresh.values()):
                    m.close()
        assert coverage_warnings(caplog) == []

    @pytest.mark.slow
    @pytest.mark.timeout(120)
    def test_with_redis_default_every_prefix_fails_closed_until_it_is_back(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """``yes``: past the node timeout every prefix fails closed, quickly; one warning."""
        caplog.set_level(logging.WARNING, logger="coreason_budget")
        with running_cluster(node_timeout_ms=1000, require_full_coverage=True) as servers:
            prefixes = prefixes_on_distinct_masters(servers)
            dead, healthy = prefixes[0], prefixes[1:]
            managers = open_managers(servers.url, prefixes)
            again = open_managers(servers.url, healthy)  # the same cluster: no second warning
            try:
                for manager in managers.values():
                    serves_exactly(manager, "before")
                for manager in again.values():
                    serves_exactly(manager, "before-again")
                [warning] = coverage_warnings(caplog)
                message = warning.getMessage()
                assert "every key prefix" in message
                assert "cluster-require-full-coverage no" in message
                assert "replica" in message

                servers.kill(0)
                # Until the cluster marks it failed, only its own prefix notices.
                assert_unavailable(managers[dead], OPERATIONS["reserve"])
                serves_exactly(managers[healthy[0]], "not-yet-failed")
                servers.wait_failed(0)
                deadline = time.monotonic() + 10
                while {servers.cluster_state(i) for i in (1, 2)} != {"fail"}:
                    assert time.monotonic() < deadline, "the cluster never went down"
                    time.sleep(0.05)
                for operation in OPERATIONS.values():
                    assert_unavailable(managers[dead], operation)
                for p in healthy:
                    for name in ("reserve", "check_availability"):
                        with pytest.raises(BudgetUnavailableError, match="cluster is down"):
                            OPERATIONS[name](managers[p])
                    for name in ("reserve", "record_spend", "check_availability"):
                        assert_unavailable(managers[p], OPERATIONS[name])  # not a hang

                servers.restart(0)  # returns once every node says the cluster is ok
                for p in healthy:
                    serves_exactly(managers[p], "back")
                    assert managers[p].usage("before", "p")["user"].spent_nano == 750_000_000
                serves_exactly(managers[dead], "back")
                managers[dead].close()  # a reconnection does not warn again
                serves_exactly(managers[dead], "reconnected")
            finally:
                for m in (*managers.values(), *again.values()):
                    m.close()
        assert len(coverage_warnings(caplog)) == 1


class TestCoverageCheck:
    """On its first connection the library reads the masters' cluster-require-full-coverage."""

    def test_no_warning_when_full_coverage_is_not_required(
        self,
        make_manager: ManagerFactory,
        redis_url: str,
        caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """The suite's cluster runs with ``no``: checked, and nothing to say."""
        checked: set[str] = set()
        monkeypatch.setattr(_store, "_coverage_checked", checked)
        caplog.set_level(logging.DEBUG, logger="coreason_budget")
        make_manager().ping()
        assert checked == {redis_url.replace("redis+cluster://", "redis://")}
        assert coverage_warnings(caplog) == []

    @pytest.mark.timeout(60)
    def test_config_disabled_is_skipped(self, caplog: pytest.LogCaptureFixture) -> None:
        """CONFIG renamed away, as on managed services: no warning, no error, calls work."""
        caplog.set_level(logging.WARNING, logger="coreason_budget")
        with running_cluster(
            require_full_coverage=True, extra_args=["--rename-command", "CONFIG", ""]
        ) as servers:
            client = servers.clients()[0]
            with pytest.raises(redis.ResponseError, match="unknown command"):
                client.config_get("cluster-require-full-coverage")
            client.close()
            with BudgetManager(BudgetConfig(redis_url=servers.url, **FAST)) as manager:
                manager.record_spend("alice", 1.0)
                assert manager.usage("alice")["user"].spent_usd == 1.0
            assert servers.url.replace("+cluster", "") in _store._coverage_checked
        assert coverage_warnings(caplog) == []
