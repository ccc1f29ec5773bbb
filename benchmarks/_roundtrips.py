"""
Round trips per operation, counted on the server, so the count is exact and noise-free.

``INFO commandstats`` deltas count every command the server ran, including
the ones a Lua script runs inside one EVALSHA; a round trip is only what the
client sent. So while the operations run, MONITOR labels each command with its
origin (``lua`` or a client address): round trips are the client's commands,
and the commandstats total is checked against MONITOR's total so neither count
can silently drift from the other.
"""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from collections.abc import Callable

import attrs
import redis

#: Commands of the counting machinery itself, and the handshake of a new connection
#: (HELLO, CLIENT SETNAME/SETINFO): once per connection, not per operation.
_OWN = frozenset({"info", "monitor", "echo", "hello", "client"})


@attrs.frozen
class Trips:
    round_trips: float  # commands sent by the client, per operation
    server_commands: float  # every command the server ran, inside scripts too, per operation
    breakdown: str  # e.g. "evalsha (in scripts: hget 6, time 1)"


def commandstats(client: redis.Redis) -> Counter[str]:
    stats = client.info("commandstats")
    return Counter(
        {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items() if k != "errorstat"}
    )


def count(client: redis.Redis, op: Callable[[], object], n: int = 10) -> Trips:
    """Run *op* n times alone on the server (after one warm-up call) and count per call."""
    op()  # connects, loads scripts: one-time costs are not per-operation costs
    token = f"bench-stop-{uuid.uuid4().hex}"
    sent: Counter[str] = Counter()
    scripted: Counter[str] = Counter()
    ready = threading.Event()

    def listen() -> None:
        with client.monitor() as monitor:
            ready.set()
            while True:
                line = monitor.next_command()
                name = line["command"].split(" ", 1)[0].lower()
                if name == "echo" and token in line["command"]:
                    return
                if name in _OWN:
                    continue
                (scripted if line["client_type"] == "lua" else sent)[name] += 1

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    ready.wait(5)
    before = commandstats(client)
    for _ in range(n):
        op()
    client.echo(token)
    listener.join(10)
    delta = commandstats(client) - before
    for own in _OWN:
        delta.pop(own, None)
    total = sum(delta.values())
    monitored = sum(sent.values()) + sum(scripted.values())
    if total != monitored:
        raise RuntimeError(f"commandstats counted {total} commands but MONITOR saw {monitored}")
    return Trips(
        round_trips=sum(sent.values()) / n,
        server_commands=total / n,
        breakdown=describe(sent, scripted, n),
    )


def describe(sent: Counter[str], scripted: Counter[str], n: int) -> str:
    def per_op(counts: Counter[str]) -> str:
        return ", ".join(f"{k} {v / n:g}" for k, v in sorted(counts.items()))

    text = per_op(sent)
    if scripted:
        text += f" (in scripts: {per_op(scripted)})"
    return text
