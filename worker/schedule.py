"""Shifts and leave, pure: parsing a weekly schedule and leave ranges, and telling at an
instant whether an operator is scheduled to work and when that may change next. No I/O.

A shift is one or more items separated by commas, each days then one or more time
ranges: `mon-fri 09:00-18:00`, `mon-fri 09:00-13:00 14:00-18:00, sat 10:00-14:00`,
`fri-mon 22:00-06:00` (a range that ends at or before it starts runs over midnight into
the next day, and belongs to the day it starts), `daily 00:00-24:00`. Days are `mon` …
`sun`, a span `mon-fri` (it may wrap, `fri-mon`), or `daily`. Times are wall-clock times
in the shift's IANA time zone, so daylight-saving changes follow the zone's rules: a shift
starting at 09:00 starts at 09:00 local time on both sides of a change; a time that does
not exist on a spring-forward day (02:30 in Europe/Berlin) is read with the offset before
the change (an hour later on the clock), and one that occurs twice on a fall-back day is
its first occurrence.

Leave is one or more inclusive date ranges, `2026-12-24..2026-12-31` (or a single date),
separated by commas, from midnight to midnight in the same zone (UTC for an operator
without a shift)."""

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from worker.errors import UserError

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
MAX_LENGTH = 2000
MAX_LEAVE_LENGTH = 4000
# A schedule with no change within this long (always on, or on every minute of the week)
# is looked at again after it anyway: cheap, and it keeps the timer from being unset.
HORIZON = timedelta(days=8)

_TIME = re.compile(r"([01]\d|2[0-4]):([0-5]\d)")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


class ScheduleError(UserError, ValueError):
    """A shift, zone or leave that cannot be read: the message says what is wrong, in one
    line, quoting only what the person typed."""


@dataclass(frozen=True, slots=True)
class Range:
    days: frozenset[int]  # weekday numbers, Monday 0
    start: int  # minutes after midnight
    end: int  # minutes after midnight; <= start: ends the next day


@dataclass(frozen=True, slots=True)
class Shift:
    ranges: tuple[Range, ...]
    text: str  # normalised: what is stored and shown


@dataclass(frozen=True, slots=True)
class Leave:
    first: date
    last: date  # inclusive

    def __str__(self) -> str:
        if self.first == self.last:
            return self.first.isoformat()
        return f"{self.first.isoformat()}..{self.last.isoformat()}"


@dataclass(frozen=True, slots=True)
class Status:
    on_shift: bool
    on_leave: bool
    next_change: datetime | None  # UTC; when either may change next

    @property
    def scheduled(self) -> bool:
        return self.on_shift and not self.on_leave


def zone(name: str) -> ZoneInfo:
    """An IANA time zone by name, or ScheduleError."""
    if not name or len(name) > 64 or name.startswith("/") or ".." in name:
        raise ScheduleError(f"unknown time zone {name!r}; use an IANA name like Europe/Berlin")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ScheduleError(
            f"unknown time zone {name!r}; use an IANA name like Europe/Berlin"
        ) from None


def _days(text: str) -> frozenset[int]:
    if text == "daily":
        return frozenset(range(7))
    first, dash, last = text.partition("-")
    if first not in DAYS or (dash and last not in DAYS):
        raise ScheduleError(
            f"cannot read the days {text!r}; use mon..sun, a span like mon-fri, or daily"
        )
    a = DAYS.index(first)
    b = DAYS.index(last) if dash else a
    return frozenset((a + i) % 7 for i in range((b - a) % 7 + 1))


def _minutes(text: str, whole: str) -> int:
    m = _TIME.fullmatch(text)
    if not m or (m.group(1) == "24" and m.group(2) != "00"):
        raise ScheduleError(f"cannot read the time {text!r} in {whole!r}; use HH:MM-HH:MM")
    return int(m.group(1)) * 60 + int(m.group(2))


def parse_shift(text: str) -> Shift:
    """A shift from its text, or ScheduleError."""
    if len(text) > MAX_LENGTH:
        raise ScheduleError(f"a shift is at most {MAX_LENGTH} characters")
    ranges: list[Range] = []
    items = []
    for item in text.lower().split(","):
        words = item.split()
        if not words:
            raise ScheduleError(f"an empty part in the shift {text!r}")
        if len(words) < 2:
            raise ScheduleError(
                f"cannot read {item.strip()!r}: days then time ranges, e.g. mon-fri 09:00-18:00"
            )
        days = _days(words[0])
        for word in words[1:]:
            start_text, dash, end_text = word.partition("-")
            if not dash:
                raise ScheduleError(f"cannot read the range {word!r}; use HH:MM-HH:MM")
            start, end = _minutes(start_text, word), _minutes(end_text, word)
            if start == 24 * 60:
                raise ScheduleError(f"a range cannot start at 24:00: {word!r}")
            if start == end:
                raise ScheduleError(f"an empty range {word!r}; use 00:00-24:00 for a whole day")
            ranges.append(Range(days, start, end if end != 24 * 60 else 0))
        items.append(" ".join(words))
    return Shift(tuple(ranges), ", ".join(items))


def parse_leave(text: str) -> list[Leave]:
    """Leave ranges from their text (`2026-12-24..2026-12-31`, comma-separated), or
    ScheduleError; a range that ends before it starts is refused."""
    if len(text) > MAX_LEAVE_LENGTH:
        raise ScheduleError(f"leave is at most {MAX_LEAVE_LENGTH} characters")
    leaves = []
    for part in text.split(","):
        part = part.strip()
        first_text, dots, last_text = part.partition("..")
        last_text = last_text if dots else first_text
        try:
            if not (_DATE.fullmatch(first_text) and _DATE.fullmatch(last_text)):
                raise ValueError
            first, last = date.fromisoformat(first_text), date.fromisoformat(last_text)
        except ValueError:
            raise ScheduleError(
                f"cannot read the leave {part!r}; use YYYY-MM-DD..YYYY-MM-DD"
            ) from None
        if last < first:
            raise ScheduleError(f"the leave {part!r} ends before it starts")
        leaves.append(Leave(first, last))
    return leaves


def leave_text(leaves: list[Leave]) -> str | None:
    """What is stored for these ranges: sorted, without repeats; None for none."""
    return ", ".join(str(x) for x in sorted(set(leaves), key=lambda x: (x.first, x.last))) or None


def _at(day: date, minutes: int, tz: tzinfo) -> datetime:
    """The instant (UTC) of this wall-clock time on this day in the zone; fold 0: a time
    that does not exist is read with the offset before the change, one that occurs twice
    is the first."""
    local = datetime.combine(day, time(minutes // 60, minutes % 60), tzinfo=tz)
    return local.astimezone(UTC)


def shift_intervals(
    shift: Shift, tz: tzinfo, first: date, last: date
) -> list[tuple[datetime, datetime]]:
    """The shift's working intervals (UTC) starting on the days first..last, merged where
    they touch or overlap, in order."""
    spans = []
    day = first
    while day <= last:
        for r in shift.ranges:
            if day.weekday() in r.days:
                end_day = day if r.end > r.start else day + timedelta(days=1)
                start, end = _at(day, r.start, tz), _at(end_day, r.end, tz)
                if end > start:
                    spans.append((start, end))
        day += timedelta(days=1)
    spans.sort()
    merged: list[tuple[datetime, datetime]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def evaluate(shift: Shift | None, tz: tzinfo | None, leaves: list[Leave], now: datetime) -> Status:
    """Whether the operator is on shift and on leave at `now` (aware), and the next
    instant at which either may change (None: never, as with no shift and no leave)."""
    tz = tz or UTC
    now = now.astimezone(UTC)
    boundaries: list[datetime] = []
    on_shift = True
    if shift is not None:
        today = now.astimezone(tz).date()
        spans = shift_intervals(shift, tz, today - timedelta(days=2), today + timedelta(days=8))
        on_shift = any(start <= now < end for start, end in spans)
        boundaries += [t for span in spans for t in span if t > now]
        if not boundaries:  # on around the clock: look again later
            boundaries.append(now + HORIZON)
    on_leave = False
    for leave in leaves:
        start = _at(leave.first, 0, tz)
        end = _at(leave.last + timedelta(days=1), 0, tz)
        on_leave = on_leave or start <= now < end
        boundaries += [t for t in (start, end) if t > now]
    return Status(on_shift, on_leave, min(boundaries, default=None))


@dataclass(frozen=True, slots=True)
class Schedule:
    """An operator's stored schedule, read back."""

    shift: Shift | None
    tz: ZoneInfo | None
    leaves: list[Leave]

    @classmethod
    def of(cls, shift: str | None, time_zone: str | None, leave: str | None) -> "Schedule":
        return cls(
            parse_shift(shift) if shift else None,
            zone(time_zone) if time_zone else None,
            parse_leave(leave) if leave else [],
        )

    def at(self, now: datetime) -> Status:
        return evaluate(self.shift, self.tz, self.leaves, now)
