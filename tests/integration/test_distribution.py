"""The routing transaction itself, against real PostgreSQL: what it writes for new
contacts, and that they never overtake a backlog."""

import asyncpg
import pytest

from tests.helpers import SMOOTH_OWED, route_new, setup_source
from worker import admin, distribution


async def _operators_of(pool: asyncpg.Pool) -> dict[str, int | None]:
    rows = await pool.fetch(
        "SELECT l.external_id, c.operator_id FROM contacts c JOIN leads l ON l.id = c.lead_id"
    )
    return {r["external_id"]: r["operator_id"] for r in rows}


async def test_a_new_contact_is_written_once_already_assigned(pool: asyncpg.Pool) -> None:
    [op] = await setup_source(pool, "web", [("a", 2, 1)])
    async with pool.acquire() as conn, conn.transaction():
        outcome = await route_new(conn, "web", "w:1", "w:2", "w:3")
        # This transaction's own row counts: three inserts, no contact updated after.
        written = await conn.fetchrow(
            "SELECT n_tup_ins, n_tup_upd FROM pg_stat_xact_user_tables WHERE relname = 'contacts'"
        )
    assert (written["n_tup_ins"], written["n_tup_upd"]) == (3, 0)
    assert await _operators_of(pool) == {"w:1": op, "w:2": op, "w:3": None}
    assert [e.routing_key for e in outcome.events] == [
        "contact.assigned",
        "contact.assigned",
        "contact.queued",
    ]
    assert await pool.fetchval("SELECT open_load FROM operators WHERE id = $1", op) == 2


async def test_new_contacts_queue_behind_a_backlog_longer_than_one_drain(
    pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(distribution, "MAX_DRAIN", 2)
    [op] = await setup_source(pool, "web", [("a", 0, 1)])
    async with pool.acquire() as conn, conn.transaction():
        await route_new(conn, "web", "old:1", "old:2", "old:3")  # nobody free: queued
    # Room for everyone, given behind routing's back: only routing drains the backlog.
    await pool.execute("UPDATE operators SET max_load = 10")
    async with pool.acquire() as conn, conn.transaction():
        outcome = await route_new(conn, "web", "new:1")
    # One transaction drains at most MAX_DRAIN of the backlog; the newcomer must not
    # take the room that old:3 is owed.
    assert await _operators_of(pool) == {"old:1": op, "old:2": op, "old:3": None, "new:1": None}
    assert outcome.late_assignments == 2
    source_id = await pool.fetchval("SELECT id FROM sources WHERE key = 'web'")
    async with pool.acquire() as conn, conn.transaction():  # the next drain: the rest
        await distribution.lock_sources(conn, {source_id})
        await distribution.drain_sources(conn, {source_id})
    assert set((await _operators_of(pool)).values()) == {op}


async def test_a_new_strategy_forgets_what_smooth_owed(pool: asyncpg.Pool) -> None:
    await setup_source(pool, "web", [("a", 10, 1), ("b", 10, 2)], strategy="smooth")
    async with pool.acquire() as conn, conn.transaction():
        await route_new(conn, "web", "w:1")  # one contact of three: someone is owed now
    assert any(r["owed"] for r in await pool.fetch(SMOOTH_OWED))
    await admin.update_source(pool, "web", name="Web")  # not a new strategy: kept
    assert any(r["owed"] for r in await pool.fetch(SMOOTH_OWED))
    await admin.update_source(pool, "web", strategy="least_loaded")
    lags = [r["owed"] for r in await pool.fetch(SMOOTH_OWED)]
    assert lags == [0, 0]
