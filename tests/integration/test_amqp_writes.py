"""Publishes queued in one loop turn leave in one write(), and every one of them still
arrives, in order, confirmed; a publish that waits for its write is released too."""

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiormq
import aiormq.connection
import pytest
from aiormq import spec

from worker import amqp_writes
from worker.settings import Settings

COUNT = 100


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of each write the AMQP connection makes (aiormq writes to a StreamWriter).
    What install() changes in aiormq is put back afterwards."""
    connection = aiormq.connection
    monkeypatch.setattr(connection, "FrameGenerator", connection.FrameGenerator)
    monkeypatch.setattr(
        connection.Connection, "FRAME_BUFFER_SIZE", connection.Connection.FRAME_BUFFER_SIZE
    )
    sizes: list[int] = []
    original: Callable[[asyncio.StreamWriter, Any], None] = asyncio.StreamWriter.write

    def write(self: asyncio.StreamWriter, data: Any) -> None:
        sizes.append(len(data))
        original(self, data)

    monkeypatch.setattr(asyncio.StreamWriter, "write", write)
    return sizes


@contextlib.asynccontextmanager
async def _channel(settings: Settings) -> AsyncIterator[aiormq.Channel]:
    connection = await aiormq.connect(settings.amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        assert isinstance(channel, aiormq.Channel)
        yield channel
    finally:
        await connection.close()


async def _publish_together(channel: aiormq.Channel, queue: str) -> list[object]:
    """COUNT publishes started in one loop turn; the last one waits for its write."""
    return await asyncio.gather(
        *(
            channel.basic_publish(
                f"m-{n}".encode(),
                routing_key=queue,
                properties=spec.Basic.Properties(message_id=f"m-{n}"),
                wait=n == COUNT - 1,
            )
            for n in range(COUNT)
        )
    )


async def _received(channel: aiormq.Channel, queue: str) -> list[bytes]:
    bodies = []
    while (got := await channel.basic_get(queue, no_ack=True)).body:
        bodies.append(got.body)
    return bodies


async def test_one_turns_publishes_leave_in_one_write(
    settings: Settings, writes: list[int]
) -> None:
    amqp_writes.install()
    async with _channel(settings) as channel:
        queue = (await channel.queue_declare(exclusive=True)).queue
        assert queue is not None
        writes.clear()
        confirms = await _publish_together(channel, queue)
        publish_writes = len(writes)
        assert all(isinstance(c, spec.Basic.Ack) for c in confirms)
        assert publish_writes <= 2, writes  # not one per publish
        assert sum(writes[:publish_writes]) > COUNT * 20  # and all of them are in it
        assert await _received(channel, queue) == [f"m-{n}".encode() for n in range(COUNT)]


async def test_without_it_each_publish_is_a_write(
    settings: Settings, writes: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What install() changes (and so what the test above would catch if it broke)."""
    monkeypatch.setattr(
        aiormq.connection, "FrameGenerator", amqp_writes.CoalescingFrameGenerator.__base__
    )
    monkeypatch.setattr(aiormq.connection.Connection, "FRAME_BUFFER_SIZE", 10)
    async with _channel(settings) as channel:
        queue = (await channel.queue_declare(exclusive=True)).queue
        assert queue is not None
        writes.clear()
        await _publish_together(channel, queue)
        assert len(writes) >= COUNT
        assert len(await _received(channel, queue)) == COUNT
