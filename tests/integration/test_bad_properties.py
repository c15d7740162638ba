"""Messages whose AMQP properties or headers the client library cannot decode, published
with pika as raw bytes (aio-pika cannot send them): each is dead-lettered once as
invalid_properties, the messages around it are routed, the worker keeps its connection
and stays ready, and the `dlq` commands read, replay and purge such messages too."""

import asyncio
import json
import struct
from typing import Any

import aio_pika
import asyncpg
import pika
import pika.data
import pytest

from tests.commands import leadrouter
from tests.helpers import (
    EventCollector,
    Expected,
    crash_route_on,
    lead,
    settled,
    setup_source,
    wait_until,
)
from tests.raw_amqp import (
    Raw,
    Watch,
    dead_letters,
    long_string,
    props,
    publish,
    publish_raw,
    timestamp,
)
from worker import dlq
from worker.app import Worker
from worker.decode import message_id_of
from worker.errors import ERROR_HEADER, REASON_HEADER
from worker.settings import Settings


def body(external_id: str, **extra: Any) -> bytes:
    return json.dumps({**lead("tg", external_id), **extra}).encode()


# (case, routing key, properties, what the error names)
BAD: list[tuple[str, str | bytes, pika.BasicProperties, str]] = [
    ("message_id", "lead.contact", props(b"\xff\xfe\x80abc"), "message_id"),
    ("app_id", "lead.contact", props("bad-app", app_id=b"\xff"), "app_id"),
    ("type", "lead.contact", props("bad-type", type=b"\xc3("), "type"),
    ("correlation_id", "lead.contact", props("bad-corr", correlation_id=b"\x80"), "correlation_id"),
    ("timestamp", "lead.contact", props("bad-ts", timestamp=2**62), "timestamp"),
    ("header key", "lead.contact", props("bad-key", headers={b"\xffk": "v", "ok": 1}), "headers"),
    (
        "header date",
        "lead.contact",
        props("bad-date", headers={"when": timestamp(2**62), "ok": 1}),
        "headers",
    ),
    ("routing key", b"lead.\xffcontact", props("bad-rk"), "routing_key"),
]


@pytest.mark.settings(delivery_limit=3, prefetch=50)
async def test_undecodable_properties_are_dead_lettered_once_and_nothing_else_is_hurt(
    pool: asyncpg.Pool,
    settings: Settings,
    events: EventCollector,
    worker: Worker,
) -> None:
    await setup_source(pool, "tg", [("a", 1000, 1)])
    watch = await Watch.start(worker)
    messages: list[tuple[str | bytes, bytes, pika.BasicProperties]] = []
    for n, (case, routing_key, properties, _named) in enumerate(BAD):
        # Each poison has valid neighbours, prefetched with it.
        messages.append(("lead.contact", body(f"before-{n}"), props(f"good-{n}-a")))
        messages.append((routing_key, body(f"bad-{case}"), properties))
        messages.append(("lead.contact", body(f"after-{n}"), props(f"good-{n}-b")))
    await asyncio.to_thread(publish, settings, messages)

    assigned = await events.wait_for("contact.assigned", 2 * len(BAD))
    assert sorted(e.data.inbound_message_id for e in assigned) == sorted(
        f"good-{n}-{x}" for n in range(len(BAD)) for x in "ab"
    )
    dead = await dead_letters(settings, len(BAD))
    await wait_until(lambda: settled(worker, len(messages)), what="every outcome counted")
    await asyncio.sleep(0.5)  # nothing more comes: no redelivery, no second dead letter
    assert dict(worker.outcomes) == {"ok": 2 * len(BAD), "invalid_properties": len(BAD)}
    assert await dlq.count(settings) == 0  # dead_letters took them all: no extra copy
    await watch.stop()

    by_body = {json.loads(m.body)["lead"]["external_id"]: m for m in dead}
    for case, _routing_key, properties, named in BAD:
        message = by_body[f"bad-{case}"]
        headers = message.headers or {}
        assert headers[REASON_HEADER] == "invalid_properties", case
        assert headers[ERROR_HEADER] == f"could not decode the AMQP {named}", case
        assert message.body == body(f"bad-{case}"), case
        # What decoded is kept.
        if named != "message_id":
            assert message.message_id == properties.message_id, case
        if named == "headers":
            assert headers["ok"] == 1, case
    assert message_id_of(by_body["bad-message_id"].message_id) is None
    assert by_body["bad-routing key"].routing_key == "lead.\ufffdcontact"
    assert await pool.fetchval("SELECT count(*) FROM contacts") == 2 * len(BAD)


async def test_a_dead_letter_keeps_headers_it_can_and_never_trusts_ours(
    settings: Settings, worker: Worker
) -> None:
    """A bad message with a header value that is not UTF-8 (or a float pamqp cannot encode
    again) is still dead-lettered with its reason; the message's own x-leadrouter-* and
    x-death headers do not survive into the dead letter."""
    headers = {
        "raw": long_string(b"\xff\xfe"),
        "huge": Raw(b"d" + struct.pack(">d", 1e300)),
        "trace": "t-1",
        REASON_HEADER: "spoof",
        ERROR_HEADER: "spoof",
        "x-leadrouter-extra": "spoof",
        "x-death": [{"reason": "spoof", "queue": "q"}],
    }
    await asyncio.to_thread(
        publish, settings, [("lead.contact", b"{not json", props("bad-json", headers=headers))]
    )
    [dead] = await dead_letters(settings, 1)
    assert dead.message_id == "bad-json"
    assert dead.headers == {
        "raw": bytearray(b"\xff\xfe"),
        "trace": "t-1",
        REASON_HEADER: "invalid_json",
        ERROR_HEADER: dead.headers[ERROR_HEADER],
    }
    assert dead.headers[ERROR_HEADER] != "spoof"
    await wait_until(lambda: settled(worker, 1), what="the outcome counted")
    assert worker.outcomes["invalid_json"] == 1


async def test_dlq_lists_shows_replays_and_purges_undecodable_messages(
    pool: asyncpg.Pool,
    settings: Settings,
    broker: aio_pika.abc.AbstractChannel,
    events: EventCollector,
    worker: Worker,
) -> None:
    """Both kinds: the worker's invalid_properties dead letter, and one that still holds
    the undecodable properties (as the broker dead-letters it, with x-death)."""
    await setup_source(pool, "tg", [("a", 100, 1)])
    await asyncio.to_thread(
        publish,
        settings,
        [("lead.contact", body("ours", message_id="body-1"), props(b"\xff", app_id="bot"))],
    )
    await wait_until(lambda: dlq.count(settings), what="the worker's dead letter")
    death = {"reason": "delivery_limit", "queue": settings.inbound_queue, "count": 3}
    broker_made = props(
        b"\xfe\xff",
        timestamp=2**62,
        headers={"x-death": [death], b"\xffkey": "v", REASON_HEADER: "spoof"},
    )
    await asyncio.to_thread(
        publish,
        settings,
        [("lead.contact", body("theirs", message_id="body-2"), broker_made)],
        settings.dead_exchange,
    )

    entries = await dlq.list_entries(settings)
    assert [(e.reason, e.message_id, e.source) for e in entries] == [
        ("invalid_properties", None, "tg"),
        ("delivery_limit", None, "tg"),
    ]
    ours, theirs = entries
    assert ours.error == "could not decode the AMQP message_id"
    assert ours.properties["app_id"] == "bot" and ours.undecodable == ()
    assert theirs.undecodable == ("headers", "message_id", "timestamp")  # in the spec's order
    assert theirs.error.endswith("could not decode the AMQP headers, message_id, timestamp")
    shown = await dlq.show(settings, theirs.id)
    assert shown is not None and shown.headers[REASON_HEADER] == "spoof"  # shown, not believed
    assert [e.id for e in await dlq.list_entries(settings, reason="delivery_limit")] == [theirs.id]

    # The command line too: no traceback, the undecodable properties named.
    listed = leadrouter(settings, "dlq", "list", "--json")
    assert [row["reason"] for row in json.loads(listed.stdout)] == [
        "invalid_properties",
        "delivery_limit",
    ]
    shown_cli = json.loads(leadrouter(settings, "dlq", "show", theirs.id, "--json").stdout)
    assert shown_cli["undecodable_properties"] == ["headers", "message_id", "timestamp"]

    # Replayed without what could not be decoded: the body's id makes each a contact, once.
    assert await dlq.replay(settings, all=True) == 2
    assigned = await events.wait_for("contact.assigned", 2)
    assert sorted(e.data.inbound_message_id for e in assigned) == ["body-1", "body-2"]
    assert await dlq.count(settings) == 0

    # Purge takes one as well.
    await asyncio.to_thread(
        publish, settings, [("lead.contact", b"{}", broker_made)], settings.dead_exchange
    )
    purged = leadrouter(settings, "dlq", "purge", "--reason", "delivery_limit", "--yes")
    assert purged.stdout.strip() == "purged 1"
    assert await dlq.count(settings) == 0


async def test_an_id_less_dead_letter_replayed_twice_makes_no_contact(
    pool: asyncpg.Pool, settings: Settings, worker: Worker, expected: Expected
) -> None:
    """aiormq stamped a random id on the dead copy of a message without one: each replay
    made a contact. Now it stays without an id, and is dead-lettered again."""
    await setup_source(pool, "tg", [("a", 100, 1)])
    for _ in range(2):  # the same id-less message, sent twice
        await asyncio.to_thread(publish_raw, settings, "lead.contact", lead("tg", "x:1"), None)
    await wait_until(lambda: settled(worker, 2), what="both dead-lettered")
    await wait_until(lambda: has(settings, 2), what="two dead letters")
    entries = await dlq.list_entries(settings)
    assert [(e.reason, e.message_id) for e in entries] == [("missing_message_id", None)] * 2

    for round_ in (1, 2):
        assert await dlq.replay(settings, reason="missing_message_id") == 2
        await wait_until(
            lambda round_=round_: settled(worker, 2 + 2 * round_), what="replays handled"
        )
        await wait_until(lambda: has(settings, 2), what="dead-lettered again")
    assert worker.outcomes["missing_message_id"] == 6
    assert await pool.fetchval("SELECT count(*) FROM contacts") == 0
    expected.dead["missing_message_id"] = 2


async def has(settings: Settings, count: int) -> bool:
    return await dlq.count(settings) == count


async def test_an_expired_lead_is_listed_filtered_and_replayed_as_expired(
    pool: asyncpg.Pool, settings: Settings, broker: aio_pika.abc.AbstractChannel
) -> None:
    """No worker: the lead expires in the inbound queue and the broker dead-letters it."""
    await setup_source(pool, "tg", [("a", 100, 1)])
    await asyncio.to_thread(
        publish, settings, [("lead.contact", body("late"), props("late-1", expiration="1"))]
    )
    await wait_until(lambda: has(settings, 1), what="the expired dead letter")
    [entry] = await dlq.list_entries(settings, reason="expired")
    assert (entry.reason, entry.message_id) == ("expired", "late-1")
    assert entry.error.startswith("dead-lettered by the broker (expired)")

    listed = json.loads(leadrouter(settings, "dlq", "list", "--reason", "expired", "--json").stdout)
    assert [row["message_id"] for row in listed] == ["late-1"]
    assert leadrouter(settings, "dlq", "replay", "--reason", "expired").stdout == "replayed 1\n"

    app = Worker(settings)
    await app.start()
    try:
        await wait_until(lambda: settled(app, 1), what="the replay handled")
    finally:
        await app.stop()
    assert app.outcomes["ok"] == 1
    assert await pool.fetchval("SELECT inbound_message_id FROM contacts") == "late-1"


@pytest.mark.settings(delivery_limit=2)
async def test_a_broker_dead_letter_s_reason_is_the_broker_s(
    pool: asyncpg.Pool,
    settings: Settings,
    broker: aio_pika.abc.AbstractChannel,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await setup_source(pool, "tg", [("a", 100, 1)])
    crash_route_on(monkeypatch, "boom")
    spoofed = props("crash-1", headers={REASON_HEADER: "unknown_source", ERROR_HEADER: "spoof"})
    app = Worker(settings)
    await app.start()
    try:
        await asyncio.to_thread(publish, settings, [("lead.contact", body("boom"), spoofed)])
        await wait_until(lambda: has(settings, 1), timeout=30, what="the broker's dead letter")
    finally:
        await app.stop()
    [entry] = await dlq.list_entries(settings)
    assert (entry.message_id, entry.reason) == ("crash-1", "delivery_limit")
    assert "spoof" not in entry.error
    assert await dlq.list_entries(settings, reason="unknown_source") == []


async def test_a_scan_cut_short_by_its_limit_says_so(
    settings: Settings, broker: aio_pika.abc.AbstractChannel
) -> None:
    exchange = await broker.get_exchange(settings.dead_exchange)
    for n in range(30):
        reason = "invalid_json" if n == 25 else "unknown_source"
        headers: aio_pika.abc.HeadersType = {REASON_HEADER: reason, ERROR_HEADER: "detail"}
        await exchange.publish(aio_pika.Message(b"{}", message_id=f"m-{n}", headers=headers), "k")

    for args in (["list", "--reason", "invalid_json"], ["replay", "--reason", "invalid_json"]):
        result = leadrouter(settings, "dlq", *args, "--scan-limit", "20", check=False)
        assert result.returncode == 3, result
        last = result.stderr.strip().splitlines()[-1]  # after the log line
        assert last.startswith("error: looked at 20 of the 30 dead letters only"), result
        assert "Traceback" not in result.stderr
    purge = leadrouter(
        settings,
        "dlq",
        "purge",
        "--reason",
        "invalid_json",
        "--yes",
        "--scan-limit",
        "20",
        check=False,
    )
    assert (purge.returncode, purge.stdout) == (3, "purged 0\n")
    shown = leadrouter(settings, "dlq", "show", "000000000000", "--scan-limit", "20", check=False)
    assert shown.returncode == 3 and "looked at 20 of the 30" in shown.stderr
    # Past the limit it is there, and a large enough limit finds it.
    full = leadrouter(settings, "dlq", "list", "--reason", "invalid_json", "--json")
    assert [row["message_id"] for row in json.loads(full.stdout)] == ["m-25"]
    assert await dlq.count(settings) == 30
