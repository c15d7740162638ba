"""Offers from the command line: turning them on, answering for an operator, and what
`stats` tells about them."""

import asyncpg

from tests.commands import as_json, fails_cleanly, leadrouter
from tests.helpers import route_new, setup_source
from worker.settings import Settings

OFFERED_TO = "SELECT operator_id FROM contacts WHERE id = $1"


async def test_offers_on_answered_from_the_command_line(
    settings: Settings, pool: asyncpg.Pool
) -> None:
    a, b = await setup_source(pool, "web", [("Ann", 5, 1), ("Bob", 5, 1)])
    row = as_json(settings, "sources", "update", "web", "--accept-timeout", "30")
    assert row["accept_timeout"] == 30
    listed = leadrouter(settings, "sources", "list").stdout
    assert "accept_timeout" in listed and "30" in listed
    async with pool.acquire() as conn, conn.transaction():
        contact = (await route_new(conn, "web", "w:1")).contacts["m-w:1"]
    first = await pool.fetchval(OFFERED_TO, contact)
    other = b if first == a else a

    fails_cleanly(
        settings,
        "contacts",
        "accept",
        str(contact),
        "--operator",
        str(other),
        expect="it is not offered to them",
    )
    fails_cleanly(
        settings,
        "contacts",
        "decline",
        str(contact),
        "--operator",
        str(first),
        "--reason",
        "x" * 257,
        expect="reason",
    )
    fails_cleanly(
        settings, "contacts", "accept", "999999", "--operator", str(first), expect="no contact"
    )
    out = leadrouter(
        settings, "contacts", "decline", str(contact), "--operator", str(first), "--reason", "busy"
    ).stdout
    assert (
        out.strip()
        == f"contact {contact} declined by operator {first}; offered to operator {other}"
    )
    assert await pool.fetchval(OFFERED_TO, contact) == other
    out = leadrouter(settings, "contacts", "accept", str(contact), "--operator", str(other)).stdout
    assert out.strip() == f"contact {contact} accepted: assigned to operator {other}"
    out = leadrouter(settings, "contacts", "accept", str(contact), "--operator", str(other)).stdout
    assert "already accepted" in out
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM outbox WHERE routing_key = 'contact.answer_rejected'"
        )
        == 1
    )  # the wrong operator's accept, as for a message

    [web] = as_json(settings, "stats")
    assert (web["assigned"], web["accept_timeout"]) == (1, 30)
    offers = {o["operator_id"]: o["offers"] for o in web["operators"]}
    assert offers[first] == {
        "offered": 1,
        "accepted": 0,
        "declined": 1,
        "expired": 0,
        "acceptance_rate": 0.0,
        "median_accept_seconds": None,
    }
    assert (offers[other]["offered"], offers[other]["accepted"]) == (1, 1)
    assert offers[other]["acceptance_rate"] == 1.0
    assert offers[other]["median_accept_seconds"] is not None
    table = leadrouter(settings, "stats").stdout
    assert "offered" in table and "100%" in table

    row = as_json(settings, "sources", "update", "web", "--accept-timeout", "0")
    assert row["accept_timeout"] == 0
    fails_cleanly(settings, "sources", "update", "web", "--accept-timeout", "-1", expect="-1")


async def test_stats_without_offers_look_as_before(settings: Settings, pool: asyncpg.Pool) -> None:
    await setup_source(pool, "tg", [("a", 10, 1)])
    async with pool.acquire() as conn, conn.transaction():
        await route_new(conn, "tg", "t:1")
    [tg] = as_json(settings, "stats")
    assert "accept_timeout" not in tg and all("offers" not in o for o in tg["operators"])
    assert "offered" not in leadrouter(settings, "stats").stdout
    assert "accept_timeout" not in leadrouter(settings, "sources", "list").stdout


async def test_expire_to_away_on_add_and_update(settings: Settings, pool: asyncpg.Pool) -> None:
    row = as_json(
        settings, "sources", "add", "chat", "--accept-timeout", "20", "--expire-to-away", "3"
    )
    assert (row["accept_timeout"], row["expire_to_away"]) == (20, 3)
    row = as_json(settings, "sources", "update", "chat", "--expire-to-away", "0")
    assert (row["accept_timeout"], row["expire_to_away"]) == (20, 0)
    for bad in ("-1", "1001", "two"):
        fails_cleanly(
            settings, "sources", "update", "chat", "--expire-to-away", bad, expect="expire-to-away"
        )
    assert await pool.fetchval("SELECT expire_to_away FROM sources WHERE key = 'chat'") == 0
