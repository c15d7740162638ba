"""A bad-input campaign: hypothesis generates junk (random bytes, deep nesting, huge
numbers, unicode edge cases, NUL bytes, SQL-ish strings, oversize fields, near-valid
shapes) and a real worker gets all of it. With no source configured nothing valid can
exist, so every message must be dead-lettered with a reason, no row may be written, and
the worker must still route the valid message sent after the junk."""

import asyncio
import json
from typing import Any

import aio_pika
import asyncpg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import EventCollector, lead, settled, setup_source, wait_until
from tests.integration.test_bad_input import dead_letters, publish_raw
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
