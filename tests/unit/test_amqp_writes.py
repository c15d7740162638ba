"""The coalescing frame generator on its own, fed as aiormq's writer is: order kept,
nothing dropped, a close frame always last, the write size capped, and every drain
future resolved by the writer's one drain() call."""

import asyncio
from collections.abc import Callable
from typing import Any

import aiormq.connection
import pytest
import structlog
from aiormq import spec
from aiormq.abc import ChannelFrame

from worker import amqp_writes
from worker.amqp_writes import CoalescingFrameGenerator


def _frame(n: int, drain: asyncio.Future[None] | None = None) -> ChannelFrame:
    return ChannelFrame.marshall(1, [spec.Basic.Ack(delivery_tag=n)], drain_future=drain)


def _queue(*frames: ChannelFrame) -> asyncio.Queue[ChannelFrame]:
    queue: asyncio.Queue[ChannelFrame] = asyncio.Queue()
    for frame in frames:
        queue.put_nowait(frame)
    return queue


async def test_what_is_queued_comes_out_as_one_frame_in_order() -> None:
    frames = [_frame(n) for n in range(1, 6)]
    generator = CoalescingFrameGenerator(_queue(*frames))
    written = await generator.__anext__()
    assert written.payload == b"".join(f.payload for f in frames)
    assert not written.should_close


async def test_a_lone_frame_is_passed_through_as_it_is() -> None:
    frame = _frame(1)
    assert await CoalescingFrameGenerator(_queue(frame)).__anext__() is frame


async def test_a_close_frame_ends_a_write_and_what_follows_waits_for_the_next() -> None:
    close = ChannelFrame.marshall(0, [spec.Connection.CloseOk()])
    after = _frame(9)
    queue = _queue(_frame(1), close, after)
    generator = CoalescingFrameGenerator(queue)
    written = await generator.__anext__()
    assert written.should_close
    assert written.payload.endswith(close.payload)
    assert await generator.__anext__() is after


async def test_one_write_stops_growing_past_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    frames = [_frame(n) for n in range(1, 11)]
    size = len(frames[0].payload)
    monkeypatch.setattr(amqp_writes, "MAX_BYTES", 3 * size)
    generator = CoalescingFrameGenerator(_queue(*frames))
    first = await generator.__anext__()
    second = await generator.__anext__()
    assert len(first.payload) == 3 * size
    assert first.payload + second.payload == b"".join(f.payload for f in frames[:6])


async def test_drain_resolves_every_waiting_frame() -> None:
    loop = asyncio.get_running_loop()
    waiting: list[asyncio.Future[None]] = [loop.create_future(), loop.create_future()]
    cancelled: asyncio.Future[None] = loop.create_future()
    cancelled.cancel()
    written = await CoalescingFrameGenerator(
        _queue(_frame(1, waiting[0]), _frame(2), _frame(3, cancelled), _frame(4, waiting[1]))
    ).__anext__()
    assert written.should_drain
    written.drain()
    assert all(f.done() and f.result() is None for f in waiting)
    assert not written.should_drain


@pytest.fixture
def aiormq_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    """What install() changes in aiormq is put back afterwards."""
    monkeypatch.setattr(aiormq.connection, "FrameGenerator", aiormq.connection.FrameGenerator)
    connection = aiormq.connection.Connection
    monkeypatch.setattr(connection, "FRAME_BUFFER_SIZE", connection.FRAME_BUFFER_SIZE)


@pytest.mark.usefixtures("aiormq_restored")
def test_install_replaces_aiormq_s_writer_and_uninstall_puts_it_back() -> None:
    amqp_writes.uninstall()
    assert amqp_writes.install()
    assert amqp_writes.install()  # idempotent
    assert aiormq.connection.FrameGenerator is CoalescingFrameGenerator
    assert aiormq.connection.Connection.FRAME_BUFFER_SIZE == amqp_writes.QUEUED
    amqp_writes.uninstall()
    assert aiormq.connection.FrameGenerator is CoalescingFrameGenerator.__base__
    assert aiormq.connection.Connection.FRAME_BUFFER_SIZE == 10


def _unknown_version(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(amqp_writes.SUPPORTED, "aiormq", "7.3.")


def _foreign_generator(monkeypatch: pytest.MonkeyPatch) -> None:
    class Other(CoalescingFrameGenerator.__base__):  # type: ignore[misc,name-defined]
        pass

    monkeypatch.setattr(aiormq.connection, "FrameGenerator", Other)


def _writer_without_generator(monkeypatch: pytest.MonkeyPatch) -> None:
    async def writer(self: Any, stream: Any) -> None:
        pass

    monkeypatch.setattr(aiormq.connection.Connection, "_Connection__writer", writer)


def _frame_without_drain(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(ChannelFrame, "should_drain")


@pytest.mark.usefixtures("aiormq_restored")
@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (_unknown_version, "is not 7.3.x"),
        (_foreign_generator, "FrameGenerator was replaced by something else"),
        (_writer_without_generator, "writer does not take its frames from FrameGenerator"),
        (_frame_without_drain, "ChannelFrame is not"),
    ],
    ids=["version", "generator", "writer", "frame"],
)
def test_another_aiormq_writer_is_left_alone_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, change: Callable[[pytest.MonkeyPatch], None], problem: str
) -> None:
    amqp_writes.uninstall()
    change(monkeypatch)
    before = aiormq.connection.FrameGenerator
    with structlog.testing.capture_logs() as logged:
        assert not amqp_writes.install()
    assert aiormq.connection.FrameGenerator is before
    assert aiormq.connection.Connection.FRAME_BUFFER_SIZE == 10
    [entry] = logged
    assert (entry["event"], entry["log_level"]) == ("amqp_writes_not_installed", "warning")
    assert problem in entry["problem"]
