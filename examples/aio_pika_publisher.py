"""A Python bot publishing leads to leadrouter with aio-pika, safe to retry.

leadrouter makes one contact per message id. aio-pika (through aiormq) gives every message
published without a `message_id` a new random one, so a bot that retries a publish (after
a timeout, a lost confirm, a reconnect) without an id of its own makes a new contact on
every retry. Derive the id from something the retry repeats, here the bot's own update id,
and send it in the body (where it wins over the property) and as the property.

Run it against a local broker with the worker running:
    python examples/aio_pika_publisher.py
"""

import asyncio
import json

import aio_pika
from aio_pika.abc import AbstractChannel

INBOUND_EXCHANGE = "leads.inbound"


def lead_contact(
    source: str, update_id: int, external_id: str, text: str, name: str | None = None
) -> aio_pika.Message:
    """One `lead.contact` message; the same update gives the same message id."""
    message_id = f"{source}:{update_id}"  # stable: the same on every retry of this update
    lead = {"external_id": external_id, **({"name": name} if name else {})}
    body = {"message_id": message_id, "source": source, "lead": lead, "message": text}
    return aio_pika.Message(
        json.dumps(body).encode(),
        message_id=message_id,
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


async def publish(
    channel: AbstractChannel,
    message: aio_pika.Message,
    exchange_name: str = INBOUND_EXCHANGE,
    attempts: int = 5,
) -> None:
    """Publish with the broker's confirm, retrying the same message (same id) on failure:
    a retry of a publish that did arrive is then harmless."""
    exchange = await channel.get_exchange(exchange_name, ensure=False)
    for attempt in range(1, attempts + 1):
        try:
            await exchange.publish(message, routing_key="lead.contact", mandatory=True, timeout=10)
            return
        except (TimeoutError, ConnectionError, aio_pika.exceptions.AMQPError):
            if attempt == attempts:
                raise
            await asyncio.sleep(min(2**attempt, 30))


async def main() -> None:
    # Robust: it reconnects by itself, so the retries above have a channel to go to.
    connection = await aio_pika.connect_robust("amqp://guest:guest@127.0.0.1:5672/")
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await publish(channel, lead_contact("telegram-bot", 1001, "tg:42", "Hi!", "Ann"))


if __name__ == "__main__":
    asyncio.run(main())
