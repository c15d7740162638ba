"""One write() for the AMQP frames queued in one loop turn.

aiormq's writer task hands each queued frame (a whole publish: method, header and body;
an ack) to the transport on its own, and uvloop and asyncio both send it at once: one
system call per published event, and one more wake-up of the broker for each. With
`install()` the writer takes everything queued so far and writes it as one. Publishes
must not wait for their own write (`basic_publish(..., wait=False)`; they still wait
for the confirm), or they reach the queue one at a time; and the queue holds up to
QUEUED frames instead of aiormq's 10, or a batch's publishes wait to be queued ten at a
time (what is in flight stays bounded by the publisher confirms awaited)."""

from collections.abc import Sequence

import aiormq.connection
from aiormq.abc import ChannelFrame

MAX_BYTES = 1 << 20  # stop adding frames to one write beyond this
QUEUED = 2048  # frames a connection queues for its writer (the relay's batches fit)


class _Frames:
    """Queued ChannelFrames written as one; the drain futures of each resolved after."""

    def __init__(self, frames: Sequence[ChannelFrame]):
        self._frames = frames
        self.payload = b"".join(f.payload for f in frames)
        self.should_close = frames[-1].should_close

    @property
    def should_drain(self) -> bool:
        return any(f.should_drain for f in self._frames)

    def drain(self) -> None:
        for frame in self._frames:
            frame.drain()


class CoalescingFrameGenerator(aiormq.connection.FrameGenerator):
    async def __anext__(self) -> ChannelFrame:
        first = await super().__anext__()
        frames, size = [first], len(first.payload)
        while not self.queue.empty() and size < MAX_BYTES and not frames[-1].should_close:
            frame = self.queue.get_nowait()
            self.queue.task_done()
            frames.append(frame)
            size += len(frame.payload)
        return first if len(frames) == 1 else _Frames(frames)  # type: ignore[return-value]


def install() -> None:
    """For connections opened from now on: aiormq reads both when a connection starts.
    Idempotent. Built on aiormq's internals, hence its version pinned in pyproject.toml
    and the tests (tests/unit/test_amqp_writes.py, tests/integration/test_amqp_writes.py)."""
    aiormq.connection.FrameGenerator = CoalescingFrameGenerator  # type: ignore[misc]
    aiormq.connection.Connection.FRAME_BUFFER_SIZE = QUEUED
