"""The outbox's two ways out: the worker publishes what it committed itself, under a
lease that keeps the relays off those rows; once the lease lapses unpublished (a worker
killed after commit), any relay claims them. Rows written without a lease (admin
actions) are claimed at once."""

import asyncio
from collections.abc import AsyncIterator

import aio_pika
import asyncpg
import pytest

from tests.helpers import EventCollector, route_new, setup_source
from worker import admin, distribution, outbox
from worker.metrics import Metrics
from worker.outbox import OutboxRelay
from worker.settings import Settings


@pytest.fixture
async def relay(
    pool: asyncpg.Pool, broker: aio_pika.abc.AbstractChannel, settings: Settings
) -> AsyncIterator[OutboxRelay]:
    connection = await aio_pika.connect_robust(settings.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        yield OutboxRelay(pool, channel, settings, Metrics())


async def _route_leased(pool: asyncpg.Pool, n: int, lease: float) -> distribution.Outcome:
    async with pool.acquire() as conn, conn.transaction():
        return await route_new(conn, "web", *(f"w:{i}" for i in range(n)), lease=lease)


async def test_leased_events_are_left_to_their_writer_until_the_lease_lapses(
    pool: asyncpg.Pool, relay: OutboxRelay, events: EventCollector
) -> None:
    await setup_source(pool, "web", [("a", 10, 1)])
    outcome = await _route_leased(pool, 3, lease=600)
    assert len(outcome.events) == 3
    assert await relay.publish_pending() == 0  # leased: not claimable

    # The writer died after commit: nobody published them. Once the lease lapses:
    await pool.execute("UPDATE outbox SET lease_until = now() - interval '1 second'")
    assert await relay.publish_pending() == 3
    await events.wait_for("contact.assigned", 3)
    assert await pool.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL") == 0


async def test_the_writer_publishes_its_committed_events_without_a_claim(
    pool: asyncpg.Pool, relay: OutboxRelay, events: EventCollector
) -> None:
    await setup_source(pool, "web", [("a", 10, 1)])
    outcome = await _route_leased(pool, 4, lease=600)
    relay.committed(outcome.events)
    await relay.drain()
    received = await events.wait_for("contact.assigned", 4)
    assert {e.id for e in received} == {e.event_id for e in outcome.events}
    assert await pool.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL") == 0


async def test_admin_events_are_claimable_at_once(
    pool: asyncpg.Pool, relay: OutboxRelay, events: EventCollector
) -> None:
    [op] = await setup_source(pool, "web", [("a", 0, 1)])
    await _route_leased(pool, 2, lease=600)  # queued: nobody has capacity
    await pool.execute("UPDATE outbox SET published_at = now()")
    _, drained = await admin.update_operator(pool, op, max_load=2)
    assert drained == 2
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM outbox WHERE lease_until IS NOT NULL AND published_at IS NULL"
        )
        == 0
    )
    assert await relay.publish_pending() == 2
    await events.wait_for("contact.assigned", 2)


async def test_prune_forgets_only_published_events_older_than_the_retention(
    pool: asyncpg.Pool,
) -> None:
    await setup_source(pool, "web", [("a", 10, 1)])
    await _route_leased(pool, 5, lease=600)  # five events, pending (leased)
    ids = [r["id"] for r in await pool.fetch("SELECT id FROM outbox ORDER BY id")]
    await pool.execute(
        "UPDATE outbox SET published_at = now() - interval '2 hours' WHERE id = ANY($1)", ids[:2]
    )
    await pool.execute("UPDATE outbox SET published_at = now() WHERE id = $1", ids[2])

    assert await outbox.prune_outbox(pool, retention_hours=1) == 2
    left = {r["id"] for r in await pool.fetch("SELECT id FROM outbox")}
    assert left == set(ids[2:])  # the recent one and the two still pending


async def test_prune_goes_through_more_than_one_statement(
    pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(outbox, "PRUNE_BATCH", 2)
    await setup_source(pool, "web", [("a", 10, 1)])
    await _route_leased(pool, 5, lease=600)
    await pool.execute("UPDATE outbox SET published_at = now() - interval '2 hours'")
    assert await outbox.prune_outbox(pool, retention_hours=1) == 5
    assert await pool.fetchval("SELECT count(*) FROM outbox") == 0


@pytest.mark.settings(outbox_batch=1)  # ten events may wait to be published
async def test_a_relay_behind_holds_the_consumer_back_and_drops_nothing(
    pool: asyncpg.Pool, relay: OutboxRelay, events: EventCollector
) -> None:
    await setup_source(pool, "web", [("a", 20, 1)])
    outcome = await _route_leased(pool, 12, lease=600)
    relay.committed(outcome.events)  # more than may wait: the consumer must wait
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(relay.room(), timeout=0.2)
    await relay.drain()
    await asyncio.wait_for(relay.room(), timeout=1)
    received = await events.wait_for("contact.assigned", 12)
    assert {e.id for e in received} == {e.event_id for e in outcome.events}
    assert await pool.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL") == 0


@pytest.mark.settings(outbox_batch=1)
async def test_a_stopping_relay_holds_nothing_back(
    pool: asyncpg.Pool, relay: OutboxRelay, events: EventCollector
) -> None:
    """At shutdown the publishing loops are gone before the consumer has finished its
    last batches: it must not wait for room that only drain() can make."""
    await setup_source(pool, "web", [("a", 20, 1)])
    stop = asyncio.Event()
    stop.set()
    await relay.run(stop)  # returns at once: stopping
    outcome = await _route_leased(pool, 12, lease=600)
    relay.committed(outcome.events)
    await asyncio.wait_for(relay.room(), timeout=1)
    await relay.drain()
    await events.wait_for("contact.assigned", 12)
    assert await pool.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL") == 0
