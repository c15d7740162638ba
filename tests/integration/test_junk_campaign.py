"""A bad-input campaign: hypothesis generates junk (random bytes, deep nesting, huge
numbers, unicode edge cases, NUL bytes, SQL-ish strings, oversize fields, near-valid
shapes) and a real worker gets all of it. With no source configured nothing valid can
exist, so every message must be dead-lettered with a reason, no row may be written, and
the worker must still route the valid message sent after the junk.

A second campaign fuzzes the AMQP properties, headers and routing key of valid leads,
published with pika as raw bytes: exactly those the client cannot decode are
dead-lettered (invalid_properties), every other one makes its contact, the worker keeps
its connection and stays ready, and replaying the dead letters makes the rest."""

import asyncio
import json
import struct
from typing import Any

import aio_pika
import asyncpg
import pika
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import EventCollector, Expected, lead, settled, setup_source, wait_until
from tests.raw_amqp import Raw, Watch, dead_letters, long_string, publish, publish_raw, timestamp
from worker import dlq
from worker.app import Worker
from worker.errors import REASON_HEADER, Reason
from worker.settings import Settings

SQLISH = ["'; DROP TABLE contacts; --", "1 OR 1=1", "$1", "\\x00", "%s%s%s", "\u0000", "😀" * 3]
edge_text = st.one_of(
    st.text(max_size=40),
    st.sampled_from(SQLISH),
    st.text(alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), max_size=3),
    st.text(min_size=257, max_size=600),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | edge_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(edge_text, inner, max_size=4),
    max_leaves=20,
)
near_valid = st.fixed_dictionaries(
    {
        "source": edge_text | st.sampled_from(["tg", "web-form", "a" * 200]),
        "lead": st.fixed_dictionaries(
            {"external_id": edge_text | st.integers()},
            optional={"email": edge_text, "phone": edge_text, "name": edge_text | json_values},
        ),
    },
    optional={"message": edge_text, "message_id": edge_text, "extra": json_values},
)


def encode(value: Any) -> bytes:
    try:
        return json.dumps(value).encode("utf-8", "surrogatepass")
    except (ValueError, TypeError):
        return repr(value).encode("utf-8", "surrogatepass")


junk = st.one_of(
    st.binary(max_size=300),
    json_values.map(encode),
    near_valid.map(encode),
    st.integers(min_value=1, max_value=5000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(min_value=1, max_value=9000).map(lambda n: b'{"contact_id": ' + b"9" * n + b"}"),
    st.just(b'{"contact_id": 1e400}'),
)
routing_keys = st.sampled_from(["lead.contact", "contact.close", "lead.unknown", ""])


def generate(count: int) -> list[tuple[str, bytes]]:
    """Draw `count` junk messages with hypothesis (deterministically)."""
    drawn: list[tuple[str, bytes]] = []

    @settings(
        max_examples=count,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(routing_keys, junk)
    def draw(key: str, body: bytes) -> None:
        drawn.append((key, body))

    draw()
    return drawn[:count]


async def test_junk_is_dead_lettered_and_writes_nothing(
    pool: asyncpg.Pool,
    settings: Settings,
    broker: aio_pika.abc.AbstractChannel,
    events: EventCollector,
    worker: Worker,
) -> None:
    messages = generate(300)
    for n, (key, body) in enumerate(messages):
        await asyncio.to_thread(publish_raw, settings, key, body, f"junk-{n}")

    await wait_until(
        lambda: settled(worker, len(messages)), timeout=60, what="every junk message settled"
    )
    dead = await dead_letters(settings, len(messages))
    reasons = {str(r) for r in Reason}
    assert all((m.headers or {}).get(REASON_HEADER) in reasons for m in dead)
    assert "ok" not in worker.outcomes and "error" not in worker.outcomes, worker.outcomes
    for table in ("leads", "contacts", "outbox"):
        assert await pool.fetchval(f"SELECT count(*) FROM {table}") == 0, table  # noqa: S608

    # Still consuming, and valid input still works.
    await setup_source(pool, "tg", [("a", 5, 1)])
    await asyncio.to_thread(publish_raw, settings, "lead.contact", lead("tg", "after"), "after-1")
    [assigned] = await events.wait_for("contact.assigned", 1)
    assert assigned.data.inbound_message_id == "after-1"


# --- AMQP properties and headers ---------------------------------------------------

LATE = 2**60  # timestamps from here on are past the year 9999, however read


def utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def amqp_properties(clean: bool) -> st.SearchStrategy[dict[str, Any]]:
    """Properties as a client may set them: `clean`, only what any client can decode;
    else anything the broker passes on (not `expiration` or `user_id`, which it checks)."""
    texts = st.text(max_size=40).map(str.encode).filter(lambda b: len(b) <= 255)
    short_strings = texts if clean else st.one_of(texts, st.binary(max_size=60))
    stamps = (
        st.integers(0, 2**40)
        if clean
        else st.one_of(st.integers(0, 2**40), st.integers(LATE, 2**64 - 1))
    )
    key_texts = st.text(min_size=1, max_size=20).map(str.encode)
    keys = key_texts if clean else st.one_of(key_texts, st.binary(min_size=1, max_size=20))
    keys = keys.filter(lambda key: len(key) <= 255 and not key.startswith(b"x-"))
    leaves = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**63 - 1),
        st.text(max_size=30),
        st.binary(max_size=30),  # a byte array
        st.binary(max_size=30).map(long_string),  # a long string, maybe not UTF-8
        stamps.map(timestamp),
        # Finite only: the broker itself cannot parse a NaN or infinite double (its
        # table parser fails and it closes the publishing connection).
        st.floats(allow_nan=False, allow_infinity=False).map(
            lambda f: Raw(b"d" + struct.pack(">d", f))
        ),
    )
    values = st.recursive(
        leaves,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3),
        max_leaves=8,
    )
    return st.fixed_dictionaries(
        {},
        optional={
            "content_type": short_strings,
            "content_encoding": short_strings,
            "headers": st.dictionaries(keys, values, max_size=5),
            "priority": st.integers(0, 255),
            "correlation_id": short_strings,
            "reply_to": short_strings,
            "message_id": short_strings,
            "timestamp": stamps,
            "type": short_strings,
            "app_id": short_strings,
        },
    )


bad_routing_keys = st.binary(min_size=1, max_size=8).filter(lambda b: not utf8(b))
amqp_messages = st.one_of(
    st.tuples(st.just(b"lead.contact"), amqp_properties(clean=True)),
    st.tuples(st.just(b"lead.contact"), amqp_properties(clean=False)),
    st.tuples(bad_routing_keys.map(lambda b: b"lead." + b), amqp_properties(clean=True)),
)


def undecodable(routing_key: bytes, properties: dict[str, Any]) -> bool:
    """Whether the client cannot decode something of this message: our model of pamqp."""

    def bad(value: Any) -> bool:
        if isinstance(value, Raw):
            return value[:1] == b"T" and struct.unpack(">Q", value[1:9])[0] >= LATE
        if isinstance(value, dict):
            return any((isinstance(k, bytes) and not utf8(k)) or bad(v) for k, v in value.items())
        if isinstance(value, list):
            return any(bad(v) for v in value)
        return False

    if not utf8(routing_key) or properties.get("timestamp", 0) >= LATE:
        return True
    if bad(properties.get("headers", {})):
        return True
    return any(isinstance(v, bytes) and not utf8(v) for v in properties.values())


def generate_properties(count: int) -> list[tuple[bytes, dict[str, Any]]]:
    drawn: list[tuple[bytes, dict[str, Any]]] = []

    @settings(
        max_examples=count,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(amqp_messages)
    def draw(message: tuple[bytes, dict[str, Any]]) -> None:
        drawn.append(message)

    draw()
    return drawn[:count]


@pytest.mark.settings(prefetch=50)
async def test_property_and_header_junk_is_dead_lettered_alone(
    pool: asyncpg.Pool,
    settings: Settings,
    events: EventCollector,
    worker: Worker,
    expected: Expected,
) -> None:
    await setup_source(pool, "tg", [("a", 10_000, 1)])
    watch = await Watch.start(worker)
    drawn = generate_properties(200)
    messages = [
        (
            routing_key,
            json.dumps({**lead("tg", f"p:{n}"), "message_id": f"prop-{n}"}).encode(),
            pika.BasicProperties(delivery_mode=2, **properties),
        )
        for n, (routing_key, properties) in enumerate(drawn)
    ]
    bad = sum(undecodable(k, p) for k, p in drawn)
    assert 20 < bad < len(drawn) - 20, "the draw exercises both kinds"
    await asyncio.to_thread(publish, settings, messages)

    await wait_until(
        lambda: settled(worker, len(messages)), timeout=60, what="every message settled"
    )
    await events.wait_for("contact.assigned", len(messages) - bad)
    dead = await dlq.list_entries(settings, limit=1000)
    assert len(dead) == bad
    assert {e.reason for e in dead} == {"invalid_properties"}
    assert sorted(e.body for e in dead) == sorted(
        body for (k, p), (_, body, _) in zip(drawn, messages, strict=True) if undecodable(k, p)
    )
    assert dict(worker.outcomes) == {"ok": len(messages) - bad, "invalid_properties": bad}
    await watch.stop()

    # Replayed without what could not be decoded, each makes its contact, once; but a
    # routing key that was not UTF-8 was replaced (U+FFFD) and is no known one now.
    mangled = sum(not utf8(k) for k, _ in drawn)
    assert await dlq.replay(settings, reason="invalid_properties") == bad
    await events.wait_for("contact.assigned", len(messages) - mangled)
    await wait_until(
        lambda: settled(worker, len(messages) + bad), timeout=60, what="every replay settled"
    )
    assert worker.outcomes["invalid_schema"] == mangled
    expected.dead["invalid_schema"] = mangled
    assert await pool.fetchval("SELECT count(*) FROM contacts") == len(messages) - mangled
