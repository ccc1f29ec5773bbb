"""
The ledger: key names, and the one registered Lua script every operation calls.

Keys all start with the hash tag ``{prefix}`` so that the keys of any one
operation (user, project and global counters, limits, the record) live in one
Redis Cluster slot, as a multi-key script requires. Ids always come after the
tag and after a fixed-grammar part of the key, so no id can change the tag or
collide with another kind of key, whatever characters it holds.
"""

from __future__ import annotations

import contextlib
import datetime
import time
from collections.abc import Callable, Iterator, Sequence
from importlib.resources import files
from typing import Any, Literal, NoReturn

import attrs
import redis

from .exceptions import (
    BudgetError,
    BudgetExceededError,
    BudgetUnavailableError,
    IdempotencyConflictError,
    InvalidInputError,
)

DAY_MS = 86_400_000
UNLIMITED = -1
#: user, project, global and model; the script's header gives the count as one digit.
MAX_SCOPES = 4
_EPOCH = datetime.date(1970, 1, 1).toordinal()
_LUA = files(__package__).joinpath("ledger.lua").read_text(encoding="utf-8")


#: The letter each scope's counter fields start with ("u:<id>"); the global
#: scope is the one field "g". Known here only: elsewhere scopes have names.
_LETTERS = {"user": "u", "project": "p", "model": "m"}
_KINDS = {letter: name for name, letter in _LETTERS.items()}
GLOBAL = "g"


def field(scope: str, entity: str | None = None) -> str:
    """The counter field of a scope: field("user", "alice") == "u:alice"; describe's inverse."""
    return GLOBAL if scope == "global" else f"{_LETTERS[scope]}:{entity}"


def describe(field: str) -> tuple[str, str | None]:
    """The scope a counter field names: ("user", "alice"), ("global", None), ..."""
    if field == GLOBAL:
        return "global", None
    kind, _, entity = field.partition(":")
    name = _KINDS.get(kind)
    if name is None or not entity:
        raise ValueError(f"not a counter field: {field!r}")
    return name, entity


@attrs.frozen
class Scopes:
    """
    The counters one operation touches, narrowest first, and their default limits.

    The manager builds one per (user, project, model) and reuses it, so that
    the hot path only reads what is precomputed here: the fields already
    encoded for the wire, the header words that carry the limits, and the
    scopes as a reservation record keeps them.
    """

    fields: tuple[str, ...]
    limits: str  # the script header's tail: "n d1 .. dn"
    wire: tuple[bytes, ...]
    record: bytes  # as a reservation record keeps them: "n len1 .. lenn\n" + the fields

    @classmethod
    def of(cls, pairs: Sequence[tuple[str, int]]) -> Scopes:
        """From (field, default limit in nano-dollars, or UNLIMITED) pairs."""
        fields = tuple(field for field, _ in pairs)
        limits = " ".join([str(len(pairs)), *(str(limit) for _, limit in pairs)])
        wire = tuple(f.encode() for f in fields)
        head = " ".join([str(len(wire)), *(str(len(w)) for w in wire)])  # n, byte lengths
        return cls(fields, limits, wire, head.encode() + b"\n" + b"".join(wire))

    @classmethod
    def tracked(cls, fields: Sequence[str]) -> Scopes:
        """
        Counters without limits: enough to replay a spooled spend or settlement,
        which never check limits. Raises ValueError for a string that is not a field.
        """
        if not 0 < len(fields) <= MAX_SCOPES:
            raise ValueError(f"{len(fields)} counter fields, not 1 to {MAX_SCOPES}")
        for field in fields:
            describe(field)
        return cls.of([(field, UNLIMITED) for field in fields])


@attrs.frozen
class Held:
    """What the store says a reservation holds."""

    state: str
    day: int
    held_nano: int


class Ledger:
    """
    Calls the script and turns its replies into values and exceptions.

    The day is decided by the Redis server's clock (the one clock every
    worker shares) unless a *clock* is injected; key names must still be
    sent in KEYS, so the client guesses the day from its own clock plus the
    skew it last learned, and the script sends it back with the right day in
    the rare case (drift across midnight) that the guess was wrong.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        prefix: str,
        retention_seconds: int,
        idempotency_ttl_seconds: int,
        pool_size: int,
        pool_timeout: float,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._client = client
        self._script = client.register_script(_LUA)
        self._tag = "{" + prefix + "}"
        self._limits_key = f"{self._tag}:limits"
        # Constant arguments go over the wire as bytes: redis-py sends bytes as they are.
        self._limits_wire = self._limits_key.encode()
        self._limits_only = (self._limits_wire,)
        self._ttls = f"{retention_seconds * 1000} {idempotency_ttl_seconds * 1000}"
        self._clock = clock
        self._skew_ms = 0
        self._day_key = (-1, b"")
        self._errors = _StoreErrors(pool_size, pool_timeout, self._reached)
        #: Called after every call the store answered (the script's own answer,
        #: a refusal included): the one place the manager's spool replay is started from.
        self.on_reached: Callable[[], None] = _nothing

    def _reached(self) -> None:
        self.on_reached()

    # -- key names -----------------------------------------------------------

    def day_key(self, day: int) -> str:
        return self._day_wire(day).decode()

    def _day_wire(self, day: int) -> bytes:
        # Cached: every call names today's key, and formatting a date is not free.
        cached = self._day_key
        if cached[0] != day:
            name = f"{self._tag}:day:{day_date(day).isoformat()}"
            cached = self._day_key = (day, name.encode())
        return cached[1]

    def reservation_key(self, reservation_id: str) -> str:
        return f"{self._tag}:res:{reservation_id}"

    def operation_key(self, operation_id: str) -> str:
        return f"{self._tag}:op:{operation_id}"

    # -- operations ----------------------------------------------------------

    def reserve(self, scopes: Scopes, amount: int, reservation_id: str) -> Held:
        """
        Hold *amount* in every scope, or raise BudgetExceededError having written nothing.

        A retry with the same id returns the hold the first call took; the same
        id with other scopes or another amount raises IdempotencyConflictError.
        """
        keys = (self.reservation_key(reservation_id), self._limits_wire)
        reply = self._call("reserve", amount, scopes, keys, with_record=True)
        if type(reply) is int:
            return Held(state="held", day=reply, held_nano=amount)
        with _decoding(reply):
            if reply[0] == "NO":
                self._refuse(reply, scopes, amount)
            _refuse_write(reply, scopes, f"reservation_id {reservation_id!r}")
            _, state, held_day, held = reply  # DUP: the hold this id already took
            if state not in STATES:
                raise ValueError(state)
            return Held(state=state, day=int(held_day), held_nano=_held(held))

    def settle(
        self,
        scopes: Scopes,
        reservation_id: str,
        day: int,
        actual: int,
        state: str,
    ) -> tuple[str, str]:
        """
        Settle a hold to *actual* (0 for a release); the first settlement wins.

        Returns ("OK", state), ("DONE", the state an earlier settlement left)
        or ("GONE", "recorded" | "expired") when the store had no such hold.
        """
        op = _SETTLE_OPS[state]
        keys = (self.reservation_key(reservation_id),)
        reply = self._call(op, actual, scopes, keys, day=day, with_record=True)
        if type(reply) is int:
            return ("OK", state)
        with _decoding(reply):
            _refuse_write(reply, scopes, f"reservation {reservation_id!r}")
            return (str(reply[0]), str(reply[1]))

    def spend(
        self, scopes: Scopes, amount: int, operation_id: str
    ) -> Literal["recorded", "duplicate"]:
        """
        Record *amount* in every scope, once per operation id, limits notwithstanding.

        "duplicate": this id already paid for exactly this; the same id for
        another payment raises IdempotencyConflictError, writing nothing.
        """
        reply = self._call(
            "spend", amount, scopes, (self.operation_key(operation_id),), with_record=True
        )
        if type(reply) is int:
            return "recorded"
        with _decoding(reply):
            _refuse_write(reply, scopes, f"idempotency_key {operation_id!r}")
        return "duplicate"

    def replay_spend(
        self, scopes: Scopes, amount: int, operation_id: str, day: int
    ) -> Literal["recorded", "duplicate", "expired"]:
        """
        Record a spend made on *day* (today or earlier) that never reached the store.

        The same operation id as the original call, so a spend that did reach
        the store (only its reply was lost) is not charged again. Returns
        "recorded", "duplicate", or "expired" (the day is past retention).
        """
        key = (self.operation_key(operation_id),)
        reply = self._call("replay", amount, scopes, key, day=day, with_record=True)
        if type(reply) is int:
            return "recorded"
        with _decoding(reply):
            _refuse_write(reply, scopes, f"idempotency_key {operation_id!r}")
        return "duplicate" if reply[0] == "DUP" else "expired"

    def seconds_to_next_day(self) -> int:
        """Seconds until the next day begins, by the clock that decides the day (at least 1)."""
        left_ms = DAY_MS - self._now_ms() % DAY_MS
        return max(1, -(-left_ms // 1000))

    def today(self) -> int:
        """The day a call made now would name (the client's guess; the script has the last word)."""
        return self._now_ms() // DAY_MS

    def check(self, scopes: Scopes, amount: int) -> None:
        """Raise BudgetExceededError if *amount* does not fit; never writes."""
        reply = self._call("check", amount, scopes, self._limits_only)
        if type(reply) is not int:
            with _decoding(reply):
                self._refuse(reply, scopes, amount)

    def usage(self, scopes: Scopes) -> list[tuple[int, int]]:
        """(spent, limit) in nano-dollars per scope, open holds counted as spent."""
        reply = self._call("usage", 0, scopes, self._limits_only)
        with _decoding(reply):
            values = [int(v) for v in reply[1:]]
            if len(values) != 2 * len(scopes.fields):
                raise ValueError("not one (spent, limit) pair per scope")
            return list(zip(values[::2], values[1::2], strict=True))

    def today_by_store(self) -> int:
        """Today's day number by the store's clock (the one every worker shares)."""
        day: int = self._call("today", 0, _NO_SCOPES, ())  # only ever the int day
        return day

    def counters(self, day: int) -> Iterator[tuple[str, int]]:
        """
        Every counter of *day*, read incrementally: each HSCAN step is short, so
        a day with a million fields never holds the store for other callers.
        A field written meanwhile may be read with either value.
        """
        with self._errors:
            for field, value in self._client.hscan_iter(self.day_key(day), count=_SCAN_COUNT):
                with _decoding(value):
                    yield field, int(value)

    def overrides(self, fields: Sequence[str]) -> dict[str, int]:
        """The limit overrides of *fields* (those that have one)."""
        if not fields:
            return {}
        with self._errors:
            values = self._client.hmget(self._limits_key, list(fields))
        with _decoding(values):
            return {f: int(v) for f, v in zip(fields, values, strict=True) if v is not None}

    def lookup(self, reservation_id: str) -> tuple[Held, list[str]] | None:
        """A reservation's state and the counter fields it holds in, or None if unknown."""
        with self._errors:
            record: str | None = self._client.get(  # type: ignore[assignment]
                self.reservation_key(reservation_id)
            )
        if record is None:
            return None
        with _decoding(record):
            # "<state> <day> <held> " + Scopes.record: "<n> <byte lengths>\n<fields>".
            head, _, body = record.partition("\n")
            state, day, held, _, *lengths = head.split(" ")
            data, fields, at = body.encode(), [], 0
            for length in map(int, lengths):
                fields.append(data[at : at + length].decode())
                at += length
            if state not in STATES:
                raise ValueError(state)
            return Held(state=state, day=int(day), held_nano=_held(held)), fields

    def ping(self) -> None:
        with self._errors:
            self._client.ping()

    def set_limit(self, field: str, limit_nano: int | None) -> None:
        with self._errors:
            if limit_nano is None:
                self._client.hdel(self._limits_key, field)
            else:
                self._client.hset(self._limits_key, field, str(limit_nano))

    # -- plumbing ------------------------------------------------------------

    def _now_ms(self) -> int:
        if self._clock is not None:
            return int(self._clock() * 1000)
        return int(time.time() * 1000) + self._skew_ms

    def _call(
        self,
        op: str,
        amount: int,
        scopes: Scopes,
        keys_after_day: tuple[str | bytes, ...],
        day: int | None = None,
        with_record: bool = False,
    ) -> Any:
        """
        One script call: its reply, an int (the day booked) or a list.

        *keys_after_day*: the record (writes), then the limits (ops that read them).
        *with_record*: send the scopes as a reservation record keeps them too.
        """
        # Twice is enough: the second attempt uses the day the server named.
        for _ in range(2):
            now = self._now_ms()
            stamp = "-" if self._clock is None else str(now)
            the_day = day if day is not None else now // DAY_MS
            keys = [self._day_wire(the_day), *keys_after_day]
            args: list[str | bytes] = [
                f"{op} {the_day} {stamp} {amount} {self._ttls} {scopes.limits}",
                *scopes.wire,
            ]
            if with_record:
                args.append(scopes.record)
            try:
                try:
                    reply: Any = self._script(keys=keys, args=args)
                except redis.exceptions.NoScriptError:
                    # redis-py reloads the script once; flushed again before its retry
                    # (a restart storm, repeated SCRIPT FLUSH): nothing ran, so once more.
                    reply = self._script(keys=keys, args=args)
            except Exception as e:
                # Whatever the client library raises (redis-py's errors, and its
                # own bugs on a peer's garbage): the store could not answer.
                raise BudgetUnavailableError(self._errors.message(e)) from e
            # Success is the day the call named, nothing else: any other integer
            # (a proxy's or an impostor's ":0") is no "yes".
            if type(reply) is int and reply == the_day:
                self.on_reached()
                return reply
            if not isinstance(reply, list) or not reply or not _ANSWERS[op](reply):
                # Not our script's (a bug, or something between us and Redis): never
                # taken for a success, which for a spend would be a charge lost.
                raise BudgetUnavailableError(
                    f"budget store sent a malformed reply: {str(reply)[:200]}"
                )
            if reply[0] != "DAY":
                self.on_reached()
                return reply
            with _decoding(reply):
                self._skew_ms = int(reply[2]) - int(time.time() * 1000)
                server_day = int(reply[1])
            if day is not None:  # a replay dated in the future by a fast clock: today then
                day = min(day, server_day)
        raise BudgetUnavailableError("could not agree with the budget store on today's date")

    @staticmethod
    def _refuse(reply: list[Any], scopes: Scopes, amount: int) -> NoReturn:
        name, entity = describe(scopes.fields[int(reply[1]) - 1])
        raise BudgetExceededError(
            scope=name,
            entity_id=entity,
            limit_nano=int(reply[3]),
            spent_nano=int(reply[2]),
            requested_nano=amount,
        )


_NO_SCOPES = Scopes.of([])
#: Fields per HSCAN step of a report: each step stays well under a millisecond of server time.
_SCAN_COUNT = 1000
#: The settled state a reservation ends in -> the script operation that settles it.
_SETTLE_OPS = {"committed": "commit", "released": "release"}


def _shapes(*shapes: tuple[str, int]) -> Callable[[list[Any]], bool]:
    """A test that a list reply is one the script sends: its first word, its length."""
    lengths = dict(shapes)
    return lambda reply: lengths.get(reply[0]) == len(reply)


_DAY = ("DAY", 3)
#: The states a reservation record may be in.
STATES = frozenset({"held", "committed", "released"})
#: The list replies each operation may get (DAY: any op but a settle's); the
#: values in them are checked where they are read.
_ANSWERS: dict[str, Callable[[list[Any]], bool]] = {
    "reserve": _shapes(("NO", 4), ("DUP", 4), _DAY, ("CONFLICT", 1), ("BIG", 2)),
    "commit": lambda r: _settled(r) or (r[0] in ("BIG", "WRONGDAY") and len(r) == 2),
    "release": lambda r: _settled(r) or (r[0] == "WRONGDAY" and len(r) == 2),
    "spend": _shapes(("DUP", 1), ("GONE", 2), _DAY, ("CONFLICT", 1), ("BIG", 2)),
    "replay": _shapes(("DUP", 1), ("GONE", 2), _DAY, ("CONFLICT", 1), ("BIG", 2)),
    "check": _shapes(("NO", 4), _DAY),
    "usage": lambda r: r[0] == "OK" or (r[0] == "DAY" and len(r) == 3),
    "today": _shapes(_DAY),
}


def _settled(reply: list[Any]) -> bool:
    """DONE with the state an earlier settlement left, or GONE (recorded, expired)."""
    if len(reply) != 2:
        return False
    if reply[0] == "DONE":
        return reply[1] in ("committed", "released")
    return reply[0] == "GONE" and reply[1] in ("recorded", "expired")


class _StoreErrors:
    """
    Any failure of the store is BudgetUnavailableError: callers fail closed on it.

    A context manager for the occasional calls; the script call uses its
    :meth:`message` in a plain ``except``, which costs nothing until it fails.
    One per ledger, to name the pool's bounds when the pool is the problem
    (those of each node's pool, for a cluster).
    """

    def __init__(self, pool_size: int, pool_timeout: float, reached: Callable[[], None]) -> None:
        self._pool_size = pool_size
        self._pool_timeout = pool_timeout
        self._reached = reached

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: object, tb: object) -> None:
        if isinstance(exc, Exception) and not isinstance(exc, BudgetError):
            raise BudgetUnavailableError(self.message(exc)) from exc
        if exc is None:
            self._reached()

    def message(self, exc: Exception) -> str:
        # redis-py's own words, "No connection available.", read like a dead store;
        # a saturated pool calls for a different fix (pool_size, fewer threads).
        if isinstance(exc, redis.ConnectionError) and str(exc) == "No connection available.":
            return (
                f"budget store unavailable: connection pool exhausted (all {self._pool_size} "
                f"connections busy for {self._pool_timeout}s); raise pool_size or pool_timeout, "
                "or make fewer concurrent calls"
            )
        if isinstance(exc, redis.ConnectionError | redis.TimeoutError) and (
            "connecting to" in str(exc)
        ):
            # Refused or unreachable (redis-py's "Error 111 connecting to host:port. ..."):
            # most often no Redis was ever started; say what would fix it.
            return (
                f"budget store unavailable: {str(exc).rstrip('.')}. Start Redis there, point "
                "COREASON_BUDGET_REDIS_URL (redis_url) at one that runs, or use the embedded "
                "store (embedded://PATH, or leave the URL unset)."
            )
        if isinstance(exc, redis.RedisError):
            return f"budget store unavailable: {exc}"
        return f"budget store unavailable: its client failed ({type(exc).__name__}: {exc})"


def day_date(day: int) -> datetime.date:
    """The date of a day number (days since 1970-01-01, UTC), as keys and records name days."""
    return datetime.date.fromordinal(_EPOCH + day)


def date_day(date: datetime.date) -> int:
    """The day number of a date."""
    return date.toordinal() - _EPOCH


def _nothing() -> None:
    return None


def _held(text: str) -> int:
    """A record's held amount; "-" marks a tombstone, which holds nothing."""
    return 0 if text == "-" else int(text)


def _refuse_write(reply: list[Any], scopes: Scopes, what: str) -> None:
    """Raise for a write the script refused before writing anything (CONFLICT, BIG)."""
    if reply[0] == "CONFLICT":
        raise IdempotencyConflictError(
            f"{what} was already used for a different charge (another user, scopes or "
            "amount); nothing was written. Use a new id for a new charge."
        )
    if reply[0] == "WRONGDAY":
        raise InvalidInputError(
            f"{what} belongs to day {day_date(int(reply[1]))}, not the day named; "
            "nothing was written"
        )
    if reply[0] == "BIG":
        name, entity = describe(scopes.fields[int(reply[1]) - 1])
        who = name if entity is None else f"{name} {entity}"
        raise InvalidInputError(
            f"the {who} counter cannot take this amount today: it would pass the largest "
            "amount the store can count (about $9.2 billion), or it holds something that is "
            "not a count; nothing was written"
        )


@contextlib.contextmanager
def _decoding(reply: object) -> Iterator[None]:
    """A reply of the right first word but the wrong shape is not our script's: fail closed."""
    try:
        yield
    except (ValueError, TypeError, IndexError, KeyError, AttributeError) as e:
        if isinstance(e, BudgetError):  # InvalidInputError is a ValueError too
            raise
        raise BudgetUnavailableError(
            f"budget store sent a malformed reply: {str(reply)[:200]}"
        ) from e
