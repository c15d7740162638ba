"""Waiting alerts and overflow, kept by the workers' timers in PostgreSQL: each fires once
per contact within a second of being due, overflow chains follow each target's own
setting, a cycle is refused, and several worker processes share the timers (and catch
up after all of them were stopped) without breaking capacity or idempotency."""

import asyncio
import random
import time
from pathlib import Path

import aio_pika
import asyncpg
import pytest

from tests.helpers import EventCollector, assert_clean_end, lead, raw_message, send, wait_until
from tests.worker_processes import (
    PEAK_LOADS,
    logs_of,
    spawn,
    stop_gracefully,
    wait_ready,
    worker_processes,
)
from worker import admin, source_queueing, timers
from worker.app import Worker
from worker.errors import UserError
from worker.settings import Settings
from worker.source_queueing import QueueingChange


async def source(
    pool: asyncpg.Pool, key: str, max_loads: list[int], change: QueueingChange | None = None
) -> list[int]:
    """A source with operators of these max loads, weight 1 each; returns their ids."""
    await source_queueing.add_source(
        pool, change or QueueingChange(), key=key, name=None, description="", strategy=None
    )
    ids = [
        (await admin.add_operator(pool, f"{key}-{n}", m, True))["id"]
        for n, m in enumerate(max_loads)
    ]
    await admin.set_weights(pool, key, dict.fromkeys(ids, 1))
    return ids


async def test_a_waiting_alert_fires_once_within_a_second_of_due(
    pool: asyncpg.Pool,
    broker: aio_pika.abc.AbstractChannel,
    settings: Settings,
    events: EventCollector,
    worker: Worker,
) -> None:
    await source(pool, "tg", [0], QueueingChange(alert_after=1))
    await send(broker, settings, "lead.contact", lead("tg", "w:1"), "w-1")
    [queued] = await events.wait_for("contact.queued", 1)
    sent = time.monotonic()
    [waiting] = await events.wait_for("contact.waiting", 1, timeout=5)
    late = time.monotonic() - sent
    assert 0.9 <= late < 2.0, f"contact.waiting {late:.2f}s after the contact queued"
    assert waiting.data.contact_id == queued.data.contact_id
    assert waiting.data.queued_seconds is not None and 1.0 <= waiting.data.queued_seconds < 2.0
    assert waiting.data.source == "tg" and waiting.data.operator_id is None
    await asyncio.sleep(1.5)  # more ticks: still one
    assert len(events.of("contact.waiting")) == 1

    async def gauge() -> float | None:  # the oldest queued contact's age, per source
        age = worker.metrics.registry.get_sample_value(
            "leadrouter_oldest_queued_seconds", {"source": "tg"}
        )
        return age if age is not None and age >= 2.0 else None

    await wait_until(gauge, timeout=5, what="the oldest-queued gauge at 2 s or more")
    await wait_until(
        lambda: pool.fetchval("SELECT count(*) = 0 FROM outbox WHERE published_at IS NULL"),
        what="everything published",
    )


async def test_overflow_goes_to_the_other_team_once_keeping_its_source(
    pool: asyncpg.Pool,
    broker: aio_pika.abc.AbstractChannel,
    settings: Settings,
    events: EventCollector,
    worker: Worker,
) -> None:
    [spare] = await source(pool, "spare", [5])
    await source(pool, "hot", [0], QueueingChange(overflow_to="spare", overflow_after=1))
    await send(broker, settings, "lead.contact", lead("hot", "o:1"), "o-1")
    [queued] = await events.wait_for("contact.queued", 1)
    sent = time.monotonic()
    [assigned] = await events.wait_for("contact.assigned", 1, timeout=5)
    late = time.monotonic() - sent
    assert 0.9 <= late < 2.0, f"assigned {late:.2f}s after the contact queued"
    [overflowed] = events.of("contact.overflowed")
    assert overflowed.data.contact_id == assigned.data.contact_id == queued.data.contact_id
    assert overflowed.data.overflow_to == "spare" and overflowed.data.source == "hot"
    assert assigned.data.operator_id == spare and assigned.data.source == "hot"
    assert (
        await pool.fetchval("SELECT s.key FROM contacts c JOIN sources s ON s.id = c.source_id")
        == "hot"
    )
    # The spare team's own newcomers still get in: the overflowed one took one place.
    await send(broker, settings, "lead.contact", lead("spare", "s:1"), "s-1")
    await events.wait_for("contact.assigned", 2)
    await asyncio.sleep(1)
    assert len(events.of("contact.overflowed")) == 1
    assert await pool.fetchval("SELECT open_load FROM operators WHERE id = $1", spare) == 2


async def test_an_overflow_chain_follows_each_targets_own_setting(
    pool: asyncpg.Pool,
    broker: aio_pika.abc.AbstractChannel,
    settings: Settings,
    events: EventCollector,
    worker: Worker,
) -> None:
    [last] = await source(pool, "c", [5])
    await source(pool, "b", [0], QueueingChange(overflow_to="c", overflow_after=1))
    await source(pool, "a", [0], QueueingChange(overflow_to="b", overflow_after=1))
    await send(broker, settings, "lead.contact", lead("a", "ch:1"), "ch-1")
    await events.wait_for("contact.queued", 1)
    sent = time.monotonic()
    [assigned] = await events.wait_for("contact.assigned", 1, timeout=6)
    late = time.monotonic() - sent
    assert 1.9 <= late < 3.0, f"reached c {late:.2f}s after it queued (1 s in a, 1 s in b)"
    assert assigned.data.operator_id == last and assigned.data.source == "a"
    [overflowed] = events.of("contact.overflowed")  # once, at the first hop
    assert overflowed.data.overflow_to == "b"


async def test_an_overflow_cycle_is_refused(pool: asyncpg.Pool) -> None:
    await source(pool, "a", [1])
    await source(pool, "b", [1], QueueingChange(overflow_to="a", overflow_after=5))
    await source(pool, "c", [1], QueueingChange(overflow_to="b", overflow_after=5))
    with pytest.raises(UserError, match="overflow would go round: a -> c -> b -> a"):
        await source_queueing.update_source(
            pool, QueueingChange(overflow_to="c", overflow_after=5), key="a"
        )
    with pytest.raises(UserError, match="itself"):
        await source_queueing.update_source(
            pool, QueueingChange(overflow_to="a", overflow_after=5), key="a"
        )
    with pytest.raises(UserError, match="both"):
        await source_queueing.update_source(pool, QueueingChange(overflow_to="c"), key="a")
    # Nothing half-applied: a refused `sources update` changed nothing, its name neither.
    with pytest.raises(UserError):
        await source_queueing.update_source(
            pool, QueueingChange(overflow_to="c", overflow_after=5), key="a", name="New name"
        )
    row = await pool.fetchrow("SELECT name, overflow_to FROM sources WHERE key = 'a'")
    assert (row["name"], row["overflow_to"]) == ("a", None)
    # Turning b's overflow off lets a go to c.
    await source_queueing.update_source(pool, QueueingChange(overflow_after=0), key="b")
    await source_queueing.update_source(
        pool, QueueingChange(overflow_to="c", overflow_after=5), key="a"
    )
    receiving = await pool.fetch("SELECT key FROM sources WHERE receives_overflow ORDER BY key")
    assert [r["key"] for r in receiving] == ["b", "c"]


async def test_timers_catch_up_with_what_fell_due_while_no_worker_ran(pool: asyncpg.Pool) -> None:
    """A restarted worker's first tick does what fell due meanwhile, once."""
    from tests.helpers import route_new

    await source(pool, "tg", [0], QueueingChange(alert_after=1))
    async with pool.acquire() as conn, conn.transaction():
        await route_new(conn, "tg", "r:1", "r:2")
    await asyncio.sleep(1.2)
    done = await timers.tick(pool)
    assert done.alerted == 2
    assert (await timers.tick(pool)).alerted == 0
    assert (
        await pool.fetchval("SELECT count(*) FROM outbox WHERE routing_key = 'contact.waiting'")
        == 2
    )


@pytest.mark.slow
@pytest.mark.settings(prefetch=8, concurrent_batches=2)
async def test_several_workers_share_priority_overflow_and_alerts(
    pool: asyncpg.Pool,
    broker: aio_pika.abc.AbstractChannel,
    settings: Settings,
    events: EventCollector,
    tmp_path: Path,
) -> None:
    """3 worker processes; "hot" (mixed priorities, alerts after 1 s, overflow to "spare"
    after 2 s) and "spare" (newest first) share an operator; a CRM closes contacts slowly
    so a backlog builds up; halfway every worker is stopped for 2 s and new ones started.
    Each message makes one contact, assigned and closed once, nobody over max_load,
    alerts and overflows once each and only while queued, urgent contacts wait less."""
    spare_ops = await source(pool, "spare", [2, 2], QueueingChange(queue_order="lifo"))
    hot_ops = await source(
        pool, "hot", [2, 2], QueueingChange(alert_after=1, overflow_to="spare", overflow_after=2)
    )
    shared = (await admin.add_operator(pool, "shared", 2, True))["id"]
    await admin.set_weights(pool, "hot", {**dict.fromkeys(hot_ops, 1), shared: 1})
    await admin.set_weights(pool, "spare", {**dict.fromkeys(spare_ops, 1), shared: 1})
    exchange = await broker.get_exchange(settings.inbound_exchange)
    total = 160
    rng = random.Random(17)
    messages = [
        {**lead("hot" if rng.random() < 0.75 else "spare", f"x:{n}"), "priority": rng.randint(0, 9)}
        for n in range(total)
    ]

    async def crm(until: int) -> None:
        """Close assigned contacts a few at a time until `until` are closed."""
        while await pool.fetchval("SELECT count(*) FROM contacts WHERE status = 'closed'") < until:
            rows = await pool.fetch(
                "SELECT id FROM contacts WHERE status = 'open' AND operator_id IS NOT NULL"
            )
            for r in rng.sample(rows, k=min(len(rows), 2)):
                await exchange.publish(
                    raw_message({"contact_id": r["id"]}, f"close-{r['id']}"), "contact.close"
                )
            await asyncio.sleep(0.15)

    with worker_processes(settings, tmp_path) as procs:
        for n in range(3):
            procs.append(spawn(settings, tmp_path, n))
        for n in range(3):
            await wait_ready(pool, settings, tmp_path, n)
        for n, body in enumerate(messages[: total // 2]):
            await exchange.publish(raw_message(body, f"m-{n}"), "lead.contact")
        await asyncio.wait_for(crm(total // 4), timeout=60)
        await asyncio.to_thread(stop_gracefully, procs)
        await asyncio.sleep(2)  # timers fall due with nobody running
        for n in range(3, 6):
            procs.append(spawn(settings, tmp_path, n))
        for n in range(3, 6):
            await wait_ready(pool, settings, tmp_path, n)
        for n, body in enumerate(messages[total // 2 :], total // 2):
            await exchange.publish(raw_message(body, f"m-{n}"), "lead.contact")
        await asyncio.wait_for(crm(total), timeout=120)
        await wait_until(
            lambda: pool.fetchval("SELECT count(*) = 0 FROM outbox WHERE published_at IS NULL"),
            what="every event published",
        )
        await asyncio.to_thread(stop_gracefully, procs)
    await assert_clean_end(settings, logs_of(tmp_path, restarts=True))

    assert await pool.fetchval("SELECT count(DISTINCT inbound_message_id) FROM contacts") == total
    peaks = [dict(r) for r in await pool.fetch(PEAK_LOADS)]
    assert all(p["peak"] <= p["max_load"] for p in peaks), peaks
    assert sum(p["commits"] for p in peaks) == 2 * total  # each assigned once, closed once
    assert await pool.fetchval("SELECT count(*) FROM operators WHERE open_load <> 0") == 0
    per_contact = await pool.fetch(
        """
        SELECT c.id, s.key AS source, c.operator_id, c.priority,
               extract(epoch FROM c.assigned_at - c.created_at) AS waited,
               array_agg(o.routing_key ORDER BY o.id) AS keys
        FROM contacts c JOIN sources s ON s.id = c.source_id JOIN outbox o ON o.contact_id = c.id
        GROUP BY c.id, s.key
        """
    )
    for r in per_contact:
        keys = r["keys"]
        assert keys.count("contact.assigned") == 1 and keys.count("contact.closed") == 1, r
        assert keys.count("contact.waiting") <= 1 and keys.count("contact.overflowed") <= 1, r
        assigned_at = keys.index("contact.assigned")
        for timer_event in ("contact.waiting", "contact.overflowed"):
            if timer_event in keys:  # only while it was queued
                assert keys.index(timer_event) < assigned_at, r
        if r["source"] == "hot" and r["operator_id"] in spare_ops:
            assert "contact.overflowed" in keys, r  # spare's own team only by overflow
        if r["source"] == "spare":
            assert r["operator_id"] in {*spare_ops, shared}, r
    keys = [k for r in per_contact for k in r["keys"]]
    assert keys.count("contact.waiting") > 0 and keys.count("contact.overflowed") > 0
    # Delivered as written, each once (ids are stable across re-publishes).
    await events.wait_for("contact.closed", total, timeout=30)
    for kind in ("contact.waiting", "contact.overflowed"):
        assert len({e.id for e in events.of(kind)}) == keys.count(kind)
    hot = [r for r in per_contact if r["source"] == "hot"]
    urgent = [float(r["waited"]) for r in hot if r["priority"] >= 7]
    calm = [float(r["waited"]) for r in hot if r["priority"] <= 2]
    assert sum(urgent) / len(urgent) < sum(calm) / len(calm), (urgent, calm)
