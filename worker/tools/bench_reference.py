"""The yardstick of `leadrouter bench --reference`: the minimal hand-written pipeline of
issue 6's table (consume, one transaction per batch of up to 50, a confirmed publish per
message, one `multiple=True` ack), written plainly with aio-pika and asyncpg and nothing
more: JSON only, no validation, outbox, weights, retries or dead letters. The bench runs
it against the same broker, database and queue arguments as leadrouter, so leadrouter's
rate is reported as a ratio measured in one run, whatever the machine's speed.

Run as `python -m worker.tools.bench_reference` with the bench's LEADROUTER_* settings."""

import asyncio
import contextlib
import json
import signal
from collections import Counter

import aio_pika
import asyncpg
import uvloop
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage

from worker import nodes
from worker.settings import Settings
from worker.sql import Queries

BATCH = 50
OPERATORS_PER_SOURCE = 4

R = Queries("worker.tools", "reference.sql")  # its own SQL, not the runtime's


async def setup(pool: asyncpg.Pool, keys: list[str]) -> None:
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(R.reference_schema)
        sources = [key for key in keys for _ in range(OPERATORS_PER_SOURCE)]
        await conn.execute(R.reference_add_operators, list(range(len(sources))), sources)


async def _route(conn: asyncpg.Connection, leads: list[tuple[str, str]]) -> dict[str, int]:
    """One batch's (message id, source) pairs → message id → operator, least loaded first."""
    keys = sorted({source for _, source in leads})
    await conn.execute(R.reference_lock_sources, keys)
    loads: dict[str, dict[int, int]] = {}
    for row in await conn.fetch(R.reference_lock_operators, keys):
        loads.setdefault(row["source"], {})[row["id"]] = row["open_load"]
    chosen = []
    for _, source in leads:
        ops = loads[source]
        operator = min(ops, key=ops.__getitem__)
        ops[operator] += 1
        chosen.append(operator)
    rows = await conn.fetch(
        R.reference_insert_contacts,
        [m for m, _ in leads],
        [s for _, s in leads],
        chosen,
    )
    claimed = Counter(r["operator_id"] for r in rows)
    await conn.execute(R.reference_claim_operators, list(claimed), list(claimed.values()))
    return {r["message_id"]: r["operator_id"] for r in rows}


async def _handle(
    pool: asyncpg.Pool, events: AbstractExchange, batch: list[AbstractIncomingMessage]
) -> None:
    leads = [(m.message_id or "", json.loads(m.body)["source"]) for m in batch]
    async with pool.acquire() as conn, conn.transaction():
        assigned = await _route(conn, leads)
    await asyncio.gather(
        *(
            events.publish(
                aio_pika.Message(
                    json.dumps({"inbound_message_id": m, "operator_id": op}).encode(),
                    message_id=m,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                routing_key="contact.assigned",
            )
            for m, op in assigned.items()
        )
    )
    await batch[-1].ack(multiple=True)


async def run(settings: Settings) -> None:
    async with asyncpg.create_pool(settings.database_url, min_size=1, max_size=2) as pool:
        connection = await nodes.connect_robust(settings.amqp_url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            await channel.set_qos(prefetch_count=2 * BATCH)
            events = await channel.get_exchange(settings.events_exchange)
            queue = await channel.get_queue(settings.inbound_queue)
            buffer: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
            await queue.consume(buffer.put)
            while True:
                batch = [await buffer.get()]
                while len(batch) < BATCH and not buffer.empty():
                    batch.append(buffer.get_nowait())
                await _handle(pool, events, batch)


def main() -> None:
    settings = Settings()

    async def until_terminated() -> None:
        task = asyncio.create_task(run(settings))
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    # On the same event loop as leadrouter, so that the ratio compares the pipelines.
    if settings.event_loop == "uvloop":
        uvloop.run(until_terminated())
    else:
        asyncio.run(until_terminated())


if __name__ == "__main__":
    main()
