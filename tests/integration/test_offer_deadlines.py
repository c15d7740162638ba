"""Offer deadlines are kept in PostgreSQL by the workers themselves: an unanswered offer
moves on within a second of its deadline, also when the worker that was expiring it was
killed; 10,000 due at once move on in bulk, shared by several worker processes."""

import asyncio
from pathlib import Path

import aio_pika
import asyncpg
import pytest

from schemas.inbound import LeadContact
from tests.conftest import Expected
from tests.helpers import EventCollector, assert_clean_end, lead, send, wait_until
from tests.worker_processes import (
    PEAK_LOADS,
    logs_of,
    spawn,
    stop_gracefully,
    wait_ready,
    worker_processes,
)
from worker import admin, distribution
from worker.app import Worker
from worker.locks import LockSpace
from worker.settings import Settings

# Per contact: how long after its first offer's deadline its second offer was made.
MOVED_ON = """
    SELECT f.contact_id, extract(epoch FROM s.offered_at - f.expires_at) AS late
    FROM offers f
    JOIN offers s ON s.contact_id = f.contact_id AND s.attempt = 2
    WHERE f.attempt = 1
"""
SET_DEADLINES = """
    WITH due AS (
        UPDATE contacts SET offer_expires_at = $1 WHERE offer_expires_at IS NOT NULL
        RETURNING id
    )
    UPDATE offers SET expires_at = $1 WHERE outcome IS NULL AND contact_id IN (SELECT id FROM due)
"""
HOLDS_DEADLINE_LOCK = """
    SELECT count(*) > 0 FROM pg_locks
    WHERE locktype = 'advisory' AND granted AND classid = $1 AND objid = $2 AND objsubid = 2
"""
SECONDS_FOR_TEN_THOUSAND = 15.0
WAITS_FOR_A_LOCK = "SELECT count(*) > 0 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"


async def _two_operators_many_sources(
    pool: asyncpg.Pool, sources: int, capacity: int, timeout: int
) -> tuple[list[int], list[str]]:
    ops = [(await admin.add_operator(pool, n, capacity, True))["id"] for n in ("a", "b")]
    keys = [f"s{n}" for n in range(sources)]
    for key in keys:
        await admin.add_source(pool, key, None, "", "smooth", accept_timeout=timeout)
        await admin.set_weights(pool, key, {ops[0]: 1, ops[1]: 1})
    return ops, keys


async def _offer(pool: asyncpg.Pool, keys: list[str], per_source: int) -> None:
    """Offers made by the routing transaction itself, 500 contacts a transaction."""
    for key in keys:
        for start in range(0, per_source, 500):
            new = [
                distribution.NewContact(
                    f"m-{key}-{n}",
                    LeadContact.model_validate(
                        {"source": key, "lead": {"external_id": f"{key}:{n}"}}
                    ),
                )
                for n in range(start, min(start + 500, per_source))
            ]
            async with pool.acquire() as conn, conn.transaction():
                scope = await distribution.read_scope(conn, {key}, ())
                await distribution.route(conn, scope, new)


async def _assert_within_capacity(pool: asyncpg.Pool) -> None:
    peaks = await pool.fetch(PEAK_LOADS)
    assert peaks and all(r["peak"] <= r["max_load"] for r in peaks), [dict(r) for r in peaks]
    # Every offer that moved on gave its capacity back: each operator's load is exactly
    # its pending offers.
    loads = await pool.fetch(
        """SELECT o.id, o.open_load,
                  (SELECT count(*) FROM contacts c
                   WHERE c.operator_id = o.id AND c.status = 'open') AS holding
           FROM operators o"""
    )
    assert all(r["open_load"] == r["holding"] for r in loads), [dict(r) for r in loads]


async def test_an_unanswered_offer_moves_on_within_a_second(
    pool: asyncpg.Pool,
    settings: Settings,
    broker: aio_pika.abc.AbstractChannel,
    events: EventCollector,
    worker: Worker,
) -> None:
    ops, _ = await _two_operators_many_sources(pool, 1, 5, timeout=1)
    await send(broker, settings, "lead.contact", lead("s0", "tg:1"), "lead-1")
    [first] = await events.wait_for("contact.offered", 1)
    [expired] = await events.wait_for("contact.expired", 1, timeout=5)
    [_, second] = await events.wait_for("contact.offered", 2)
    assert expired.data.operator_id == first.data.operator_id
    assert {first.data.operator_id, second.data.operator_id} == set(ops)
    assert second.data.attempt == 2
    [(contact_id, late)] = await pool.fetch(MOVED_ON)
    print(f"\none offer moved on {late:.3f} s after its deadline")
    assert 0 <= late < 1.0, f"moved on {late:.3f} s after its deadline"
    # A late answer from the first operator changes nothing.
    await send(
        broker,
        settings,
        "contact.accept",
        {"contact_id": contact_id, "operator_id": first.data.operator_id},
        "late-1",
    )
    [rejected] = await events.wait_for("contact.answer_rejected", 1)
    assert rejected.data.reason == "expired"
    await _assert_within_capacity(pool)


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_ten_thousand_offers_due_at_once_move_on_in_bulk(
    pool: asyncpg.Pool, settings: Settings, tmp_path: Path
) -> None:
    """10,000 offers over 10 sources, all due at the same instant; two worker processes
    share the work (a source at a time each) and route every one on to the other
    operator, in bulk, at once; how long after the deadline is printed (the design's 1 s
    is out of reach on this machine: README, Offers)."""
    total, sources = 10_000, 10
    _, keys = await _two_operators_many_sources(pool, sources, total, timeout=3600)
    await _offer(pool, keys, total // sources)
    assert await pool.fetchval("SELECT count(*) FROM offers") == total
    with worker_processes(settings, tmp_path) as procs:
        for n in range(2):
            procs.append(spawn(settings, tmp_path, n))
        for n in range(2):
            await wait_ready(pool, settings, tmp_path, n)
        deadline = await pool.fetchval("SELECT now() + interval '2 s'")
        await pool.execute(SET_DEADLINES, deadline)
        await wait_until(
            lambda: pool.fetchval("SELECT count(*) = $1 FROM offers WHERE attempt = 2", total),
            timeout=60,
            what="every offer moved on",
        )
        # Seen committed (polled every 50 ms): an upper bound for every one of them.
        seen = (await pool.fetchval("SELECT clock_timestamp()") - deadline).total_seconds()
        lateness = sorted(r["late"] for r in await pool.fetch(MOVED_ON))
        await wait_until(
            lambda: pool.fetchval("SELECT count(*) = 0 FROM outbox WHERE published_at IS NULL"),
            timeout=60,
            what="outbox published",
        )
        await asyncio.to_thread(stop_gracefully, procs)
    logs = logs_of(tmp_path)
    await assert_clean_end(settings, logs)
    print(
        f"\n10,000 offers expired: offered again after p50 {lateness[total // 2]:.3f} s, "
        f"max {lateness[-1]:.3f} s; all committed {seen:.3f} s after the deadline"
    )
    assert len(lateness) == total
    assert lateness[0] >= 0
    # In bulk: a transaction or two per worker (sources one of them had taken), not one
    # per source or per offer, nor left to a later poll.
    sweeps = [e for e in logs if e.get("event") == "offers_expired"]
    assert sum(e["expired"] for e in sweeps) == total
    assert len(sweeps) <= 4, [(e["sources"], e["expired"]) for e in sweeps]
    # The target is 1 s, which this machine does not reach (README, Offers: 2.5-2.7 s,
    # both workers' relays publishing the 20,000 events meanwhile). The time is printed;
    # the bound here only catches an expiry gone astray, not a slow machine.
    assert seen < SECONDS_FOR_TEN_THOUSAND, f"the offers moved on {seen:.3f} s after their deadline"
    # No offer was expired twice.
    assert (
        await pool.fetchval("SELECT count(*) FROM outbox WHERE routing_key = 'contact.expired'")
        == total
    )
    rows = await pool.fetch("SELECT operator_id, attempt FROM offers ORDER BY contact_id, attempt")
    pairs = list(zip(rows[::2], rows[1::2], strict=True))
    assert all(f["operator_id"] != s["operator_id"] for f, s in pairs)  # skipped the first
    await _assert_within_capacity(pool)


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_a_worker_killed_while_expiring_leaves_the_deadlines_to_the_next_one(
    pool: asyncpg.Pool, settings: Settings, tmp_path: Path, expected: Expected
) -> None:
    """The only worker takes a source's lapsed offers (its deadline lock) and is SIGKILLed
    before it commits; every worker is gone. A worker started afterwards finds the
    deadlines in the database and moves them on within a second of being ready."""
    _, [key] = await _two_operators_many_sources(pool, 1, 100, timeout=3600)
    await _offer(pool, [key], 50)
    source_id = await pool.fetchval("SELECT id FROM sources")
    with worker_processes(settings, tmp_path) as procs:
        async with pool.acquire() as holder, holder.transaction():
            # Routing of the source held up here: the expiring worker takes the deadline
            # lock, then waits for this one with the lapsed offers in hand.
            await holder.execute(
                "SELECT pg_advisory_xact_lock($1, $2)", LockSpace.SOURCE, source_id
            )
            procs.append(spawn(settings, tmp_path, 0))
            await wait_ready(pool, settings, tmp_path, 0)
            await pool.execute(SET_DEADLINES, await pool.fetchval("SELECT now()"))
            await wait_until(
                lambda: pool.fetchval(HOLDS_DEADLINE_LOCK, LockSpace.OFFER_DEADLINES, source_id),
                what="the worker holds the deadline lock",
            )
            await wait_until(lambda: pool.fetchval(WAITS_FOR_A_LOCK), what="it waits")
            procs[0].kill()
            procs[0].wait()
        assert await pool.fetchval("SELECT count(*) FROM offers WHERE attempt = 2") == 0
        procs.append(spawn(settings, tmp_path, 1))
        await wait_ready(pool, settings, tmp_path, 1)
        ready = await pool.fetchval("SELECT clock_timestamp()")
        await wait_until(
            lambda: pool.fetchval("SELECT count(*) = 50 FROM offers WHERE attempt = 2"),
            timeout=10,
            what="every offer moved on",
        )
        last = await pool.fetchval("SELECT max(offered_at) FROM offers WHERE attempt = 2")
        await asyncio.to_thread(stop_gracefully, procs[1:])
    print(f"\nafter the kill: moved on {(last - ready).total_seconds():.3f} s after the new worker")
    assert (last - ready).total_seconds() < 1.0
    await assert_clean_end(settings, logs_of(tmp_path, restarts=True), expected)
    await _assert_within_capacity(pool)
