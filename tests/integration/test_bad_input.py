"""Every kind of bad input is dead-lettered at once with its reason, and the worker keeps
consuming. Messages are published with pika, which sends exactly what it is given (aio-pika
would stamp a message_id on everything)."""

import asyncio
import json
from typing import Any

import aio_pika
import asyncpg
import pytest

from tests.helpers import (
    EventCollector,
    Expected,
    assert_clean_end,
    crash_route_on,
    lead,
    settled,
    setup_source,
    wait_until,
)
from tests.raw_amqp import dead_letters, publish_raw
from worker.app import Worker
from worker.decode import message_id_of
from worker.errors import ERROR_HEADER, REASON_HEADER
from worker.settings import Settings

ONE_MIB = 1024 * 1024


BAD_INPUT: list[tuple[str, str, bytes | dict[str, Any], str | None, str]] = [
    # (case, routing key, body, AMQP message_id, expected reason)
    ("not json", "lead.contact", b"{not json", "bad-json", "invalid_json"),
    ("not utf-8", "lead.contact", b"\xff\xfe\x00", "bad-utf8", "invalid_json"),
    ("deep nesting", "lead.contact", b"[" * 200_000, "bad-deep", "invalid_json"),
    (
        "huge number",
        "contact.close",
        b'{"contact_id": 1' + b"0" * 5000 + b"}",
        "bad-bignum",
        "invalid_json",
    ),
    ("wrong type", "contact.close", {"contact_id": "12"}, "bad-type", "invalid_schema"),
    (
        "contact id out of range",
        "contact.close",
        {"contact_id": 2**70},
        "bad-range",
        "invalid_schema",
    ),
    (
        "extra field",
        "lead.contact",
        {**lead("tg", "e:1"), "admin": True},
        "bad-extra",
        "invalid_schema",
    ),
    ("no lead", "lead.contact", {"source": "tg"}, "bad-missing", "invalid_schema"),
    ("huge field", "lead.contact", lead("tg", "x" * 100_000), "bad-huge-field", "invalid_schema"),
    (
        "NUL byte",
        "lead.contact",
        {**lead("tg", "n:1"), "message": "a\u0000b"},
        "bad-nul",
        "invalid_schema",
    ),
    (
        "bad e-mail",
        "lead.contact",
        lead("tg", "m:1", email="not-an-email"),
        "bad-email",
        "invalid_schema",
    ),
    (
        "SQL-ish source",
        "lead.contact",
        lead("tg'; DROP TABLE contacts;--", "s:1"),
        "bad-sqlish",
        "invalid_schema",
    ),
    ("unknown routing key", "lead.delete", lead("tg", "k:1"), "bad-key", "invalid_schema"),
    ("no message id", "lead.contact", lead("tg", "i:1"), None, "missing_message_id"),
    ("unknown source", "lead.contact", lead("nobody", "u:1"), "bad-source", "unknown_source"),
    (
        "unknown contact",
        "contact.close",
        {"contact_id": 987654321},
        "bad-contact",
        "unknown_contact",
    ),
    ("too large", "lead.contact", b" " * (ONE_MIB + 1), "bad-large", "too_large"),
    # priority: an integer 0-9 and nothing else (strict: no strings, floats or booleans)
    *(
        (f"priority {text}", "lead.contact", body, f"bad-priority-{n}", "invalid_schema")
        for n, (text, body) in enumerate(
            [
                ("string", {**lead("tg", "p:1"), "priority": "5"}),
                ("10", {**lead("tg", "p:2"), "priority": 10}),
                ("-1", {**lead("tg", "p:3"), "priority": -1}),
                ("3.5", {**lead("tg", "p:4"), "priority": 3.5}),
                ("3.0", {**lead("tg", "p:5"), "priority": 3.0}),
                ("true", {**lead("tg", "p:6"), "priority": True}),
                ("null", {**lead("tg", "p:7"), "priority": None}),
                ("huge", {**lead("tg", "p:8"), "priority": 10**30}),
                ("1e400", b'{"source": "tg", "lead": {"external_id": "p:9"}, "priority": 1e400}'),
            ]
        )
    ),
]


async def test_bad_input_is_dead_lettered_with_its_reason(
    pool: asyncpg.Pool,
    settings: Settings,
    broker: aio_pika.abc.AbstractChannel,
    events: EventCollector,
    worker: Worker,
) -> None:
    await setup_source(pool, "tg", [("a", 100, 1)])

    for _case, routing_key, body, message_id, _reason in BAD_INPUT:
        await asyncio.to_thread(publish_raw, settings, routing_key, body, message_id)
    # Valid messages after the junk are still routed, with the id in the property or the body.
    await asyncio.to_thread(publish_raw, settings, "lead.contact", lead("tg", "ok:1"), "good-1")
    await asyncio.to_thread(
        publish_raw, settings, "lead.contact", {**lead("tg", "ok:2"), "message_id": "good-2"}, None
    )

    assigned = await events.wait_for("contact.assigned", 2)
    assert {e.data.inbound_message_id for e in assigned} == {"good-1", "good-2"}
    dead = await dead_letters(settings, len(BAD_INPUT))
    by_case = {}
    for message in dead:
        headers = message.headers or {}
        # The dead copy of a message without an id says "none" (aiormq would stamp one).
        key = message_id_of(message.message_id) or "no id"
        by_case[(key, message.routing_key)] = (
            headers.get(REASON_HEADER),
            headers.get(ERROR_HEADER),
            message.body,
        )
    for case, routing_key, body, message_id, reason in BAD_INPUT:
        got_reason, error, dead_body = by_case[(message_id or "no id", routing_key)]
        assert got_reason == reason, case
        assert isinstance(error, str) and error, case
        sent = body if isinstance(body, bytes) else json.dumps(body).encode()
        assert dead_body == sent, f"{case}: the dead letter keeps the original body"
    # Dead-lettered once, at once: no retries, nothing written.
    # Counted once the broker confirmed the dead letter, which can be after we read it.
    await wait_until(lambda: settled(worker, len(BAD_INPUT) + 2), what="every outcome counted")
    assert worker.outcomes["ok"] == 2
    assert sum(worker.outcomes.values()) == len(BAD_INPUT) + 2
    assert await pool.fetchval("SELECT count(*) FROM contacts") == 2
    assert await pool.fetchval("SELECT count(*) FROM leads") == 2
    assert "not-an-email" not in str(by_case[("bad-email", "lead.contact")][1])


@pytest.mark.settings(delivery_limit=2)
async def test_a_crashing_handler_is_dead_lettered_by_the_delivery_limit(
    pool: asyncpg.Pool,
    settings: Settings,
    events: EventCollector,
    monkeypatch: pytest.MonkeyPatch,
    worker_log: list[dict[str, Any]],
) -> None:
    """A bug is retried through the quorum queue's delivery limit, then the broker
    dead-letters the message with x-death; other messages are not blocked."""
    await setup_source(pool, "tg", [("a", 100, 1)])
    crash_route_on(monkeypatch, "boom")
    limited = settings
    app = Worker(limited)
    await app.start()
    try:
        await asyncio.to_thread(publish_raw, limited, "lead.contact", lead("tg", "boom"), "crash-1")
        await asyncio.to_thread(publish_raw, limited, "lead.contact", lead("tg", "fine"), "fine-1")
        [assigned] = await events.wait_for("contact.assigned", 1)
        assert assigned.data.inbound_message_id == "fine-1"
        [dead] = await dead_letters(limited, 1)
    finally:
        await app.stop()
    headers = dead.headers or {}
    assert dead.message_id == "crash-1"
    assert REASON_HEADER not in headers
    [death] = headers["x-death"]  # type: ignore[misc]
    assert death["reason"] == b"delivery_limit" or death["reason"] == "delivery_limit"  # type: ignore[index]
    assert app.outcomes["error"] >= 2
    assert await pool.fetchval("SELECT count(*) FROM contacts") == 1
    await assert_clean_end(settings, worker_log, Expected(errors={"message_failed"}))


async def test_a_deleted_dead_letter_queue_is_declared_again(
    pool: asyncpg.Pool,
    settings: Settings,
    broker: aio_pika.abc.AbstractChannel,
    events: EventCollector,
    worker: Worker,
    expected: Expected,
) -> None:
    expected.errors.add("dead_letters_failing")  # until the queue is declared again
    await setup_source(pool, "tg", [("a", 100, 1)])
    await broker.queue_delete(settings.dead_queue)  # an operator's mistake
    await asyncio.to_thread(publish_raw, settings, "lead.contact", b"{not json", "bad-json")
    await asyncio.to_thread(publish_raw, settings, "lead.contact", lead("tg", "ok:1"), "good-1")
    # The dead letter is not lost (the publish was returned, so it was not acked) and
    # the worker goes on.
    [dead] = await dead_letters(settings, 1)
    assert dead.message_id == "bad-json"
    assert (dead.headers or {}).get(REASON_HEADER) == "invalid_json"
    [assigned] = await events.wait_for("contact.assigned", 1)
    assert assigned.data.inbound_message_id == "good-1"
    await wait_until(lambda: settled(worker, 2), what="both outcomes counted")
