"""The database's own guards, reached past the Python layer: the named statements of
worker/queries.sql run directly with what routing would never send them (a claim over
capacity, a claim for an inactive operator, a message id that already made a contact).
Python checks all of these first, so only these tests show the guards themselves hold."""

from typing import Any

import asyncpg

from tests.helpers import route_new, setup_source
from worker import admin
from worker.sql import Q


async def _record(conn: asyncpg.Connection, source_id: int, operator_id: int | None, n: str) -> Any:
    """record_contacts for one new contact of lead `n` (message id `m-n`), given to
    `operator_id`, as the routing transaction calls it."""
    return await conn.fetch(
        Q.record_contacts,
        [n],
        [None],
        [None],
        [None],
        [n],
        [source_id],
        [operator_id],
        ["hi"],
        [f"m-{n}"],
        [],
        [],
        [],
        [],
        [],
        [0],
        [0],
    )


async def _load(pool: asyncpg.Pool, operator_id: int) -> int:
    return int(await pool.fetchval("SELECT open_load FROM operators WHERE id = $1", operator_id))


async def test_recording_a_contact_claims_no_capacity_past_max_load(pool: asyncpg.Pool) -> None:
    [op] = await setup_source(pool, "tg", [("a", 1, 1)])
    source_id = await pool.fetchval("SELECT id FROM sources WHERE key = 'tg'")
    async with pool.acquire() as conn, conn.transaction():
        await route_new(conn, "tg", "first")  # takes the operator's only unit
    assert await _load(pool, op) == 1

    async with pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        try:
            [row] = await _record(conn, source_id, op, "second")
            assert row["claimed"] is False, "the statement claimed capacity past max_load"
            load = await conn.fetchval("SELECT open_load FROM operators WHERE id = $1", op)
            assert load == 1
        finally:
            await tx.rollback()


async def test_recording_a_contact_claims_nothing_of_an_inactive_operator(
    pool: asyncpg.Pool,
) -> None:
    [op] = await setup_source(pool, "tg", [("a", 5, 1)])
    source_id = await pool.fetchval("SELECT id FROM sources WHERE key = 'tg'")
    await admin.update_operator(pool, op, active=False)
    async with pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        try:
            [row] = await _record(conn, source_id, op, "x")
            assert row["claimed"] is False, "an inactive operator's capacity was claimed"
        finally:
            await tx.rollback()


async def test_assigning_queued_contacts_claims_no_capacity_past_max_load(
    pool: asyncpg.Pool,
) -> None:
    [op] = await setup_source(pool, "tg", [("a", 1, 1)])
    async with pool.acquire() as conn, conn.transaction():
        outcome = await route_new(conn, "tg", "first", "second")  # one assigned, one queued
    [queued] = [c for c in outcome.contacts.values() if c not in outcome.assigned]
    source = await pool.fetchval("SELECT source_id FROM contacts WHERE id = $1", queued)

    async with pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        try:
            # The queued contact handed to the full operator: one unit over max_load.
            rows = await conn.fetch(
                Q.assign_contacts, [queued], [op], [op], [1], [], [], [], [], [], [0], [source]
            )
            assert rows == [], "a queued contact was assigned past max_load"
            operator_id = await conn.fetchval(
                "SELECT operator_id FROM contacts WHERE id = $1", queued
            )
            assert operator_id is None
            load = await conn.fetchval("SELECT open_load FROM operators WHERE id = $1", op)
            assert load == 1
        finally:
            await tx.rollback()


async def test_a_known_message_id_makes_no_second_contact(pool: asyncpg.Pool) -> None:
    [op] = await setup_source(pool, "tg", [("a", 5, 1)])
    source_id = await pool.fetchval("SELECT id FROM sources WHERE key = 'tg'")
    async with pool.acquire() as conn, conn.transaction():
        await route_new(conn, "tg", "x")  # message id m-x
    # The same message id again, as a concurrent transaction would insert it after our
    # check: nothing is inserted, nothing claimed, no error.
    async with pool.acquire() as conn, conn.transaction():
        rows = await _record(conn, source_id, op, "x")
    assert rows == []
    assert (
        await pool.fetchval("SELECT count(*) FROM contacts WHERE inbound_message_id = 'm-x'") == 1
    )
    assert await _load(pool, op) == 1
