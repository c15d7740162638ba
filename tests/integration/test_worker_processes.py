"""Real worker processes: graceful shutdown, and several workers (one killed mid-stream)
sharing sources and operators without losing, doubling or over-assigning anything."""

import asyncio
import signal
import time
from pathlib import Path

import aio_pika
import asyncpg
import pytest

from tests.helpers import (
    EventCollector,
    assert_clean_end,
    lead,
    raw_message,
    setup_source,
    wait_until,
)
from tests.worker_processes import (
    PEAK_LOADS,
    logs_of,
    spawn,
    stop_gracefully,
    wait_ready,
    worker_processes,
)
from worker import admin
from worker.settings import Settings

pytestmark = pytest.mark.slow

OVER_CAPACITY = """
    SELECT o.id, o.max_load, count(c.id) AS open_now
    FROM operators o
    LEFT JOIN contacts c ON c.operator_id = o.id AND c.status = 'open'
    GROUP BY o.id
    HAVING count(c.id) > o.max_load
"""
STILL_OPEN = "SELECT count(*) = 0 FROM contacts WHERE id = ANY($1::bigint[]) AND status = 'open'"
FIRST_EVENTS = """
    SELECT count(DISTINCT contact_id) FROM outbox
    WHERE routing_key IN ('contact.assigned', 'contact.queued')
"""


async def test_sigterm_finishes_in_flight_work_and_exits_zero(
    pool: asyncpg.Pool,
    settings: Settings,
    broker: aio_pika.abc.AbstractChannel,
    events: EventCollector,
    tmp_path: Path,
) -> None:
    await setup_source(pool, "tg", [("a", 10_000, 1)])
    exchange = await broker.get_exchange(settings.inbound_exchange)
    total = 3000  # enough that the worker is still busy when SIGTERM comes
    await asyncio.gather(
        *(
            exchange.publish(raw_message(lead("tg", f"t:{n}"), f"t-{n}"), "lead.contact")
            for n in range(total)
        )
    )
    with worker_processes(settings, tmp_path) as procs:
        procs.append(spawn(settings, tmp_path, 0))
        await wait_until(lambda: pool.fetchval("SELECT count(*) > 20 FROM contacts"), what="work")
        procs[0].send_signal(signal.SIGTERM)
        started = time.monotonic()
        code = await asyncio.to_thread(procs[0].wait, 15)
        assert code == 0, (tmp_path / "worker-0.log").read_text()[-2000:]
        assert time.monotonic() - started < 10
        log = (tmp_path / "worker-0.log").read_text()
        assert "worker_stopped" in log and "Traceback" not in log

        # What it committed was published before it left; a second worker does the rest.
        done = await pool.fetchval("SELECT count(*) FROM contacts")
        assert await pool.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL") == 0, (
            log[-3000:]
        )
        assert done < total, "stopped before the end, so the rest tests the handover"
        procs.append(spawn(settings, tmp_path, 1))
        await events.wait_for("contact.assigned", total, timeout=30)
        await asyncio.to_thread(stop_gracefully, procs)
    assert await pool.fetchval("SELECT count(*) FROM contacts") == total
    assert len({e.data.contact_id for e in events.of("contact.assigned")}) == total
    await assert_clean_end(settings, logs_of(tmp_path))


async def test_several_workers_one_killed_keep_every_invariant(
    request: pytest.FixtureRequest,
    pool: asyncpg.Pool,
    settings: Settings,
    broker: aio_pika.abc.AbstractChannel,
    events: EventCollector,
    tmp_path: Path,
) -> None:
    """3 worker processes, 2 sources sharing operators of small capacity, every message
    published once, one worker SIGKILLed mid-stream and restarted, then contacts closed
    so that freed capacity drains both backlogs. What the killed worker held unacked must
    come back: nothing else would make its contacts."""
    operators = [(await admin.add_operator(pool, f"op{n}", 6, True))["id"] for n in range(4)]
    for key, weights in {"tg": [1, 2, 3, 0], "web": [0, 3, 2, 1]}.items():
        await admin.add_source(pool, key, None, "", None)
        await admin.set_weights(
            pool, key, {o: w for o, w in zip(operators, weights, strict=True) if w}
        )
    total = 500
    exchange = await broker.get_exchange(settings.inbound_exchange)

    over_capacity: list[object] = []

    async def watch_capacity() -> None:
        """Sample committed state all along: nobody may ever be over max_load."""
        while True:
            rows = await pool.fetch(OVER_CAPACITY)
            over_capacity.extend(dict(r) for r in rows)
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch_capacity())
    request.addfinalizer(watcher.cancel)  # also when an assertion fails early
    with worker_processes(settings, tmp_path) as procs:
        for n in range(3):
            procs.append(spawn(settings, tmp_path, n))
        for n in range(3):
            await wait_ready(pool, settings, tmp_path, n)

        async def publish_all() -> None:
            for start in range(0, total, 50):
                await asyncio.gather(
                    *(
                        exchange.publish(
                            raw_message(lead("tg" if n % 2 else "web", f"k:{n % 300}"), f"k-{n}"),
                            "lead.contact",
                        )
                        for n in range(start, start + 50)
                    )
                )

        publishing = asyncio.create_task(publish_all())
        await wait_until(lambda: pool.fetchval("SELECT count(*) > 100 FROM contacts"), what="work")
        procs[0].kill()  # SIGKILL: no chance to finish anything
        procs[0].wait()
        procs.append(spawn(settings, tmp_path, 3))
        await publishing
        await wait_until(
            lambda: pool.fetchval("SELECT count(*) = $1 FROM contacts", total),
            timeout=60,
            what=f"{total} contacts",
        )

        # Close every assigned contact, once; those the freed capacity assigns next.
        assigned = [
            r["id"]
            for r in await pool.fetch("SELECT id FROM contacts WHERE operator_id IS NOT NULL")
        ]
        while assigned:
            await asyncio.gather(
                *(
                    exchange.publish(raw_message({"contact_id": c}, f"close-{c}"), "contact.close")
                    for c in assigned
                )
            )
            closing = list(assigned)
            await wait_until(
                lambda closing=closing: pool.fetchval(STILL_OPEN, closing),
                timeout=60,
                what="closes",
            )
            assigned = [
                r["id"]
                for r in await pool.fetch(
                    "SELECT id FROM contacts WHERE operator_id IS NOT NULL AND status = 'open'"
                )
            ]
        await wait_until(
            lambda: pool.fetchval("SELECT count(*) = 0 FROM outbox WHERE published_at IS NULL"),
            timeout=30,
            what="outbox published",
        )
        outbox_ids = {str(r["event_id"]) for r in await pool.fetch("SELECT event_id FROM outbox")}
        await wait_until(
            lambda: _covered(events, outbox_ids), timeout=30, what="every event received"
        )
        await asyncio.to_thread(stop_gracefully, procs)
    watcher.cancel()
    await assert_clean_end(settings, logs_of(tmp_path))

    # Exactly one contact per message id; every contact went through open → closed.
    ids = {r["inbound_message_id"] for r in await pool.fetch("SELECT * FROM contacts")}
    assert ids == {f"k-{n}" for n in range(total)}
    assert await pool.fetchval("SELECT count(*) FROM contacts") == total
    assert await pool.fetchval("SELECT count(*) FROM contacts WHERE status = 'open'") == 0
    # One event row per state change: a first event (assigned or queued) for every contact,
    # an assigned event for every contact that was ever assigned, a closed event for each.
    first = await pool.fetchval(FIRST_EVENTS)
    assert first == total
    assert (
        await pool.fetchval("SELECT count(*) FROM outbox WHERE routing_key = 'contact.closed'")
        == total
    )
    assert (
        await pool.fetchval("SELECT count(*) FROM outbox WHERE routing_key = 'contact.assigned'")
        == total
    )
    # Capacity never exceeded: sampled all along, and replayed after every commit.
    assert over_capacity == []
    peaks = [dict(r) for r in await pool.fetch(PEAK_LOADS)]
    assert peaks and all(p["peak"] <= p["max_load"] for p in peaks), peaks
    assert await pool.fetchval("SELECT count(*) FROM operators WHERE open_load <> 0") == 0
    # Every event was published at least once, and ids are unique per state change.
    received = [e.id for e in events.events]
    assert set(received) == outbox_ids
    assert len({(e.data.contact_id, e.type) for e in events.events}) == len(outbox_ids)


async def _covered(events: EventCollector, ids: set[str]) -> bool:
    return ids <= {e.id for e in events.events}
