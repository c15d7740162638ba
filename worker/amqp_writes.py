"""One write() for the AMQP frames queued in one loop turn.

aiormq's writer task hands each queued frame (a whole publish: method, header and body;
an ack) to the transport on its own, and uvloop and asyncio both send it at once: one
system call per published event, and one more wake-up of the broker for each. With
`install()` the writer takes everything queued so far and writes it as one. Publishes
must not wait for their own write (`basic_publish(..., wait=False)`; they still wait
for the confirm), or they reach the queue one at a time; and the queue holds up to
QUEUED frames instead of aiormq's 10, or a batch's publishes wait to be queued ten at a
time (what is in flight stays bounded by the publisher confirms awaited).

Built on aiormq's writer internals: `install()` checks that aiormq is the version this was
written against and that its writer still reads the names it replaces; otherwise it
leaves aiormq's own writer, with a warning (each frame a write: slower, never wrong)."""

import dataclasses
from collections.abc import Sequence
from importlib import metadata

import aiormq.connection
from aiormq.abc import ChannelFrame

from worker import log

logger = log.get(__name__)

SUPPORTED = {"aiormq": "7.2."}  # package -> version prefix this was written against
_AIORMQ_GENERATOR = aiormq.connection.FrameGenerator
_AIORMQ_QUEUED = aiormq.connection.Connection.FRAME_BUFFER_SIZE
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


def install() -> bool:
    """For connections opened from now on: aiormq reads both when a connection starts.
    Idempotent. Leaves aiormq alone, with a warning, unless its writer is the one this was
    written against (its version pinned in pyproject.toml; the tests
    tests/unit/test_amqp_writes.py, tests/integration/test_amqp_writes.py)."""
    problem = _unsupported()
    if problem:
        logger.warning("amqp_writes_not_installed", problem=problem)
        return False
    aiormq.connection.FrameGenerator = CoalescingFrameGenerator  # type: ignore[misc]
    aiormq.connection.Connection.FRAME_BUFFER_SIZE = QUEUED
    return True


def uninstall() -> None:
    aiormq.connection.FrameGenerator = _AIORMQ_GENERATOR  # type: ignore[misc]
    aiormq.connection.Connection.FRAME_BUFFER_SIZE = _AIORMQ_QUEUED


def _unsupported() -> str | None:
    for package, prefix in SUPPORTED.items():
        try:
            version = metadata.version(package)
        except metadata.PackageNotFoundError:
            return f"{package} is not installed"
        if not version.startswith(prefix):
            return f"{package} {version} is not {prefix}x"
    connection = aiormq.connection
    if connection.FrameGenerator not in (_AIORMQ_GENERATOR, CoalescingFrameGenerator):
        return "aiormq.connection.FrameGenerator was replaced by something else"
    if "FrameGenerator" not in _names(getattr(connection.Connection, "_Connection__writer", None)):
        return "aiormq's writer does not take its frames from FrameGenerator"
    if "queue" not in _names(_AIORMQ_GENERATOR.__init__):
        return "aiormq's FrameGenerator does not read a queue"
    if "FRAME_BUFFER_SIZE" not in _names(connection.Connection.__init__):
        return "aiormq's connection does not size its write queue by FRAME_BUFFER_SIZE"
    if not isinstance(getattr(connection.Connection, "FRAME_BUFFER_SIZE", None), int):
        return "aiormq's connection has no FRAME_BUFFER_SIZE"
    fields = {f.name for f in dataclasses.fields(ChannelFrame)}
    if not {"payload", "should_close"} <= fields or not all(
        hasattr(ChannelFrame, name) for name in ("should_drain", "drain")
    ):
        return "aiormq's ChannelFrame is not payload, should_close, should_drain, drain()"
    return None


def _names(function: object) -> tuple[str, ...]:
    """The global and attribute names a function's code reads (empty if it has none)."""
    code = getattr(function, "__code__", None)
    return tuple(code.co_names) if code is not None else ()
