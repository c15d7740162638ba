"""Publishing inbound messages the way an upstream bot does (demo, tests, bot developers)."""

import json
from typing import Any

import aio_pika
import aiormq.exceptions
from aio_pika.abc import AbstractExchange

from schemas.inbound import ContactClose, LeadContact
from worker import log, nodes
from worker.settings import Settings

logger = log.get(__name__)


def lead_contact_message(body: LeadContact, message_id: str) -> aio_pika.Message:
    payload = body.model_dump(exclude_none=True)
    if not body.priority:  # the default: the message as it was before priorities
        del payload["priority"]
    return _message(payload, message_id)


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


# The connection went before the confirm came: the message may or may not have arrived.
_LOST = (
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
)


async def publish_lead(settings: Settings, body: LeadContact, message_id: str) -> None:
    """Publish one `lead.contact` as a bot would, waiting for the broker's confirm; if
    the node goes away first, again on the first node of the list that answers (once per
    node): a copy that did arrive is harmless, the worker keeps one contact per message
    id."""
    tries = len(nodes.node_urls(settings.amqp_url))
    while True:
        try:
            await _publish_lead(settings, body, message_id)
            return
        except _LOST as exc:
            tries -= 1
            if tries <= 0:
                raise
            logger.warning("publish_retrying", error=type(exc).__name__)


async def _publish_lead(settings: Settings, body: LeadContact, message_id: str) -> None:
    connection = await nodes.connect(settings.amqp_url)
    async with connection:
        # Raises PublishError when nothing is bound to take it, rather than "succeed".
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.get_exchange(settings.inbound_exchange)
        await publish(exchange, "lead.contact", lead_contact_message(body, message_id))
