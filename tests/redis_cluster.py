"""
A real three-master Redis Cluster for the tests, built by the suite itself.

Three redis-servers (the binary the rest of the suite uses) start with
``--cluster-enabled yes``; the fixture then assigns the slots and introduces
the nodes itself (CLUSTER ADDSLOTS, SET-CONFIG-EPOCH, MEET), so neither
redis-cli nor redis-trib is needed. No replicas: failover is Redis's business,
the library only has to route, retry and fail closed.

The nodes run with ``cluster-require-full-coverage no``, the setting the README
asks operators for (a dead master stops only its own slots); pass
``require_full_coverage=True`` for Redis's default, under which every node
refuses every key once any master has been marked failed.

``python -m tests.redis_cluster --measure`` starts a cluster and measures
reserve+commit throughput on one prefix (one shard) against three prefixes on
three shards.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import redis

from .redis_server import redis_server_bin

SLOTS = 16384
#: Redis 6.2 has no ``cluster-port``: the bus listens on port + 10000.
BUS_OFFSET = 10000


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_cluster_port() -> int:
    """A free port whose bus port (+10000) is free too, both below the ephemeral range."""
    for _ in range(1000):
        port = random.randrange(10000, 22000)
        if _bindable(port) and _bindable(port + BUS_OFFSET):
            return port
    raise RuntimeError("no free port pair for a cluster node")


def slot_ranges(masters: int) -> list[tuple[int, int]]:
    """Contiguous, inclusive slot ranges, as redis-cli splits them (0-5460, 5461-10922, ...)."""
    per = SLOTS / masters
    return [(round(i * per), round((i + 1) * per) - 1) for i in range(masters)]


class RedisClusterServers:
    """N masters on free loopback ports, slots split evenly, no persistence."""

    def __init__(
        self,
        masters: int = 3,
        *,
        require_full_coverage: bool = False,
        node_timeout_ms: int = 2000,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.masters = masters
        self.require_full_coverage = require_full_coverage
        self.node_timeout_ms = node_timeout_ms
        self.extra_args = list(extra_args)
        self.dir = tempfile.mkdtemp(prefix="cb-cluster-")
        self.ports: list[int] = []
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.ports[0]}"

    def start(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        try:
            for _ in range(self.masters):
                self._start_node(deadline)
        except BaseException:
            self.stop()
            raise
        clients = self.clients()
        try:
            for i, (client, (low, high)) in enumerate(
                zip(clients, slot_ranges(self.masters), strict=True)
            ):
                client.execute_command("CLUSTER", "ADDSLOTS", *range(low, high + 1))  # type: ignore[no-untyped-call]
                # Distinct epochs up front, as redis-cli does: no collisions to resolve.
                client.execute_command("CLUSTER", "SET-CONFIG-EPOCH", i + 1)  # type: ignore[no-untyped-call]
            for port in self.ports[1:]:
                clients[0].execute_command("CLUSTER", "MEET", "127.0.0.1", port)  # type: ignore[no-untyped-call]
            self.wait_ready(deadline)
        except BaseException:
            self.stop()
            raise
        finally:
            for c in clients:
                c.close()

    def _start_node(self, deadline: float, port: int | None = None) -> subprocess.Popen[bytes]:
        """Start a node (on *port*, or a free one); a lost race for a free port tries another."""
        while True:
            node_port = free_cluster_port() if port is None else port
            args = [
                redis_server_bin(),
                "--port", str(node_port),
                "--bind", "127.0.0.1",
                "--cluster-enabled", "yes",
                "--cluster-config-file", f"{self.dir}/nodes-{node_port}.conf",
                "--cluster-node-timeout", str(self.node_timeout_ms),
                "--cluster-require-full-coverage",
                "yes" if self.require_full_coverage else "no",
                "--save", "",
                "--appendonly", "no",
                "--dir", self.dir,
                "--daemonize", "no",
                *self.extra_args,
            ]  # fmt: skip
            proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            client = redis.Redis(port=node_port, socket_connect_timeout=0.2)
            try:
                while True:
                    try:
                        client.ping()
                        if port is None:
                            self.ports.append(node_port)
                            self.procs.append(proc)
                        return proc
                    except redis.ConnectionError:
                        if proc.poll() is not None and port is None:
                            break  # lost a race for the port: try another
                        if proc.poll() is not None or time.monotonic() > deadline:
                            proc.kill()
                            proc.wait()
                            raise RuntimeError(
                                f"redis-server did not start on {node_port}"
                            ) from None
                        time.sleep(0.02)
            finally:
                client.close()

    def kill(self, index: int) -> None:
        """Kill one master at once, as a crash would (its data goes; its nodes.conf stays)."""
        proc = self.procs[index]
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()

    def restart(self, index: int, timeout: float = 30.0) -> None:
        """Start a killed master again on its port; it rejoins with its slots, empty."""
        deadline = time.monotonic() + timeout
        self.procs[index] = self._start_node(deadline, self.ports[index])
        self.wait_ready(deadline)

    def pause(self, index: int) -> None:
        """Stall one master (SIGSTOP): it accepts connections and never answers."""
        self.procs[index].send_signal(signal.SIGSTOP)

    def resume(self, index: int) -> None:
        self.procs[index].send_signal(signal.SIGCONT)

    def wait_failed(self, index: int, timeout: float = 30.0) -> float:
        """
        Wait until every other master flags master *index* ``fail`` (not just
        ``fail?``): past cluster-node-timeout, once a majority agreed. Returns
        the seconds waited.
        """
        start = time.monotonic()
        others = [p for i, p in enumerate(self.ports) if i != index]
        target = f":{self.ports[index]}@"
        while True:
            flagged = 0
            for port in others:
                client = redis.Redis(port=port, decode_responses=True, socket_timeout=10)
                try:
                    nodes: str = client.execute_command("CLUSTER", "NODES")  # type: ignore[no-untyped-call]
                finally:
                    client.close()
                for line in nodes.splitlines():
                    fields = line.split()
                    if target in fields[1] and "fail" in fields[2].split(","):
                        flagged += 1
            if flagged == len(others):
                return time.monotonic() - start
            if time.monotonic() - start > timeout:
                raise RuntimeError(f"master {self.ports[index]} was not marked failed")
            time.sleep(0.05)

    def cluster_state(self, index: int) -> str:
        """``ok`` or ``fail``, as master *index* sees the cluster."""
        client = self.clients()[index]
        try:
            info: str = client.execute_command("CLUSTER", "INFO")  # type: ignore[no-untyped-call]
        finally:
            client.close()
        return dict(line.split(":", 1) for line in info.split() if ":" in line)["cluster_state"]

    def unassign_slots_of(self, index: int) -> None:
        """
        On every other master, forget who owns master *index*'s slots (CLUSTER
        DELSLOTS): the slot map the cluster reports then has a hole. A master
        that comes back claims its slots again.
        """
        low, high = slot_ranges(self.masters)[index]
        for i, client in enumerate(self.clients()):
            try:
                if i != index:
                    client.execute_command("CLUSTER", "DELSLOTS", *range(low, high + 1))  # type: ignore[no-untyped-call]
            finally:
                client.close()

    def wait_ready(self, deadline: float) -> None:
        clients = self.clients()
        try:
            while not all(self._ready(c) for c in clients):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"cluster on ports {self.ports} is not ready")
                time.sleep(0.05)
        finally:
            for c in clients:
                c.close()

    def _ready(self, client: redis.Redis) -> bool:
        try:
            info: str = client.execute_command("CLUSTER", "INFO")  # type: ignore[no-untyped-call]
        except redis.ConnectionError:
            return False
        fields = dict(line.split(":", 1) for line in info.split() if ":" in line)
        return (
            fields.get("cluster_state") == "ok"
            and fields.get("cluster_known_nodes") == str(self.masters)
            and fields.get("cluster_slots_assigned") == str(SLOTS)
        )

    def clients(self) -> list[redis.Redis]:
        """A plain (non-cluster) client per master, in slot order."""
        return [redis.Redis(port=p, decode_responses=True, socket_timeout=10) for p in self.ports]

    def flush(self) -> None:
        for client in self.clients():
            client.flushall()
            client.script_flush()
            client.close()

    def keyslot(self, key: str) -> int:
        client = redis.Redis(port=self.ports[0], decode_responses=True)
        try:
            return int(client.execute_command("CLUSTER", "KEYSLOT", key))  # type: ignore[no-untyped-call]
        finally:
            client.close()

    def port_of_slot(self, slot: int) -> int:
        for port, (low, high) in zip(self.ports, slot_ranges(self.masters), strict=True):
            if low <= slot <= high:
                return port
        raise ValueError(slot)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def prefixes_on_distinct_masters(servers: RedisClusterServers, base: str = "tenant") -> list[str]:
    """One key prefix per master: ``base-N`` for the first N whose tag lands there."""
    found: dict[int, str] = {}
    n = 0
    while len(found) < servers.masters:
        prefix = f"{base}-{n}"
        found.setdefault(servers.port_of_slot(servers.keyslot("{" + prefix + "}")), prefix)
        n += 1
    return [found[port] for port in servers.ports]


@contextlib.contextmanager
def running_cluster(masters: int = 3, **options: Any) -> Iterator[RedisClusterServers]:
    """A started cluster, stopped on exit; *options* as RedisClusterServers takes them."""
    servers = RedisClusterServers(masters, **options)
    servers.start()
    try:
        yield servers
    finally:
        servers.stop()


# -- measurement -------------------------------------------------------------------


def _worker(url: str, prefix: str, threads: int, seconds: float, barrier: Any, out: Any) -> None:
    """One process: *threads* threads doing reserve+commit on *prefix* for *seconds*."""
    from coreason_budget import BudgetConfig, BudgetManager

    config = BudgetConfig(
        redis_url=url,
        key_prefix=prefix,
        daily_user_limit_usd=1e6,
        daily_project_limit_usd=1e6,
        daily_global_limit_usd=1e6,
    )
    with BudgetManager(config) as manager:
        manager.reserve("warm-up", 0.0).release()
        counts = [0] * threads
        barrier.wait()  # every process imported, connected and warmed up
        stop = time.monotonic() + seconds

        def run(i: int) -> None:
            user = f"u{i}"
            n = 0
            while time.monotonic() < stop:
                manager.reserve(user, 0.001, project_id="p").commit(0.0005)
                n += 1
            counts[i] = n

        pool = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
    out.put(sum(counts))


def _server_stats(servers: RedisClusterServers) -> list[tuple[int, float, float]]:
    """Per master: (EVALSHA calls, their total usec, CPU seconds used)."""
    stats = []
    for client in servers.clients():
        commands = client.info("commandstats").get("cmdstat_evalsha", {})
        cpu = client.info("cpu")
        stats.append(
            (
                int(commands.get("calls", 0)),
                float(commands.get("usec", 0)),
                float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
            )
        )
        client.close()
    return stats


def measure(
    servers: RedisClusterServers,
    prefixes: Sequence[str],
    processes: int,
    threads: int,
    seconds: float,
) -> dict[str, float]:
    """reserve+commit pairs per second with *processes* x *threads* callers over *prefixes*."""
    servers.flush()
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    barrier = ctx.Barrier(processes)
    procs = [
        ctx.Process(
            target=_worker,
            args=(servers.url, prefixes[i % len(prefixes)], threads, seconds, barrier, out),
        )
        for i in range(processes)
    ]
    for p in procs:
        p.start()
    # Statistics from here on: the workers' imports take longer than this.
    for client in servers.clients():
        client.config_resetstat()
        client.close()
    before = _server_stats(servers)
    total = sum(out.get(timeout=seconds + 60) for _ in procs)
    for p in procs:
        p.join()
    stats = _server_stats(servers)
    busiest = max(range(len(stats)), key=lambda i: stats[i][0])
    calls = sum(s[0] for s in stats)
    return {
        "pairs_per_s": total / seconds,
        "usec_per_script_call": sum(s[1] for s in stats) / calls if calls else 0.0,
        # Includes the workers' warm-up and teardown: an upper bound on the run's CPU.
        "busiest_shard_cpu": (stats[busiest][2] - before[busiest][2]) / seconds,
        "shards_used": sum(1 for s in stats if s[0] > 10),
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--measure", action="store_true", help="run the throughput measurement")
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    with running_cluster() as servers:
        print(f"cluster up: {servers.url} (ports {servers.ports})", flush=True)
        if not args.measure:
            print("Ctrl-C stops it")
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    time.sleep(3600)
            return
        spread = prefixes_on_distinct_masters(servers)
        rounds = [("one prefix", spread[:1]), ("three prefixes", spread)] * args.rounds
        for label, prefixes in rounds:
            r = measure(servers, prefixes, args.processes, args.threads, args.seconds)
            in_script = 1e6 / r["usec_per_script_call"] / 2
            print(
                f"{label:>15}: {r['pairs_per_s']:6.0f} reserve+commit/s over "
                f"{r['shards_used']:.0f} shard(s), {args.processes} processes x "
                f"{args.threads} threads; script {r['usec_per_script_call']:.1f} us/call "
                f"(<= {in_script:,.0f} pairs/s a shard if scripts were all it did); "
                f"busiest shard {r['busiest_shard_cpu']:.0%} of a core"
            )


if __name__ == "__main__":
    main()
