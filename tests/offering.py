"""Helpers for the tests of offers: routing through the transaction as the worker does."""

import asyncpg

from tests.helpers import route_new, setup_source
from worker import admin, distribution, offers

CONTACT = """
    SELECT c.operator_id, c.offer_expires_at IS NOT NULL AS offered, c.offer_attempt,
           c.offer_skip, c.status
    FROM contacts c WHERE c.inbound_message_id = $1
"""
LOADS = "SELECT id, open_load FROM operators ORDER BY id"


async def answer(
    pool: asyncpg.Pool,
    contact_id: int,
    operator_id: int,
    accept: bool,
    message_id: str,
    reason: str | None = None,
) -> distribution.Outcome:
    """One answer through the routing transaction, as the worker handles it."""
    async with pool.acquire() as conn, conn.transaction():
        scope = await distribution.read_scope(conn, (), [contact_id])
        a = offers.Answer(message_id, contact_id, operator_id, accept, reason)
        return await distribution.route(conn, scope, answers=[a])


async def new(pool: asyncpg.Pool, source: str, *external_ids: str) -> distribution.Outcome:
    async with pool.acquire() as conn, conn.transaction():
        return await route_new(conn, source, *external_ids)


def keys(outcome: distribution.Outcome) -> list[str]:
    return [e.routing_key for e in outcome.events]


async def offering_source(
    pool: asyncpg.Pool, operators: list[tuple[str, int, int]], strategy: str = "smooth"
) -> list[int]:
    ids = await setup_source(pool, "web", operators, strategy=strategy)
    await admin.update_source(pool, "web", accept_timeout=30)
    return ids
