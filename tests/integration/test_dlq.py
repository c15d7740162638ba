"""Dead-letter ops against the real broker: listing changes nothing, replay and purge take
exactly what they select and leave the rest in order."""

import asyncio
import json
from collections import Counter
from typing import Any

import aio_pika
import aiormq
import asyncpg
import pytest

from tests.commands import leadrouter
from tests.helpers import (
    EventCollector,
    Expected,
    assert_clean_end,
    crash_route_on,
    lead,
    setup_source,
    wait_until,
)
from tests.raw_amqp import publish_raw
from worker import admin, dlq
from worker.app import Worker
from worker.consumer import ERROR_HEADER, REASON_HEADER
from worker.settings import Settings


async def dead_count(settings: Settings, count: int) -> None:
    async def reached() -> bool:
        return await dlq.count(settings) >= count

    await wait_until(reached, what=f"{count} dead letters")


async def dead_letter_one_by_one(
    settings: Settings, messages: list[tuple[str, bytes | dict[str, Any], str]]
) -> None:
    """Publish bad messages for the worker, each after the last was dead-lettered, so that
    the dead-letter queue has them in this order (the worker handles messages in parallel)."""
    start = await dlq.count(settings)
    for n, (routing_key, body, message_id) in enumerate(messages, 1):
        await asyncio.to_thread(publish_raw, settings, routing_key, body, message_id)
        await dead_count(settings, start + n)


def summary(entries: list[dlq.Entry]) -> list[tuple[str | None, str, str | None]]:
    return [(e.message_id, e.reason, e.source) for e in entries]


async def test_list_show_replay_and_purge(
    pool: asyncpg.Pool,
    settings: Settings,
    events: EventCollector,
    worker: Worker,
) -> None:
    [op] = await setup_source(pool, "tg", [("a", 100, 1)])
    await dead_letter_one_by_one(
        settings,
        [
            ("lead.contact", lead("web", "w:1"), "u-1"),
            ("lead.contact", b"{not json", "j-1"),
            ("lead.contact", lead("web", "w:2"), "u-2"),
            ("lead.contact", {"source": "tg"}, "s-1"),
            ("contact.close", {"contact_id": 987654321}, "c-1"),
            ("lead.contact", lead("web", "w:3"), "u-3"),
        ],
    )

    entries = await dlq.list_entries(settings)
    assert summary(entries) == [
        ("u-1", "unknown_source", "web"),
        ("j-1", "invalid_json", None),
        ("u-2", "unknown_source", "web"),
        ("s-1", "invalid_schema", "tg"),
        ("c-1", "unknown_contact", None),
        ("u-3", "unknown_source", "web"),
    ]
    assert all(e.error for e in entries)
    assert all(e.routing_key == "lead.contact" for e in entries if e.message_id != "c-1")
    assert len({e.id for e in entries}) == len(entries)
    # Looking changes nothing: same entries, same order, same ids.
    assert [e.id for e in await dlq.list_entries(settings)] == [e.id for e in entries]
    assert await dlq.count(settings) == 6
    assert summary(await dlq.list_entries(settings, reason="unknown_source", limit=2)) == [
        ("u-1", "unknown_source", "web"),
        ("u-2", "unknown_source", "web"),
    ]
    assert [e.message_id for e in await dlq.list_entries(settings, limit=1)] == ["u-1"]

    bad_json = entries[1]
    shown = await dlq.show(settings, f" {bad_json.id.upper()}\n")
    assert shown is not None
    assert (shown.id, shown.body, shown.text) == (bad_json.id, b"{not json", "{not json")
    assert shown.headers[REASON_HEADER] == "invalid_json"
    assert shown.headers[ERROR_HEADER] == bad_json.error
    assert await dlq.show(settings, "000000000000") is None

    # Fix the cause, then replay: each contact made once, the others stay in order.
    await admin.add_source(pool, "web", None, "", None)
    await admin.set_weights(pool, "web", {op: 1})
    assert await dlq.replay(settings, reason="unknown_source") == 3
    assigned = await events.wait_for("contact.assigned", 3)
    assert sorted(e.data.inbound_message_id for e in assigned) == ["u-1", "u-2", "u-3"]
    assert await pool.fetchval("SELECT count(*) FROM contacts") == 3
    rest = await dlq.list_entries(settings)
    assert [e.id for e in rest] == [e.id for e in entries if e.reason != "unknown_source"]

    # A second run finds nothing; nor do the ids of what was replayed.
    assert await dlq.replay(settings, reason="unknown_source") == 0
    assert await dlq.replay(settings, ids=[entries[0].id]) == 0
    await asyncio.sleep(0.5)
    assert await pool.fetchval("SELECT count(*) FROM contacts") == 3

    # A replay that fails again is dead-lettered again, behind the rest, with the same id;
    # the replay does not chase it round.
    [close] = [e for e in rest if e.reason == "unknown_contact"]
    assert await dlq.replay(settings, ids=[close.id]) == 1
    await wait_until(
        lambda: worker_outcome(worker, "unknown_contact", 2), what="the close dead again"
    )
    await dead_count(settings, 3)
    again = await dlq.list_entries(settings)
    assert summary(again) == [
        ("j-1", "invalid_json", None),
        ("s-1", "invalid_schema", "tg"),
        ("c-1", "unknown_contact", None),
    ]
    assert again[2].id == close.id

    assert await dlq.purge(settings, reason="invalid_json") == 1
    assert summary(await dlq.list_entries(settings)) == summary(again)[1:]
    assert await dlq.purge(settings) == 2
    assert await dlq.list_entries(settings) == []


async def worker_outcome(worker: Worker, outcome: str, count: int) -> bool:
    return worker.outcomes[outcome] >= count


@pytest.mark.settings(delivery_limit=2)
async def test_a_broker_dead_letter_is_listed_as_delivery_limit(
    pool: asyncpg.Pool,
    settings: Settings,
    broker: aio_pika.abc.AbstractChannel,
    monkeypatch: pytest.MonkeyPatch,
    worker_log: list[dict[str, Any]],
) -> None:
    await setup_source(pool, "tg", [("a", 100, 1)])
    crash_route_on(monkeypatch, "boom")
    app = Worker(settings)
    await app.start()
    try:
        await dead_letter_one_by_one(
            settings,
            [
                ("lead.contact", lead("web", "w:1"), "u-1"),
                ("lead.contact", lead("tg", "boom"), "crash-1"),
                ("lead.contact", lead("web", "w:2"), "u-2"),
            ],
        )
    finally:
        await app.stop()

    entries = await dlq.list_entries(settings)
    assert summary(entries) == [
        ("u-1", "unknown_source", "web"),
        ("crash-1", "delivery_limit", "tg"),
        ("u-2", "unknown_source", "web"),
    ]
    crash = entries[1]
    assert REASON_HEADER not in crash.headers and "x-death" in crash.headers
    assert crash.error == (
        f"dead-lettered by the broker (delivery_limit) from queue {settings.inbound_queue}"
    )
    assert crash.age_seconds is not None and 0 <= crash.age_seconds < 60
    assert [e.message_id for e in await dlq.list_entries(settings, reason="delivery_limit")] == [
        "crash-1"
    ]

    assert await dlq.purge(settings, reason="delivery_limit") == 1
    assert [e.id for e in await dlq.list_entries(settings)] == [entries[0].id, entries[2].id]
    await assert_clean_end(
        settings, worker_log, Expected(Counter(unknown_source=2), errors={"message_failed"})
    )


async def publish_dead(
    channel: aio_pika.abc.AbstractChannel, settings: Settings, count: int
) -> list[str]:
    """Dead copies as the consumer makes them, straight onto the dead-letter exchange."""
    exchange = await channel.get_exchange(settings.dead_exchange)
    reasons = ["invalid_schema", "unknown_source", "unknown_contact"]
    for n in range(count):
        body = json.dumps({"source": f"s{n % 5}", "n": n}).encode()
        headers: aio_pika.abc.HeadersType = {
            "trace": f"t-{n}",
            REASON_HEADER: reasons[n % 3],
            ERROR_HEADER: "detail",
        }
        message = aio_pika.Message(body, message_id=f"m-{n}", headers=headers)
        await exchange.publish(message, "lead.contact" if n % 2 else "contact.close")
    return [f"m-{n}" for n in range(count)]


async def inbound_messages(settings: Settings) -> list[aio_pika.abc.AbstractIncomingMessage]:
    connection = await aio_pika.connect(settings.amqp_url)
    taken = []
    async with connection:
        queue = await (await connection.channel()).get_queue(settings.inbound_queue)
        while (message := await queue.get(fail=False)) is not None:
            await message.ack()
            taken.append(message)
    return taken


async def test_many_dead_letters_keep_their_order(
    settings: Settings, broker: aio_pika.abc.AbstractChannel
) -> None:
    """More than a quorum queue returns in order; no worker, so replays wait inbound."""
    ids = await publish_dead(broker, settings, 300)
    every = await dlq.list_entries(settings, limit=1000)
    assert [e.message_id for e in every] == ids
    # A second command while one reads the queue is refused, and nothing moves.
    results = await asyncio.gather(
        dlq.list_entries(settings, limit=1000),
        dlq.show(settings, every[-1].id),
        return_exceptions=True,
    )
    assert sum(isinstance(r, dlq.Busy) for r in results) == 1, results
    assert [e.id for e in await dlq.list_entries(settings, limit=1000)] == [e.id for e in every]

    # Capped: stops after holding max_held, says so with what it found, loses nothing.
    with pytest.raises(dlq.ScanIncomplete) as capped:
        await dlq.list_entries(settings, reason="nothing", max_held=50)
    assert (capped.value.looked, capped.value.total, capped.value.result) == (50, 300, [])
    assert "looked at 50 of the 300 dead letters only" in str(capped.value)
    with pytest.raises(dlq.ScanIncomplete) as capped:
        await dlq.list_entries(settings, limit=1000, max_held=50)
    assert [e.id for e in capped.value.result] == [e.id for e in every[:50]]
    # Found what was asked for before the cap: complete.
    assert len(await dlq.list_entries(settings, limit=50, max_held=50)) == 50
    # A limit past the largest prefetch AMQP can ask for: no prefetch limit, same result.
    huge = await dlq.list_entries(settings, limit=1000, max_held=dlq.MAX_PREFETCH + 1)
    assert [e.id for e in huge] == [e.id for e in every]

    chosen = every[::7]
    assert await dlq.replay(settings, ids=[e.id for e in chosen]) == len(chosen)
    rest = [e for e in every if e.id not in {c.id for c in chosen}]
    assert [e.id for e in await dlq.list_entries(settings, limit=1000)] == [e.id for e in rest]

    replayed = await inbound_messages(settings)
    assert [m.message_id for m in replayed] == [e.message_id for e in chosen]
    assert [m.routing_key for m in replayed] == [e.routing_key for e in chosen]
    assert [m.body for m in replayed] == [e.body for e in chosen]
    for message, entry in zip(replayed, chosen, strict=True):
        # x-delivery-count is the (quorum) inbound queue's own.
        headers = {k: v for k, v in message.headers.items() if k != "x-delivery-count"}
        assert headers == {"trace": entry.headers["trace"]}
        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT

    purged = await dlq.purge(settings, reason="unknown_contact")
    assert purged == sum(e.reason == "unknown_contact" for e in rest)
    left = [e.id for e in rest if e.reason != "unknown_contact"]
    assert [e.id for e in await dlq.list_entries(settings, limit=1000)] == left
    assert await dlq.replay(settings, all=True) == len(left)
    assert await dlq.count(settings) == 0


async def test_two_commands_at_once_one_runs_and_sees_everything_in_order(
    settings: Settings, broker: aio_pika.abc.AbstractChannel
) -> None:
    """With basic.get, a `list` beside a `show` missed messages the other held, or saw the
    ones it handed back out of order, and said nothing. Now one of them is refused."""
    await publish_dead(broker, settings, 300)
    every = [e.id for e in await dlq.list_entries(settings, limit=1000)]
    assert len(every) == 300
    for _ in range(10):
        listed, shown = await asyncio.gather(
            dlq.list_entries(settings, limit=1000),
            dlq.show(settings, every[-1]),
            return_exceptions=True,
        )
        if isinstance(listed, dlq.Busy):
            assert isinstance(shown, dlq.Entry) and shown.id == every[-1], shown
        else:
            assert isinstance(shown, dlq.Busy), shown
            assert isinstance(listed, list) and [e.id for e in listed] == every
        refused = listed if isinstance(listed, dlq.Busy) else shown
        assert str(refused) == (
            f"another dlq command is reading {settings.dead_queue}; try again when it is done"
        )
    assert await dlq.count(settings) == 300


async def another_command(settings: Settings) -> aio_pika.abc.AbstractConnection:
    """A connection reading the dead-letter queue as a dlq command does; closing it hands
    back what it holds."""
    connection = await aio_pika.connect(settings.amqp_url)
    queue = await (await connection.channel()).get_queue(settings.dead_queue)

    async def hold(_message: aio_pika.abc.AbstractIncomingMessage) -> None:
        pass

    await queue.consume(hold, exclusive=True)
    return connection


async def test_a_command_refused_says_so_and_exits_4(
    settings: Settings, broker: aio_pika.abc.AbstractChannel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whichever way the other command holds the queue (its consumer already there, or
    it starts between this one's count and its consume), nothing is done."""
    await publish_dead(broker, settings, 3)
    other = await another_command(settings)
    try:
        for args in (["list"], ["show", "000000000000"], ["replay", "--all"], ["purge", "--yes"]):
            result = leadrouter(settings, "dlq", *args, check=False)
            assert result.returncode == 4, result
            assert result.stderr.strip().splitlines()[-1] == (
                f"error: another dlq command is reading {settings.dead_queue}; "
                "try again when it is done"
            ), result
            assert result.stdout == ""
    finally:
        await other.close()

    # The other one starts between this one's count and its consume: the broker refuses
    # this one's exclusive consume.
    qos = aiormq.Channel.basic_qos
    started: list[aio_pika.abc.AbstractConnection] = []

    async def other_starts_first(channel: aiormq.Channel, **kwargs: Any) -> Any:
        started.append(await another_command(settings))
        return await qos(channel, **kwargs)

    monkeypatch.setattr(aiormq.Channel, "basic_qos", other_starts_first)
    try:
        with pytest.raises(dlq.Busy):
            await dlq.list_entries(settings)
    finally:
        monkeypatch.undo()
        for connection in started:
            await connection.close()
    assert len(started) == 1
    assert [e.message_id for e in await dlq.list_entries(settings)] == ["m-0", "m-1", "m-2"]


async def test_a_counted_dead_letter_removed_meanwhile_makes_the_scan_incomplete(
    settings: Settings, broker: aio_pika.abc.AbstractChannel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Something that is not a dlq command (here basic.get) takes a message between the
    count and the consumer's start: the scan waits for it, then says it is incomplete."""
    await publish_dead(broker, settings, 3)
    queue = await broker.get_queue(settings.dead_queue)
    qos = aiormq.Channel.basic_qos

    async def one_taken(channel: aiormq.Channel, **kwargs: Any) -> Any:
        taken = await queue.get()
        await taken.ack()
        return await qos(channel, **kwargs)

    monkeypatch.setattr(aiormq.Channel, "basic_qos", one_taken)
    monkeypatch.setattr(dlq, "DELIVERY_TIMEOUT", 0.5)
    with pytest.raises(dlq.ScanIncomplete) as incomplete:
        await dlq.list_entries(settings)
    monkeypatch.undo()
    assert (incomplete.value.looked, incomplete.value.total) == (2, 3)
    assert [e.message_id for e in incomplete.value.result] == ["m-1", "m-2"]
    assert "removed meanwhile" in str(incomplete.value)


async def test_a_huge_dead_letter_is_shown_cut(
    settings: Settings, broker: aio_pika.abc.AbstractChannel
) -> None:
    exchange = await broker.get_exchange(settings.dead_exchange)
    body = b" " * (2 * 1024 * 1024)
    headers: aio_pika.abc.HeadersType = {REASON_HEADER: "too_large", ERROR_HEADER: "detail"}
    await exchange.publish(aio_pika.Message(body, message_id="big", headers=headers), "lead.x")
    [entry] = await dlq.list_entries(settings)
    assert (entry.reason, entry.source, entry.body_size) == ("too_large", None, len(body))
    assert len(entry.body) == dlq.BODY_SHOWN
    shown = await dlq.show(settings, entry.id)
    assert shown is not None and shown.text.endswith("more bytes not shown]")
    assert await dlq.replay(settings, ids=[entry.id]) == 1
    [replayed] = await inbound_messages(settings)
    assert replayed.body == body  # the whole body, not the part shown


async def test_an_unroutable_replay_keeps_its_dead_letter(
    settings: Settings, broker: aio_pika.abc.AbstractChannel
) -> None:
    await publish_dead(broker, settings, 3)
    before = [e.id for e in await dlq.list_entries(settings)]
    nowhere = settings.model_copy(update={"inbound_exchange": f"{settings.inbound_exchange}.x"})
    exchange = await broker.declare_exchange(nowhere.inbound_exchange, auto_delete=False)
    try:
        with pytest.raises(aio_pika.exceptions.PublishError):
            await dlq.replay(nowhere, all=True)
    finally:
        await exchange.delete()
    assert [e.id for e in await dlq.list_entries(settings)] == before
