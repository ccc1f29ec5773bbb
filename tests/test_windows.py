"""
Budget windows (:mod:`coreason_budget._windows`): periods, labels, DST, the cache.

Every charge lands in the periods containing its instant, so the properties
here are the ledger's: each instant is in exactly one period of each window
(periods tile time, no gaps, no overlaps), a period's label is the local
calendar name people expect, and a label names its period back. They are
checked by hypothesis in zones chosen for what they do to the wall clock, with
instants drawn mostly near DST transitions and month ends, where bugs live;
the exact examples pin the famous odd days down to the millisecond.
"""

from __future__ import annotations

import datetime
import functools
import timeit
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coreason_budget._windows import WEEKDAYS, WINDOWS, Calendar, Period

EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
MS = datetime.timedelta(milliseconds=1)
SECOND_MS = 1_000
MINUTE_MS = 60 * SECOND_MS
HOUR_MS = 60 * MINUTE_MS
DAY_MS = 24 * HOUR_MS

# UTC as the control; New York and Berlin for ordinary DST on different dates
# and hours; Lord Howe's 30-minute shift; Kathmandu's +05:45; Apia's skipped day
# (and its DST on the far side of the date line).
ZONES = (
    "UTC",
    "America/New_York",
    "Europe/Berlin",
    "Australia/Lord_Howe",
    "Asia/Kathmandu",
    "Pacific/Apia",
)
WEEK_STARTS = ("monday", "sunday")
FIRST_YEAR, LAST_YEAR = 2010, 2030

PROPERTY = settings(
    max_examples=50,
    deadline=None,
    # conftest's autouse per-test data directory is harmless to share across examples.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


# -- an independent model of the wall clock ----------------------------------------------------


def to_ms(moment: datetime.datetime) -> int:
    """UTC milliseconds of an aware datetime (integer arithmetic, as the module promises)."""
    return (moment - EPOCH) // MS


def utc_ms(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> int:
    """UTC milliseconds of a UTC calendar time: ``utc_ms(2026, 11, 30, 3)``."""
    return to_ms(datetime.datetime(year, month, day, hour, minute, tzinfo=datetime.UTC))


def wall_ms(
    zone: str, year: int, month: int, day: int, hour: int = 0, minute: int = 0, *, fold: int = 0
) -> int:
    """UTC milliseconds of a local wall time in *zone* (*fold* picks a repeated time's pass)."""
    wall = datetime.datetime(year, month, day, hour, minute, tzinfo=ZoneInfo(zone), fold=fold)
    return to_ms(wall)


def local(zone: str, instant_ms: int) -> datetime.datetime:
    """The naive wall time of *instant_ms* in *zone*."""
    moment = EPOCH + datetime.timedelta(milliseconds=instant_ms)
    return moment.astimezone(ZoneInfo(zone)).replace(tzinfo=None)


def hours(period: Period) -> float:
    """A period's real length in hours."""
    return (period.end_ms - period.start_ms) / HOUR_MS


def expected_floor(window: str, wall: datetime.datetime, week_start: str) -> datetime.datetime:
    """Where *window*'s period of the wall time *wall* begins, on the wall clock."""
    if window == "hour":
        return wall.replace(minute=0, second=0, microsecond=0)
    day = wall.replace(hour=0, minute=0, second=0, microsecond=0)
    if window == "day":
        return day
    if window == "week":
        back = (day.weekday() - WEEKDAYS.index(week_start)) % 7
        return day - datetime.timedelta(days=back)
    return day.replace(day=1)


def expected_next(window: str, floor: datetime.datetime) -> datetime.datetime:
    """The wall-clock boundary after *floor*."""
    if window == "hour":
        return floor + datetime.timedelta(hours=1)
    if window == "day":
        return floor + datetime.timedelta(days=1)
    if window == "week":
        return floor + datetime.timedelta(days=7)
    if floor.month == 12:
        return floor.replace(year=floor.year + 1, month=1)
    return floor.replace(month=floor.month + 1)


def expected_label(window: str, floor: datetime.datetime) -> str:
    """The local calendar name of the period beginning at wall time *floor*."""
    if window == "hour":
        return floor.strftime("%Y-%m-%dT%H")
    if window == "month":
        return floor.strftime("%Y-%m")
    return floor.date().isoformat()


@functools.cache
def transitions(zone: str) -> tuple[int, ...]:
    """Every UTC-offset change of *zone* in the tested years, to the second, in ms."""
    tz = ZoneInfo(zone)

    def offset(seconds: int) -> datetime.timedelta | None:
        moment = EPOCH + datetime.timedelta(seconds=seconds)
        return moment.astimezone(tz).utcoffset()

    found: list[int] = []
    start = utc_ms(FIRST_YEAR - 1, 12, 1) // SECOND_MS
    stop = utc_ms(LAST_YEAR + 1, 2, 1) // SECOND_MS
    step = 6 * 3600  # no zone changes offset twice within six hours
    for before in range(start, stop, step):
        after = before + step
        if offset(before) == offset(after):
            continue
        low, high = before, after  # offset(low) is the old one, offset(high) the new
        while high - low > 1:
            middle = (low + high) // 2
            if offset(middle) == offset(low):
                low = middle
            else:
                high = middle
        found.append(high * SECOND_MS)
    return tuple(found)


@functools.cache
def month_starts(zone: str) -> tuple[int, ...]:
    """The first instant of every local month in the tested years."""
    return tuple(
        wall_ms(zone, year, month, 1)
        for year in range(FIRST_YEAR, LAST_YEAR + 1)
        for month in range(1, 13)
    )


def instants(zone: str) -> st.SearchStrategy[int]:
    """
    Instants in 2010-2030, three times in four within three days of one of the
    zone's transitions or month boundaries (for UTC, month boundaries only).
    """
    anywhere = st.integers(utc_ms(FIRST_YEAR, 1, 1), utc_ms(LAST_YEAR, 12, 31))
    near = st.integers(-3 * DAY_MS, 3 * DAY_MS)
    around_month = st.builds(int.__add__, st.sampled_from(month_starts(zone)), near)
    if not transitions(zone):
        return st.one_of(anywhere, around_month, around_month, around_month)
    around_shift = st.builds(int.__add__, st.sampled_from(transitions(zone)), near)
    return st.one_of(anywhere, around_month, around_shift, around_shift)


zone_and_week_start = pytest.mark.parametrize(
    ("zone", "week_start"), [(zone, start) for zone in ZONES for start in WEEK_STARTS]
)


# -- properties --------------------------------------------------------------------------------


class TestProperties:
    """What must hold for every instant, window, zone and week start."""

    @zone_and_week_start
    @PROPERTY
    @given(data=st.data())
    def test_each_instant_is_in_exactly_one_period(
        self, zone: str, week_start: str, data: st.DataObject
    ) -> None:
        """The period contains the instant, and its neighbours meet it exactly: periods tile."""
        calendar = Calendar(zone, week_start)
        t = data.draw(instants(zone), label="instant_ms")
        for window in WINDOWS:
            period = calendar.period(window, t)
            assert period.window == window
            assert period.start_ms <= t < period.end_ms
            assert calendar.period(window, period.start_ms) == period
            assert calendar.period(window, period.end_ms - 1) == period
            assert calendar.period(window, period.end_ms).start_ms == period.end_ms
            assert calendar.period(window, period.start_ms - 1).end_ms == period.start_ms

    @zone_and_week_start
    @PROPERTY
    @given(data=st.data())
    def test_boundaries_and_label_follow_the_wall_clock(
        self, zone: str, week_start: str, data: st.DataObject
    ) -> None:
        """
        The label is the local calendar name of the instant; the start is the
        first instant at or past its wall-clock boundary, the end the first at
        or past the next one (checked on the wall clock, not by the module).
        """
        calendar = Calendar(zone, week_start)
        t = data.draw(instants(zone), label="instant_ms")
        for window in WINDOWS:
            period = calendar.period(window, t)
            floor = expected_floor(window, local(zone, t), week_start)
            following = expected_next(window, floor)
            assert period.label == expected_label(window, floor)
            assert local(zone, period.start_ms) >= floor > local(zone, period.start_ms - 1)
            assert local(zone, period.end_ms) >= following > local(zone, period.end_ms - 1)

    @zone_and_week_start
    @PROPERTY
    @given(data=st.data())
    def test_a_label_names_its_period(
        self, zone: str, week_start: str, data: st.DataObject
    ) -> None:
        """``labelled`` inverts ``period(...).label``, so reports find the same counters."""
        calendar = Calendar(zone, week_start)
        t = data.draw(instants(zone), label="instant_ms")
        for window in WINDOWS:
            period = calendar.period(window, t)
            assert calendar.labelled(window, period.label) == period

    @zone_and_week_start
    @PROPERTY
    @given(data=st.data())
    def test_wider_periods_contain_narrower(
        self, zone: str, week_start: str, data: st.DataObject
    ) -> None:
        """A day holds its hours; a week and a month hold their days."""
        calendar = Calendar(zone, week_start)
        t = data.draw(instants(zone), label="instant_ms")
        hour, day, week, month = calendar.periods(WINDOWS, t)
        assert day.start_ms <= hour.start_ms < hour.end_ms <= day.end_ms
        for wide in (week, month):
            assert wide.start_ms <= day.start_ms < day.end_ms <= wide.end_ms

    @pytest.mark.parametrize("zone", ZONES)
    @PROPERTY
    @given(data=st.data())
    def test_periods_match_period(self, zone: str, data: st.DataObject) -> None:
        """The cached path answers as the uncached one, in the order asked."""
        calendar = Calendar(zone)
        order = data.draw(st.permutations(WINDOWS), label="windows")
        for _ in range(3):
            t = data.draw(instants(zone), label="instant_ms")
            assert calendar.periods(order, t) == tuple(calendar.period(w, t) for w in order)


# -- exact examples ----------------------------------------------------------------------------


class TestDaylightSaving:
    """The famous odd days, to the millisecond (transition dates checked against zoneinfo)."""

    def test_new_york_spring_forward_day_is_23_hours(self) -> None:
        """2026-03-08: 02:00 EST becomes 03:00 EDT; the local hour 02 never happens."""
        calendar = Calendar("America/New_York")
        day = calendar.labelled("day", "2026-03-08")
        assert (day.start_ms, day.end_ms) == (utc_ms(2026, 3, 8, 5), utc_ms(2026, 3, 9, 4))
        assert hours(day) == 23
        skipped = calendar.labelled("hour", "2026-03-08T02")
        assert skipped.start_ms == skipped.end_ms == utc_ms(2026, 3, 8, 7)
        assert calendar.period("hour", utc_ms(2026, 3, 8, 7)).label == "2026-03-08T03"
        assert calendar.period("hour", utc_ms(2026, 3, 8, 7) - 1).label == "2026-03-08T01"

    def test_new_york_fall_back_day_is_25_hours_with_a_two_hour_hour(self) -> None:
        """2026-11-01: 01:00-02:00 happens twice and is one hour period, labelled once."""
        calendar = Calendar("America/New_York")
        day = calendar.labelled("day", "2026-11-01")
        assert (day.start_ms, day.end_ms) == (utc_ms(2026, 11, 1, 4), utc_ms(2026, 11, 2, 5))
        assert hours(day) == 25
        first_pass = calendar.period("hour", utc_ms(2026, 11, 1, 5, 30))  # 01:30 EDT
        second_pass = calendar.period("hour", utc_ms(2026, 11, 1, 6, 30))  # 01:30 EST
        assert first_pass == second_pass == calendar.labelled("hour", "2026-11-01T01")
        assert first_pass.label == "2026-11-01T01"
        assert (first_pass.start_ms, first_pass.end_ms) == (
            utc_ms(2026, 11, 1, 5),
            utc_ms(2026, 11, 1, 7),
        )
        labels = [calendar.period("hour", day.start_ms + n * HOUR_MS).label for n in range(25)]
        assert len(set(labels)) == 24

    @pytest.mark.parametrize(
        ("label", "length"), [("2026-03-29", 23), ("2026-10-25", 25), ("2026-06-15", 24)]
    )
    def test_berlin_days(self, label: str, length: int) -> None:
        """Berlin shifts at 01:00 UTC on the last Sundays of March and October."""
        assert hours(Calendar("Europe/Berlin").labelled("day", label)) == length

    def test_lord_howe_half_hour_shifts(self) -> None:
        """
        Lord Howe moves by 30 minutes at 02:00: back on 2026-04-05 (a 24.5 h day,
        a 90-minute local hour 01) and forward on 2026-10-04 (a 23.5 h day, a
        30-minute local hour 02).
        """
        zone = "Australia/Lord_Howe"
        assert utc_ms(2026, 4, 4, 15) in transitions(zone)
        assert utc_ms(2026, 10, 3, 15, 30) in transitions(zone)
        calendar = Calendar(zone)
        assert hours(calendar.labelled("day", "2026-04-05")) == 24.5
        assert hours(calendar.labelled("hour", "2026-04-05T01")) == 1.5
        assert hours(calendar.labelled("day", "2026-10-04")) == 23.5
        short = calendar.labelled("hour", "2026-10-04T02")
        assert hours(short) == 0.5
        assert short.start_ms == utc_ms(2026, 10, 3, 15, 30)  # 02:00 skipped to 02:30 +11
        assert local(zone, short.start_ms) == datetime.datetime(2026, 10, 4, 2, 30)

    def test_kathmandu_hours_start_at_quarter_past_utc(self) -> None:
        """At +05:45 every local hour starts at minute 15 of a UTC hour, days at 18:15 UTC."""
        calendar = Calendar("Asia/Kathmandu")
        for t in range(utc_ms(2026, 11, 29), utc_ms(2026, 11, 30), 7 * MINUTE_MS):
            hour = calendar.period("hour", t)
            assert hour.start_ms % HOUR_MS == 15 * MINUTE_MS
            assert hours(hour) == 1
        day = calendar.labelled("day", "2026-11-29")
        assert day.start_ms == utc_ms(2026, 11, 28, 18, 15)
        assert calendar.period("day", utc_ms(2026, 11, 29, 18, 14)).label == "2026-11-29"
        assert calendar.period("day", utc_ms(2026, 11, 29, 18, 15)).label == "2026-11-30"

    def test_apia_skipped_day(self) -> None:
        """
        Apia jumped from 2011-12-29 23:59:59 (-10) to 2011-12-31 00:00 (+14):
        the 29th meets the 31st, the 30th is empty and no instant is on it.
        """
        calendar = Calendar("Pacific/Apia")
        jump = utc_ms(2011, 12, 30, 10)
        assert jump in transitions("Pacific/Apia")
        before = calendar.period("day", wall_ms("Pacific/Apia", 2011, 12, 29, 12))
        assert before.label == "2011-12-29"
        assert before.end_ms == jump == calendar.labelled("day", "2011-12-31").start_ms
        assert hours(before) == 24
        skipped = calendar.labelled("day", "2011-12-30")
        assert skipped == Period("day", "2011-12-30", jump, jump)
        assert calendar.period("day", jump).label == "2011-12-31"
        assert calendar.period("day", jump - 1).label == "2011-12-29"
        labels = {
            calendar.period("day", t).label
            for t in range(jump - 2 * DAY_MS, jump + 2 * DAY_MS, 15 * MINUTE_MS)
        }
        assert labels == {"2011-12-28", "2011-12-29", "2011-12-31", "2012-01-01"}
        assert calendar.period("hour", jump - 1).label == "2011-12-29T23"
        assert calendar.period("hour", jump).label == "2011-12-31T00"
        assert calendar.labelled("hour", "2011-12-30T12").start_ms == jump
        assert calendar.labelled("hour", "2011-12-30T12").end_ms == jump
        week = calendar.period("week", jump)  # Monday 2011-12-26: a six-day week
        assert week.label == "2011-12-26"
        assert hours(week) == 6 * 24


class TestCalendarNames:
    """Labels and weeks are local, and weeks start where configured."""

    def test_labels_are_local(self) -> None:
        """03:00 UTC on 2026-11-30 is still the 29th in New York."""
        t = utc_ms(2026, 11, 30, 3)
        new_york = Calendar("America/New_York").periods(WINDOWS, t)
        labels = [p.label for p in new_york]
        assert labels == ["2026-11-29T22", "2026-11-29", "2026-11-23", "2026-11"]
        utc = Calendar().periods(WINDOWS, t)
        assert [p.label for p in utc] == ["2026-11-30T03", "2026-11-30", "2026-11-30", "2026-11"]

    @pytest.mark.parametrize(
        ("week_start", "label"),
        [("monday", "2026-11-23"), ("sunday", "2026-11-29"), ("SUNDAY", "2026-11-29")],
    )
    def test_week_start_is_honoured(self, week_start: str, label: str) -> None:
        """Sunday 2026-11-29 ends a Monday week and begins a Sunday one."""
        calendar = Calendar("UTC", week_start)
        assert calendar.week_start == week_start.lower()
        week = calendar.period("week", utc_ms(2026, 11, 29, 12))
        assert week.label == label
        assert hours(week) == 7 * 24
        assert week == calendar.labelled("week", label)

    @pytest.mark.parametrize("week_start", WEEKDAYS)
    def test_every_week_start_begins_its_weeks(self, week_start: str) -> None:
        """Whatever the start day, a week label is a date of that weekday."""
        calendar = Calendar("Europe/Berlin", week_start)
        label = calendar.period("week", utc_ms(2026, 11, 29, 12)).label
        assert WEEKDAYS[datetime.date.fromisoformat(label).weekday()] == week_start

    def test_months_roll_over_years_and_leap_days(self) -> None:
        """December ends at January's start; February 2028 has 29 days."""
        calendar = Calendar("Europe/Berlin")
        december = calendar.period("month", utc_ms(2026, 12, 15))
        assert december.label == "2026-12"
        assert december.end_ms == calendar.labelled("month", "2027-01").start_ms
        assert december.end_ms == utc_ms(2026, 12, 31, 23)
        assert hours(calendar.labelled("month", "2028-02")) == 29 * 24
        assert hours(calendar.labelled("month", "2026-03")) == 31 * 24 - 1

    def test_attributes(self) -> None:
        """The zone name and the normalised week start are kept; windows are narrowest first."""
        calendar = Calendar("Asia/Kathmandu", "Friday")
        assert (calendar.timezone, calendar.week_start) == ("Asia/Kathmandu", "friday")
        assert (Calendar().timezone, Calendar().week_start) == ("UTC", "monday")
        assert WINDOWS == ("hour", "day", "week", "month")
        assert WEEKDAYS[0] == "monday"
        assert WEEKDAYS[6] == "sunday"
        assert "Asia/Kathmandu" in repr(calendar)


class TestClockSetBackAcrossABoundary:
    """
    Where a zone's clock goes back across a boundary, boundaries stay instants
    and periods still tile: the replayed wall times after the boundary first
    struck belong to the later period, whose label then differs from their
    local name. (None of the property-tested zones does this.)
    """

    def test_chatham_falls_back_from_0345_to_0245(self) -> None:
        """Local 02:45-03:00 happens twice; the second pass is in hour 03, which is 2 h long."""
        zone = "Pacific/Chatham"
        calendar = Calendar(zone)
        second_pass = wall_ms(zone, 2026, 4, 5, 2, 50, fold=1)
        assert local(zone, second_pass) == datetime.datetime(2026, 4, 5, 2, 50)
        hour = calendar.period("hour", second_pass)
        assert hour.label == "2026-04-05T03"
        assert hours(hour) == 2
        assert hours(calendar.labelled("hour", "2026-04-05T02")) == 1
        assert hours(calendar.labelled("day", "2026-04-05")) == 25

    def test_troll_goes_back_two_hours(self) -> None:
        """Troll (+02 to +00 at 03:00 local): hour 02 spans three real hours."""
        calendar = Calendar("Antarctica/Troll")
        one = calendar.labelled("hour", "2026-10-25T01")
        two = calendar.labelled("hour", "2026-10-25T02")
        three = calendar.labelled("hour", "2026-10-25T03")
        assert (hours(one), hours(two), hours(three)) == (1, 3, 1)
        assert one.end_ms == two.start_ms
        assert two.end_ms == three.start_ms
        assert calendar.period("hour", utc_ms(2026, 10, 25, 1, 30)) == two  # local 01:30, again

    def test_st_johns_once_went_back_across_midnight(self) -> None:
        """St John's, 2009-11-01 00:01 NDT to 2009-10-31 23:01 NST: the replay is November's."""
        zone = "America/St_Johns"
        calendar = Calendar(zone)
        second_pass = wall_ms(zone, 2009, 10, 31, 23, 30, fold=1)
        day, month = calendar.period("day", second_pass), calendar.period("month", second_pass)
        assert (day.label, month.label) == ("2009-11-01", "2009-11")
        assert hours(calendar.labelled("day", "2009-10-31")) == 24
        assert hours(day) == 25
        for window in WINDOWS:
            period = calendar.period(window, second_pass)
            assert period.start_ms <= second_pass < period.end_ms
            assert calendar.period(window, period.start_ms - 1).end_ms == period.start_ms


# -- bad input ---------------------------------------------------------------------------------


class TestBadInput:
    """Typos fail loudly with ValueError, at configuration time where possible."""

    @pytest.mark.parametrize(
        ("timezone", "message"),
        [
            ("Mars/Base", "unknown time zone 'Mars/Base'"),
            ("", "invalid time zone ''"),
            ("../etc/passwd", "invalid time zone '../etc/passwd'"),
            ("/etc/passwd", "invalid time zone"),
            ("America", "unknown time zone"),
            ("zone.tab", "invalid time zone"),
        ],
    )
    def test_unknown_zone(self, timezone: str, message: str) -> None:
        """Unknown names, path tricks and non-zone files under the zone directory."""
        with pytest.raises(ValueError, match=message):
            Calendar(timezone)

    def test_unknown_week_start(self) -> None:
        """The message lists the choices."""
        with pytest.raises(ValueError, match=r"unknown week_start 'funday'.*monday"):
            Calendar(week_start="funday")

    @pytest.mark.parametrize("window", ["fortnight", "", "Day", "days"])
    def test_unknown_window(self, window: str) -> None:
        """Windows are exact, lower-case names, in every method."""
        calendar = Calendar()
        with pytest.raises(ValueError, match="unknown window"):
            calendar.period(window, 0)
        with pytest.raises(ValueError, match="unknown window"):
            calendar.periods(("day", window), 0)
        with pytest.raises(ValueError, match="unknown window"):
            calendar.labelled(window, "2026-11-29")

    @pytest.mark.parametrize(
        ("window", "label"),
        [
            ("month", "2026-13"),
            ("month", "2026-00"),
            ("month", "2026-11-01"),
            ("day", "yesterday"),
            ("day", "2026-02-30"),
            ("day", "2026-11-29T00"),
            ("day", "2026-1-5"),
            ("day", " 2026-11-29"),
            ("day", "\u0662\u0660\u0662\u0666-11-29"),  # Arabic-Indic digits: int() takes them
            ("hour", "2026-11-29T24"),
            ("hour", "2026-11-29"),
            ("week", "2026-11-24"),  # a Tuesday, not a week start
        ],
    )
    def test_malformed_label(self, window: str, label: str) -> None:
        """A label must be the one canonical name of a period of that window."""
        with pytest.raises(ValueError, match=f"{window} label"):
            Calendar().labelled(window, label)

    def test_week_label_names_the_wrong_weekday(self) -> None:
        """The message says which day weeks start on."""
        with pytest.raises(ValueError, match="weeks start on sunday"):
            Calendar(week_start="sunday").labelled("week", "2026-11-23")

    @pytest.mark.parametrize("instant_ms", [10**15, -(10**15)])
    def test_instant_out_of_range(self, instant_ms: int) -> None:
        """Beyond datetime's years 1-9999: ValueError, not OverflowError."""
        with pytest.raises(ValueError, match="outside years 1 to 9999"):
            Calendar().period("day", instant_ms)

    def test_label_at_the_end_of_time(self) -> None:
        """December 9999 has no following month to end at."""
        with pytest.raises(ValueError, match="too close"):
            Calendar().labelled("month", "9999-12")


# -- cache -------------------------------------------------------------------------------------


class TestCache:
    """``periods`` is the hot path: a hit returns the cached tuple itself."""

    def test_same_tuple_within_the_hour(self) -> None:
        """Every instant of one hour gets the very same object."""
        calendar = Calendar("America/New_York")
        start = utc_ms(2026, 11, 29, 14)
        first = calendar.periods(WINDOWS, start)
        for t in range(start, start + HOUR_MS, 7 * MINUTE_MS + 13):
            assert calendar.periods(WINDOWS, t) is first
        assert calendar.periods(list(WINDOWS), start + HOUR_MS - 1) is first

    def test_new_answer_across_a_boundary(self) -> None:
        """Past the end, or before the start, of any cached period: recomputed, and right."""
        calendar = Calendar("America/New_York")
        windows = ("day", "hour")
        t = utc_ms(2026, 11, 29, 14, 30)
        first = calendar.periods(windows, t)
        after = calendar.periods(windows, first[1].end_ms)
        assert after is not first
        assert after == (calendar.period("day", t), calendar.period("hour", first[1].end_ms))
        assert after[1].label == "2026-11-29T10"
        before = calendar.periods(windows, first[1].start_ms - 1)
        assert before[1].label == "2026-11-29T08"
        assert calendar.periods(windows, t) == first

    def test_each_windows_tuple_has_its_own_entry(self) -> None:
        """Different window sets, and orders, do not evict or confuse each other."""
        calendar = Calendar()
        t = utc_ms(2026, 11, 29, 14, 30)
        daily = calendar.periods(("day",), t)
        both = calendar.periods(("month", "day"), t)
        assert [p.window for p in both] == ["month", "day"]
        assert calendar.periods(("day",), t + 1) is daily
        assert calendar.periods(("month", "day"), t + 1) is both
        assert calendar.periods((), t) == ()

    def test_a_hit_is_fast(self) -> None:
        """Well under a microsecond a call; the bound here is loose, for slow CI machines."""
        calendar = Calendar("Europe/Berlin")
        t = utc_ms(2026, 11, 29, 14, 30)
        calendar.periods(WINDOWS, t)
        runs = 20_000
        seconds = min(timeit.repeat(lambda: calendar.periods(WINDOWS, t), number=runs, repeat=3))
        assert seconds / runs < 5e-6
