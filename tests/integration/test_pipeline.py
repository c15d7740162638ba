"""The distribution pipeline against real RabbitMQ and PostgreSQL: messages published by
a plain AMQP client, events read from the outbound exchange."""

import asyncio
import uuid

import aio_pika
import asyncpg

from tests.helpers import EventCollector, lead, raw_message, send, settled, setup_source, wait_until
from worker import admin
from worker.app import Worker
from worker.settings import Settings

# chi-square critical value for 2 degrees of freedom at p = 0.001
CHI2_2DF_P001 = 13.82


async def test_shares_follow_weights(
    pool: asyncpg.Pool,
    broker: aio_pika.abc.AbstractChannel,
    settings: Settings,
    events: EventCollector,
    worker: Worker,
) -> None:
    ids = await setup_source(
        pool,
        "telegram-bot",
        [("a", 1000, 10), ("b", 1000, 30), ("c", 1000, 60)],
        strategy="weighted_random",
    )
    exchange = await broker.get_exchange(settings.inbound_exchange)
    await asyncio.gather(
        *(
            exchange.publish(raw_message(lead("telegram-bot", f"tg:{n}"), f"m-{n}"), "lead.contact")
            for n in range(600)
        )
    )
    assigned = await events.wait_for("contact.assigned", 600, timeout=60)

    counts = {i: sum(e.data.operator_id == i for e in assigned) for i in ids}
    expected = {ids[0]: 60, ids[1]: 180, ids[2]: 360}
    chi2 = sum((counts[i] - expected[i]) ** 2 / expected[i] for i in ids)
    assert chi2 < CHI2_2DF_P001, (counts, chi2)
    assert len({e.data.contact_id for e in assigned}) == 600
    assert events.of("contact.queued") == []
    assert await pool.fetchval("SELECT count(*) FROM contacts") == 600
    event = assigned[0]
    assert event.specversion == "1.0" and event.type == "org.leadrouter.contact.assigned"
    assert event.subject == f"contacts/{event.data.contact_id}"
    assert event.source == "/leadrouter/sources/telegram-bot"


async def test_capacity_queue_close_and_drain(
    pool: asyncpg.Pool,
    broker: aio_pika.abc.AbstractChannel,
    settings: Settings,
    events: EventCollector,
    worker: Worker,
) -> None:
    [op] = await setup_source(pool, "web", [("solo", 2, 1)])
    for n in range(3):
        await send(broker, settings, "lead.contact", lead("web", f"w:{n}"), f"m-{n}")
    first_two = await events.wait_for("contact.assigned", 2)
    [queued] = await events.wait_for("contact.queued", 1)
    assert {e.data.operator_id for e in first_two} == {op}
    # Whichever was routed last (handled concurrently, not necessarily w:2) waits.
    assert queued.data.operator_id is None
    assert {e.data.contact_id for e in first_two} | {queued.data.contact_id} == set(range(1, 4))
    assert (await admin.list_operators(pool))[0]["load"] == 2

    # Closing by message frees capacity, which goes to the queued contact at once.
    closing = first_two[0].data.contact_id
    await send(broker, settings, "contact.close", {"contact_id": closing}, "close-1")
    [closed] = await events.wait_for("contact.closed", 1)
    assert closed.data.contact_id == closing and closed.data.operator_id == op
    late = (await events.wait_for("contact.assigned", 3))[2]
    assert late.data.contact_id == queued.data.contact_id and late.data.operator_id == op
    assert late.data.queued_seconds is not None and late.data.queued_seconds >= 0

    # Closing again is a no-op; a new lead after the next close goes to the operator.
    await send(broker, settings, "contact.close", {"contact_id": closing}, "close-1b")
    await send(
        broker,
        settings,
        "contact.close",
        {"contact_id": first_two[1].data.contact_id},
        "close-2",
    )
    await events.wait_for("contact.closed", 2)
    await send(broker, settings, "lead.contact", lead("web", "w:3"), "m-3")
    newest = (await events.wait_for("contact.assigned", 4))[3]
    assert newest.data.lead_external_id == "w:3" and newest.data.operator_id == op
    await wait_until(lambda: settled(worker, 7), what="7 messages handled")
    assert len(events.of("contact.closed")) == 2
    assert (await admin.list_operators(pool))[0]["load"] == 2


async def test_redelivered_message_ids_create_nothing(
    pool: asyncpg.Pool,
    broker: aio_pika.abc.AbstractChannel,
    settings: Settings,
    events: EventCollector,
    worker: Worker,
) -> None:
    await setup_source(pool, "tg", [("a", 100, 1), ("b", 100, 1)])
    for n in range(20):
        await send(broker, settings, "lead.contact", lead("tg", f"x:{n}"), f"id-{n}")
    await events.wait_for("contact.assigned", 20)
    # The same ids again, one through the body field instead of the AMQP property.
    for n in range(20):
        await send(broker, settings, "lead.contact", lead("tg", f"x:{n}"), f"id-{n}")
    await send(broker, settings, "lead.contact", {**lead("tg", "x:0"), "message_id": "id-0"})
    await wait_until(lambda: settled(worker, 41), what="41 messages handled")
    assert worker.outcomes == {"ok": 41}
    await worker.relay.drain()  # type: ignore[union-attr]
    await asyncio.sleep(0.3)
    assert await pool.fetchval("SELECT count(*) FROM contacts") == 20
    assert await pool.fetchval("SELECT count(*) FROM outbox") == 20
    assert len(events.events) == 20


async def test_returning_lead_is_recognised(
    pool: asyncpg.Pool,
    broker: aio_pika.abc.AbstractChannel,
    settings: Settings,
    events: EventCollector,
    worker: Worker,
) -> None:
    await setup_source(pool, "tg", [("a", 100, 1)])
    await admin.add_source(pool, "web", None, "", None)
    await admin.set_weights(pool, "web", {(await admin.list_operators(pool))[0]["id"]: 1})
    await send(
        broker,
        settings,
        "lead.contact",
        lead("tg", "p:1", name="Ann", email="ann@example.com"),
        "r-1",
    )
    await send(
        broker,
        settings,
        "lead.contact",
        lead("web", "p:1", phone="+1 555 0100"),
        "r-2",
    )
    assigned = await events.wait_for("contact.assigned", 2)
    assert assigned[0].data.lead_id == assigned[1].data.lead_id
    row = await pool.fetchrow("SELECT name, email, phone FROM leads WHERE external_id = 'p:1'")
    assert dict(row) == {"name": "Ann", "email": "ann@example.com", "phone": "+1 555 0100"}


async def test_admin_actions_route_the_backlog_through_the_outbox(
    pool: asyncpg.Pool,
    broker: aio_pika.abc.AbstractChannel,
    settings: Settings,
    events: EventCollector,
    worker: Worker,
) -> None:
    """Capacity created by the CLI (activating, raising max_load, adding a weight) goes to
    queued contacts in the same transaction; the worker's relay publishes the events."""
    [op] = await setup_source(pool, "tg", [("a", 0, 1)])
    for n in range(3):
        await send(broker, settings, "lead.contact", lead("tg", f"q:{n}"), f"q-{n}")
    await events.wait_for("contact.queued", 3)

    _, drained = await admin.update_operator(pool, op, max_load=1)
    assert drained == 1
    other = (await admin.add_operator(pool, "b", 5, False))["id"]
    assert await admin.set_weights(pool, "tg", {op: 1, other: 1}) == 0  # b is inactive
    _, drained = await admin.update_operator(pool, other, active=True)
    assert drained == 2
    assigned = {
        e.data.contact_id: e.data.operator_id for e in await events.wait_for("contact.assigned", 3)
    }
    # Oldest contact first: it got the first capacity, the two others the second.
    oldest, *rest = sorted(assigned)
    assert assigned[oldest] == op and {assigned[c] for c in rest} == {other}


async def test_sweep_assigns_what_no_transaction_could(
    pool: asyncpg.Pool, settings: Settings
) -> None:
    """The safety net: capacity changed behind leadrouter's back is found by the sweep."""
    from worker.app import sweep_backlog

    [op] = await setup_source(pool, "tg", [("a", 0, 1)])
    lead_id = await pool.fetchval("INSERT INTO leads (external_id) VALUES ('s:1') RETURNING id")
    source_id = await pool.fetchval("SELECT id FROM sources WHERE key = 'tg'")
    await pool.execute(
        "INSERT INTO contacts (lead_id, source_id, inbound_message_id) VALUES ($1, $2, $3)",
        lead_id,
        source_id,
        str(uuid.uuid4()),
    )
    assert await sweep_backlog(pool) == 0
    await pool.execute("UPDATE operators SET max_load = 1 WHERE id = $1", op)
    assert await sweep_backlog(pool) == 1
    assert await pool.fetchval("SELECT operator_id FROM contacts") == op
    assert await pool.fetchval("SELECT routing_key FROM outbox") == "contact.assigned"
