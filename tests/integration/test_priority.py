"""Priority and queue order against real PostgreSQL: a backlog is served by priority, then
age (or newest first for a `lifo` source); a new contact never overtakes a waiting one of
the same or higher priority in a FIFO source; freed capacity goes to whichever of the
operator's sources has the head that comes first by priority, then age."""

from typing import Any

import asyncpg

from schemas.inbound import LeadContact
from tests.helpers import setup_source
from worker import admin, distribution, source_queueing


async def route(conn: Any, source: str, *contacts: tuple[str, int]) -> distribution.Outcome:
    """Route new contacts (external id, priority) in one transaction."""
    new = [
        distribution.NewContact(
            f"m-{e}",
            LeadContact.model_validate(
                {"source": source, "lead": {"external_id": e}, "priority": p}
            ),
        )
        for e, p in contacts
    ]
    scope = await distribution.read_scope(conn, {source}, ())
    return await distribution.route(conn, scope, new)


async def route_new(pool: asyncpg.Pool, source: str, *contacts: tuple[str, int]) -> None:
    async with pool.acquire() as conn, conn.transaction():
        await route(conn, source, *contacts)


async def assigned(pool: asyncpg.Pool) -> set[str]:
    rows = await pool.fetch(
        "SELECT l.external_id FROM contacts c JOIN leads l ON l.id = c.lead_id"
        " WHERE c.operator_id IS NOT NULL"
    )
    return {r["external_id"] for r in rows}


async def assign_one_at_a_time(pool: asyncpg.Pool, operator_id: int, n: int) -> list[str]:
    """Give the operator room for one more contact n times (each time the previous one is
    closed, as a person would): the order in which the backlog is served."""
    order: list[str] = []
    for _ in range(n):
        before = await assigned(pool)
        await admin.update_operator(pool, operator_id, None, 1, None)
        [new] = (await assigned(pool)) - before
        order.append(new)
        contact = await pool.fetchval(
            "SELECT c.id FROM contacts c JOIN leads l ON l.id = c.lead_id WHERE l.external_id = $1",
            new,
        )
        await admin.update_operator(pool, operator_id, None, 0, None)
        await admin.close_contact(pool, contact)
    return order


async def test_backlog_drains_by_priority_then_age(pool: asyncpg.Pool) -> None:
    [op] = await setup_source(pool, "web", [("a", 0, 1)])
    await route_new(pool, "web", ("p0-old", 0), ("p5-old", 5), ("p0-new", 0))
    await route_new(pool, "web", ("p9", 9), ("p5-new", 5))
    order = await assign_one_at_a_time(pool, op, 5)
    assert order == ["p9", "p5-old", "p5-new", "p0-old", "p0-new"]


async def test_lifo_serves_newest_first_within_a_priority(pool: asyncpg.Pool) -> None:
    [op] = await setup_source(pool, "web", [("a", 0, 1)])
    async with pool.acquire() as conn, conn.transaction():
        await source_queueing.store(
            conn,
            await conn.fetchval("SELECT id FROM sources WHERE key = 'web'"),
            source_queueing.QueueingChange(queue_order="lifo"),
        )
    await route_new(pool, "web", ("p0-1", 0), ("p3-1", 3), ("p0-2", 0))
    await route_new(pool, "web", ("p3-2", 3), ("p0-3", 0))
    order = await assign_one_at_a_time(pool, op, 5)
    assert order == ["p3-2", "p3-1", "p0-3", "p0-2", "p0-1"]


async def test_a_new_contact_overtakes_only_lower_priorities(pool: asyncpg.Pool) -> None:
    [op] = await setup_source(pool, "web", [("a", 0, 1)])
    await route_new(pool, "web", ("waiting", 3))
    # One free place, given behind routing's back: the next routing hands it out.
    await pool.execute("UPDATE operators SET max_load = 1 WHERE id = $1", op)
    await route_new(pool, "web", ("same", 3), ("lower", 0))
    assert await assigned(pool) == {"waiting"}  # neither newcomer overtook it
    await pool.execute("UPDATE operators SET max_load = 2 WHERE id = $1", op)
    await route_new(pool, "web", ("higher", 4))
    assert await assigned(pool) == {"waiting", "higher"}  # before "same" and "lower"


async def test_a_new_contact_queues_behind_an_unread_backlog_of_its_priority(
    pool: asyncpg.Pool, monkeypatch: Any
) -> None:
    """A drain reads at most MAX_DRAIN of a backlog: a newcomer of the priority of what it
    did not read queues; one above everything waiting is placed at once."""
    monkeypatch.setattr(distribution, "MAX_DRAIN", 2)
    [op] = await setup_source(pool, "web", [("a", 0, 1)])
    await route_new(pool, "web", ("h1", 5), ("h2", 5), ("h3", 5))
    await pool.execute("UPDATE operators SET max_load = 10 WHERE id = $1", op)
    await route_new(pool, "web", ("new5", 5))
    assert await assigned(pool) == {"h1", "h2"}
    # This drain reads h3 and new5 (two again, so more of priority 5 might wait): new6
    # comes before all of them, and is placed at once.
    await route_new(pool, "web", ("new6", 6))
    assert await assigned(pool) == {"h1", "h2", "h3", "new5", "new6"}


async def test_freed_operator_serves_the_other_source_first_by_priority_and_age(
    pool: asyncpg.Pool,
) -> None:
    """Two sources share one operator. Today the lower source id's queue won; now the head
    that comes first by priority, then age."""
    [op] = await setup_source(pool, "a", [("shared", 0, 1)])
    await admin.add_source(pool, "b", None, "", None)
    await admin.set_weights(pool, "b", {op: 1})
    await route_new(pool, "b", ("b-old", 0))  # older than anything of source a
    await route_new(pool, "a", ("a-new", 0))
    await route_new(pool, "a", ("a-urgent", 2))
    await route_new(pool, "b", ("b-urgent", 2))
    order = await assign_one_at_a_time(pool, op, 4)
    assert order == ["a-urgent", "b-urgent", "b-old", "a-new"]
