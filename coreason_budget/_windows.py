"""
Budget windows: which hour, day, week and month an instant belongs to.

A budget is enforced per *window* (``hour``, ``day``, ``week``, ``month``), and
its counters are kept per *period*: one concrete hour, day, week or month. A
charge at instant *t* lands in exactly the periods that contain *t*, so every
instant must belong to exactly one period of each window, and the periods of
a window must tile time with no gaps and no overlaps, or spend would be lost
or counted twice.

Periods are calendar-aligned in one configured IANA time zone, because the
people who set budgets think in local days ("100 dollars a day" means until
local midnight). Their boundaries are therefore defined on the local wall
clock, and must survive what real zones do to it: 23- and 25-hour days,
30-minute shifts (Australia/Lord_Howe), offsets such as +05:45
(Asia/Kathmandu) and even a skipped day (Pacific/Apia had no 2011-12-30).

The rule, for a window *W* and an instant *t*: let ``local(t)`` be the naive
wall time of *t*; the period starts at the first instant whose wall time is
``>=`` the floor of ``local(t)`` to *W*'s boundary and ends at the first
instant whose wall time is ``>=`` the next boundary. Hence a repeated
(fall-back) hour is one period two real hours long, and a wall time that a
spring-forward skipped starts its period at the transition itself.

Boundaries are thus instants, increasing with the wall times they stand for,
and the periods between them tile time. In the rare zone whose clock goes back
*across* a boundary (Pacific/Chatham falls back from 03:45 to 02:45, so 02:45
to 03:00 happens twice, the second time after 03:00 first struck; Antarctica/
Troll goes back two hours), the replayed wall times after the boundary's first
occurrence belong to the later period: its label is then not the local name of
every instant in it, but no instant is in two periods or in none.

Instants are ints of UTC milliseconds since the epoch (what the ledger
stores); all conversions use integer arithmetic, never float timestamps,
so a boundary is never off by a rounding error.

This module is pure: no I/O, no Redis, no clock. It is the single authority
on period boundaries and labels, used on every budget operation, so
:meth:`Calendar.periods` caches its last answer.
"""

from __future__ import annotations

import datetime
import re
import zoneinfo
from collections.abc import Sequence
from typing import Final

import attrs

__all__ = ["WEEKDAYS", "WINDOWS", "Calendar", "Period"]

WINDOWS: tuple[str, ...] = ("hour", "day", "week", "month")
"""The windows a budget may have, narrowest first."""

WEEKDAYS: tuple[str, ...] = (
    "monday",
    "tuesday",
    "wednesday",
    "thursday",
    "friday",
    "saturday",
    "sunday",
)
"""Week start choices, in :meth:`datetime.date.weekday` order (Monday is 0)."""

_EPOCH: Final = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
_MS: Final = datetime.timedelta(milliseconds=1)
_HOUR: Final = datetime.timedelta(hours=1)
_DAY: Final = datetime.timedelta(days=1)
_WEEK: Final = datetime.timedelta(days=7)

# Label syntax, strict (zero-padded, ASCII digits only) so that one period has
# exactly one label and a stored counter key can never be spelled two ways.
_LABEL_SYNTAX: Final = {
    "hour": re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2})", re.ASCII),
    "day": re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})", re.ASCII),
    "week": re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})", re.ASCII),
    "month": re.compile(r"([0-9]{4})-([0-9]{2})", re.ASCII),
}
_LABEL_FORMAT: Final = {
    "hour": "YYYY-MM-DDTHH",
    "day": "YYYY-MM-DD",
    "week": "YYYY-MM-DD",
    "month": "YYYY-MM",
}

# How far period() may step from the period named by an instant's local wall time
# to the one containing it: one step for an ordinary zone, up to a step per hour
# the clock was set back (Antarctica/DumontDUrville once went back 10 hours, and
# Alaska 24 when it left the Russian calendar). 50 hour-steps cover two days.
_MAX_STEPS: Final = 50

# periods() keeps one cached answer per distinct windows tuple; callers use a
# handful, so this bound only guards against a caller inventing new ones forever.
_CACHE_LIMIT: Final = 64


@attrs.frozen
class Period:
    """
    One concrete hour, day, week or month: the unit budget counters are kept per.

    ``[start_ms, end_ms)`` in UTC milliseconds, half-open so that consecutive
    periods share a boundary without sharing an instant. ``end_ms == start_ms``
    only for a local day or hour the zone skipped entirely (no instant is in
    it, so no charge can land there). ``label`` is the local calendar name,
    which is what a person reading a report expects and what keys a counter:
    hour ``2026-11-29T14``, day ``2026-11-29``, week ``2026-11-23`` (the local
    date of its first day), month ``2026-11``.
    """

    window: str
    label: str
    start_ms: int
    end_ms: int


class Calendar:
    """
    Maps instants to periods in one time zone with one first day of the week.

    Configured once per deployment: every process sharing a ledger must use the
    same zone and week start, or they would charge different counters.
    """

    timezone: str
    week_start: str

    def __init__(self, timezone: str = "UTC", week_start: str = "monday") -> None:
        """
        *timezone*: an IANA zone name (``Europe/Berlin``); *week_start*: a name
        from :data:`WEEKDAYS`, any case.

        Raises :class:`ValueError` naming the problem for an unknown or
        malformed zone (``Mars/Base``, ``''``, ``../etc/passwd``) or an unknown
        week start: a typo must fail at start-up, not silently charge the
        wrong periods.
        """
        if not isinstance(timezone, str):
            raise ValueError(f"timezone must be an IANA zone name (a str), got {timezone!r}")
        try:
            zone = zoneinfo.ZoneInfo(timezone)
        except (zoneinfo.ZoneInfoNotFoundError, IsADirectoryError):  # "America": a folder
            raise ValueError(f"unknown time zone {timezone!r}: not an IANA zone name") from None
        except (ValueError, OSError) as error:
            raise ValueError(f"invalid time zone {timezone!r}: {error}") from None
        if not isinstance(week_start, str) or week_start.lower() not in WEEKDAYS:
            raise ValueError(
                f"unknown week_start {week_start!r}: expected one of {', '.join(WEEKDAYS)}"
            )
        self.timezone = timezone
        self.week_start = week_start.lower()
        self._zone = zone
        self._week_start_index = WEEKDAYS.index(self.week_start)
        # windows tuple -> (periods, latest start, earliest end). Replaced, never
        # mutated in place, so a reader on another thread sees a whole entry.
        self._cache: dict[tuple[str, ...], tuple[tuple[Period, ...], int, int]] = {}

    def __repr__(self) -> str:
        return f"Calendar(timezone={self.timezone!r}, week_start={self.week_start!r})"

    # -- public -------------------------------------------------------------------------------

    def period(self, window: str, instant_ms: int) -> Period:
        """
        The period of *window* containing *instant_ms* (UTC milliseconds).

        Raises :class:`ValueError` for an unknown window, or an instant outside
        what :mod:`datetime` can represent (years 1 to 9999). Cached as
        :meth:`periods` is: working one out costs about 20 us.
        """
        return self.periods((window,), instant_ms)[0]

    def periods(self, windows: Sequence[str], instant_ms: int) -> tuple[Period, ...]:
        """
        :meth:`period` for each of *windows*, in the order given.

        The hot path: every budget operation asks for its periods, and nearly
        always for an instant in the same periods as last time. So the answer
        is cached per windows tuple and returned (the identical object) while
        *instant_ms* lies inside every cached period; only crossing a boundary
        computes anew. A cache entry is one immutable tuple, stored by a
        single assignment, so concurrent callers under CPython see either the
        old or the new entry, both correct for their own instants.
        """
        key = windows if type(windows) is tuple else tuple(windows)
        entry = self._cache.get(key)
        if entry is not None and entry[1] <= instant_ms < entry[2]:
            return entry[0]
        result = tuple(self._period(window, instant_ms) for window in key)
        if not result:
            return result
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache = {}
        self._cache[key] = (
            result,
            max(p.start_ms for p in result),
            min(p.end_ms for p in result),
        )
        return result

    def _period(self, window: str, instant_ms: int) -> Period:
        """:meth:`period`, worked out (not cached)."""
        if window not in _LABEL_SYNTAX:
            raise ValueError(f"unknown window {window!r}: expected one of {', '.join(WINDOWS)}")
        try:
            floor = self._floor(window, self._local(instant_ms))
            found = self._period_from(window, floor)
            # Where the clock goes back across a boundary (Pacific/Chatham falls
            # back from 03:45 to 02:45; St John's once from 00:01 to 23:01 the day
            # before), the replayed wall times after the boundary's first
            # occurrence lie in the *next* period: boundaries are instants, and
            # periods must tile. Step to the period that does contain the instant.
            for _ in range(_MAX_STEPS):
                if instant_ms >= found.end_ms:
                    floor = self._step(window, floor, 1)
                elif instant_ms < found.start_ms:
                    floor = self._step(window, floor, -1)
                else:
                    return found
                found = self._period_from(window, floor)
        except (OverflowError, ValueError):  # datetime's range, reached by the instant or a step
            raise ValueError(f"instant {instant_ms!r} ms is outside years 1 to 9999") from None
        raise RuntimeError(  # pragma: no cover - no IANA zone comes near this
            f"{self!r} found no {window} period containing instant {instant_ms} ms"
        )

    def labelled(self, window: str, label: str) -> Period:
        """
        The period that *label* names: the inverse of ``period(...).label``.

        For reporting a past period by name. Raises :class:`ValueError` for an
        unknown window or a label that is not a valid name of one of its
        periods (``2026-13`` for a month, ``yesterday`` for a day, a week
        label that is not a week-start day). A day or hour that the zone
        skipped (Pacific/Apia's ``2011-12-30``) is a valid name with an empty
        period (``start_ms == end_ms``): nothing was spent in it.
        """
        syntax = _LABEL_SYNTAX.get(window)
        if syntax is None:
            raise ValueError(f"unknown window {window!r}: expected one of {', '.join(WINDOWS)}")
        match = syntax.fullmatch(label) if isinstance(label, str) else None
        if match is None:
            raise ValueError(
                f"malformed {window} label {label!r}: expected {_LABEL_FORMAT[window]}"
            )
        fields = [int(part) for part in match.groups()]
        try:
            if window == "month":
                floor = datetime.datetime(fields[0], fields[1], 1)
            elif window == "hour":
                floor = datetime.datetime(fields[0], fields[1], fields[2], fields[3])
            else:
                floor = datetime.datetime(fields[0], fields[1], fields[2])
        except ValueError as error:
            raise ValueError(f"invalid {window} label {label!r}: {error}") from None
        if window == "week" and floor.weekday() != self._week_start_index:
            raise ValueError(
                f"invalid week label {label!r}: {floor.date()} is a "
                f"{WEEKDAYS[floor.weekday()]}, but weeks start on {self.week_start}"
            )
        try:
            return self._period_from(window, floor)
        except (OverflowError, ValueError):  # its end or an offset leaves datetime's range
            raise ValueError(f"{window} {label!r} is too close to year 1 or 9999") from None

    # -- boundaries ---------------------------------------------------------------------------

    def _local(self, instant_ms: int) -> datetime.datetime:
        """The naive local wall time of *instant_ms*, exactly (no float)."""
        utc = _EPOCH + datetime.timedelta(milliseconds=instant_ms)
        return utc.astimezone(self._zone).replace(tzinfo=None)

    def _floor(self, window: str, local: datetime.datetime) -> datetime.datetime:
        """The wall time where the period of *window* named by *local* starts."""
        if window == "hour":
            return local.replace(minute=0, second=0, microsecond=0)
        day = local.replace(hour=0, minute=0, second=0, microsecond=0)
        if window == "day":
            return day
        if window == "week":
            return day - datetime.timedelta(days=(day.weekday() - self._week_start_index) % 7)
        return day.replace(day=1)

    @staticmethod
    def _step(window: str, floor: datetime.datetime, steps: int) -> datetime.datetime:
        """The boundary *steps* periods of *window* after (or before) *floor*, on the wall clock."""
        if window == "hour":
            return floor + steps * _HOUR
        if window == "day":
            return floor + steps * _DAY
        if window == "week":
            return floor + steps * _WEEK
        months = floor.year * 12 + floor.month - 1 + steps
        return floor.replace(year=months // 12, month=months % 12 + 1)

    @staticmethod
    def _label(window: str, floor: datetime.datetime) -> str:
        """The calendar name of the period starting at wall time *floor*."""
        if window == "hour":
            return f"{floor.date().isoformat()}T{floor.hour:02d}"
        if window == "month":
            return f"{floor.year:04d}-{floor.month:02d}"
        return floor.date().isoformat()

    def _period_from(self, window: str, floor: datetime.datetime) -> Period:
        """The period from wall time *floor* to the next boundary of *window*."""
        return Period(
            window,
            self._label(window, floor),
            self._first_at(floor),
            self._first_at(self._step(window, floor, 1)),
        )

    def _first_at(self, wall: datetime.datetime) -> int:
        """
        The first instant (UTC ms) whose local wall time is ``>=`` *wall*.

        For an ordinary wall time, that instant; for a repeated one (fall
        back), its first occurrence, so the repeated hour belongs to one
        period; for one the zone skipped (spring forward, Apia's lost day),
        the transition instant, so the skipped span's period is empty and the
        periods around it still meet. The two folds bracket the transition,
        which a binary search then finds to the millisecond.
        """
        early = self._to_ms(wall.replace(tzinfo=self._zone, fold=0))
        late = self._to_ms(wall.replace(tzinfo=self._zone, fold=1))
        low, high = min(early, late), max(early, late)
        if self._local(low) >= wall:
            return low
        # A gap: local(low) < wall <= local(high). Invariant: low is before the
        # answer, high is at or after it.
        while high - low > 1:
            middle = (low + high) // 2
            if self._local(middle) >= wall:
                high = middle
            else:
                low = middle
        return high

    @staticmethod
    def _to_ms(moment: datetime.datetime) -> int:
        """UTC milliseconds of an aware datetime, by integer arithmetic."""
        return (moment - _EPOCH) // _MS
