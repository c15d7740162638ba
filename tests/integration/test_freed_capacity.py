"""Capacity a transaction frees for a source whose lock it did not hold is used at once,
not at the backlog sweep: by the worker (a `contact.close` message) and by the admin
actions alike."""

import asyncio
import time

import aio_pika
import asyncpg
import pytest

from tests.helpers import route_new, send, setup_source, wait_until
from worker import admin, distribution
from worker.app import Worker
from worker.locks import LockSpace
from worker.routing_file import apply, parse
from worker.settings import Settings

WAITING_FOR_A_LOCK = "SELECT count(*) > 0 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
OPERATOR_OF = "SELECT operator_id FROM contacts WHERE inbound_message_id = $1"


@pytest.mark.parametrize("closer", ["worker", "admin"])
@pytest.mark.settings(backlog_sweep_seconds=3600)
async def test_capacity_freed_while_another_source_is_locked_is_used_within_a_second(
    pool: asyncpg.Pool,
    settings: Settings,
    broker: aio_pika.abc.AbstractChannel,
    worker: Worker,
    closer: str,
) -> None:
    """One operator (max-load 1) weighted for two sources. A close of a contact that was
    queued when the closing transaction read it, but given to the operator by another
    session before that transaction got its lock, frees the operator for the other
    source too, whose lock the closing transaction never took."""
    [op] = await setup_source(pool, "tg", [("a", 1, 1)])
    await admin.add_source(pool, "web", None, "", None)
    await admin.set_weights(pool, "web", {op: 1})
    ids = {r["key"]: r["id"] for r in await pool.fetch("SELECT id, key FROM sources")}
    async with pool.acquire() as conn, conn.transaction():
        first = (await route_new(conn, "web", "w:0")).contacts["m-w:0"]  # the operator: full
    async with pool.acquire() as conn, conn.transaction():
        queued = (await route_new(conn, "tg", "t:1")).contacts["m-t:1"]  # queued
    assert await pool.fetchval(OPERATOR_OF, "m-t:1") is None

    async with pool.acquire() as holder, holder.transaction():
        await holder.execute("SELECT pg_advisory_xact_lock($1, $2)", LockSpace.SOURCE, ids["tg"])
        # The close reads the contact (queued: no operator, no other source to lock)
        # and waits for tg's lock.
        if closer == "worker":
            await send(broker, settings, "contact.close", {"contact_id": queued}, "close-1")
            closing: asyncio.Future[object] | None = None
        else:
            closing = asyncio.ensure_future(admin.close_contact(pool, queued))
        await wait_until(lambda: pool.fetchval(WAITING_FOR_A_LOCK), what="the close waits")
        # Meanwhile this session closes the first contact: the freed operator takes the
        # queued tg contact; then a web contact queues behind the operator.
        scope = await distribution.read_scope(holder, (), [first])
        await distribution.route(holder, scope, close_ids=[first])
        assert await holder.fetchval(OPERATOR_OF, "m-t:1") == op
        await route_new(holder, "web", "w:2")
        assert await holder.fetchval(OPERATOR_OF, "m-w:2") is None
    released = time.monotonic()
    if closing is not None:
        await closing

    # The close frees the operator again; web's queued contact takes it at once.
    await wait_until(lambda: pool.fetchval(OPERATOR_OF, "m-w:2"), timeout=5, what="assigned")
    waited = time.monotonic() - released
    assert waited < 1.0, f"assigned {waited:.3f}s after the locks were released"
    assert await pool.fetchval(OPERATOR_OF, "m-w:2") == op
    assert await pool.fetchval("SELECT open_load FROM operators WHERE id = $1", op) == 1


@pytest.mark.parametrize("how", ["operators update", "apply"])
@pytest.mark.settings(backlog_sweep_seconds=3600)
async def test_a_max_load_raised_serves_a_source_weighted_while_it_waited_for_locks(
    pool: asyncpg.Pool, how: str
) -> None:
    """`operators update` and `apply` read the operator's sources, then wait for their
    locks; a weight given meanwhile for another source is served by the capacity they
    create, before they return."""
    [op] = await setup_source(pool, "tg", [("a", 0, 1)])
    await admin.add_source(pool, "web", None, "", None)
    async with pool.acquire() as conn, conn.transaction():
        await route_new(conn, "web", "w:1")  # nobody can take it
    tg = await pool.fetchval("SELECT id FROM sources WHERE key = 'tg'")

    async with pool.acquire() as holder:
        await holder.execute("SELECT pg_advisory_lock($1, $2)", LockSpace.SOURCE, tg)
        raising = asyncio.ensure_future(
            admin.update_operator(pool, op, max_load=1)
            if how == "operators update"
            else apply(pool, parse('[[operators]]\nname = "a"\nmax_load = 1\n', "toml"), False)
        )
        await wait_until(lambda: pool.fetchval(WAITING_FOR_A_LOCK), what="the update waits")
        assert await admin.set_weights(pool, "web", {op: 1}) == 0  # still max-load 0
        await holder.execute("SELECT pg_advisory_unlock($1, $2)", LockSpace.SOURCE, tg)
    result = await raising
    if how == "operators update":
        assert result[1] == 1  # "assigned 1 queued contact(s)"
    assert await pool.fetchval(OPERATOR_OF, "m-w:1") == op
