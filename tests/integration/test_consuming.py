"""The worker consumes through aiormq directly, so aio-pika does not restore that consumer
for it: these prove the worker does, after its channel is closed under it and after the
broker cancels it because the queue was deleted. Nothing published afterwards is lost."""

import aio_pika
import aiormq.exceptions
import asyncpg
import pytest

from tests.helpers import (
    EventCollector,
    lead,
    queue_consumers,
    raw_message,
    setup_source,
    wait_until,
)
from worker.app import Worker
from worker.settings import Settings


async def _send(broker: aio_pika.abc.AbstractChannel, settings: Settings, ids: range) -> None:
    exchange = await broker.get_exchange(settings.inbound_exchange)
    for n in ids:
        await exchange.publish(raw_message(lead("web", f"w:{n}"), f"m-{n}"), "lead.contact")


async def test_consumes_again_after_its_channel_is_closed_by_the_broker(
    pool: asyncpg.Pool,
    broker: aio_pika.abc.AbstractChannel,
    settings: Settings,
    events: EventCollector,
    worker: Worker,
) -> None:
    await setup_source(pool, "web", [("a", 1000, 1)])
    await _send(broker, settings, range(5))
    await events.wait_for("contact.assigned", 5)
    robust = worker._consume_channel
    assert robust is not None
    channel = await robust.get_underlay_channel()
    # Acking a tag never delivered is a channel error: the broker closes the channel.
    with pytest.raises(aiormq.exceptions.ChannelClosed):
        await channel.basic_ack(10**9)
        await channel.basic_qos(prefetch_count=1)  # the close arrives by the next call

    async def reopened() -> bool:
        current = await robust.get_underlay_channel()
        return current is not channel and not current.is_closed and worker.readiness.consuming

    await wait_until(reopened, what="the channel reopened and consuming")
    await _send(broker, settings, range(5, 25))
    await events.wait_for("contact.assigned", 25, timeout=30)
    assert await pool.fetchval("SELECT count(*) FROM contacts") == 25
    assert (
        await queue_consumers(settings.amqp_url, settings.inbound_queue) == 1
    )  # restored once, not twice


async def test_consumes_again_after_the_broker_cancels_it(
    pool: asyncpg.Pool,
    broker: aio_pika.abc.AbstractChannel,
    settings: Settings,
    events: EventCollector,
    worker: Worker,
) -> None:
    await setup_source(pool, "web", [("a", 1000, 1)])
    await broker.queue_delete(settings.inbound_queue)  # cancels the worker's consumer

    async def consuming_again() -> bool:
        return (
            worker.readiness.consuming
            and await queue_consumers(settings.amqp_url, settings.inbound_queue) == 1
        )

    await wait_until(consuming_again, timeout=30, what="the queue declared and consumed again")
    await _send(broker, settings, range(10))
    await events.wait_for("contact.assigned", 10, timeout=30)
