"""The AMQP topology of DESIGN.md, described as data and declared idempotently."""

from dataclasses import dataclass, field
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue

from worker.settings import Settings


@dataclass(frozen=True)
class ExchangeSpec:
    name: str
    type: aio_pika.ExchangeType = aio_pika.ExchangeType.TOPIC


@dataclass(frozen=True)
class QueueSpec:
    name: str
    arguments: dict[str, Any]
    bindings: tuple[tuple[str, str], ...] = field(default=())  # (exchange, routing key)


@dataclass(frozen=True)
class Topology:
    inbound: ExchangeSpec
    events: ExchangeSpec
    dead: ExchangeSpec
    inbound_queue: QueueSpec
    dead_queue: QueueSpec

    @property
    def exchanges(self) -> tuple[ExchangeSpec, ...]:
        return (self.inbound, self.events, self.dead)

    @property
    def queues(self) -> tuple[QueueSpec, ...]:
        return (self.inbound_queue, self.dead_queue)


def topology(settings: Settings) -> Topology:
    return Topology(
        inbound=ExchangeSpec(settings.inbound_exchange),
        events=ExchangeSpec(settings.events_exchange),
        dead=ExchangeSpec(settings.dead_exchange),
        inbound_queue=QueueSpec(
            settings.inbound_queue,
            {
                "x-queue-type": "quorum",
                "x-dead-letter-exchange": settings.dead_exchange,
                "x-delivery-limit": settings.delivery_limit,
            },
            # Every key, so that a message with a key we do not know is dead-lettered
            # for someone to see rather than dropped by the exchange.
            bindings=((settings.inbound_exchange, "#"),),
        ),
        # Classic, not quorum: a quorum queue reorders messages handed back unacked and
        # counts each inspection as a delivery, and `leadrouter dlq list` must neither
        # reorder nor wear out what it only looks at. Lazy: dead letters may pile up.
        dead_queue=QueueSpec(
            settings.dead_queue,
            {"x-queue-type": "classic", "x-queue-mode": "lazy"},
            bindings=((settings.dead_exchange, "#"),),
        ),
    )


@dataclass
class Declared:
    exchanges: dict[str, AbstractExchange]
    queues: dict[str, AbstractQueue]


async def declare(
    channel: AbstractChannel, settings: Settings, dead_queue: bool = True
) -> Declared:
    """Declare every exchange, queue and binding; safe to run any number of times.
    `dead_queue=False` leaves out the dead-letter queue: a classic queue lives on one node
    of a cluster, and declaring it fails while that node is down, which a robust channel
    (it declares again what was declared on it at every reconnect) must not do."""
    spec = topology(settings)
    exchanges = {
        e.name: await channel.declare_exchange(e.name, e.type, durable=True) for e in spec.exchanges
    }
    queues = {}
    for q in spec.queues:
        if q is spec.dead_queue and not dead_queue:
            continue
        queue = await channel.declare_queue(q.name, durable=True, arguments=q.arguments)
        for exchange, key in q.bindings:
            await queue.bind(exchanges[exchange], routing_key=key)
        queues[q.name] = queue
    return Declared(exchanges, queues)


async def delete(channel: AbstractChannel, settings: Settings) -> None:
    """Remove the topology (tests and the demo, which use names of their own)."""
    spec = topology(settings)
    for q in spec.queues:
        await channel.queue_delete(q.name)
    for e in spec.exchanges:
        await channel.exchange_delete(e.name)
