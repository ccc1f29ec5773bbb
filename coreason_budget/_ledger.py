"""
The ledger: key names, and the one registered Lua script every operation calls.

Keys all start with the hash tag ``{prefix}`` so that the keys of any one
operation (user, project and global counters, limits, the record) live in one
Redis Cluster slot, as a multi-key script requires. Ids always come after the
tag and after a fixed-grammar part of the key, so no id can change the tag or
collide with another kind of key, whatever characters it holds.
"""

from __future__ import annotations

import binascii
import contextlib
import datetime
import hashlib
import time
from collections.abc import Callable, Iterator, Sequence
from importlib.resources import files
from typing import Any, Literal, NamedTuple, NoReturn

import attrs
import redis

from ._steps import Command, Script, Steps
from ._windows import WINDOWS, Calendar, Period
from .exceptions import (
    BudgetError,
    BudgetExceededError,
    BudgetUnavailableError,
    IdempotencyConflictError,
    InvalidInputError,
    UnknownReservationError,
)

UNLIMITED = -1
DAY_MS = 86_400_000
#: The last instant (ms) a hold or a spooled charge may name: 9999-12-31T23:59:59.999Z.
MAX_AT = 253_402_300_799_999
#: user, project, model and global.
MAX_SCOPES = 4
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
    encoded for the wire, the words that carry the limits, and the
    scopes as a reservation record keeps them.
    """

    fields: tuple[str, ...]
    limits: tuple[str, ...]  # n x k default limits, scope by scope, window by window
    wire: tuple[bytes, ...]
    record: bytes  # as a reservation record keeps them: "n len1 .. lenn\n" + the fields
    count: str  # how many, for the script's arguments

    @classmethod
    def of(cls, pairs: Sequence[tuple[str, Sequence[int]]]) -> Scopes:
        """From (field, default limit per kept window in nano-dollars or UNLIMITED) pairs."""
        fields = tuple(field for field, _ in pairs)
        limits = tuple(str(limit) for _, per_window in pairs for limit in per_window)
        wire = tuple(f.encode() for f in fields)
        head = " ".join([str(len(wire)), *(str(len(w)) for w in wire)])  # n, byte lengths
        return cls(fields, limits, wire, head.encode() + b"\n" + b"".join(wire), str(len(wire)))

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
        return cls.of([(field, ()) for field in fields])


@attrs.frozen
class Held:
    """What the store says a reservation holds."""

    state: str
    #: When the hold was taken (ms since the epoch, by the store's clock): its
    #: periods, which it settles in whenever it is settled.
    at: int
    held_nano: int
    #: False when *held_nano* is not the store's (a handle made without asking it).
    known: bool = True


_blake2b = hashlib.blake2b
_b64 = binascii.b2a_base64


class Marker(NamedTuple):
    """
    Where an operation id's marker lives, and what it says: a field (9 bytes of
    the id's digest, 72 bits: a clash among the ids of one bucket and day is
    beyond any volume) of one of *count* small hashes per UTC day (the bucket:
    4 more bytes of the digest), holding a 6-byte digest of what the id paid
    for; both in base64, so that any client (and redis-cli) reads them as text.
    Redis keeps a hash of up to 128 short fields in one compact block
    (listpack): about 25 bytes a marker where a key per id cost about 240.
    """

    bucket: int
    field: bytes
    paid: bytes

    @classmethod
    def of(
        cls, kind: bytes, record_id: str, count: int, paid: tuple[int, Scopes] | None = None
    ) -> Marker:  # (a NamedTuple: one is made for every write)
        """
        *kind*: b"s" (a spend's operation id) or b"r" (a reservation id): two id
        spaces. *paid*: the (amount, scopes) the id pays for or holds, when the
        call writes or compares it (a settlement does not: its record has it).
        """
        digest = _blake2b(kind + b":" + record_id.encode(), digest_size=13).digest()
        what = b""
        if paid is not None:
            amount, scopes = paid
            held = _blake2b(b"%d " % amount + scopes.record, digest_size=6).digest()
            what = _b64(held, newline=False)
        bucket = int.from_bytes(digest[:4], "big") % count
        return cls(bucket, _b64(digest[4:], newline=False), what)

    def buckets(self, tag: str, first: int, count: int) -> list[bytes]:
        """The bucket keys of *count* UTC days from day *first*."""
        return [f"{tag}:ops:{day}:{self.bucket}".encode() for day in range(first, first + count)]


@attrs.frozen
class Frame:
    """The periods a call names: the kept windows' periods of one instant, as keys and words."""

    periods: tuple[Period, ...]
    keys: tuple[bytes, ...]  # the counters of each period
    #: The script's last header words, the same for every call in these periods: the
    #: server's clock ("-"), the TTLs, the number of periods, then start, end of each.
    words: tuple[str, ...]
    #: The instants in every period: [latest start, earliest end).
    first: int
    last: int

    @classmethod
    def of(
        cls, periods: tuple[Period, ...], keys: tuple[bytes, ...], ttls: tuple[str, str]
    ) -> Frame:
        words = ["-", *ttls, str(len(periods))]
        for p in periods:
            words += (str(p.start_ms), str(p.end_ms))
        return cls(
            periods,
            keys,
            tuple(words),
            max(p.start_ms for p in periods),
            min(p.end_ms for p in periods),
        )

    def holds(self, at: int) -> bool:
        return self.first <= at < self.last


class Ledger:
    """
    The ledger's operations, sans I/O: each builds the script call (or the
    command) it needs, yields it (see :mod:`._steps`), and turns the reply
    into values and exceptions. A driver, sync or async, does the I/O and
    raises BudgetUnavailableError into the operation when the store fails.

    Which periods "now" is in is decided by the Redis server's clock (the one
    clock every worker shares) unless a *clock* is injected; key names must
    still be sent in KEYS, so the client guesses the periods from its own
    clock plus the skew it last learned, and the script sends back the time in
    the rare case (drift across a boundary) that the guess was wrong.
    """

    def __init__(
        self,
        *,
        prefix: str,
        retention_seconds: int,
        idempotency_ttl_seconds: int,
        calendar: Calendar | None = None,
        windows: Sequence[str] = ("day",),
        record_buckets: int = 16384,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._tag = "{" + prefix + "}"
        self.calendar = Calendar() if calendar is None else calendar
        #: The windows kept, narrowest first.
        self.windows = tuple(windows)
        self._limits_keys = {w: f"{self._tag}:limits:{w}" for w in WINDOWS}
        # Constant arguments go over the wire as bytes: redis-py sends bytes as they are.
        self._limits_wire = tuple(self._limits_keys[w].encode() for w in self.windows)
        self._ttls = (str(retention_seconds * 1000), str(idempotency_ttl_seconds * 1000))
        self._buckets = record_buckets
        #: The UTC days a retried spend's marker may be on: as many as the TTL spans.
        self._marker_days = idempotency_ttl_seconds * 1000 // DAY_MS + 1
        self._clock = clock
        self._skew_ms = 0
        self._frame: Frame | None = None
        #: Called after every call the store answered (the script's own answer,
        #: a refusal included): the one place the manager's spool replay is started from.
        self.on_reached: Callable[[], None] = _nothing

    # -- key names -----------------------------------------------------------

    def period_key(self, period: Period) -> str:
        return f"{self._tag}:{period.window}:{period.label}"

    def frame(self, at: int, windows: Sequence[str] | None = None) -> Frame:
        """The periods of *at* in *windows* (default: every kept one), ready for the wire."""
        cached = self._frame
        if windows is None and cached is not None and cached.holds(at):
            return cached  # in the same periods as the last call: most calls
        periods = self.calendar.periods(self.windows if windows is None else windows, at)
        frame = Frame.of(periods, tuple(self.period_key(p).encode() for p in periods), self._ttls)
        if windows is None:
            self._frame = frame
        return frame

    def reservation_key(self, reservation_id: str) -> str:
        return f"{self._tag}:res:{reservation_id}"

    # -- operations ----------------------------------------------------------

    def reserve(self, scopes: Scopes, amount: int, reservation_id: str) -> Steps[Held]:
        """
        Hold *amount* in every scope and window, or raise BudgetExceededError
        having written nothing.

        A retry with the same id returns the hold the first call took; the same
        id with other scopes or another amount raises IdempotencyConflictError.
        """
        record = self.reservation_key(reservation_id).encode()
        marker = Marker.of(b"r", reservation_id, self._buckets, (amount, scopes))
        reply = yield from self._call("reserve", amount, scopes, record, limits=True, marker=marker)
        if type(reply) is int:
            return Held(state="held", at=reply, held_nano=amount)
        with _decoding(reply):
            if reply[0] == "NO":
                self._refuse(reply, scopes, amount)
            _refuse_write(reply, scopes, f"reservation_id {reservation_id!r}")
            _, state, held_at, held = reply  # DUP: the hold this id already took
            if state not in STATES:
                raise ValueError(state)
            return Held(state=state, at=int(held_at), held_nano=_held(held))

    def settle(
        self,
        scopes: Scopes,
        reservation_id: str,
        at: int | None,
        actual: int,
        state: str,
    ) -> Steps[tuple[str, str]]:
        """
        Settle a hold taken at *at* to *actual* (0 for a release), in the
        periods it was taken in; the first settlement wins.

        Returns ("OK", state), ("DONE", the state an earlier settlement left)
        or ("GONE", "recorded" | "expired") when the store had no such hold.

        *at* None settles by id alone, in one round trip as well when the hold
        was taken in the current periods (the HTTP service's commit without the
        hold): the record names its instant and scopes (*scopes* is then
        empty); with no record it is UnknownReservationError, nothing written.
        """
        op = _SETTLE_OPS[state]
        record = self.reservation_key(reservation_id).encode()
        marker = Marker.of(b"r", reservation_id, self._buckets)
        guessed = at is None
        for _ in range(2):
            reply = yield from self._call(
                op, actual, scopes, record, at=at, guess=guessed, marker=marker
            )
            if type(reply) is int:
                return ("OK", state)
            with _decoding(reply):
                if reply[0] == "WHEN" and guessed:
                    at, guessed = int(reply[1]), False  # its instant, as its record says: once more
                    continue
                if reply[0] == "NONE":
                    raise UnknownReservationError(
                        f"no reservation {reservation_id!r} (never made, or expired)"
                    )
                _refuse_write(reply, scopes, f"reservation {reservation_id!r}")
                return (str(reply[0]), str(reply[1]))
        raise BudgetUnavailableError("the budget store named two instants for one reservation")

    def spend(self, scopes: Scopes, amount: int, operation_id: str) -> Steps[Spent]:
        """
        Record *amount* in every scope and window, once per operation id, limits notwithstanding.

        "duplicate": this id already paid for exactly this; the same id for
        another payment raises IdempotencyConflictError, writing nothing.
        """
        marker = Marker.of(b"s", operation_id, self._buckets, (amount, scopes))
        reply = yield from self._call("spend", amount, scopes, None, marker=marker)
        if type(reply) is int:
            return "recorded"
        with _decoding(reply):
            _refuse_write(reply, scopes, f"idempotency_key {operation_id!r}")
        return "duplicate"

    def replay_spend(
        self, scopes: Scopes, amount: int, operation_id: str, at: int
    ) -> Steps[Literal["recorded", "duplicate", "expired"]]:
        """
        Record a spend made at *at* (now or earlier) that never reached the store.

        The same operation id as the original call, so a spend that did reach
        the store (only its reply was lost) is not charged again. Returns
        "recorded", "duplicate", or "expired" (its periods are past retention).
        """
        marker = Marker.of(b"s", operation_id, self._buckets, (amount, scopes))
        reply = yield from self._call("replay", amount, scopes, None, at=at, marker=marker)
        if type(reply) is int:
            return "recorded"
        with _decoding(reply):
            _refuse_write(reply, scopes, f"idempotency_key {operation_id!r}")
        return "duplicate" if reply[0] == "DUP" else "expired"

    def now(self) -> int:
        """When a call made now happens (ms): the client's guess; the script has the last word."""
        if self._clock is not None:
            return int(self._clock() * 1000)
        return int(time.time() * 1000) + self._skew_ms

    def seconds_to_reset(self, window: str = "day") -> int:
        """Seconds until *window*'s current period ends, by the clock deciding it (at least 1)."""
        now = self.now()
        end = self.calendar.period(window, now).end_ms
        return max(1, -(-(end - now) // 1000))

    def check(self, scopes: Scopes, amount: int) -> Steps[None]:
        """Raise BudgetExceededError if *amount* does not fit in every window; never writes."""
        reply = yield from self._call("check", amount, scopes, None, limits=True)
        if type(reply) is not int:
            with _decoding(reply):
                self._refuse(reply, scopes, amount)

    def usage(self, scopes: Scopes, window: str) -> Steps[tuple[Period, list[tuple[int, int]]]]:
        """
        The current period of *window* and (spent, limit) in nano-dollars per
        scope there, open holds counted as spent.
        """
        j = self.windows.index(window)
        reply = yield from self._call("usage", 0, scopes, None, limits=True)
        with _decoding(reply):
            k = len(self.windows)
            values = [int(v) for v in reply[2:]]
            if len(values) != 2 * k * len(scopes.fields):
                raise ValueError("not one (spent, limit) pair per scope and window")
            pairs = [
                (values[2 * (i * k + j)], values[2 * (i * k + j) + 1])
                for i in range(len(scopes.fields))
            ]
            return self.calendar.period(window, int(reply[1])), pairs

    def now_by_store(self) -> Steps[int]:
        """The time (ms) by the store's clock (the one every worker shares)."""
        # Naming the day's period (its key unread) lets the reply be checked: a time
        # in it, or the script's NOW, never any integer a proxy might send.
        now: int = yield from self._call("now", 0, NO_SCOPES, None, windows=("day",))
        return now

    def counters(self, period: Period, cursor: int) -> Steps[tuple[int, list[tuple[str, int]]]]:
        """
        One HSCAN step over the counters of *period*: the next cursor (0: done) and
        the counters read. Each step is short, so a period with a million fields
        never holds the store for other callers. A field written meanwhile may
        be read with either value.
        """
        reply = yield Command(
            "hscan", (self.period_key(period),), {"cursor": cursor, "count": _SCAN_COUNT}
        )
        self.on_reached()
        with _decoding(reply):
            after, values = reply
            return int(after), [(field, int(value)) for field, value in values.items()]

    def overrides(self, window: str, fields: Sequence[str]) -> Steps[dict[str, int]]:
        """The limit overrides of *fields* in *window* (those that have one)."""
        if not fields:
            return {}
        values = yield Command("hmget", (self._limits_keys[window], list(fields)))
        self.on_reached()
        with _decoding(values):
            return {f: int(v) for f, v in zip(fields, values, strict=True) if v is not None}

    def lookup(self, reservation_id: str) -> Steps[tuple[Held, list[str]] | None]:
        """
        A reservation's state and the counter fields it holds in, or None if
        unknown. One settled yesterday or today (and folded into its day's
        bucket) says only how it was settled: no fields, held 0, at its day.
        """
        record = yield Command("get", (self.reservation_key(reservation_id),))
        self.on_reached()
        if record is None:
            marker = Marker.of(b"r", reservation_id, self._buckets)
            today = self.now() // DAY_MS
            for day, key in zip(
                (today, today - 1), reversed(marker.buckets(self._tag, today - 1, 2)), strict=True
            ):
                value = yield Command("hget", (key, marker.field))
                if value is not None:
                    with _decoding(value):
                        state = {"c": "committed", "r": "released"}[value[0]]
                    return Held(state=state, at=day * DAY_MS, held_nano=0), []
            return None
        with _decoding(record):
            # "<state> <at> <held> <digest> " + Scopes.record: "<n> <byte lengths>\n<fields>".
            head, _, body = record.partition("\n")
            state, at, held, _, _, *lengths = head.split(" ")
            data, fields, start = body.encode(), [], 0
            for length in map(int, lengths):
                fields.append(data[start : start + length].decode())
                start += length
            if state not in STATES:
                raise ValueError(state)
            return Held(state=state, at=int(at), held_nano=_held(held)), fields

    def ping(self) -> Steps[None]:
        yield Command("ping")
        self.on_reached()

    def set_limit(self, window: str, field: str, limit_nano: int | None) -> Steps[None]:
        key = self._limits_keys[window]
        if limit_nano is None:
            yield Command("hdel", (key, field))
        else:
            yield Command("hset", (key, field, str(limit_nano)))
        self.on_reached()

    # -- plumbing ------------------------------------------------------------

    def _call(
        self,
        op: str,
        amount: int,
        scopes: Scopes,
        record: bytes | None,
        *,
        limits: bool = False,
        at: int | None = None,
        guess: bool = False,
        windows: Sequence[str] | None = None,
        marker: Marker | None = None,
    ) -> Steps[Any]:
        """
        One script call: its reply, an int (the instant booked) or a list.

        *record*: the reservation key (reserve, settle). *limits*: the
        operation reads limits (sent with the default limits and the limits
        keys). *at*: a settlement's or a replay's instant, whose periods are
        named; *guess*: settling by the record alone, naming now's periods.
        *marker*: a spend's or replay's operation-id marker, whose buckets are
        named for the days a retry of it may come (see :class:`Marker`).
        """
        # Twice is enough: the second attempt uses the time the server named.
        now: int | None = None
        for _ in range(2):
            # One reading of the clock: an injected one's stamp and the periods named agree.
            current = self.now() if now is None else now
            moment = current if at is None else at  # a settlement's or replay's own periods
            frame = self.frame(moment, windows)
            keys = list(frame.keys)
            if marker is None:
                buckets = ("0", "-")
            else:
                first, count = self._bucket_days(op, moment // DAY_MS, guess)
                buckets = (str(count), str(first))
            args: list[str | bytes] = [
                op,
                str(amount),
                "-" if at is None else str(at),
                scopes.count,
                *buckets,
                # The server's clock ("-" leads the frame's words), or the injected one's time.
                *(frame.words if self._clock is None else (str(current), *frame.words[1:])),
            ]
            if limits:
                keys += self._limits_wire
                args += scopes.limits
            if record is not None:
                keys.append(record)
            args += scopes.wire
            if marker is not None:
                keys += marker.buckets(self._tag, first, count)
                if record is None:  # a spend's marker: what it paid for
                    args += (marker.paid, marker.field)
                else:  # a reservation: its scopes, its id, and (reserve) its hold's digest
                    args += (scopes.record, marker.field)
                    if op == "reserve":
                        args.append(marker.paid)
            elif record is not None:
                args.append(scopes.record)
            reply: Any = yield Script(keys, args)
            # Success is an instant in the periods the call named, nothing else:
            # any other integer (a proxy's or an impostor's ":0") is no "yes".
            if type(reply) is int and (reply == at or (at is None and frame.holds(reply))):
                self.on_reached()
                return reply
            if not isinstance(reply, list) or not reply or not _ANSWERS[op](reply):
                # Not our script's (a bug, or something between us and Redis): never
                # taken for a success, which for a spend would be a charge lost.
                raise BudgetUnavailableError(
                    f"budget store sent a malformed reply: {str(reply)[:200]}"
                )
            if reply[0] != "NOW" or guess:
                self.on_reached()
                return reply
            with _decoding(reply):
                now = int(reply[1])
                if self._clock is None:
                    self._skew_ms = now - int(time.time() * 1000)
            if at is not None:  # a replay dated in the future by a fast clock: now then
                at = min(at, now)
        raise BudgetUnavailableError("could not agree with the budget store on the time")

    def _bucket_days(self, op: str, day: int, guess: bool) -> tuple[int, int]:
        """
        The first UTC day and the number of days of the record buckets *op*
        names, *day* being the day of the moment it names: a spend's marker may
        be on any day of the idempotency TTL (a replay's, a day either side of
        when it was made: the store's clock booked it); a reservation settled
        and folded away is looked for today (a reserve), yesterday and today (a
        settlement by id alone), or on its own day.
        """
        if op == "spend":
            return day - self._marker_days + 1, self._marker_days
        if op == "replay":
            return day - self._marker_days + 1, self._marker_days + 1
        if guess:
            return day - 1, 2
        return day, 1

    def _refuse(self, reply: list[Any], scopes: Scopes, amount: int) -> NoReturn:
        name, entity = describe(scopes.fields[int(reply[1]) - 1])
        window = self.windows[int(reply[2]) - 1]
        now = int(reply[5])
        end = self.calendar.period(window, now).end_ms
        raise BudgetExceededError(
            scope=name,
            entity_id=entity,
            limit_nano=int(reply[4]),
            spent_nano=int(reply[3]),
            requested_nano=amount,
            window=window,
            resets_at=instant(end),
            retry_after_seconds=max(1, -(-(end - now) // 1000)),
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


_NOW = ("NOW", 2)
#: The states a reservation record may be in.
STATES = frozenset({"held", "committed", "released"})
#: The list replies each operation may get (NOW: any op but a settle's); the
#: values in them are checked where they are read.
_ANSWERS: dict[str, Callable[[list[Any]], bool]] = {
    "reserve": _shapes(("NO", 6), ("DUP", 4), _NOW, ("CONFLICT", 1), ("BIG", 2)),
    "commit": lambda r: _settled(r) or (r[0] in ("BIG", "WHEN") and len(r) == 2) or r == ["NONE"],
    "release": lambda r: _settled(r) or (r[0] == "WHEN" and len(r) == 2) or r == ["NONE"],
    "spend": _shapes(("DUP", 1), ("GONE", 2), _NOW, ("CONFLICT", 1), ("BIG", 2)),
    "replay": _shapes(("DUP", 1), ("GONE", 2), _NOW, ("CONFLICT", 1), ("BIG", 2)),
    "check": _shapes(("NO", 6), _NOW),
    "usage": lambda r: (r[0] == "OK" and len(r) >= 2) or (r[0] == "NOW" and len(r) == 2),
    "now": _shapes(_NOW),
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


def instant(at: int) -> datetime.datetime:
    """An instant (ms since the epoch, as records keep them) as an aware UTC datetime."""
    return _EPOCH + datetime.timedelta(milliseconds=at)


def at_ms(moment: datetime.datetime) -> int:
    """An aware datetime as ms since the epoch, exactly (no float rounding)."""
    if not isinstance(moment, datetime.datetime) or moment.utcoffset() is None:
        raise InvalidInputError(f"expected an aware datetime, got {moment!r}")
    return (moment - _EPOCH) // datetime.timedelta(milliseconds=1)


_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


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
    if reply[0] == "WHEN":
        raise InvalidInputError(
            f"{what} was taken at {instant(int(reply[1])).isoformat()}, not at the time "
            "named; nothing was written"
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
