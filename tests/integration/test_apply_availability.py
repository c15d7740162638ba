"""`leadrouter apply` with shifts and leave: applied with the rest, idempotent, and an
operator's shift set in the file takes them out of routing at once."""

import asyncpg

from worker.routing_file import apply, parse

FILE = """
[[operators]]
name = "Alice"
max_load = 5
shift = "{day} 10:00-11:00"
time_zone = "America/New_York"
leave = ["2026-12-24..2026-12-31"]

[[operators]]
name = "Bob"
max_load = 5

[[sources]]
key = "tg"
weights = {{ Alice = 1, Bob = 1 }}
"""


async def test_apply_sets_schedules_once(pool: asyncpg.Pool) -> None:
    from datetime import UTC, datetime

    day = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")[(datetime.now(UTC).weekday() + 3) % 7]
    routing = parse(FILE.format(day=day), "toml")
    first = await apply(pool, routing, dry_run=False)
    assert [c.kind for c in first] == ["create", "create", "create", "create"]
    row = await pool.fetchrow(
        "SELECT shift, time_zone, leave, scheduled, schedule_due_at FROM operators"
        " WHERE name = 'Alice'"
    )
    assert row["shift"] == f"{day} 10:00-11:00" and row["time_zone"] == "America/New_York"
    assert row["leave"] == "2026-12-24..2026-12-31"
    assert row["scheduled"] is False and row["schedule_due_at"] is not None
    available = await pool.fetch(
        "SELECT o.name FROM source_weights w JOIN operators o ON o.id = w.operator_id"
        " WHERE w.available ORDER BY o.name"
    )
    assert [r["name"] for r in available] == ["Bob"]
    outbox = await pool.fetchval("SELECT count(*) FROM outbox")
    again = await apply(pool, routing, dry_run=False)
    assert {c.kind for c in again} == {"unchanged"}
    assert await pool.fetchval("SELECT count(*) FROM outbox") == outbox  # no new event
    # Bob's schedule, set by hand, is left alone by a file that does not mention it.
    await pool.execute("UPDATE operators SET leave = '2030-01-01' WHERE name = 'Bob'")
    assert {c.kind for c in await apply(pool, routing, dry_run=False)} == {"unchanged"}
    assert await pool.fetchval("SELECT leave FROM operators WHERE name = 'Bob'") == "2030-01-01"
