"""Presence, shifts and leave through the command: set, show and clear; what `operators
list` and `stats` show; wrong input is one error line and changes nothing."""

import asyncpg

from tests.commands import as_json, fails_cleanly, leadrouter
from tests.helpers import setup_source
from worker.settings import Settings

STATE = "SELECT presence, shift, time_zone, leave, scheduled, schedule_due_at FROM operators"


async def test_presence_shift_and_leave_round_trip(settings: Settings, pool: asyncpg.Pool) -> None:
    [op, other] = await setup_source(pool, "tg", [("a", 5, 1), ("b", 5, 1)])
    listed = as_json(settings, "operators", "list")
    assert [(o["presence"], o["shift"], o["available"]) for o in listed] == [
        ("online", None, True),
        ("online", None, True),
    ]

    away = as_json(settings, "operators", "presence", str(op), "away")
    assert away["presence"] == "away" and away["available"] is False

    shift = as_json(
        settings, "operators", "shift", str(op), "Mon-Fri 09:00-18:00", "--tz", "Europe/Berlin"
    )
    assert shift["shift"] == "mon-fri 09:00-18:00" and shift["time_zone"] == "Europe/Berlin"
    shown = as_json(settings, "operators", "shift", str(op))
    assert shown["shift"] == "mon-fri 09:00-18:00" and shown["presence"] == "away"

    leave = as_json(settings, "operators", "leave", str(op), "2026-12-24..2026-12-31")
    assert leave["leave"] == "2026-12-24..2026-12-31"
    more = as_json(settings, "operators", "leave", str(op), "2027-01-05")
    assert more["leave"] == "2026-12-24..2026-12-31, 2027-01-05"
    assert as_json(settings, "operators", "leave", str(op))["leave"] == more["leave"]

    table = leadrouter(settings, "operators", "list").stdout
    assert "mon-fri 09:00-18:00" in table and "away" in table

    stats = as_json(settings, "stats")
    [source] = stats
    by_id = {o["operator_id"]: o for o in source["operators"]}
    assert by_id[op]["presence"] == "away" and by_id[op]["available"] is False
    assert by_id[op]["shift"] == "mon-fri 09:00-18:00 (Europe/Berlin)"
    assert by_id[other]["available"] is True

    cleared = as_json(settings, "operators", "leave", str(op), "--clear")
    assert cleared["leave"] is None
    cleared = as_json(settings, "operators", "shift", str(op), "--clear")
    assert cleared["shift"] is None and cleared["time_zone"] is None
    back = as_json(settings, "operators", "presence", str(op), "online")
    assert back["available"] is True
    row = await pool.fetchrow(STATE + " WHERE id = $1", op)
    assert tuple(row) == ("online", None, None, None, True, None)
    reasons = await pool.fetch(
        "SELECT payload->'data'->>'reason' AS reason FROM outbox"
        " WHERE routing_key = 'operator.presence_changed' ORDER BY id"
    )
    assert {r["reason"] for r in reasons} == {"cli"}


async def test_wrong_input_is_one_line_and_changes_nothing(
    settings: Settings, pool: asyncpg.Pool
) -> None:
    [op] = await setup_source(pool, "tg", [("a", 5, 1)])
    await pool.execute("UPDATE operators SET shift = 'sat 10:00-11:00', time_zone = 'UTC'")
    before = await pool.fetch(STATE)
    cases = [
        (["presence", "99", "away"], "no operator with id 99"),
        (["presence", str(op), "busy"], "unknown status 'busy'"),
        (["shift", str(op), "mon-fri 09:00-18:00", "--tz", "Mars/Olympus"], "unknown time zone"),
        (["shift", str(op), "mon-fri 9-6", "--tz", "UTC"], "cannot read the time"),
        (["shift", str(op), "weekdays 09:00-18:00", "--tz", "UTC"], "cannot read the days"),
        (["shift", str(op), "mon-fri 09:00-18:00"], "needs its time zone"),
        (["shift", "99", "mon-fri 09:00-18:00", "--tz", "UTC"], "no operator with id 99"),
        (["leave", str(op), "2026-12-31..2026-12-24"], "ends before it starts"),
        (["leave", str(op), "2026-12-24", "tomorrow"], "cannot read the leave"),
        (["leave", "99", "2026-12-24"], "no operator with id 99"),
    ]
    for args, expect in cases:
        fails_cleanly(settings, "operators", *args, expect=expect)
    assert await pool.fetch(STATE) == before
    assert await pool.fetchval("SELECT count(*) FROM outbox") == 0
