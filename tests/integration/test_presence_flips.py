"""Presence and shifts changing under load, with several worker processes: operators go
away and come back by message (some handing their open contacts back), shifts are set
and cleared by the admin path, and schedule evaluations are made due for all workers at
once, while leads arrive and contacts close on two sources sharing the operators. Every
invariant holds: no operator over max_load at any commit, nobody given a contact while
not available, the oldest waiting contact first, one contact per message, every contact
routed in the end."""

import asyncio
import json
import random
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

import aio_pika
import asyncpg
import pytest

from tests.helpers import EventCollector, assert_clean_end, lead, raw_message, wait_until
from tests.worker_processes import logs_of, spawn, stop_gracefully, wait_ready, worker_processes
from worker import admin, availability
from worker.settings import Settings

pytestmark = pytest.mark.slow

OVER_CAPACITY = """
    SELECT o.id, o.max_load, count(c.id) AS open_now
    FROM operators o
    LEFT JOIN contacts c ON c.operator_id = o.id AND c.status = 'open'
    GROUP BY o.id
    HAVING count(c.id) > o.max_load
"""
# Events of one operator are written under its row lock (assignments and closes claim or
# release it, presence changes lock it), so their outbox order is their commit order.
OPERATOR_EVENTS = """
    SELECT id, routing_key, payload -> 'data' AS data FROM outbox
    WHERE routing_key IN ('contact.assigned', 'contact.closed', 'contact.requeued',
                          'contact.queued', 'operator.presence_changed')
    ORDER BY id
"""


def off_shift_now() -> str:
    day = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")[(datetime.now(UTC).weekday() + 3) % 7]
    return f"{day} 10:00-11:00"


async def test_presence_and_shifts_flipping_under_load_keep_every_invariant(
    request: pytest.FixtureRequest,
    pool: asyncpg.Pool,
    settings: Settings,
    broker: aio_pika.abc.AbstractChannel,
    events: EventCollector,
    tmp_path: Path,
) -> None:
    rng = random.Random(16)
    operators = [(await admin.add_operator(pool, f"op{n}", 3, True))["id"] for n in range(5)]
    for key, weights in {"tg": [1, 2, 3, 1, 0], "web": [0, 3, 2, 1, 2]}.items():
        await admin.add_source(pool, key, None, "", None)
        await admin.set_weights(
            pool, key, {o: w for o, w in zip(operators, weights, strict=True) if w}
        )
    total = 400
    exchange = await broker.get_exchange(settings.inbound_exchange)
    over_capacity: list[object] = []

    async def watch_capacity() -> None:
        while True:
            over_capacity.extend(dict(r) for r in await pool.fetch(OVER_CAPACITY))
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch_capacity())
    request.addfinalizer(watcher.cancel)

    async def publish_leads() -> None:
        for start in range(0, total, 20):
            await asyncio.gather(
                *(
                    exchange.publish(
                        raw_message(lead("tg" if n % 2 else "web", f"k:{n % 250}"), f"k-{n}"),
                        "lead.contact",
                    )
                    for n in range(start, start + 20)
                )
            )
            await asyncio.sleep(0.02)

    async def flip_presence() -> None:
        for n in range(60):
            op = rng.choice(operators)
            status = rng.choice(["online", "online", "away", "offline"])
            body = {"operator_id": op, "status": status, "requeue_open": rng.random() < 0.4}
            await exchange.publish(raw_message(body, f"p-{n}"), "operator.presence")
            await asyncio.sleep(0.03)

    async def flip_shifts() -> None:
        for _ in range(25):
            op = rng.choice(operators)
            if rng.random() < 0.5:
                await availability.set_shift(pool, op, off_shift_now(), "UTC")
            else:
                await availability.set_shift(pool, op, None, None)
            # Everyone's schedule due at once: the workers share the evaluations.
            for due in rng.sample(operators, 3):  # a row per statement: no lock cycle
                await pool.execute(
                    "UPDATE operators SET schedule_due_at = clock_timestamp() WHERE id = $1", due
                )
            await pool.execute("SELECT pg_notify('leadrouter_schedule', '')")
            await asyncio.sleep(0.05)

    async def close_some() -> None:
        for n in range(40):
            rows = await pool.fetch(
                "SELECT id FROM contacts WHERE status = 'open' AND operator_id IS NOT NULL"
                " ORDER BY random() LIMIT 3"
            )
            for r in rows:
                await exchange.publish(
                    raw_message({"contact_id": r["id"]}, f"c-{n}-{r['id']}"), "contact.close"
                )
            await asyncio.sleep(0.04)

    with worker_processes(settings, tmp_path) as procs:
        for n in range(3):
            procs.append(spawn(settings, tmp_path, n))
        for n in range(3):
            await wait_ready(pool, settings, tmp_path, n)
        await asyncio.gather(publish_leads(), flip_presence(), flip_shifts(), close_some())

        # Everyone back: online, no shift; then close until every contact was handled.
        for n, op in enumerate(operators):
            body = {"operator_id": op, "status": "online"}
            await exchange.publish(raw_message(body, f"back-{n}"), "operator.presence")
            await availability.set_shift(pool, op, None, None)
        await wait_until(
            lambda: pool.fetchval("SELECT count(*) = $1 FROM contacts", total),
            timeout=60,
            what="every message made its contact",
        )

        async def all_closed() -> bool:
            rows = await pool.fetch(
                "SELECT id FROM contacts WHERE status = 'open' AND operator_id IS NOT NULL"
            )
            for r in rows:
                await exchange.publish(
                    raw_message({"contact_id": r["id"]}, f"end-{r['id']}"), "contact.close"
                )
            return bool(await pool.fetchval("SELECT bool_and(status = 'closed') FROM contacts"))

        await wait_until(all_closed, timeout=90, what="every contact routed and closed")
        await wait_until(
            lambda: pool.fetchval("SELECT count(*) = 0 FROM outbox WHERE published_at IS NULL"),
            what="the outbox published",
        )
        await asyncio.to_thread(stop_gracefully, procs)
    watcher.cancel()

    assert over_capacity == []
    assert await pool.fetchval("SELECT count(DISTINCT inbound_message_id) FROM contacts") == total
    available: dict[int, bool] = defaultdict(lambda: True)
    load: dict[int, int] = defaultdict(int)
    limits = {
        r["id"]: r["max_load"] for r in await pool.fetch("SELECT id, max_load FROM operators")
    }
    flips = 0
    # Per source, the contacts waiting (events of a source are written under its lock:
    # in commit order). A contact assigned from the queue must be its oldest, and a new
    # one may be assigned only while none waits.
    waiting: dict[str, set[int]] = defaultdict(set)
    story: dict[str, list[str]] = defaultdict(list)
    for row in await pool.fetch(OPERATOR_EVENTS):
        key, data = row["routing_key"], json.loads(row["data"])
        if "source" in data:
            story[data["source"]].append(
                f"{row['id']} {key} {data['contact_id']} op={data['operator_id']}"
            )
        if key in ("contact.queued", "contact.requeued"):
            waiting[data["source"]].add(data["contact_id"])
        elif key == "contact.closed":  # a queued contact may be closed too
            waiting[data["source"]].discard(data["contact_id"])
        elif key == "contact.assigned":
            queue = waiting[data["source"]]
            if data["contact_id"] in queue:
                assert data["contact_id"] == min(queue), story[data["source"]][-40:]
                queue.discard(data["contact_id"])
            else:
                assert not queue, story[data["source"]][-40:]
        if key == "operator.presence_changed":
            available[data["operator_id"]] = data["available"]
            flips += 1
        elif key == "contact.assigned":
            op = data["operator_id"]
            assert available[op], f"contact {data['contact_id']} went to unavailable {op}"
            load[op] += 1
            assert load[op] <= limits[op], f"operator {op} over max_load"
        elif key == "contact.closed" and data["operator_id"] is not None:
            load[data["operator_id"]] -= 1
        elif key == "contact.requeued":
            load[data["requeued_from"]] -= 1
    assert flips >= 20, "presence hardly changed: the test proves little"
    assert all(v == 0 for v in load.values()), dict(load)
    requeued = await pool.fetchval(
        "SELECT count(*) FROM outbox WHERE routing_key = 'contact.requeued'"
    )
    assert requeued > 0, "nothing was handed back: the test proves little"
    await assert_clean_end(settings, logs_of(tmp_path))
