"""The ack window acks many deliveries in one frame without ever acking one that is
still being handled or one left unacked on purpose (found by review: a deferred message
covered by a later multiple ack would never be redelivered)."""

from dataclasses import dataclass, field
from typing import Any

from worker.consumer import _AckWindow, _Delivery


@dataclass(eq=False)  # hashed by identity, as aiormq channels are
class FakeChannel:
    is_closed: bool = False
    acks: list[tuple[int, bool]] = field(default_factory=list)
    waited: list[bool] = field(default_factory=list)

    async def basic_ack(self, delivery_tag: int, multiple: bool = False, wait: bool = True) -> None:
        self.acks.append((delivery_tag, multiple))
        self.waited.append(wait)


@dataclass
class FakeMessage:
    delivery_tag: int


def deliveries(window: _AckWindow, channel: Any, *tags: int) -> list[_Delivery]:
    ds = [_Delivery(FakeMessage(t), channel, 0.0) for t in tags]  # type: ignore[arg-type]
    for d in ds:
        window.delivered(d)
    return ds


async def test_a_contiguous_run_is_acked_in_one_frame() -> None:
    window, channel = _AckWindow(), FakeChannel()
    d = deliveries(window, channel, 1, 2, 3)
    await window.ack(d)
    assert channel.acks == [(3, True)]
    assert channel.waited == [False]  # queued for the writer: the next batch starts at once


async def test_never_over_a_delivery_still_being_handled() -> None:
    window, channel = _AckWindow(), FakeChannel()
    one, two, three = deliveries(window, channel, 1, 2, 3)
    await window.ack([two, three])
    assert channel.acks == []  # 1 is still busy
    await window.ack([one])
    assert channel.acks == [(3, True)]


async def test_never_over_a_delivery_left_unacked_for_redelivery() -> None:
    window, channel = _AckWindow(), FakeChannel()
    one, two, three, four = deliveries(window, channel, 1, 2, 3, 4)
    await window.hold(two)  # deferred at shutdown: the broker must redeliver it
    await window.ack([one, three, four])
    assert channel.acks == [(1, True), (3, False), (4, False)]


async def test_a_handed_back_delivery_no_longer_blocks() -> None:
    window, channel = _AckWindow(), FakeChannel()
    one, two = deliveries(window, channel, 1, 2)
    await window.released(one)  # its nack was sent
    await window.ack([two])
    assert channel.acks == [(2, True)]


async def test_a_closed_channel_is_forgotten_quietly() -> None:
    window, old, new = _AckWindow(), FakeChannel(), FakeChannel()
    [stale] = deliveries(window, old, 1)
    [fresh] = deliveries(window, new, 1)  # tags start again on a reopened channel
    old.is_closed = True
    await window.ack([stale, fresh])
    assert old.acks == [] and new.acks == [(1, True)]


async def test_one_acked_alone_ahead_of_busy_ones_and_a_held_one_acked_at_last() -> None:
    """A message replaced by its copy is acked at once, ahead of older ones still in a
    batch; a held dead letter the broker finally took is acked alone, and later runs may
    then reach over it."""
    window, channel = _AckWindow(), FakeChannel()
    one, two, three, four = deliveries(window, channel, 1, 2, 3, 4)
    await window.ack_alone(three)  # 1 and 2 still busy
    assert channel.acks == [(3, False)]
    await window.hold(two)  # a refused dead letter
    await window.ack([one])
    assert channel.acks == [(3, False), (1, True)]
    await window.ack_alone(two)
    await window.ack([four])
    assert channel.acks == [(3, False), (1, True), (2, False), (4, True)]


async def test_what_waited_behind_a_held_delivery_is_acked_when_it_is_held() -> None:
    """Found by review: 2 was done while 1 was busy, then 1 was held; 2 must not wait in
    the window until another batch acks on this channel."""
    window, channel = _AckWindow(), FakeChannel()
    one, two = deliveries(window, channel, 1, 2)
    await window.ack([two])
    assert channel.acks == []  # 1 is still busy
    await window.hold(one)
    assert channel.acks == [(2, False)]  # alone: never over the held 1
    await window.ack([])
    await window.ack_alone(one)
    assert channel.acks == [(2, False), (1, False)]


async def test_what_waited_behind_one_acked_alone_is_acked_with_it() -> None:
    window, channel = _AckWindow(), FakeChannel()
    one, two = deliveries(window, channel, 1, 2)
    await window.ack([two])
    await window.ack_alone(one)
    assert channel.acks == [(1, False), (2, True)]


async def test_what_waited_behind_one_handed_back_is_acked_when_its_nack_is_sent() -> None:
    window, channel = _AckWindow(), FakeChannel()
    one, two = deliveries(window, channel, 1, 2)
    await window.ack([two])
    await window.released(one)
    assert channel.acks == [(2, True)]
