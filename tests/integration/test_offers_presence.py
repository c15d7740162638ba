"""Offers and availability together: an operator who stops taking work declines their
pending offers, which move on at once; and `--expire-to-away N` sets away an operator
who let N offers of the source in a row lapse."""

import json

import asyncpg

from tests.offering import CONTACT, answer, new, offering_source
from worker import admin, availability, offers
from worker.routing_file import apply, parse

OUTBOX = """
    SELECT routing_key, payload FROM outbox
    WHERE routing_key IN ('contact.declined', 'contact.offered', 'contact.queued')
      AND contact_id = $1
    ORDER BY id
"""


async def test_going_away_moves_pending_offers_on_to_the_next_operator(
    pool: asyncpg.Pool,
) -> None:
    a, b = await offering_source(pool, [("a", 5, 1), ("b", 5, 1)])
    outcome = await new(pool, "web", "w:1")
    contact = outcome.contacts["m-w:1"]
    first = await pool.fetchrow(CONTACT, "m-w:1")
    holder, other = (a, b) if first["operator_id"] == a else (b, a)

    changed = await availability.set_presence(pool, holder, "away", "cli")

    assert changed.offers_moved == 1
    row = await pool.fetchrow(CONTACT, "m-w:1")
    assert (row["operator_id"], row["offered"], row["offer_attempt"]) == (other, True, 2)
    assert row["offer_skip"] == [holder]
    events = [
        (r["routing_key"], json.loads(r["payload"])["data"])
        for r in await pool.fetch(OUTBOX, contact)
    ]
    assert [k for k, _ in events] == ["contact.offered", "contact.declined", "contact.offered"]
    assert events[1][1]["operator_id"] == holder
    assert events[1][1]["reason"] == "operator away"
    loads = dict(await pool.fetch("SELECT id, open_load FROM operators"))
    assert loads == {holder: 0, other: 1}


async def test_going_offline_with_nobody_else_queues_the_offer(pool: asyncpg.Pool) -> None:
    [a] = await offering_source(pool, [("a", 5, 1)])
    outcome = await new(pool, "web", "w:1")
    contact = outcome.contacts["m-w:1"]

    changed = await availability.set_presence(pool, a, "offline", "cli")

    assert changed.offers_moved == 1
    row = await pool.fetchrow(CONTACT, "m-w:1")
    assert (row["operator_id"], row["offered"], row["status"]) == (None, False, "open")
    keys = [r["routing_key"] for r in await pool.fetch(OUTBOX, contact)]
    assert keys == ["contact.offered", "contact.declined", "contact.queued"]
    assert await pool.fetchval("SELECT open_load FROM operators WHERE id = $1", a) == 0

    # Back online: the queued contact is offered to them again at once.
    await availability.set_presence(pool, a, "online", "cli")
    row = await pool.fetchrow(CONTACT, "m-w:1")
    assert (row["operator_id"], row["offered"]) == (a, True)


async def test_an_operator_without_offers_going_away_changes_no_contact(
    pool: asyncpg.Pool,
) -> None:
    a, _b = await offering_source(pool, [("a", 5, 1), ("b", 5, 1)])
    changed = await availability.set_presence(pool, a, "away", "cli")
    assert changed.offers_moved == 0
    assert await pool.fetchval("SELECT count(*) FROM contacts") == 0


LAPSE = """
    WITH due AS (
        UPDATE contacts SET offer_expires_at = now() - interval '1 second'
        WHERE offer_expires_at IS NOT NULL AND operator_id = $1
        RETURNING id
    )
    UPDATE offers SET expires_at = now() - interval '1 second'
    WHERE outcome IS NULL AND contact_id IN (SELECT id FROM due)
"""
PRESENCE_EVENTS = """
    SELECT payload->'data' AS data FROM outbox
    WHERE routing_key = 'operator.presence_changed' ORDER BY id
"""


async def lapse(pool: asyncpg.Pool, operator_id: int) -> int:
    """Let the operator's pending offers lapse now, and expire them as the workers do."""
    await pool.execute(LAPSE, operator_id)
    source_id = await pool.fetchval("SELECT id FROM sources WHERE key = 'web'")
    return await offers.expire_source(pool, source_id)


async def presence(pool: asyncpg.Pool, operator_id: int) -> str:
    return str(await pool.fetchval("SELECT presence FROM operators WHERE id = $1", operator_id))


async def test_expire_to_away_sets_away_after_n_offers_in_a_row_lapse(
    pool: asyncpg.Pool,
) -> None:
    [a] = await offering_source(pool, [("a", 1, 1)])
    await admin.update_source(pool, "web", expire_to_away=2)
    await new(pool, "web", "w:1")
    assert await lapse(pool, a) == 1  # offered to `a` again (nobody else): one in a row
    assert await presence(pool, a) == "online"
    assert await lapse(pool, a) == 1  # two in a row: away
    assert await presence(pool, a) == "away"
    [event] = [json.loads(r["data"]) for r in await pool.fetch(PRESENCE_EVENTS)]
    assert (event["operator_id"], event["status"], event["reason"]) == (a, "away", "expired_offers")
    # Going away took the offer back: the contact waits, and `a` holds nothing.
    row = await pool.fetchrow(CONTACT, "m-w:1")
    assert (row["operator_id"], row["offered"]) == (None, False)
    assert await pool.fetchval("SELECT open_load FROM operators WHERE id = $1", a) == 0

    # Online again, the count starts afresh: one lapse is not enough.
    await availability.set_presence(pool, a, "online", "cli")
    assert await lapse(pool, a) == 1
    assert await presence(pool, a) == "online"


async def test_an_answer_breaks_the_row(pool: asyncpg.Pool) -> None:
    [a] = await offering_source(pool, [("a", 5, 1)])
    await admin.update_source(pool, "web", expire_to_away=2)
    first = (await new(pool, "web", "w:1")).contacts["m-w:1"]
    assert await lapse(pool, a) == 1
    await answer(pool, first, a, False, "dec-1", "busy")  # declined: not a lapse
    await new(pool, "web", "w:2")
    assert await lapse(pool, a) == 2  # w:1 offered again after the decline, and w:2
    assert await presence(pool, a) == "away"  # those two lapsed in a row


async def test_expire_to_away_off_never_sets_anyone_away(pool: asyncpg.Pool) -> None:
    [a] = await offering_source(pool, [("a", 1, 1)])
    await new(pool, "web", "w:1")
    for _ in range(3):
        assert await lapse(pool, a) == 1
    assert await presence(pool, a) == "online"
    assert await pool.fetch(PRESENCE_EVENTS) == []


async def test_the_routing_file_sets_expire_to_away_and_applies_idempotently(
    pool: asyncpg.Pool,
) -> None:
    text = """
[[operators]]
name = "Ann"
max_load = 5

[[sources]]
key = "chat"
accept_timeout = 20
expire_to_away = 2
weights = { Ann = 1 }
"""
    first = await apply(pool, parse(text, "toml"), dry_run=False)
    assert "expire_to_away 2" in " ".join(c.details for c in first)
    assert await pool.fetchval("SELECT expire_to_away FROM sources WHERE key = 'chat'") == 2
    again = await apply(pool, parse(text, "toml"), dry_run=False)
    assert {c.kind for c in again} == {"unchanged"}
    off = await apply(pool, parse(text.replace("expire_to_away = 2", ""), "toml"), dry_run=False)
    assert [c.details for c in off if c.kind == "update"] == ["expire_to_away 2 → off"]


async def test_lapses_before_going_away_and_back_do_not_count(pool: asyncpg.Pool) -> None:
    a, b = await offering_source(pool, [("a", 1, 1), ("b", 1, 1)])
    await admin.update_source(pool, "web", expire_to_away=2)
    await new(pool, "web", "w:1")
    x = (await pool.fetchrow(CONTACT, "m-w:1"))["operator_id"]
    y = b if x == a else a
    assert await lapse(pool, x) == 1  # one lapse of x's; w:1 moves on to y
    assert (await pool.fetchrow(CONTACT, "m-w:1"))["operator_id"] == y
    await availability.set_presence(pool, x, "away", "cli")  # nothing pending: no decline
    await availability.set_presence(pool, x, "online", "cli")
    await new(pool, "web", "w:2")  # y is full: offered to x
    assert (await pool.fetchrow(CONTACT, "m-w:2"))["operator_id"] == x
    assert await lapse(pool, x) == 1  # two lapses in all, but one since x came back
    assert await presence(pool, x) == "online"
