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

from ._steps import Command, Script, Steps
from .exceptions import (
    BudgetError,
    BudgetExceededError,
    BudgetUnavailableError,
    IdempotencyConflictError,
    InvalidInputError,
    UnknownReservationError,
)

DAY_MS = 86_400_000
UNLIMITED = -1
#: user, project, global and model; the script's header gives the count as one digit.
MAX_SCOPES = 4
_EPOCH = datetime.date(1970, 1, 1).toordinal()
#: The ledger script, registered once per client by each driver.
LUA = files(__package__).joinpath("ledger.lua").read_text(encoding="utf-8")


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
    #: False when *held_nano* is not the store's (a handle made without asking it).
    known: bool = True


class Ledger:
    """
    The ledger's operations, sans I/O: each builds the script call (or the
    command) it needs, yields it (see :mod:`._steps`), and turns the reply
    into values and exceptions. A driver, sync or async, does the I/O and
    raises BudgetUnavailableError into the operation when the store fails.

    The day is decided by the Redis server's clock (the one clock every
    worker shares) unless a *clock* is injected; key names must still be
    sent in KEYS, so the client guesses the day from its own clock plus the
    skew it last learned, and the script sends it back with the right day in
    the rare case (drift across midnight) that the guess was wrong.
    """

    def __init__(
        self,
        *,
        prefix: str,
        retention_seconds: int,
        idempotency_ttl_seconds: int,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._tag = "{" + prefix + "}"
        self._limits_key = f"{self._tag}:limits"
        # Constant arguments go over the wire as bytes: redis-py sends bytes as they are.
        self._limits_wire = self._limits_key.encode()
        self._limits_only = (self._limits_wire,)
        self._ttls = f"{retention_seconds * 1000} {idempotency_ttl_seconds * 1000}"
        self._clock = clock
        self._skew_ms = 0
        self._day_key = (-1, b"")
        #: Called after every call the store answered (the script's own answer,
        #: a refusal included): the one place the manager's spool replay is started from.
        self.on_reached: Callable[[], None] = _nothing

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

    def reserve(self, scopes: Scopes, amount: int, reservation_id: str) -> Steps[Held]:
        """
        Hold *amount* in every scope, or raise BudgetExceededError having written nothing.

        A retry with the same id returns the hold the first call took; the same
        id with other scopes or another amount raises IdempotencyConflictError.
        """
        keys = (self.reservation_key(reservation_id).encode(), self._limits_wire)
        reply = yield from self._call("reserve", amount, scopes, keys, with_record=True)
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
        day: int | None,
        actual: int,
        state: str,
    ) -> Steps[tuple[str, str]]:
        """
        Settle a hold to *actual* (0 for a release); the first settlement wins.

        Returns ("OK", state), ("DONE", the state an earlier settlement left)
        or ("GONE", "recorded" | "expired") when the store had no such hold.

        *day* None settles by id alone, in one round trip as well (the HTTP
        service's commit without the hold): the record names its day and
        scopes (*scopes* is then empty); with no record it is
        UnknownReservationError, nothing written.
        """
        op = _SETTLE_OPS[state]
        keys = (self.reservation_key(reservation_id).encode(),)
        guessed = day is None
        for _ in range(2):
            the_day = self.today() if day is None else day
            reply = yield from self._call(op, actual, scopes, keys, day=the_day, with_record=True)
            if type(reply) is int:
                return ("OK", state)
            with _decoding(reply):
                if reply[0] == "WRONGDAY" and guessed:
                    day, guessed = int(reply[1]), False  # its day, as its record says: once more
                    continue
                if reply[0] == "NONE":
                    raise UnknownReservationError(
                        f"no reservation {reservation_id!r} (never made, or expired)"
                    )
                _refuse_write(reply, scopes, f"reservation {reservation_id!r}")
                return (str(reply[0]), str(reply[1]))
        raise BudgetUnavailableError("the budget store named two days for one reservation")

    def spend(self, scopes: Scopes, amount: int, operation_id: str) -> Steps[Spent]:
        """
        Record *amount* in every scope, once per operation id, limits notwithstanding.

        "duplicate": this id already paid for exactly this; the same id for
        another payment raises IdempotencyConflictError, writing nothing.
        """
        key = (self.operation_key(operation_id).encode(),)
        reply = yield from self._call("spend", amount, scopes, key, with_record=True)
        if type(reply) is int:
            return "recorded"
        with _decoding(reply):
            _refuse_write(reply, scopes, f"idempotency_key {operation_id!r}")
        return "duplicate"

    def replay_spend(
        self, scopes: Scopes, amount: int, operation_id: str, day: int
    ) -> Steps[Literal["recorded", "duplicate", "expired"]]:
        """
        Record a spend made on *day* (today or earlier) that never reached the store.

        The same operation id as the original call, so a spend that did reach
        the store (only its reply was lost) is not charged again. Returns
        "recorded", "duplicate", or "expired" (the day is past retention).
        """
        key = (self.operation_key(operation_id).encode(),)
        reply = yield from self._call("replay", amount, scopes, key, day=day, with_record=True)
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

    def check(self, scopes: Scopes, amount: int) -> Steps[None]:
        """Raise BudgetExceededError if *amount* does not fit; never writes."""
        reply = yield from self._call("check", amount, scopes, self._limits_only)
        if type(reply) is not int:
            with _decoding(reply):
                self._refuse(reply, scopes, amount)

    def usage(self, scopes: Scopes) -> Steps[list[tuple[int, int]]]:
        """(spent, limit) in nano-dollars per scope, open holds counted as spent."""
        reply = yield from self._call("usage", 0, scopes, self._limits_only)
        with _decoding(reply):
            values = [int(v) for v in reply[1:]]
            if len(values) != 2 * len(scopes.fields):
                raise ValueError("not one (spent, limit) pair per scope")
            return list(zip(values[::2], values[1::2], strict=True))

    def today_by_store(self) -> Steps[int]:
        """Today's day number by the store's clock (the one every worker shares)."""
        day: int = yield from self._call("today", 0, NO_SCOPES, ())  # only ever the int day
        return day

    def counters(self, day: int, cursor: int) -> Steps[tuple[int, list[tuple[str, int]]]]:
        """
        One HSCAN step over the counters of *day*: the next cursor (0: done) and
        the counters read. Each step is short, so a day with a million fields
        never holds the store for other callers. A field written meanwhile may
        be read with either value.
        """
        reply = yield Command(
            "hscan", (self.day_key(day),), {"cursor": cursor, "count": _SCAN_COUNT}
        )
        self.on_reached()
        with _decoding(reply):
            after, values = reply
            return int(after), [(field, int(value)) for field, value in values.items()]

    def overrides(self, fields: Sequence[str]) -> Steps[dict[str, int]]:
        """The limit overrides of *fields* (those that have one)."""
        if not fields:
            return {}
        values = yield Command("hmget", (self._limits_key, list(fields)))
        self.on_reached()
        with _decoding(values):
            return {f: int(v) for f, v in zip(fields, values, strict=True) if v is not None}

    def lookup(self, reservation_id: str) -> Steps[tuple[Held, list[str]] | None]:
        """A reservation's state and the counter fields it holds in, or None if unknown."""
        record = yield Command("get", (self.reservation_key(reservation_id),))
        self.on_reached()
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

    def ping(self) -> Steps[None]:
        yield Command("ping")
        self.on_reached()

    def set_limit(self, field: str, limit_nano: int | None) -> Steps[None]:
        if limit_nano is None:
            yield Command("hdel", (self._limits_key, field))
        else:
            yield Command("hset", (self._limits_key, field, str(limit_nano)))
        self.on_reached()

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
        keys_after_day: tuple[bytes, ...],
        day: int | None = None,
        with_record: bool = False,
    ) -> Steps[Any]:
        """
        One script call: its reply, an int (the day booked) or a list.

        *keys_after_day*: the record (writes), then the limits (ops that read them).
        *with_record*: send the scopes as a reservation record keeps them too.
        """
        # Twice is enough: the second attempt uses the day the server named.
        for _ in range(2):
            if day is not None and self._clock is None:
                the_day, stamp = day, "-"  # a settlement's day, by the store's clock: no time read
            else:
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
            reply: Any = yield Script(keys, args)
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


#: What a spend's call answers: "recorded" now, or "duplicate" (this id paid before).
Spent = Literal["recorded", "duplicate"]
NO_SCOPES = Scopes.of([])
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
    "commit": lambda r: (
        _settled(r) or (r[0] in ("BIG", "WRONGDAY") and len(r) == 2) or r == ["NONE"]
    ),
    "release": lambda r: _settled(r) or (r[0] == "WRONGDAY" and len(r) == 2) or r == ["NONE"],
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


def store_unavailable(
    exc: Exception, pool_size: int, pool_timeout: float
) -> BudgetUnavailableError:
    """
    What any failure of the store's client means to a caller: BudgetUnavailableError
    (fail closed), in words that say what would fix it. Every driver maps
    whatever its client raises through here.
    """
    # redis-py's own words, "No connection available.", read like a dead store;
    # a saturated pool calls for a different fix (pool_size, fewer threads).
    if isinstance(exc, redis.ConnectionError) and str(exc) == "No connection available.":
        message = (
            f"budget store unavailable: connection pool exhausted (all {pool_size} "
            f"connections busy for {pool_timeout}s); raise pool_size or pool_timeout, "
            "or make fewer concurrent calls"
        )
    elif isinstance(exc, redis.ConnectionError | redis.TimeoutError) and (
        "connecting to" in str(exc)
    ):
        # Refused or unreachable (redis-py's "Error 111 connecting to host:port. ..."):
        # most often no Redis was ever started; say what would fix it.
        message = (
            f"budget store unavailable: {str(exc).rstrip('.')}. Start Redis there, point "
            "COREASON_BUDGET_REDIS_URL (redis_url) at one that runs, or use the embedded "
            "store (embedded://PATH, or leave the URL unset)."
        )
    elif isinstance(exc, redis.RedisError):
        message = f"budget store unavailable: {exc}"
    elif isinstance(exc, TimeoutError):  # asyncio's bound on a whole call
        message = "budget store unavailable: it did not answer within its timeout"
    else:
        message = f"budget store unavailable: its client failed ({type(exc).__name__}: {exc})"
    error = BudgetUnavailableError(message)
    error.__cause__ = exc
    return error


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
    """Raise for a write the script refused before writing anything (CONFLICT, BIG, WRONGDAY)."""
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
