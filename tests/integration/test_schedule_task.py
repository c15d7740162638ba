"""The schedule side task: a shift starting or leave ending hands the operator the backlog
within a second, with no cron, and boundaries that passed while no worker ran are caught
up at start. The boundary is made to fall a moment from now by writing the operator's
row as the schedule would have left it (a real shift boundary is minutes away)."""

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import asyncpg

from tests.helpers import (
    EventCollector,
    assert_clean_end,
    lead,
    send,
    settled,
    setup_source,
    wait_until,
)
from worker import availability
from worker.app import Worker
from worker.settings import Settings

QUEUED = "SELECT count(*) FROM contacts WHERE status = 'open' AND operator_id IS NULL"


def off_shift_now() -> str:
    """A weekly shift that is surely not on now: an hour, three days from today."""
    day = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")[(datetime.now(UTC).weekday() + 3) % 7]
    return f"{day} 10:00-11:00"


async def test_a_shift_starting_routes_the_backlog_within_a_second(
    pool: asyncpg.Pool,
    settings: Settings,
    broker: aio_pika.abc.AbstractChannel,
    events: EventCollector,
    worker: Worker,
) -> None:
    [a] = await setup_source(pool, "tg", [("a", 10, 1)])
    changed = await availability.set_shift(pool, a, off_shift_now(), "UTC")
    assert changed.event and changed.operator["on_shift"] is False
    due = await pool.fetchval("SELECT schedule_due_at FROM operators WHERE id = $1", a)
    assert due > datetime.now(UTC) + timedelta(days=2)
    for n in range(4):
        await send(broker, settings, "lead.contact", lead("tg", f"t:{n}"), f"m-{n}")
    await wait_until(lambda: settled(worker, 4), what="the leads")
    assert await pool.fetchval(QUEUED) == 4

    # The shift is now around the clock, and its start is half a second away.
    start = await pool.fetchval(
        "UPDATE operators SET shift = 'daily 00:00-24:00',"
        " schedule_due_at = clock_timestamp() + interval '0.5 seconds'"
        " WHERE id = $1 RETURNING schedule_due_at",
        a,
    )
    await pool.execute("SELECT pg_notify('leadrouter_schedule', '')")
    assigned = await events.wait_for("contact.assigned", 4, timeout=5)
    late = max(e.time for e in assigned) - start
    assert late < timedelta(seconds=1), f"the backlog waited {late} after the shift started"
    assert [e.data.contact_id for e in assigned] == sorted(e.data.contact_id for e in assigned)
    [_, started] = await events.wait_for_operator_events(2)
    assert started.data.reason == "shift" and started.data.available is True
    next_due = await pool.fetchval("SELECT schedule_due_at FROM operators WHERE id = $1", a)
    assert next_due > datetime.now(UTC) + timedelta(days=6)  # around the clock: a week on


async def test_boundaries_passed_while_down_are_caught_up_at_start(
    pool: asyncpg.Pool,
    settings: Settings,
    broker: aio_pika.abc.AbstractChannel,
    events: EventCollector,
    worker_log: list[dict[str, Any]],
) -> None:
    """Leave that ended while no worker ran: the first worker to start hands the
    operator the backlog, and says why (reason leave)."""
    [a, b] = await setup_source(pool, "tg", [("a", 10, 1), ("b", 10, 1)])
    await availability.set_leave(pool, a, [datetime.now(UTC).date().isoformat()])
    await availability.set_presence(pool, b, "offline", "cli")
    source = await pool.fetchval("SELECT id FROM sources")
    for n in range(3):
        lead_id = await pool.fetchval(
            "INSERT INTO leads (external_id) VALUES ($1) RETURNING id", f"q:{n}"
        )
        await pool.execute(
            "INSERT INTO contacts (lead_id, source_id, inbound_message_id) VALUES ($1, $2, $3)",
            lead_id,
            source,
            f"q-{n}",
        )
    # As if the leave had been two days last month, and ended while everything was down.
    await pool.execute(
        "UPDATE operators SET leave = '2020-01-01..2020-01-02',"
        " schedule_due_at = '2020-01-03T00:00:00Z' WHERE id = $1",
        a,
    )
    app = Worker(settings)
    started = time.monotonic()
    await app.start()
    try:
        assigned = await events.wait_for("contact.assigned", 3, timeout=10)
        assert time.monotonic() - started < 5
        assert {e.data.operator_id for e in assigned} == {a}
        changed = [e for e in events.operator_events if e.data.operator_id == a]
        assert [e.data.reason for e in changed] == ["cli", "leave"]  # set, then ended
        assert changed[1].data.on_leave is False and changed[1].data.available is True
    finally:
        await app.stop()
    await assert_clean_end(settings, worker_log)
    due = await pool.fetchval("SELECT schedule_due_at FROM operators WHERE id = $1", a)
    assert due is None  # no shift, leave in the past: nothing will change
