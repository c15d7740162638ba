"""A message the worker received, built again to be published: the worker's copy of an
inbound message (consumer.py), its dead letter (consumer.py) and a replayed dead letter
(`dlq replay`, dlq.py). One recipe, so that the three cannot drift apart:

- the body and the properties that decoded are kept;
- a message without an id stays without one (`no_id()`): aiormq would stamp a random id
  on it, making each copy a message of its own;
- headers the caller does not trust are left out, then any that cannot be encoded again
  (`amqp_reads.publishable`), so that the message can always be published; the caller's
  own headers are added last;
- always persistent; the expiration and user id only when the caller asks for them."""

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aio_pika
from aiormq.abc import DeliveredMessage

from worker import amqp_reads
from worker.decode import message_id_of, no_id


@dataclass(frozen=True)
class Republished:
    message: aio_pika.Message
    dropped: int  # headers that could not be encoded again


def properties_of(message: DeliveredMessage) -> dict[str, Any]:
    """A delivered message's properties by aio-pika's names; the expiration in seconds."""
    p = message.header.properties
    return {
        "content_type": p.content_type,
        "content_encoding": p.content_encoding,
        "correlation_id": p.correlation_id,
        "reply_to": p.reply_to,
        "type": p.message_type,
        "app_id": p.app_id,
        "priority": p.priority,
        "timestamp": p.timestamp,
        "expiration": seconds(p.expiration),
        "user_id": p.user_id,
    }


def republished(
    body: bytes,
    message_id: str | None,
    properties: Mapping[str, Any],
    headers: Mapping[str, Any],
    *,
    keep_header: Callable[[str], bool],
    add_headers: Mapping[str, Any] | None = None,
    expiration: bool = False,
    user_id: str | None = None,
    timestamp: datetime | None = None,
) -> Republished:
    """`properties` by aio-pika's names (the expiration in seconds). `keep_header` says
    which of the message's own headers to carry; `add_headers` are set after them. The
    expiration is kept only with `expiration` (a copy's time to live starts anew; a dead
    letter must not expire); `user_id` is the publishing user's, which the broker checks;
    `timestamp` stands in for a missing one."""
    kept, dropped = amqp_reads.publishable({k: v for k, v in headers.items() if keep_header(k)})
    kept.update(add_headers or {})
    message = aio_pika.Message(
        body=body,
        headers=kept,
        message_id=message_id_of(message_id) or no_id(),
        content_type=properties.get("content_type"),
        content_encoding=properties.get("content_encoding"),
        correlation_id=properties.get("correlation_id"),
        reply_to=properties.get("reply_to"),
        type=properties.get("type"),
        app_id=properties.get("app_id"),
        priority=properties.get("priority"),
        timestamp=properties.get("timestamp") or timestamp,
        expiration=properties.get("expiration") if expiration else None,
        user_id=user_id,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )
    return Republished(message, dropped)


def seconds(milliseconds: str | None) -> float | None:
    """The expiration property (milliseconds, as text) in seconds, as aio-pika takes it."""
    if not milliseconds or not milliseconds.isdigit():
        return None
    return int(milliseconds) / 1000
