"""The consumer's copies of a message and its side tasks, with stand-ins for the broker
and the database: when copies are made at all, that a copy of a message without an id or
with undecodable properties stays such a message, and that freed capacity is routed by
one task at a time."""

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
from pamqp.commands import Basic
from pamqp.header import ContentHeader
from structlog.testing import capture_logs

from worker import amqp_reads, distribution
from worker.consumer import UNDECODABLE_HEADER, Consumer, _Delivery
from worker.decode import message_id_of
from worker.metrics import Metrics
from worker.settings import Settings


@dataclass
class Exchange:
    published: list[tuple[Any, str]] = field(default_factory=list)

    async def publish(self, message: Any, routing_key: str, mandatory: bool = False) -> None:
        self.published.append((message, routing_key))


@dataclass(eq=False)
class Channel:
    is_closed: bool = False
    acks: list[int] = field(default_factory=list)

    async def basic_ack(self, delivery_tag: int, multiple: bool = False, wait: bool = True) -> None:
        self.acks.append(delivery_tag)


@dataclass
class Delivered:  # aiormq's DeliveredMessage, as much of it as the consumer reads
    header: ContentHeader
    body: bytes
    channel: Channel
    delivery: Basic.Deliver

    @property
    def routing_key(self) -> str:
        return self.delivery.routing_key

    @property
    def delivery_tag(self) -> int:
        return self.delivery.delivery_tag


async def no_topology() -> None:
    return None


def consumer(url: str = "amqp://worker:pw@127.0.0.1/", **settings: Any) -> Consumer:
    return Consumer(
        None,  # type: ignore[arg-type]
        Exchange(),  # type: ignore[arg-type]
        Settings(amqp_url=url, delivery_limit=4, **settings),
        Metrics(),
        None,  # type: ignore[arg-type]
        no_topology,
        inbound_exchange=Exchange(),  # type: ignore[arg-type]
    )


def delivered(
    *, message_id: str | None = "m-1", user_id: str | None = None, **headers: Any
) -> Delivered:
    header = ContentHeader(body_size=2)
    header.properties.message_id = message_id
    header.properties.user_id = user_id
    header.properties.headers = headers
    return Delivered(header, b"{}", Channel(), Basic.Deliver("c", 1, False, "x", "lead.contact"))


def as_delivery(message: Delivered) -> _Delivery:
    return _Delivery(message, message.channel, 0.0)  # type: ignore[arg-type]


def inbound(c: Consumer) -> list[tuple[Any, str]]:
    return c._inbound.published  # type: ignore[union-attr]


async def test_a_worn_message_is_copied_and_its_original_acked() -> None:
    c = consumer()
    message = delivered(**{"x-delivery-count": 2})
    await c.on_message(message)  # type: ignore[arg-type]
    await asyncio.gather(*c._side_tasks)
    [(copy, routing_key)] = inbound(c)
    assert (copy.message_id, copy.user_id, routing_key) == ("m-1", "worker", "lead.contact")
    assert message.channel.acks == [1] and c.outcomes == Counter(refreshed=1)


async def test_no_copy_once_stopping() -> None:
    c = consumer()
    c.stopping = True
    await c.on_message(delivered(**{"x-delivery-count": 2}))  # type: ignore[arg-type]
    assert not c._side_tasks and inbound(c) == [] and len(c._buffer) == 1


async def test_no_copies_without_a_user_of_its_own() -> None:
    """Copies are trusted by their user id; with no user in the URL (the broker's guest,
    everybody's), none is made: the broker's delivery limit is all there is."""
    c = consumer("amqp://127.0.0.1/")
    await c.on_message(delivered(**{"x-delivery-count": 3}))  # type: ignore[arg-type]
    assert not c._side_tasks and inbound(c) == [] and len(c._buffer) == 1
    assert c._failures(c._buffer[0]) == 0


async def test_a_copy_of_a_message_without_an_id_has_none() -> None:
    """aiormq would stamp a random id on it, and the copy would become a contact."""
    c = consumer()
    await c._publish_copy(as_delivery(delivered(message_id=None)), 0)
    [(copy, _)] = inbound(c)
    assert copy.message_id and message_id_of(copy.message_id) is None


async def test_a_copy_names_what_could_not_be_decoded_and_only_ours_is_trusted() -> None:
    c = consumer()
    message = delivered()
    setattr(message.header, amqp_reads.UNDECODABLE, ("app_id",))
    await c._publish_copy(as_delivery(message), 0)
    [(copy, _)] = inbound(c)
    assert copy.headers == {UNDECODABLE_HEADER: "app_id"}
    ours = delivered(user_id="worker", **{UNDECODABLE_HEADER: "app_id"})
    theirs = delivered(user_id="someone", **{UNDECODABLE_HEADER: "app_id"})
    assert c._undecodable(as_delivery(ours)) == ("app_id",)
    assert c._undecodable(as_delivery(theirs)) == ()


async def test_a_copy_keeps_the_headers_it_can_and_drops_the_ones_it_would_trust() -> None:
    c = consumer()
    message = delivered(
        raw=b"\xff", huge=1e300, trace="t", **{"x-leadrouter-failures": 3, "x-delivery-count": 2}
    )
    await c._publish_copy(as_delivery(message), 1)
    [(copy, _)] = inbound(c)
    assert copy.headers == {"raw": bytearray(b"\xff"), "trace": "t", "x-leadrouter-failures": 1}


async def test_freed_capacity_is_routed_by_one_task_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each waits on the source locks with a pool connection: one per batch could take
    the whole pool while one lock is held long."""
    calls: list[set[int]] = []
    release = asyncio.Event()

    async def drain(_pool: Any, source_ids: set[int]) -> Counter[tuple[str, str]]:
        calls.append(set(source_ids))
        await release.wait()
        return Counter()

    monkeypatch.setattr(distribution, "drain_after_commit", drain)
    c = consumer()
    for source_id in (1, 2, 3):
        c._drain_later({source_id})
        await asyncio.sleep(0)
    assert calls == [{1}] and len(c._side_tasks) == 1
    release.set()
    await asyncio.gather(*c._side_tasks)
    assert calls == [{1}, {2, 3}]


async def test_a_transient_failure_at_shutdown_is_not_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def drain(_pool: Any, _source_ids: set[int]) -> Counter[tuple[str, str]]:
        c.stopping = True
        raise ConnectionResetError

    monkeypatch.setattr(distribution, "drain_after_commit", drain)
    c = consumer()
    with capture_logs() as logs:
        c._drain_later({1})
        await asyncio.gather(*c._side_tasks)
    assert [e for e in logs if e["log_level"] == "error"] == []
