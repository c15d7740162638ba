"""Shifts and leave in the routing file: validated with the rest, normalised, and in the
diff only where the file sets them."""

import pytest

from worker.errors import UserError
from worker.routing_file import Operator, State, parse, plan

FILE = """
[[operators]]
name = "Alice"
max_load = 5
shift = "Mon-Fri 09:00-18:00"
time_zone = "Europe/Berlin"
leave = ["2026-12-24..2026-12-31", "2027-01-05"]

[[operators]]
name = "Bob"
max_load = 5
"""


def test_schedule_fields_are_read_and_normalised() -> None:
    alice, bob = parse(FILE, "toml").operators
    assert alice.schedule_fields() == {
        "shift": "mon-fri 09:00-18:00",
        "time_zone": "Europe/Berlin",
        "leave": "2026-12-24..2026-12-31, 2027-01-05",
    }
    assert bob.schedule_fields() == {}  # left out: left alone


def test_the_diff_shows_schedule_changes_and_nothing_when_equal() -> None:
    routing = parse(FILE, "toml")
    same = State(
        (
            Operator(
                1,
                "Alice",
                5,
                True,
                "mon-fri 09:00-18:00",
                "Europe/Berlin",
                "2026-12-24..2026-12-31, 2027-01-05",
            ),
            Operator(2, "Bob", 5, True, "sat 10:00-11:00", "UTC", "2026-01-01"),
        )
    )
    assert [c.kind for c in plan(same, routing)] == ["unchanged", "unchanged"]
    before = State((Operator(1, "Alice", 5, True), Operator(2, "Bob", 5, True)))
    [alice, bob] = plan(before, routing)
    assert alice.kind == "update" and "shift off → 'mon-fri 09:00-18:00'" in alice.details
    assert bob.kind == "unchanged"


def test_empty_values_clear() -> None:
    routing = parse(
        '[[operators]]\nname = "A"\nmax_load = 1\nshift = ""\ntime_zone = "UTC"\nleave = []\n',
        "toml",
    )
    assert routing.operators[0].schedule_fields() == {
        "shift": None,
        "time_zone": "UTC",
        "leave": None,
    }


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ('shift = "mon-fri 09:00-18:00"', "operators[0]: a shift needs its time_zone"),
        (
            'shift = "weekdays 09:00-18:00"\ntime_zone = "UTC"',
            "operators[0].shift: cannot read the days",
        ),
        ('time_zone = "Mars/Olympus"', "operators[0].time_zone: unknown time zone"),
        ('leave = ["2026-12-31..2026-12-24"]', "operators[0].leave: the leave"),
        ('leave = "2026-12-24"', "operators[0].leave"),
    ],
)
def test_bad_schedules_are_one_line_with_the_location(entry: str, message: str) -> None:
    with pytest.raises(UserError) as caught:
        parse(f'[[operators]]\nname = "A"\nmax_load = 1\n{entry}\n', "toml")
    assert str(caught.value).startswith(message), str(caught.value)
    assert "\n" not in str(caught.value)
