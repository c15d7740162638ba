"""Valid messages waiting out a transient stall are never dead-lettered, however often
the workers restart meanwhile (each restart returns them to the quorum queue, which
counts a delivery); a message that keeps crashing the handler still is."""

import asyncio
import signal
from pathlib import Path

import aio_pika
import asyncpg
import pytest

from tests.helpers import (
    EventCollector,
    crash_route_on,
    lead,
    raw_message,
    settled,
    setup_source,
    wait_until,
)
from tests.raw_amqp import dead_letters
from tests.worker_processes import spawn, wait_ready, worker_processes
from worker.app import Worker
from worker.locks import LockSpace
from worker.settings import Settings

pytestmark = pytest.mark.slow

WAITING_FOR_A_LOCK = "SELECT count(*) > 0 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"


@pytest.mark.settings(delivery_limit=2, shutdown_grace_seconds=0.5)
async def test_restarts_while_a_source_is_locked_dead_letter_nothing(
    pool: asyncpg.Pool,
    settings: Settings,
    broker: aio_pika.abc.AbstractChannel,
    events: EventCollector,
    tmp_path: Path,
) -> None:
    await setup_source(pool, "tg", [("a", 1000, 1)])
    source_id = await pool.fetchval("SELECT id FROM sources WHERE key = 'tg'")
    exchange = await broker.get_exchange(settings.inbound_exchange)
    total = 20
    for n in range(total):
        await exchange.publish(raw_message(lead("tg", f"r:{n}"), f"r-{n}"), "lead.contact")
    restarts = 3 * settings.delivery_limit

    async def all_taken_and_waiting() -> bool:
        queue = await broker.declare_queue(settings.inbound_queue, passive=True)
        waiting = await pool.fetchval(WAITING_FOR_A_LOCK)
        return bool(waiting) and queue.declaration_result.message_count == 0

    async with pool.acquire() as holder:
        # Another session holds the source's lock (a long transaction, a stuck admin).
        await holder.execute("SELECT pg_advisory_lock($1, $2)", LockSpace.SOURCE, source_id)
        with worker_processes(settings, tmp_path) as procs:
            for n in range(restarts):
                procs.append(spawn(settings, tmp_path, n))
                await wait_ready(pool, settings, tmp_path, n)
                await wait_until(all_taken_and_waiting, what="messages waiting on the lock")
                procs[n].send_signal(signal.SIGTERM)  # a deployment, say
                assert await asyncio.to_thread(procs[n].wait, 15) == 0
            procs.append(spawn(settings, tmp_path, restarts))
            await wait_ready(pool, settings, tmp_path, restarts)
            await holder.execute("SELECT pg_advisory_unlock($1, $2)", LockSpace.SOURCE, source_id)
            await events.wait_for("contact.assigned", total, timeout=30)
            logs = [tmp_path / f"worker-{n}.log" for n in range(restarts + 1)]
            log = "".join([await asyncio.to_thread(p.read_text) for p in logs])
    assert await dead_letters(settings, 0) == []
    assert await pool.fetchval("SELECT count(DISTINCT inbound_message_id) FROM contacts") == total
    assert await pool.fetchval("SELECT count(*) FROM contacts") == total
    assert "delivery_count_reset" in log, "the copies are what kept them alive"


@pytest.mark.settings(delivery_limit=3)
async def test_a_message_that_keeps_crashing_the_handler_ends_dead_lettered_across_restarts(
    pool: asyncpg.Pool,
    settings: Settings,
    broker: aio_pika.abc.AbstractChannel,
    events: EventCollector,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The handler's failures are counted on the message's copies, so the fresh copies
    that restarts bring do not let a bug loop forever."""
    await setup_source(pool, "tg", [("a", 100, 1)])
    crash_route_on(monkeypatch, "boom")
    exchange = await broker.get_exchange(settings.inbound_exchange)
    await exchange.publish(raw_message(lead("tg", "boom"), "crash-1"), "lead.contact")
    await exchange.publish(raw_message(lead("tg", "fine"), "fine-1"), "lead.contact")
    for _restart in range(3):
        app = Worker(settings)
        await app.start()
        try:
            await wait_until(lambda app=app: settled(app, 1), what="a failure")  # type: ignore[misc]
        finally:
            await app.stop()
    app = Worker(settings)
    await app.start()
    try:
        [dead] = await dead_letters(settings, 1, timeout=60)
    finally:
        await app.stop()
    assert dead.message_id == "crash-1"
    [death] = (dead.headers or {})["x-death"]  # type: ignore[misc]
    assert death["reason"] in (b"delivery_limit", "delivery_limit")  # type: ignore[index]
    assert [e.data.inbound_message_id for e in events.of("contact.assigned")] == ["fine-1"]
    assert await dead_letters(settings, 0) == []
