"""Presence, shifts and leave: who may take work now, and what follows when that changes.

An operator gets contacts only while active, online, on shift and not on leave. The last
three are folded into `operators.ready` (migration `availability`), which the triggers
that keep each weight row's `available` flag read, so routing finds who can take work
through the same index as before, at the same cost, and its claim re-checks `ready`
under the operator's row lock.

Every change goes through `_change`, in one transaction: the sources the operator
matters to are locked (the usual lock order: sources, then the operator's row), the new
presence and schedule are stored with the next instant the schedule may change, an
`operator.presence_changed` event is written when presence or schedule status changed,
`_became_unavailable` does what going away entails (handing back open contacts on
request; pending offers are to move on there too), and the backlog of those sources is
routed at once, as freed capacity is.

The schedule has no cron: each worker runs `ScheduleKeeper`, which sleeps until the
earliest `schedule_due_at` (or a NOTIFY that a shift or leave was set), then evaluates the
operators that are due, each in a transaction of its own under a tried advisory lock
(LockSpace.SCHEDULE), so several workers share the work and none waits for another. Due
times in the past (every worker was down) are caught up at once."""

import asyncio
import contextlib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from worker import distribution, log
from worker.errors import UserError
from worker.listen import keep_listening
from worker.metrics import Metrics
from worker.outbox import EventWriter
from worker.retry import backoff, in_transaction, is_transient, stopped_within
from worker.schedule import Schedule, ScheduleError, leave_text, parse_leave, parse_shift, zone
from worker.settings import Settings
from worker.sql import Q

logger = log.get(__name__)
STATUSES = ("online", "away", "offline")
CHANNEL = "leadrouter_schedule"
DUE_BATCH = 50  # operators evaluated per round
# The longest the keeper sleeps without being woken or due (a lost notification, a
# schedule set on a database the keeper's LISTEN connection did not reach).
MAX_SLEEP_SECONDS = 5.0
MIN_SLEEP_SECONDS = 0.02

Row = dict[str, Any]
_KEEP: Any = object()  # a field `_change` leaves as it is


class UnknownOperator(UserError):
    """No operator with that id."""


@dataclass(frozen=True, slots=True)
class Changed:
    """What a change did."""

    operator: Row  # id, presence, shift, time_zone, leave, on_shift, on_leave, available
    event: bool  # operator.presence_changed written
    requeued: int  # open contacts handed back
    assigned: int  # queued contacts assigned by routing the backlog after it
    offers_moved: int = 0  # pending offers taken back and routed on


def check_status(status: str) -> str:
    if status not in STATUSES:
        raise UserError(f"unknown status {status!r}; choose one of {', '.join(STATUSES)}")
    return status


async def set_presence(
    pool: asyncpg.Pool, operator_id: int, status: str, reason: str, requeue_open: bool = False
) -> Changed:
    """Set an operator's presence (reason: message or cli)."""
    check_status(status)
    return await in_transaction(
        pool,
        lambda conn: _change(conn, operator_id, reason, presence=status, requeue_open=requeue_open),
    )


async def set_shift(
    pool: asyncpg.Pool, operator_id: int, shift: str | None, time_zone: str | None
) -> Changed:
    """Set (or with None, clear) an operator's weekly shift in an IANA zone."""
    text = parse_shift(shift).text if shift is not None else None
    tz = None
    if time_zone is not None:
        zone(time_zone)
        tz = time_zone
    if text is not None and tz is None:
        raise UserError("a shift needs its time zone: --tz, e.g. --tz Europe/Berlin")
    result = await in_transaction(
        pool, lambda conn: _change(conn, operator_id, "cli", shift=text, time_zone=tz)
    )
    return result


async def set_leave(
    pool: asyncpg.Pool, operator_id: int, ranges: Iterable[str], clear: bool = False
) -> Changed:
    """Add leave ranges to an operator's (or, with clear, remove them all first)."""
    added = [leave for text in ranges for leave in parse_leave(text)]

    def update(current: str | None) -> str | None:
        old = [] if clear or not current else parse_leave(current)
        return leave_text(old + added)

    return await in_transaction(pool, lambda conn: _change(conn, operator_id, "cli", leave=update))


async def set_schedule(
    conn: asyncpg.Connection, operator_id: int, fields: dict[str, str | None]
) -> Changed:
    """Set schedule columns (`shift`, `time_zone`, `leave`, already checked) in the
    caller's transaction: `leadrouter apply`."""
    leave = fields.get("leave", _KEEP)
    return await _change(
        conn,
        operator_id,
        "cli",
        shift=fields.get("shift", _KEEP),
        time_zone=fields.get("time_zone", _KEEP),
        leave=_KEEP if leave is _KEEP else (lambda _old: leave),
    )


async def apply_message(
    conn: asyncpg.Connection, operator_id: int, status: str, requeue_open: bool
) -> Changed:
    """An `operator.presence` message, in the caller's transaction; UnknownOperator if
    there is no such operator."""
    return await _change(conn, operator_id, "message", presence=status, requeue_open=requeue_open)


def describe(row: asyncpg.Record | Row, now: datetime | None = None) -> Row:
    """An operator's presence and schedule as shown: status now included."""
    schedule = _schedule(row)
    status = schedule.at(now or datetime.now(UTC))
    return {
        "presence": row["presence"],
        "shift": row["shift"],
        "time_zone": row["time_zone"],
        "leave": row["leave"],
        "on_shift": status.on_shift,
        "on_leave": status.on_leave,
        "available": bool(row["is_active"]) and row["presence"] == "online" and status.scheduled,
    }


def _schedule(row: asyncpg.Record | Row) -> Schedule:
    try:
        return Schedule.of(row["shift"], row["time_zone"], row["leave"])
    except ScheduleError:  # stored by an older version: treat as no schedule, and say so
        logger.warning("schedule_unreadable", operator_id=row["id"])
        return Schedule(None, None, [])


async def _change(
    conn: asyncpg.Connection,
    operator_id: int,
    reason: str,
    *,
    presence: Any = _KEEP,
    shift: Any = _KEEP,
    time_zone: Any = _KEEP,
    leave: Any = _KEEP,
    requeue_open: bool = False,
    due_only: bool = False,
) -> Changed:
    """Change an operator's presence or schedule (fields left `_KEEP` stay; `leave` is
    a function of the stored leave, read under the lock), or with `due_only` re-evaluate
    their schedule if it is due; in the caller's transaction."""
    scope = await conn.fetchval(Q.operator_scope, operator_id)
    if scope is None:
        raise UnknownOperator(f"no operator with id {operator_id}")
    sources = set(scope)
    await distribution.lock_sources(conn, sources)
    old = await conn.fetchrow(Q.lock_operator_availability, operator_id)
    now = datetime.now(UTC)
    if due_only and (old["schedule_due_at"] is None or old["schedule_due_at"] > now):
        return Changed(describe(old, now), False, 0, 0)  # another worker did it
    new = {
        "presence": old["presence"] if presence is _KEEP else presence,
        "shift": old["shift"] if shift is _KEEP else shift,
        "time_zone": old["time_zone"] if time_zone is _KEEP else time_zone,
        "leave": old["leave"] if leave is _KEEP else leave(old["leave"]),
    }
    if shift is not _KEEP and shift is None and time_zone is _KEEP:
        new["time_zone"] = None  # a cleared shift takes its zone with it
    schedule = _schedule({**new, "id": operator_id})
    status = schedule.at(now)
    available = await conn.fetchval(
        Q.set_operator_availability,
        operator_id,
        new["presence"],
        new["shift"],
        new["time_zone"],
        new["leave"],
        status.scheduled,
        status.next_change,
    )
    events = EventWriter()
    event = new["presence"] != old["presence"] or status.scheduled != old["scheduled"]
    if event:
        if due_only:
            before = _schedule(old).at(old["schedule_due_at"] - timedelta(microseconds=1))
            reason = "leave" if before.on_leave != status.on_leave else "shift"
        events.presence_changed(
            now,
            {
                "operator_id": operator_id,
                "status": new["presence"],
                "available": available,
                "on_shift": status.on_shift,
                "on_leave": status.on_leave,
                "reason": reason,
            },
        )
    requeued = 0
    if not available:
        requeued = await _became_unavailable(conn, operator_id, sources, requeue_open, events)
    await events.write(conn, lease=None)
    moved = assigned = 0
    if not available:
        why = f"operator {new['presence']}"
        if not old["is_active"]:
            why = "operator inactive"
        elif new["presence"] == "online":
            why = "operator on leave" if status.on_leave else "operator off shift"
        moved, assigned = await _move_offers_on(conn, operator_id, sources, why)
    if shift is not _KEEP or leave is not _KEEP:
        await conn.execute(Q.notify_schedule)
    if not moved:  # moving offers on routed these backlogs already
        assigned = (await distribution.drain_sources(conn, sources)).total() if sources else 0
    row = {"id": operator_id, "name": old["name"], "is_active": old["is_active"], **new}
    if event or requeued:
        logger.info(
            "operator_presence_changed",
            operator_id=operator_id,
            status=new["presence"],
            available=available,
            reason=reason,
            requeued=requeued,
            offers_moved=moved,
            assigned=assigned,
        )
    return Changed(describe(row, now) | {"id": operator_id}, event, requeued, assigned, moved)


async def _became_unavailable(
    conn: asyncpg.Connection,
    operator_id: int,
    sources: set[int],
    requeue_open: bool,
    events: EventWriter,
) -> int:
    """What an operator no longer taking work entails, under the locks of `sources`:
    with `requeue_open`, their open contacts of those sources go back to the queue
    (`contact.requeued`), to be routed by the caller's drain in their old place (their
    pending offers move on after this change's events are written: `_move_offers_on`).
    Returns how many contacts were handed back."""
    if not requeue_open:
        return 0
    rows = await conn.fetch(Q.requeue_open_contacts, operator_id, sorted(sources))
    for row in rows:
        events.requeued(row, operator_id)
    return len(rows)


async def _move_offers_on(
    conn: asyncpg.Connection, operator_id: int, sources: set[int], why: str
) -> tuple[int, int]:
    """An operator who no longer takes work declines their pending offers (`why` is the
    decline's reason), under the locks of `sources`: each is offered at once to the next
    operator, or queued, as the whole backlog of `sources` is routed. Returns how many
    were taken back, and how many queued contacts that routing assigned."""
    pending = await conn.fetch(Q.pending_offers_of, operator_id, sorted(sources))
    if not pending:
        return 0, 0
    outcome = await distribution.take_back_offers(
        conn, sources, [r["id"] for r in pending], "declined", why
    )
    return len(outcome.withdrawn), outcome.assignments.total()


# --- the schedule keeper --------------------------------------------------------------


async def run_due(pool: asyncpg.Pool, limit: int = DUE_BATCH) -> int:
    """Evaluate the operators whose schedule is due, each in its own transaction; those
    another worker holds are skipped. Returns how many were evaluated."""
    done = 0
    for row in await pool.fetch(Q.due_schedules, limit):

        async def evaluate(conn: asyncpg.Connection, operator_id: int = row["id"]) -> bool:
            if not await conn.fetchval(Q.try_lock_schedule, operator_id):
                return False
            await _change(conn, operator_id, "shift", due_only=True)
            return True

        if await in_transaction(pool, evaluate):
            done += 1
    return done


class ScheduleKeeper:
    """The side task that applies shift and leave boundaries as they come (see the
    module's docstring), and keeps the available-operators gauge."""

    def __init__(self, pool: asyncpg.Pool, settings: Settings, metrics: Metrics) -> None:
        self._pool = pool
        self._settings = settings
        self._metrics = metrics
        self._wake = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        listener = asyncio.create_task(
            keep_listening(
                self._settings.database_url,
                CHANNEL,
                self._wake,
                stop,
                self._settings.retry_max_seconds,
                "schedule",
            )
        )
        try:
            attempt = 0
            while not stop.is_set():
                try:
                    while await run_due(self._pool) == DUE_BATCH:
                        pass
                    await self._gauge()
                    due = await self._pool.fetchval(Q.next_schedule_due)
                    attempt = 0
                except Exception as exc:
                    attempt += 1
                    if not is_transient(exc):
                        logger.exception("schedule_failed")
                    await stopped_within(stop, backoff(attempt, self._settings.retry_max_seconds))
                    continue
                sleep = MAX_SLEEP_SECONDS
                if due is not None:
                    # Not below a floor: a due operator another worker is evaluating
                    # right now stays due until it commits.
                    wait = (due - datetime.now(UTC)).total_seconds()
                    sleep = min(sleep, max(wait, MIN_SLEEP_SECONDS))
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(_first(stop, self._wake), sleep)
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener

    async def _gauge(self) -> None:
        for r in await self._pool.fetch(Q.available_operators_per_source):
            self._metrics.available_operators.labels(r["source"]).set(r["available"])


async def _first(*events: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
