"""Offers and availability together: an operator who stops taking work declines their
pending offers, which move on at once; and `--expire-to-away N` sets away an operator
who let N offers of the source in a row lapse."""

import json

import asyncpg

from tests.integration.test_offers import CONTACT, new, offering_source
from worker import availability

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
