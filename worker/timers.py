"""The workers' timers, kept in PostgreSQL: waiting alerts (`contact.waiting` once per
contact still queued `alert_after` seconds after it came) and overflow (after
`overflow_after` seconds a queued contact may also go to another source's operators:
`contact.overflowed` once, then routed there too; chains follow each target's own
setting). No cron: every worker runs `run_timers` as a side task and ticks twice a
second, so a timer fires within a second of being due, and a restarted worker catches
up with whatever fell due meanwhile.

Several workers share the work safely: a source's timers are kept by one worker at a
time (a try-lock, LockSpace.TIMERS), under the source's routing lock, so they see every
contact that will ever be inserted for it before the lock has a higher id. Each source
keeps a watermark per timer (the last contact id handled, in id order, stopping at the
first one not yet due), so a contact is alerted or overflowed once; the event is written
in the same transaction. A source that uses none of this costs nothing here but one row
in the tick's first query.

Also: the gauge of the oldest queued contact's age per source."""

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import asyncpg

from worker import distribution, log
from worker.metrics import Metrics
from worker.outbox import EventWriter
from worker.retry import backoff, is_transient, stopped_within
from worker.sql import Q

logger = log.get(__name__)
TICK_SECONDS = 0.5
GAUGE_SECONDS = 2.0  # how often the oldest-queued gauge is read
BATCH = 1000  # contacts one source's timer looks at per transaction


@dataclass
class Tick:
    """What one round did."""

    alerted: int = 0
    overflowed: int = 0
    forwarded: int = 0
    assigned: int = 0
    drain: set[int] = field(default_factory=set)  # sources given overflowed contacts


async def tick(pool: asyncpg.Pool) -> Tick:
    """Fire every due timer of every source, then route what overflowed."""
    done = Tick()
    rows = await pool.fetch(Q.timer_sources)
    for row in rows:
        async with pool.acquire() as conn, conn.transaction():
            if not await conn.fetchval(Q.try_lock_source_timers, row["id"]):
                continue  # another worker keeps this source's timers now
            await distribution.lock_sources(conn, {row["id"]})
            await _source_timers(conn, row["id"], done)
    if any(r["receives_overflow"] for r in rows):  # the safety net, where overflow goes
        done.drain.update(r["source_id"] for r in await pool.fetch(Q.overflow_backlog))
    for source_id in sorted(done.drain):
        done.assigned += (await distribution.drain_after_commit(pool, {source_id})).total()
    return done


async def _source_timers(conn: asyncpg.Connection, source_id: int, done: Tick) -> None:
    s = await conn.fetchrow(Q.source_timers, source_id)
    events = EventWriter()
    now = datetime.now(UTC)
    alerted, overflowed = s["alerted_through"], s["overflowed_through"]
    if s["alert_after"] is not None:
        due, alerted = await _due(conn, source_id, alerted, s["alert_after"])
        due = await _still_queued(conn, due)
        for r in due:
            events.waiting(r, s["key"], now, round(r["waited"], 3))
        done.alerted += len(due)
    if s["target_id"] is not None:
        due, overflowed = await _due(conn, source_id, overflowed, s["overflow_after"])
        due = await _still_queued(conn, due)
        if due:
            await conn.execute(
                Q.overflow_contacts,
                [r["id"] for r in due],
                [r["priority"] for r in due],
                s["target_id"],
            )
            for r in due:
                events.overflowed(r, s["key"], now, s["target_key"])
            done.overflowed += len(due)
            done.drain.add(s["target_id"])
        forwarded = await conn.fetch(
            Q.forward_overflows, source_id, s["overflow_after"], s["target_id"]
        )
        if forwarded:
            done.forwarded += len(forwarded)
            done.drain.add(s["target_id"])
    if s["receives_overflow"]:
        await conn.execute(Q.forget_overflows, source_id)
    if (alerted, overflowed) != (s["alerted_through"], s["overflowed_through"]):
        await conn.execute(Q.advance_timers, source_id, alerted, overflowed)
    if events.rows:
        columns = list(map(list, zip(*events.rows, strict=True)))
        decided = columns[5] if events.recording else []
        await conn.execute(Q.insert_timer_events, *columns[:4], decided)  # attempt 0: no offer
        await conn.execute(Q.notify_outbox)


async def _still_queued(
    conn: asyncpg.Connection, rows: list[asyncpg.Record]
) -> list[asyncpg.Record]:
    """Those of `rows` still queued, locked until commit. The source's lock keeps its own
    routing away, but an overflowed contact may be taken by its target's routing: that
    one then waits for this commit (so the event comes first), or took it already."""
    if not rows:
        return rows
    kept = {r["id"] for r in await conn.fetch(Q.lock_still_queued, [r["id"] for r in rows])}
    return [r for r in rows if r["id"] in kept]


async def _due(
    conn: asyncpg.Connection, source_id: int, through: int, after: int
) -> tuple[list[asyncpg.Record], int]:
    """The source's queued contacts after contact `through`, in id order, up to the first
    that has not waited `after` seconds yet; and the new watermark (the last of them)."""
    due: list[asyncpg.Record] = []
    while True:
        rows = await conn.fetch(Q.queued_after, source_id, through, BATCH)
        for r in rows:
            if r["waited"] < after:
                return due, through
            due.append(r)
            through = r["id"]
        if len(rows) < BATCH:
            return due, through


async def update_gauge(pool: asyncpg.Pool, metrics: Metrics) -> None:
    for r in await pool.fetch(Q.oldest_queued):
        metrics.oldest_queued.labels(r["key"]).set(r["seconds"])


async def run_timers(
    pool: asyncpg.Pool,
    stop: asyncio.Event,
    metrics: Metrics,
    wake_relay: Callable[[], None],
    retry_max_seconds: float,
) -> None:
    """The side task: tick until stopped. Transient failures are retried with backoff;
    anything else is a bug and ends the task (the worker then stops, see app.py)."""
    attempt = 0
    gauged = 0.0
    while not stop.is_set():
        try:
            done = await tick(pool)
            if time.monotonic() - gauged >= GAUGE_SECONDS:
                await update_gauge(pool, metrics)
                gauged = time.monotonic()
            attempt = 0
        except Exception as exc:
            if not is_transient(exc):
                raise
            attempt += 1
            logger.warning("timers_failed", error=type(exc).__name__)
            await stopped_within(stop, backoff(attempt, retry_max_seconds))
            continue
        if done.alerted or done.overflowed or done.forwarded or done.assigned:
            logger.info(
                "timers_fired",
                alerted=done.alerted,
                overflowed=done.overflowed,
                forwarded=done.forwarded,
                assigned=done.assigned,
            )
            wake_relay()
        await stopped_within(stop, TICK_SECONDS)
