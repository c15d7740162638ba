"""Routing against real services: exact shares, instant backlog drain, affinity, and the
capacity invariant across sources with several worker processes."""

import asyncio
import random
import time
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import pytest

from tests.helpers import (
    SMOOTH_OWED,
    EventCollector,
    assert_clean_end,
    lead,
    raw_message,
    route_new,
    send,
    settled,
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
from worker.app import Worker
from worker.settings import Settings


async def make_source(
    pool: asyncpg.Pool,
    key: str,
    weights: dict[int, int],
    strategy: str = "smooth",
    affinity_hours: int | None = None,
) -> None:
    await admin.add_source(pool, key, None, "", strategy, affinity_hours)
    await admin.set_weights(pool, key, weights)


async def operators(pool: asyncpg.Pool, *max_loads: int) -> list[int]:
    return [
        (await admin.add_operator(pool, f"op{n}", m, True))["id"] for n, m in enumerate(max_loads)
    ]


async def test_smooth_gives_exact_shares(
    pool: asyncpg.Pool,
    broker: aio_pika.abc.AbstractChannel,
    settings: Settings,
    events: EventCollector,
    worker: Worker,
) -> None:
    a, b, c = await operators(pool, 1000, 1000, 1000)
    await make_source(pool, "tg", {a: 1, b: 3, c: 6})
    exchange = await broker.get_exchange(settings.inbound_exchange)
    await asyncio.gather(
        *(
            exchange.publish(raw_message(lead("tg", f"s:{n}"), f"s-{n}"), "lead.contact")
            for n in range(100)
        )
    )
    assigned = await events.wait_for("contact.assigned", 100)
    counts = {op: sum(e.data.operator_id == op for e in assigned) for op in (a, b, c)}
    assert counts == {a: 10, b: 30, c: 60}
    rows = await pool.fetch(SMOOTH_OWED)
    assert all(abs(r["owed"]) < 1e-9 for r in rows)  # whole rounds: nobody owed


async def test_least_loaded_balances_load_per_weight(
    pool: asyncpg.Pool,
    broker: aio_pika.abc.AbstractChannel,
    settings: Settings,
    events: EventCollector,
    worker: Worker,
) -> None:
    a, b, c = await operators(pool, 100, 100, 100)
    await make_source(pool, "tg", {a: 1, b: 1, c: 2}, strategy="least_loaded")
    for n in range(40):  # one at a time: each choice sees the previous one's load
        await send(broker, settings, "lead.contact", lead("tg", f"l:{n}"), f"l-{n}")
        await events.wait_for("contact.assigned", n + 1)
    loads = {o["id"]: o["load"] for o in await admin.list_operators(pool)}
    assert loads == {a: 10, b: 10, c: 20}


@pytest.mark.settings(backlog_sweep_seconds=3600)
async def test_queued_contact_is_assigned_within_a_second_of_a_close(
    pool: asyncpg.Pool,
    broker: aio_pika.abc.AbstractChannel,
    settings: Settings,
    events: EventCollector,
    worker: Worker,
) -> None:
    [op] = await operators(pool, 1)
    await make_source(pool, "tg", {op: 1})
    await send(broker, settings, "lead.contact", lead("tg", "d:1"), "d-1")
    [first] = await events.wait_for("contact.assigned", 1)
    for n in range(2, 5):
        await send(broker, settings, "lead.contact", lead("tg", f"d:{n}"), f"d-{n}")
    queued = await events.wait_for("contact.queued", 3)

    closed_at = time.monotonic()
    await send(broker, settings, "contact.close", {"contact_id": first.data.contact_id}, "close-d1")
    [_, late] = await events.wait_for("contact.assigned", 2, timeout=5)
    waited = time.monotonic() - closed_at
    assert waited < 1.0, f"assigned {waited:.3f}s after the close"
    # The oldest queued contact first (events of one relay batch may arrive in any order).
    assert late.data.contact_id == min(e.data.contact_id for e in queued)
    assert late.data.queued_seconds is not None and late.data.queued_seconds > 0


@pytest.mark.settings(backlog_sweep_seconds=3600, batch_linger_seconds=0.5)
async def test_a_flood_never_overtakes_the_backlog(
    pool: asyncpg.Pool,
    broker: aio_pika.abc.AbstractChannel,
    settings: Settings,
    events: EventCollector,
    worker_log: list[dict[str, Any]],
) -> None:
    """Capacity opens (ten closes) in the very transaction that brings a flood of new
    leads: the five waiting contacts get it first, oldest first, then the newcomers the
    rest, in the order they came."""
    [op] = await operators(pool, 10)
    await make_source(pool, "tg", {op: 1})
    async with pool.acquire() as conn, conn.transaction():
        outcome = await route_new(conn, "tg", *(f"old:{n}" for n in range(15)))
    busy = sorted(outcome.assigned)  # old:0-9 took the capacity; old:10-14 wait
    backlog = sorted(set(outcome.contacts.values()) - set(busy))
    assert (len(busy), len(backlog)) == (10, 5)
    # Published before any worker runs, the closes among the newcomers, so that they
    # reach the worker together (it lingers for a full batch).
    exchange = await broker.get_exchange(settings.inbound_exchange)
    for n in range(100):
        await exchange.publish(raw_message(lead("tg", f"new:{n}"), f"new-{n}"), "lead.contact")
        if n % 10 == 5:
            contact_id = busy[n // 10]
            await exchange.publish(
                raw_message({"contact_id": contact_id}, f"close-{contact_id}"), "contact.close"
            )
    app = Worker(settings)
    await app.start()
    try:
        await events.wait_for("contact.closed", 10)
        # Those of the first routing too (the relay publishes them at start), and ten more.
        await events.wait_for("contact.assigned", 20)
        await wait_until(lambda: settled(app, 110), what="every message settled")
    finally:
        await app.stop()
    # They really competed: one transaction freed the capacity and brought the newcomers.
    assert any(
        e["event"] == "batch_handled" and e["closed"] == 10 and e["contacts"] for e in worker_log
    ), "no transaction held all the closes and new leads together"
    # Assignment order is outbox order: the backlog oldest first, then the first five
    # newcomers; the other 95 queue.
    late = await pool.fetch(
        "SELECT o.contact_id, l.external_id FROM outbox o"
        " JOIN contacts c ON c.id = o.contact_id JOIN leads l ON l.id = c.lead_id"
        " WHERE o.routing_key = 'contact.assigned' AND NOT o.contact_id = ANY($1::bigint[])"
        " ORDER BY o.id",
        busy,
    )
    assert [r["contact_id"] for r in late][:5] == backlog
    newcomers = [r["external_id"] for r in late][5:]
    assert len(newcomers) == 5 and all(e.startswith("new:") for e in newcomers), newcomers
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM contacts c JOIN leads l ON l.id = c.lead_id"
            " WHERE l.external_id LIKE 'new:%' AND c.operator_id IS NULL"
        )
        == 95
    )
    await assert_clean_end(settings, worker_log)


async def test_returning_lead_goes_back_to_the_same_operator(
    pool: asyncpg.Pool,
    broker: aio_pika.abc.AbstractChannel,
    settings: Settings,
    events: EventCollector,
    worker: Worker,
) -> None:
    ops = await operators(pool, 100, 100, 100)
    await make_source(pool, "tg", dict.fromkeys(ops, 1), affinity_hours=24)
    await make_source(pool, "plain", dict.fromkeys(ops, 1))
    sent = 0
    for round_ in range(3):
        for other in range(4):  # other leads in between move the round robin on
            await send(
                broker,
                settings,
                "lead.contact",
                lead("tg", f"o:{round_}:{other}"),
                f"o-{round_}-{other}",
            )
        await send(broker, settings, "lead.contact", lead("tg", "returning"), f"r-{round_}")
        await send(broker, settings, "lead.contact", lead("plain", "returning"), f"p-{round_}")
        sent += 6
        await events.wait_for("contact.assigned", sent)
    mine = [
        e
        for e in events.of("contact.assigned")
        if e.data.lead_external_id == "returning" and e.data.source == "tg"
    ]
    assert len({e.data.operator_id for e in mine}) == 1
    assert [e.data.affinity for e in mine] == [False, True, True]
    plain = [
        e
        for e in events.of("contact.assigned")
        if e.data.lead_external_id == "returning" and e.data.source == "plain"
    ]
    assert not any(e.data.affinity for e in plain)

    # When that operator cannot take it, normal routing applies.
    await admin.update_operator(pool, mine[0].data.operator_id, active=False)  # type: ignore[arg-type]
    await send(broker, settings, "lead.contact", lead("tg", "returning"), "r-last")
    last = (await events.wait_for("contact.assigned", sent + 1))[-1]
    assert last.data.operator_id != mine[0].data.operator_id and last.data.affinity is False


async def test_removing_all_weights_queues_without_errors(
    pool: asyncpg.Pool,
    broker: aio_pika.abc.AbstractChannel,
    settings: Settings,
    events: EventCollector,
    worker: Worker,
) -> None:
    [op] = await operators(pool, 10)
    await make_source(pool, "tg", {op: 1})
    await admin.set_weights(pool, "tg", {})
    await send(broker, settings, "lead.contact", lead("tg", "w:1"), "w-1")
    [queued] = await events.wait_for("contact.queued", 1)
    assert await admin.set_weights(pool, "tg", {op: 2}) == 1
    [assigned] = await events.wait_for("contact.assigned", 1)
    assert assigned.data.contact_id == queued.data.contact_id
    assert worker.outcomes == {"ok": 1}


@pytest.mark.slow
@pytest.mark.settings(prefetch=8, concurrent_batches=2)  # transactions side by side, too
async def test_capacity_is_never_exceeded_across_sources(
    pool: asyncpg.Pool,
    broker: aio_pika.abc.AbstractChannel,
    settings: Settings,
    events: EventCollector,
    tmp_path: Path,
) -> None:
    """4 worker processes, 3 sources sharing 5 operators of max_load 3, 300 leads, and a
    CRM closing contacts at random as they come."""
    ops = await operators(pool, 3, 3, 3, 3, 3)
    await make_source(pool, "tg", {ops[0]: 1, ops[1]: 2, ops[2]: 3})
    await make_source(pool, "web", {ops[1]: 1, ops[2]: 1, ops[3]: 1}, strategy="weighted_random")
    await make_source(pool, "wa", {ops[0]: 1, ops[3]: 2, ops[4]: 1}, strategy="least_loaded")
    exchange = await broker.get_exchange(settings.inbound_exchange)
    total = 300
    with worker_processes(settings, tmp_path) as procs:
        for n in range(4):
            procs.append(spawn(settings, tmp_path, n))
        for n in range(4):
            await wait_ready(pool, settings, tmp_path, n)
        rng = random.Random(5)
        publishing = asyncio.gather(
            *(
                exchange.publish(
                    raw_message(lead(rng.choice(["tg", "web", "wa"]), f"c:{n}"), f"c-{n}"),
                    "lead.contact",
                )
                for n in range(total)
            )
        )

        async def crm() -> None:
            """Close open, assigned contacts at random until everything was handled."""
            closed: set[int] = set()
            while len(closed) < total:
                rows = await pool.fetch(
                    "SELECT id FROM contacts WHERE status = 'open' AND operator_id IS NOT NULL"
                )
                fresh = [r["id"] for r in rows if r["id"] not in closed]
                for contact_id in rng.sample(fresh, k=min(len(fresh), 4)):
                    closed.add(contact_id)
                    await exchange.publish(
                        raw_message({"contact_id": contact_id}, f"x-{contact_id}"), "contact.close"
                    )
                await asyncio.sleep(0.005)

        await publishing
        await asyncio.wait_for(crm(), timeout=90)
        await wait_until(
            lambda: pool.fetchval(
                "SELECT count(*) = $1 FROM contacts WHERE status = 'closed'", total
            ),
            timeout=60,
            what="every contact closed",
        )
        await asyncio.to_thread(stop_gracefully, procs)
    await assert_clean_end(settings, logs_of(tmp_path))
    peaks = [dict(r) for r in await pool.fetch(PEAK_LOADS)]
    assert len(peaks) == 5 and all(p["peak"] <= p["max_load"] for p in peaks), peaks
    assert sum(p["commits"] for p in peaks) == 2 * total  # each assigned once, closed once
    assert any(p["peak"] == p["max_load"] for p in peaks), "capacity was actually contended"
    assert await pool.fetchval("SELECT count(*) FROM operators WHERE open_load <> 0") == 0
