"""The worker's copies of a message it replaces (a message the broker redelivered often,
see Consumer._refresh) are the same message: one without an id stays without one, one
whose properties the client could not decode is dead-lettered as such, and one with
headers the client cannot publish again is copied all the same. Redelivery counts are
made here with the x-delivery-count header the publisher sets, which the quorum queue
keeps on a first delivery."""

import asyncio
import json
import struct

import aio_pika
import asyncpg
import pytest

from tests.helpers import (
    EventCollector,
    Expected,
    lead,
    raw_message,
    settled,
    setup_source,
    wait_until,
)
from tests.raw_amqp import Raw, dead_letters, long_string, props, publish
from worker.app import Worker
from worker.decode import message_id_of
from worker.errors import ERROR_HEADER, REASON_HEADER
from worker.settings import Settings

WORN = {"x-delivery-count": 3}  # past half the delivery limit of these tests (4)


def body(external_id: str) -> bytes:
    return json.dumps(lead("tg", external_id)).encode()


@pytest.mark.settings(delivery_limit=4)
async def test_a_worn_message_without_an_id_is_copied_without_one(
    pool: asyncpg.Pool, settings: Settings, worker: Worker, expected: Expected
) -> None:
    """aiormq stamps a random id on a publish without one: the copy would have become a
    contact. It is dead-lettered as missing_message_id, like the message it replaces."""
    await setup_source(pool, "tg", [("a", 100, 1)])
    expected.dead["missing_message_id"] = 0  # taken off below
    await asyncio.to_thread(
        publish, settings, [("lead.contact", body("no-id"), props(None, headers=WORN))]
    )
    [dead] = await dead_letters(settings, 1)
    assert worker.outcomes["refreshed"] == 1, "it was copied"
    assert (dead.headers or {})[REASON_HEADER] == "missing_message_id"
    assert message_id_of(dead.message_id) is None
    assert await pool.fetchval("SELECT count(*) FROM contacts") == 0


@pytest.mark.settings(delivery_limit=4)
async def test_a_worn_message_with_undecodable_properties_stays_invalid(
    pool: asyncpg.Pool, settings: Settings, worker: Worker
) -> None:
    """The client left the bad property out of the delivery: the copy names it in a
    header trusted under the worker's user only, and is dead-lettered as the original
    would have been."""
    await setup_source(pool, "tg", [("a", 100, 1)])
    message = ("lead.contact", body("bad-app"), props("bad-app", app_id=b"\xff", headers=WORN))
    await asyncio.to_thread(publish, settings, [message])
    [dead] = await dead_letters(settings, 1)
    assert worker.outcomes["refreshed"] == 1, "it was copied"
    headers = dead.headers or {}
    assert headers[REASON_HEADER] == "invalid_properties"
    assert headers[ERROR_HEADER] == "could not decode the AMQP app_id"
    assert dead.message_id == "bad-app"
    assert await pool.fetchval("SELECT count(*) FROM contacts") == 0


@pytest.mark.settings(delivery_limit=4)
async def test_a_worn_message_with_headers_that_cannot_be_published_again_is_copied(
    pool: asyncpg.Pool, settings: Settings, events: EventCollector, worker: Worker
) -> None:
    """A long string that is not UTF-8 (decoded as bytes) and a double beyond single
    precision: published as byte array, and left out."""
    await setup_source(pool, "tg", [("a", 100, 1)])
    headers = {
        **WORN,
        "raw": long_string(b"\xff\xfe"),
        "huge": Raw(b"d" + struct.pack(">d", 1e300)),
        "trace": "t-1",
    }
    await asyncio.to_thread(
        publish, settings, [("lead.contact", body("odd"), props("odd-1", headers=headers))]
    )
    [assigned] = await events.wait_for("contact.assigned", 1)
    assert assigned.data.inbound_message_id == "odd-1"
    await wait_until(lambda: settled(worker, 2), what="copied, then handled")
    assert worker.outcomes["refreshed"] == 1 and worker.outcomes["ok"] == 1
    assert await pool.fetchval("SELECT count(*) FROM contacts") == 1


@pytest.mark.settings(batch_linger_seconds=0.3, retry_max_seconds=0.2)
async def test_dead_letters_with_one_id_in_flight_at_once_are_both_kept(
    pool: asyncpg.Pool,
    settings: Settings,
    broker: aio_pika.abc.AbstractChannel,
    worker: Worker,
    expected: Expected,
) -> None:
    """aiormq matches a returned publish to its confirmation by message id: two dead
    letters with one id in flight at once, both returned (the dead-letter queue deleted),
    would credit the first return to the second publish and count the first as taken.
    Each must reach the dead-letter queue the worker declares again, none acked before."""
    expected.errors.add("dead_letters_failing")
    dead_queue = await broker.get_queue(settings.dead_queue)
    await dead_queue.delete(if_unused=False, if_empty=False)
    exchange = await broker.get_exchange(settings.inbound_exchange)
    # One batch (the linger): a bot retrying an invalid message.
    await asyncio.gather(
        exchange.publish(raw_message(b"{not json", "retried"), "lead.contact"),
        exchange.publish(raw_message(b"{not json", "retried"), "lead.contact"),
    )
    await wait_until(
        lambda: asyncio.sleep(0, worker.outcomes["invalid_json"] == 2), what="both settled"
    )
    dead = await dead_letters(settings, 2)  # in the queue the worker declared again
    assert [d.message_id for d in dead] == ["retried", "retried"]
    await asyncio.sleep(0.5)
    assert await dead_letters(settings, 0) == []
    assert await pool.fetchval("SELECT count(*) FROM contacts") == 0
