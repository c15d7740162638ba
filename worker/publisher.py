"""Publishing inbound messages the way an upstream bot does (demo, tests, bot developers)."""

import json
from typing import Any

import aio_pika
from aio_pika.abc import AbstractExchange

from schemas.inbound import ContactClose, LeadContact
from worker import nodes
from worker.settings import Settings


def lead_contact_message(body: LeadContact, message_id: str) -> aio_pika.Message:
    return _message(body.model_dump(exclude_none=True), message_id)


def contact_close_message(body: ContactClose, message_id: str) -> aio_pika.Message:
    return _message(body.model_dump(exclude_none=True), message_id)


def _message(payload: dict[str, Any], message_id: str) -> aio_pika.Message:
    return aio_pika.Message(
        body=json.dumps(payload).encode(),
        message_id=message_id,
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


async def publish(exchange: AbstractExchange, routing_key: str, message: aio_pika.Message) -> None:
    """Publish and wait for the broker's confirm (the channel must have confirms on)."""
    await exchange.publish(message, routing_key=routing_key, mandatory=True)


async def publish_lead(settings: Settings, body: LeadContact, message_id: str) -> None:
    """Publish one `lead.contact` as a bot would, waiting for the broker's confirm."""
    connection = await nodes.connect(settings.amqp_url)
    async with connection:
        # Raises PublishError when nothing is bound to take it, rather than "succeed".
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.get_exchange(settings.inbound_exchange)
        await publish(exchange, "lead.contact", lead_contact_message(body, message_id))
