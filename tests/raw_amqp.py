"""Publishing what the worker must refuse, with pika (which sends what it is given), and
taking dead letters off their queue."""

import asyncio
import contextlib
import json
import struct
from collections.abc import Iterator
from typing import Any

import aio_pika
import aiormq
import pika
import pika.data

from tests.helpers import wait_until
from worker.app import Worker
from worker.settings import Settings


def publish_raw(
    settings: Settings, routing_key: str, body: bytes | dict[str, Any], message_id: str | None
) -> None:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish(
            settings.inbound_exchange,
            routing_key,
            data,
            pika.BasicProperties(message_id=message_id, delivery_mode=2),
            mandatory=True,
        )
    finally:
        connection.close()


async def dead_letters(
    settings: Settings, count: int, timeout: float = 20
) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Take `count` messages off the dead-letter queue."""
    connection = await aio_pika.connect(settings.amqp_url)
    taken: list[aio_pika.abc.AbstractIncomingMessage] = []
    async with connection:

        async def declared() -> bool:
            """A test that deleted the queue waits for the worker to declare it again."""
            try:
                async with connection.channel() as probe:
                    await probe.get_queue(settings.dead_queue)  # passive
            except aiormq.exceptions.ChannelNotFoundEntity:
                return False
            return True

        await wait_until(declared, timeout=timeout, what="the dead-letter queue")
        channel = await connection.channel()
        queue = await channel.get_queue(settings.dead_queue)

        async def take() -> bool:
            while (message := await queue.get(fail=False)) is not None:
                await message.ack()
                taken.append(message)
            return len(taken) >= count

        await wait_until(take, timeout=timeout, what=f"{count} dead letters")
    return taken


def props(message_id: Any = None, **kwargs: Any) -> pika.BasicProperties:
    """Persistent properties with this message_id (any bytes, as pika sends them)."""
    return pika.BasicProperties(message_id=message_id, delivery_mode=2, **kwargs)


class Raw(bytes):
    """A header value sent as these exact bytes (its type byte first): pika itself would
    only send valid UTF-8 strings and dates it can represent."""


@contextlib.contextmanager
def raw_header_values() -> Iterator[None]:
    real = pika.data.encode_value

    def encode_value(pieces: list[bytes], value: Any) -> int:
        if isinstance(value, Raw):
            pieces.append(bytes(value))
            return len(value)
        return real(pieces, value)

    pika.data.encode_value = encode_value
    try:
        yield
    finally:
        pika.data.encode_value = real


def long_string(raw: bytes) -> Raw:
    return Raw(b"S" + struct.pack(">I", len(raw)) + raw)


def timestamp(seconds: int) -> Raw:
    return Raw(b"T" + struct.pack(">Q", seconds))


def publish(
    settings: Settings,
    messages: list[tuple[str | bytes, bytes, pika.BasicProperties]],
    exchange: str | None = None,
) -> None:
    """Publish (routing key, body, properties) with pika, confirmed, on one connection."""
    with raw_header_values():
        connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
        try:
            channel = connection.channel()
            channel.confirm_delivery()
            for routing_key, body, properties in messages:
                channel.basic_publish(
                    exchange or settings.inbound_exchange,
                    routing_key,  # type: ignore[arg-type]
                    body,
                    properties,
                    mandatory=True,
                )
        finally:
            connection.close()


class Watch:
    """Samples the worker's readiness and connection while a test runs."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.connection = self._aiormq()
        self.not_ready = 0
        self._task = asyncio.create_task(self._sample())

    @classmethod
    async def start(cls, worker: Worker) -> "Watch":
        async def ready() -> bool:
            return worker.readiness.ready()

        await wait_until(ready, what="the worker ready")
        return cls(worker)

    def _aiormq(self) -> Any:
        connection = self.worker._connection
        assert connection is not None and connection.transport is not None
        return connection.transport.connection

    async def _sample(self) -> None:
        while True:
            if not self.worker.readiness.ready():
                self.not_ready += 1
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        assert self.not_ready == 0, "the worker was not ready at times"
        assert self._aiormq() is self.connection, "the worker reconnected"
        assert not self.connection.is_closed
