"""Presence through the worker: an `operator.presence` message takes an operator out of
routing and back; coming online hands them the backlog at once, oldest first; going
away with requeue_open hands their open contacts back, to be routed again in their old
place; bad presence messages are dead-lettered with their reason, nothing applied."""

import time

import aio_pika
import asyncpg

from tests.helpers import EventCollector, Expected, lead, send, settled, setup_source, wait_until
from worker import availability
from worker.app import Worker
from worker.settings import Settings

OPEN_OF = "SELECT id FROM contacts WHERE operator_id = $1 AND status = 'open' ORDER BY id"
QUEUED = "SELECT count(*) FROM contacts WHERE status = 'open' AND operator_id IS NULL"


async def test_away_operator_gets_nothing_and_online_takes_the_backlog_at_once(
    pool: asyncpg.Pool,
    settings: Settings,
    broker: aio_pika.abc.AbstractChannel,
    events: EventCollector,
    worker: Worker,
) -> None:
    [a, b] = await setup_source(pool, "tg", [("a", 10, 1), ("b", 2, 1)])
    await send(broker, settings, "operator.presence", {"operator_id": a, "status": "away"}, "p-1")
    [changed] = await events.wait_for_operator_events(1)
    assert changed.data.model_dump() == {
        "operator_id": a,
        "status": "away",
        "available": False,
        "on_shift": True,
        "on_leave": False,
        "reason": "message",
    }
    assert changed.source == f"/leadrouter/operators/{a}"
    for n in range(5):
        await send(broker, settings, "lead.contact", lead("tg", f"t:{n}"), f"m-{n}")
    await wait_until(lambda: settled(worker, 6), what="the leads")
    assert len(await pool.fetch(OPEN_OF, a)) == 0  # away: nothing
    assert len(await pool.fetch(OPEN_OF, b)) == 2  # b is full; three wait
    assert await pool.fetchval(QUEUED) == 3

    # The same message again (a redelivery) changes nothing and says nothing.
    await send(broker, settings, "operator.presence", {"operator_id": a, "status": "away"}, "p-1")
    await wait_until(lambda: settled(worker, 7), what="the repeat")

    started = time.monotonic()
    await send(broker, settings, "operator.presence", {"operator_id": a, "status": "online"}, "p-2")
    assigned = await events.wait_for("contact.assigned", 5, timeout=5)
    took = time.monotonic() - started
    assert took < 1.0, f"the backlog took {took:.2f} s"
    late = [e.data.contact_id for e in assigned if e.data.operator_id == a]
    assert late == sorted(late) and len(late) == 3  # the backlog, oldest first
    assert len(events.operator_events) == 2
    assert events.operator_events[1].data.status == "online"
    assert events.operator_events[1].data.available is True


async def test_requeue_open_hands_contacts_back_in_their_place(
    pool: asyncpg.Pool,
    settings: Settings,
    broker: aio_pika.abc.AbstractChannel,
    events: EventCollector,
    worker: Worker,
) -> None:
    [a] = await setup_source(pool, "tg", [("a", 10, 1)])
    for n in range(3):
        await send(broker, settings, "lead.contact", lead("tg", f"t:{n}"), f"m-{n}")
    await events.wait_for("contact.assigned", 3)
    mine = [r["id"] for r in await pool.fetch(OPEN_OF, a)]
    # b joins, full at first, so the requeued contacts queue and one newer contact is
    # queued behind them; then b gets room.
    b = (
        await pool.fetchrow("INSERT INTO operators (name, max_load) VALUES ('b', 0) RETURNING id")
    )["id"]
    await pool.execute(
        "INSERT INTO source_weights (source_id, operator_id, weight) SELECT id, $1, 1 FROM sources",
        b,
    )
    await send(
        broker,
        settings,
        "operator.presence",
        {"operator_id": a, "status": "offline", "requeue_open": True},
        "p-1",
    )
    requeued = await events.wait_for("contact.requeued", 3)
    assert [e.data.contact_id for e in requeued] == mine
    assert all(e.data.requeued_from == a and e.data.operator_id is None for e in requeued)
    assert (await pool.fetchval("SELECT open_load FROM operators WHERE id = $1", a)) == 0
    await send(broker, settings, "lead.contact", lead("tg", "t:new"), "m-new")
    await events.wait_for("contact.queued", 1)
    from worker import admin

    await admin.update_operator(pool, b, max_load=10)
    assigned = await events.wait_for("contact.assigned", 3 + 4)
    again = [e.data.contact_id for e in assigned[3:]]
    assert again[:3] == mine  # their old place: before the newer one
    assert all(e.data.operator_id == b for e in assigned[3:])
    [changed] = events.operator_events
    assert changed.data.status == "offline" and changed.data.reason == "message"


async def test_bad_presence_messages_are_dead_lettered(
    pool: asyncpg.Pool,
    settings: Settings,
    broker: aio_pika.abc.AbstractChannel,
    worker: Worker,
    expected: Expected,
) -> None:
    [a] = await setup_source(pool, "tg", [("a", 10, 1)])
    bad = [
        {"operator_id": a + 1000, "status": "away"},
        {"operator_id": a, "status": "busy"},
        {"operator_id": a, "status": "away", "requeue_open": "yes"},
        {"status": "away"},
    ]
    for n, body in enumerate(bad):
        await send(broker, settings, "operator.presence", body, f"bad-{n}")
    await wait_until(lambda: settled(worker, len(bad)), what="the bad messages")
    assert worker.outcomes["unknown_operator"] == 1
    assert worker.outcomes["invalid_schema"] == 3
    expected.dead.update({"unknown_operator": 1, "invalid_schema": 3})
    assert await pool.fetchval("SELECT presence FROM operators WHERE id = $1", a) == "online"
    assert await pool.fetchval("SELECT count(*) FROM outbox") == 0


async def test_presence_by_admin_takes_effect_as_by_message(pool: asyncpg.Pool) -> None:
    """Without a worker: the admin path routes the backlog in its own transaction."""
    [a] = await setup_source(pool, "tg", [("a", 10, 1)])
    away = await availability.set_presence(pool, a, "away", "cli")
    assert away.event and away.operator["available"] is False
    again = await availability.set_presence(pool, a, "away", "cli")
    assert not again.event
    source = await pool.fetchval("SELECT id FROM sources")
    for n in range(2):
        lead_id = await pool.fetchval(
            "INSERT INTO leads (external_id) VALUES ($1) RETURNING id", f"q:{n}"
        )
        await pool.execute(
            "INSERT INTO contacts (lead_id, source_id, inbound_message_id) VALUES ($1, $2, $3)",
            lead_id,
            source,
            f"q-{n}",
        )
    assert not await pool.fetchval("SELECT available FROM source_weights")
    online = await availability.set_presence(pool, a, "online", "cli")
    assert online.assigned == 2
    assert await pool.fetchval("SELECT open_load FROM operators WHERE id = $1", a) == 2
    keys = [
        r["routing_key"] for r in await pool.fetch("SELECT routing_key FROM outbox ORDER BY id")
    ]
    assert keys == [
        "operator.presence_changed",
        "operator.presence_changed",
        "contact.assigned",
        "contact.assigned",
    ]


async def test_the_claims_take_nothing_of_an_operator_who_is_not_online(
    pool: asyncpg.Pool,
) -> None:
    """The database's own guard: routing reads operators without locking them, so an
    operator who went away after the read must still not be claimed."""
    from worker.sql import Q

    [op] = await setup_source(pool, "tg", [("a", 5, 1)])
    source_id = await pool.fetchval("SELECT id FROM sources WHERE key = 'tg'")
    lead_id = await pool.fetchval("INSERT INTO leads (external_id) VALUES ('q') RETURNING id")
    queued = await pool.fetchval(
        "INSERT INTO contacts (lead_id, source_id, inbound_message_id) VALUES ($1, $2, 'q')"
        " RETURNING id",
        lead_id,
        source_id,
    )
    await availability.set_presence(pool, op, "away", "cli")
    async with pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        try:
            args = [["n"], [None], [None], [None], ["n"], [source_id], [op], ["hi"], ["m-n"]]
            [row] = await conn.fetch(Q.record_contacts, *args, [], [], [], [], [], [0], [0])
            assert row["claimed"] is False, "an away operator's capacity was claimed"
            rows = await conn.fetch(
                Q.assign_contacts, [queued], [op], [op], [1], [], [], [], [], [], [0], [source_id]
            )
            assert rows == [], "a queued contact went to an away operator"
        finally:
            await tx.rollback()
