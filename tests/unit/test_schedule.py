"""Shifts and leave, pure: parsing, evaluation at an instant, the next change, and the
daylight-saving transitions of Europe/Berlin and America/New_York."""

from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.errors import UserError
from worker.schedule import (
    Leave,
    Schedule,
    ScheduleError,
    evaluate,
    leave_text,
    parse_leave,
    parse_shift,
    zone,
)

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def test_parse_normalises_and_reads_several_ranges() -> None:
    shift = parse_shift("Mon-Fri 09:00-13:00  14:00-18:00 ,sat 10:00-14:00")
    assert shift.text == "mon-fri 09:00-13:00 14:00-18:00, sat 10:00-14:00"
    assert len(shift.ranges) == 3
    assert shift.ranges[0].days == frozenset(range(5))
    assert parse_shift(shift.text) == shift  # stored text reads back the same


def test_spans_wrap_and_daily() -> None:
    assert parse_shift("fri-mon 22:00-06:00").ranges[0].days == frozenset({4, 5, 6, 0})
    assert parse_shift("daily 00:00-24:00").ranges[0].days == frozenset(range(7))


@pytest.mark.parametrize(
    "text",
    [
        "",
        "mon-fri",
        "09:00-18:00",
        "monday 09:00-18:00",
        "mon-fri 9:00-18:00",
        "mon-fri 09:00-18:60",
        "mon-fri 09:00-25:00",
        "mon-fri 09:00-24:30",
        "mon-fri 24:00-06:00",
        "mon-fri 09:00-09:00",
        "mon-fri 09:00",
        "mon-fri 09:00-18:00,",
        "x" * 3000,
    ],
)
def test_malformed_shifts_are_refused_with_one_line(text: str) -> None:
    with pytest.raises(ScheduleError) as caught:
        parse_shift(text)
    assert "\n" not in str(caught.value)
    assert isinstance(caught.value, UserError)  # the CLI prints it as one error line


@pytest.mark.parametrize("name", ["Mars/Olympus", "", "../etc/passwd", "/etc/localtime", "x" * 70])
def test_unknown_zones_are_refused(name: str) -> None:
    with pytest.raises(ScheduleError, match="unknown time zone"):
        zone(name)


def test_leave_ranges() -> None:
    assert parse_leave("2026-12-24..2026-12-31, 2027-01-05") == [
        Leave(date(2026, 12, 24), date(2026, 12, 31)),
        Leave(date(2027, 1, 5), date(2027, 1, 5)),
    ]
    leaves = parse_leave("2027-01-05,2026-12-24..2026-12-31,2027-01-05")
    assert leave_text(leaves) == "2026-12-24..2026-12-31, 2027-01-05"
    assert leave_text([]) is None


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("2026-12-31..2026-12-24", "ends before it starts"),
        ("2026-02-30", "cannot read"),
        ("24.12.2026", "cannot read"),
        ("2026-12-24...2026-12-31", "cannot read"),
        ("", "cannot read"),
    ],
)
def test_bad_leave_is_refused(text: str, why: str) -> None:
    with pytest.raises(ScheduleError, match=why):
        parse_leave(text)


def test_office_hours_in_berlin_winter() -> None:
    shift = parse_shift("mon-fri 09:00-18:00")
    # Monday 2026-01-05, CET = UTC+1: the shift is 08:00-17:00 UTC.
    before = evaluate(shift, BERLIN, [], utc(2026, 1, 5, 7, 59))
    assert not before.on_shift and before.next_change == utc(2026, 1, 5, 8, 0)
    during = evaluate(shift, BERLIN, [], utc(2026, 1, 5, 8, 0))
    assert during.on_shift and during.next_change == utc(2026, 1, 5, 17, 0)
    # Friday evening: next Monday.
    friday = evaluate(shift, BERLIN, [], utc(2026, 1, 9, 17, 0))
    assert not friday.on_shift and friday.next_change == utc(2026, 1, 12, 8, 0)


def test_berlin_spring_forward_keeps_local_times() -> None:
    """2026-03-29 02:00 CET -> 03:00 CEST. A shift at 09:00 local starts at 08:00 UTC
    before the change and 07:00 UTC after."""
    shift = parse_shift("daily 09:00-17:00")
    saturday = evaluate(shift, BERLIN, [], utc(2026, 3, 28, 12))
    assert saturday.on_shift and saturday.next_change == utc(2026, 3, 28, 16, 0)
    night = evaluate(shift, BERLIN, [], utc(2026, 3, 28, 16, 0))
    assert night.next_change == utc(2026, 3, 29, 7, 0)
    assert not evaluate(shift, BERLIN, [], utc(2026, 3, 29, 6, 59)).on_shift
    assert evaluate(shift, BERLIN, [], utc(2026, 3, 29, 7, 0)).on_shift


def test_berlin_overnight_range_across_spring_forward_is_an_hour_shorter() -> None:
    """22:00-06:00 from Saturday 2026-03-28: 21:00 UTC to 04:00 UTC (7 hours)."""
    shift = parse_shift("sat 22:00-06:00")
    start = evaluate(shift, BERLIN, [], utc(2026, 3, 28, 20, 59))
    assert not start.on_shift and start.next_change == utc(2026, 3, 28, 21, 0)
    night = evaluate(shift, BERLIN, [], utc(2026, 3, 29, 1, 0))
    assert night.on_shift and night.next_change == utc(2026, 3, 29, 4, 0)


def test_berlin_fall_back_overnight_range_is_an_hour_longer() -> None:
    """2026-10-25 03:00 CEST -> 02:00 CET. sat 22:00-06:00: 20:00 UTC to 05:00 UTC."""
    shift = parse_shift("sat 22:00-06:00")
    on = evaluate(shift, BERLIN, [], utc(2026, 10, 24, 20, 0))
    assert on.on_shift and on.next_change == utc(2026, 10, 25, 5, 0)
    assert evaluate(shift, BERLIN, [], utc(2026, 10, 25, 4, 59)).on_shift
    assert not evaluate(shift, BERLIN, [], utc(2026, 10, 25, 5, 0)).on_shift


def test_berlin_time_in_the_gap_and_the_repeated_hour() -> None:
    """02:30 does not exist on 2026-03-29: read with the offset before (CET), so 01:30
    UTC; 02:30 happens twice on 2026-10-25: the first (CEST), 00:30 UTC."""
    spring = parse_shift("sun 02:30-04:00")
    assert evaluate(spring, BERLIN, [], utc(2026, 3, 29, 1, 0)).next_change == utc(
        2026, 3, 29, 1, 30
    )
    fall = parse_shift("sun 02:30-04:00")
    assert evaluate(fall, BERLIN, [], utc(2026, 10, 25, 0, 0)).next_change == utc(
        2026, 10, 25, 0, 30
    )
    assert evaluate(fall, BERLIN, [], utc(2026, 10, 25, 2, 59)).on_shift  # 03:59 CET
    assert not evaluate(fall, BERLIN, [], utc(2026, 10, 25, 3, 0)).on_shift


def test_new_york_transitions() -> None:
    """2026-03-08 02:00 EST -> 03:00 EDT; 2026-11-01 02:00 EDT -> 01:00 EST. 09:00 local
    is 14:00 UTC in winter and 13:00 UTC in summer."""
    shift = parse_shift("daily 09:00-17:00")
    sat = evaluate(shift, NEW_YORK, [], utc(2026, 3, 7, 22, 0))
    assert not sat.on_shift and sat.next_change == utc(2026, 3, 8, 13, 0)
    fall = evaluate(shift, NEW_YORK, [], utc(2026, 10, 31, 22, 0))
    assert fall.next_change == utc(2026, 11, 1, 14, 0)
    overnight = parse_shift("sat 20:00-04:00")
    # Sat 2026-10-31 20:00 EDT = 00:00 UTC; Sun 04:00 EST = 09:00 UTC: nine hours.
    on = evaluate(overnight, NEW_YORK, [], utc(2026, 11, 1, 0, 0))
    assert on.on_shift and on.next_change == utc(2026, 11, 1, 9, 0)


def test_leave_is_midnight_to_midnight_in_the_zone() -> None:
    leaves = parse_leave("2026-12-24..2026-12-26")
    shift = parse_shift("daily 00:00-24:00")
    before = evaluate(shift, BERLIN, leaves, utc(2026, 12, 23, 22, 59))
    assert before.scheduled and before.next_change == utc(2026, 12, 23, 23, 0)
    on = evaluate(shift, BERLIN, leaves, utc(2026, 12, 23, 23, 0))
    assert on.on_leave and not on.scheduled and on.next_change == utc(2026, 12, 26, 23, 0)
    assert evaluate(shift, BERLIN, leaves, utc(2026, 12, 26, 23, 0)).scheduled
    # Without a shift, leave counts in UTC.
    plain = evaluate(None, None, leaves, utc(2026, 12, 24, 0, 0))
    assert plain.on_leave and plain.on_shift and plain.next_change == utc(2026, 12, 27)


def test_no_schedule_never_changes() -> None:
    status = Schedule.of(None, None, None).at(utc(2026, 1, 1))
    assert status.scheduled and status.next_change is None


def test_around_the_clock_is_looked_at_again_later() -> None:
    status = evaluate(parse_shift("daily 00:00-24:00"), BERLIN, [], utc(2026, 1, 1))
    assert status.on_shift and status.next_change is not None
    assert status.next_change > utc(2026, 1, 7)


times = st.datetimes(
    min_value=datetime(2025, 1, 1), max_value=datetime(2028, 12, 31), timezones=st.just(UTC)
)


@given(
    now=times,
    zone_name=st.sampled_from(["Europe/Berlin", "America/New_York", "Asia/Kolkata", "UTC"]),
    shift=st.sampled_from(
        ["mon-fri 09:00-18:00", "fri-mon 22:00-06:00", "daily 02:30-03:30", "sun 00:00-24:00"]
    ),
)
def test_nothing_changes_before_the_next_change(now: datetime, zone_name: str, shift: str) -> None:
    """The status holds until next_change, and (for a real boundary) differs right after:
    the schedule task can sleep until then and miss nothing."""
    tz = ZoneInfo(zone_name)
    parsed = parse_shift(shift)
    status = evaluate(parsed, tz, [], now)
    assert status.next_change is not None and status.next_change > now
    span = status.next_change - now
    for fraction in (0.25, 0.5, 0.99):
        between = now + span * fraction
        assert evaluate(parsed, tz, [], between).on_shift == status.on_shift
    if span < timedelta(days=7):
        assert evaluate(parsed, tz, [], status.next_change).on_shift != status.on_shift
