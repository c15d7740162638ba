"""examples/aio_pika_publisher.py (shown in the README) against the real worker: a retried
publish, even one built afresh from the same update, makes one contact; the naive way
(no message id of the bot's own) makes a contact per publish, as the README warns."""

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import aio_pika
import asyncpg

from tests.helpers import settled, setup_source, wait_until
from worker.app import Worker
from worker.settings import Settings

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "aio_pika_publisher.py"
COUNTS = """
    SELECT l.external_id, count(*) AS contacts
    FROM contacts c JOIN leads l ON l.id = c.lead_id
    GROUP BY l.external_id
"""


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("aio_pika_publisher", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_a_retried_publish_makes_one_contact(
    pool: asyncpg.Pool,
    settings: Settings,
    broker: aio_pika.abc.AbstractChannel,
    worker: Worker,
) -> None:
    await setup_source(pool, "telegram-bot", [("a", 100, 1)])
    example = load_example()
    message = example.lead_contact("telegram-bot", 1001, "tg:42", "Hi!", "Ann")
    await example.publish(broker, message, settings.inbound_exchange)
    await example.publish(broker, message, settings.inbound_exchange)  # a retry
    again = example.lead_contact("telegram-bot", 1001, "tg:42", "Hi!", "Ann")  # after a restart
    await example.publish(broker, again, settings.inbound_exchange)

    # The naive way: no id of the bot's own, so aiormq invents a new one per publish.
    exchange = await broker.get_exchange(settings.inbound_exchange)
    naive = {"source": "telegram-bot", "lead": {"external_id": "tg:43"}, "message": "Hi!"}
    for _retry in range(2):
        await exchange.publish(aio_pika.Message(json.dumps(naive).encode()), "lead.contact")

    await wait_until(lambda: settled(worker, 5), what="5 messages settled")
    counts = {r["external_id"]: r["contacts"] for r in await pool.fetch(COUNTS)}
    assert counts == {"tg:42": 1, "tg:43": 2}
    assert await pool.fetchval(
        "SELECT inbound_message_id FROM contacts c JOIN leads l "
        "ON l.id = c.lead_id WHERE l.external_id = 'tg:42'"
    ) == ("telegram-bot:1001")
