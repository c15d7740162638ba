"""Admin actions take the same locks as the workers; when PostgreSQL breaks a deadlock
by aborting one, it is run again rather than failing the command."""

import asyncio

import asyncpg

from worker.retry import in_transaction


async def test_a_transaction_aborted_by_a_deadlock_runs_again(pool: asyncpg.Pool) -> None:
    attempts = 0
    holding_first = asyncio.Event()

    async def work(conn: asyncpg.Connection) -> str:
        nonlocal attempts
        attempts += 1
        await conn.execute("SELECT pg_advisory_xact_lock(9001)")
        holding_first.set()
        await conn.execute("SELECT pg_advisory_xact_lock(9002)")  # held by the other one
        return "done"

    async with pool.acquire() as other, other.transaction():
        # Whoever waits past deadlock_timeout first checks for a cycle and is aborted:
        # make sure that is `work` (default 1 s), not this transaction.
        await other.execute("SET LOCAL deadlock_timeout = '60s'")
        await other.execute("SELECT pg_advisory_xact_lock(9002)")
        task = asyncio.create_task(in_transaction(pool, work))
        await holding_first.wait()
        await asyncio.sleep(0.2)  # `work` is waiting for 9002 by now
        # Each now waits for the other: PostgreSQL aborts `work`'s transaction.
        await other.execute("SELECT pg_advisory_xact_lock(9001)")
    assert await task == "done"
    assert attempts == 2
