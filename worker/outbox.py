"""The outbox, its one owner: writing events in the routing transaction (EventWriter),
publishing and claiming them (OutboxRelay), and pruning the published ones.

The relay publishes committed events with publisher confirms, and marks them published
only after the broker confirmed them.

Two ways in. The worker hands over the events it has just committed (leased, so no other
relay takes them meanwhile): they are published at once, without a claim round trip.
Everything else (admin actions, leases that lapsed because a worker died or the broker
was away) is claimed from the table, woken by NOTIFY or a sweep timer; several relays
share it safely (FOR UPDATE SKIP LOCKED), and a relay killed mid-batch leaves its
events to be claimed again."""

import asyncio
import contextlib
import json
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

import aiormq
import aiormq.abc
import asyncpg
from aio_pika.abc import AbstractChannel
from aiormq import spec

from schemas.events import envelope, operator_envelope
from worker import history, log
from worker.assignment import Assignment
from worker.listen import keep_listening
from worker.metrics import Metrics
from worker.retry import backoff, is_transient, read_only
from worker.settings import Settings
from worker.sql import Q

logger = log.get(__name__)
CHANNEL = "leadrouter_outbox"
# Events published from memory are marked published together, at most this long after
# their confirm: at low load one UPDATE per event would cost more than its publish.
MARK_DELAY_SECONDS = 0.05
PRUNE_BATCH = 5000  # rows looked at per statement
# From this many events written for the relays (no lease), by COPY rather than INSERT.
COPY_FROM = 1000


@dataclass(frozen=True, slots=True)
class Event:
    """An outbox row as written, for its writer to publish after commit."""

    id: int  # the outbox row
    event_id: str
    routing_key: str
    payload: str


class EventWriter:
    """Writes the outbox rows of one transaction: the routing transaction reports each
    state change here. The rows are kept in the order their state changes happened
    (closes before the assignments they made room for), written in one statement after
    every operator row is locked: outbox order is then commit order per operator.

    With history on, each contact event also carries its decision (`history.detail`),
    written to `contact_decisions` by the same statement; `routing` holds what routing
    decided each contact on (worker/decisions.py), by contact id."""

    def __init__(self) -> None:
        # event id, contact id, routing key, payload, attempt, decision (or None)
        self.rows: list[tuple[uuid.UUID, int | None, str, str, int, str | None]] = []
        self.derived_ids = False  # some event ids may have been written before
        self.recording = history.recording()
        self.routing: dict[int, dict[str, Any]] = {}

    def closed(self, row: asyncpg.Record) -> None:
        self._add(
            "contact.closed",
            row["closed_at"],
            _data(row, "closed", row["lead_external_id"], row["source_key"], row["operator_id"]),
        )

    def assigned(
        self,
        row: asyncpg.Record,
        lead_external_id: str,
        source_key: str,
        a: Assignment,
        attempt: int = 0,
    ) -> None:
        waited = max((row["assigned_at"] - row["created_at"]).total_seconds(), 0.0)
        data = _data(
            row,
            "open",
            lead_external_id,
            source_key,
            a.operator_id,
            queued_seconds=round(waited, 3),
            affinity=a.affinity,
        )
        if attempt:  # accepted: which offer it was
            data["attempt"] = attempt
        self._add("contact.assigned", row["assigned_at"], data, attempt)

    def offer_event(
        self,
        key: str,
        row: asyncpg.Record,
        time: datetime,
        lead_external_id: str,
        source_key: str,
        operator_id: int | None,
        attempt: int | None,
        event_id: uuid.UUID | None = None,
        status: str = "open",
        **extra: Any,
    ) -> None:
        """An event of a source that makes offers (worker/offers.py): offered, declined,
        expired, queued again, or an answer rejected (with `event_id` given)."""
        data = _data(row, status, lead_external_id, source_key, operator_id)
        if attempt is not None:
            data["attempt"] = attempt
        data.update(extra)
        self._add(key, time, data, attempt or 0, event_id)

    def queued(self, row: asyncpg.Record, lead_external_id: str, source_key: str) -> None:
        self._add(
            "contact.queued",
            row["created_at"],
            _data(row, "open", lead_external_id, source_key, None),
        )

    def waiting(
        self, row: asyncpg.Record, source_key: str, time: datetime, queued_seconds: float
    ) -> None:
        """contact.waiting: still queued after the source's alert time (timers.py)."""
        data = _data(row, "open", row["lead_external_id"], source_key, None, queued_seconds)
        self._add("contact.waiting", time, data)

    def overflowed(
        self, row: asyncpg.Record, source_key: str, time: datetime, target_key: str
    ) -> None:
        """contact.overflowed: may also go to `target_key`'s operators now (timers.py)."""
        data = _data(row, "open", row["lead_external_id"], source_key, None)
        self._add("contact.overflowed", time, {**data, "overflow_to": target_key})

    def requeued(self, row: asyncpg.Record, operator_id: int) -> None:
        """An open contact handed back by its operator (worker/availability.py): queued
        again, routed as if new in its old place."""
        data = _data(row, "open", row["lead_external_id"], row["source_key"], None)
        data["requeued_from"] = operator_id
        self._add("contact.requeued", row["requeued_at"], data)

    def presence_changed(self, time: datetime, data: dict[str, Any]) -> None:
        """An operator's presence or schedule changed (worker/availability.py)."""
        key = "operator.presence_changed"
        event_id = uuid.uuid4()
        payload = json.dumps(operator_envelope(str(event_id), key, time, data))
        self.rows.append((event_id, None, key, payload, 0, None))

    def _add(
        self,
        key: str,
        time: datetime,
        data: dict[str, Any],
        attempt: int = 0,
        event_id: uuid.UUID | None = None,
    ) -> None:
        self.derived_ids = self.derived_ids or event_id is not None
        event_id = event_id or uuid.uuid4()
        payload = json.dumps(envelope(str(event_id), key, time, data))
        decision = history.detail(key, data, self.routing) if self.recording else None
        self.rows.append((event_id, data["contact_id"], key, payload, attempt, decision))

    async def write(self, conn: asyncpg.Connection, lease: float | None) -> list[Event]:
        if not self.rows:
            return []
        if lease is None and len(self.rows) >= COPY_FROM and not self.derived_ids:
            # Many rows for the relays (offers expired in bulk): COPY, half the time of
            # the INSERT, and nothing to hand back.
            await conn.copy_records_to_table(
                "outbox",
                records=[r[:5] for r in self.rows],
                columns=["event_id", "contact_id", "routing_key", "payload", "attempt"],
            )
            if self.recording:
                columns = list(map(list, zip(*self.rows, strict=True)))
                await conn.execute(Q.insert_decisions, *columns[1:3], columns[5])
            await conn.execute(Q.notify_outbox)
            return []
        columns = list(map(list, zip(*self.rows, strict=True)))
        decided = columns[5] if self.recording else []
        written = await conn.fetch(Q.insert_events, *columns[:4], lease, columns[4], decided)
        if lease is None:
            await conn.execute(Q.notify_outbox)
        ids = {str(r["event_id"]): r["id"] for r in written}
        # An event id written before (a rejected answer that came again) is not written
        # twice, nor published again by this writer.
        return [
            Event(ids[str(e)], str(e), key, payload)
            for e, _, key, payload, *_ in self.rows
            if str(e) in ids
        ]


def _data(
    row: asyncpg.Record,
    status: str,
    lead_external_id: str,
    source_key: str,
    operator_id: int | None,
    queued_seconds: float | None = None,
    affinity: bool = False,
) -> dict[str, Any]:
    """An event's `data` (schemas.events.ContactEventData) from a contact row."""
    return {
        "contact_id": row["id"],
        "status": status,
        "lead_id": row["lead_id"],
        "lead_external_id": lead_external_id,
        "source": source_key,
        "operator_id": operator_id,
        "inbound_message_id": row["inbound_message_id"],
        "queued_seconds": queued_seconds,
        "affinity": affinity,
    }


class OutboxRelay:
    def __init__(
        self, pool: asyncpg.Pool, channel: AbstractChannel, settings: Settings, metrics: Metrics
    ):
        self._pool = pool
        self._channel = channel  # with publisher confirms
        self._settings = settings
        self._metrics = metrics
        self._wake = asyncio.Event()  # rows to claim
        self._committed: deque[Event] = deque()  # leased rows to publish directly
        self._has_committed = asyncio.Event()
        self._publishing = 0  # batches of committed events in flight
        self._confirmed: list[int] = []  # their outbox ids once confirmed, to mark
        self._has_confirmed = asyncio.Event()
        self._marking = asyncio.Lock()
        # Beyond this many waiting (the broker slower than the database), the consumer
        # waits before its next batch, rather than leave committed events to wait for
        # their lease. A soft limit: the batches already running still add theirs.
        self._max_waiting = 10 * settings.outbox_batch
        self._room = asyncio.Event()
        self._room.set()
        self._stopping = False  # the publishing loops are gone: drain() publishes the rest

    def wake(self) -> None:
        self._wake.set()

    def committed(self, events: Sequence[Event]) -> None:
        """Events this process has just committed under a lease: published next."""
        if not events:
            return
        self._committed.extend(events)
        self._has_committed.set()
        if len(self._committed) >= self._max_waiting and not self._stopping:
            self._room.clear()

    async def room(self) -> None:
        """Returns once few enough committed events wait to be published (backpressure
        for the consumer)."""
        await self._room.wait()

    async def _publish_committed(self) -> None:
        """Publish what `committed` handed over, many confirms in flight; a failure leaves
        the batch leased, to be claimed once the lease lapses."""
        while True:  # until run() ends; what is committed after that, drain() publishes
            if not self._committed:
                self._has_committed.clear()
                await self._has_committed.wait()
                continue
            # Shielded: a batch taken off the queue is finished even if this loop is
            # cancelled at shutdown; drain() waits for it.
            await asyncio.shield(self._publish_some_committed())

    async def _publish_some_committed(self) -> None:
        take = min(len(self._committed), self._settings.outbox_batch)
        batch = [self._committed.popleft() for _ in range(take)]
        if len(self._committed) < self._max_waiting:
            self._room.set()
        self._publishing += 1
        try:
            channel = await self._channel.get_underlay_channel()
            await asyncio.gather(
                *(self._publish(channel, e.event_id, e.routing_key, e.payload) for e in batch)
            )
            self._confirmed.extend(e.id for e in batch)
            self._has_confirmed.set()
            self._metrics.events_published.inc(len(batch))
        except Exception as exc:
            logger.warning("outbox_publish_deferred", error=type(exc).__name__, count=len(batch))
        finally:
            self._publishing -= 1

    async def _mark_confirmed(self) -> None:
        """Mark what was published from memory, many events per statement. Until then a
        row stays leased; if its worker dies first, it is published again once the lease
        lapses (at least once: consumers de-duplicate by event id)."""
        while True:
            await self._has_confirmed.wait()
            await asyncio.sleep(MARK_DELAY_SECONDS)
            if not await asyncio.shield(self._mark()):  # PostgreSQL away: later
                await asyncio.sleep(self._settings.retry_max_seconds)

    async def _mark(self) -> bool:
        async with self._marking:
            self._has_confirmed.clear()
            ids, self._confirmed = self._confirmed, []
            if not ids:
                return True
            try:
                await self._pool.execute(Q.mark_events_published, ids)
            except Exception as exc:
                logger.warning("outbox_mark_failed", error=type(exc).__name__, count=len(ids))
                self._confirmed.extend(ids)
                self._has_confirmed.set()
                return False
            return True

    async def publish_pending(self) -> int:
        """Publish one batch of pending events; returns how many."""
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(Q.claim_pending_events, self._settings.outbox_batch)
            if not rows:
                return 0
            channel = await self._channel.get_underlay_channel()
            await asyncio.gather(
                *(
                    self._publish(channel, str(r["event_id"]), r["routing_key"], r["payload"])
                    for r in rows
                )
            )
            await conn.execute(Q.mark_events_published, [r["id"] for r in rows])
        self._metrics.events_published.inc(len(rows))
        logger.debug("events_published", count=len(rows))
        return len(rows)

    async def _publish(
        self, channel: aiormq.abc.AbstractChannel, event_id: str, routing_key: str, payload: str
    ) -> None:
        properties = spec.Basic.Properties(
            message_id=event_id,
            content_type="application/cloudevents+json",
            delivery_mode=2,  # persistent
            message_type=routing_key,
        )
        # Not mandatory: an event nobody subscribed to yet is not an error. Through
        # aiormq directly: aio-pika's Message objects cost more than the publish itself.
        await cast(aiormq.Channel, channel).basic_publish(  # the concrete one takes `wait`
            payload.encode(),
            exchange=self._settings.events_exchange,
            routing_key=routing_key,
            properties=properties,
            wait=False,  # for the confirm only, not for each frame's write (see amqp_writes)
        )

    async def drain(self) -> None:
        """Publish until nothing is pending (at shutdown: what was committed, then what
        can be claimed)."""
        while self._committed:
            await self._publish_some_committed()
        while self._publishing:  # noqa: ASYNC110 (once, at shutdown)
            await asyncio.sleep(0.01)
        await self._mark()
        await self._drain_claimed()

    async def _drain_claimed(self) -> None:
        while await self.publish_pending() == self._settings.outbox_batch:
            pass

    async def run(self, stop: asyncio.Event) -> None:
        """Publish what this worker commits as it comes; claim what others notify us of,
        and sweep on a timer for what a crash, a lapsed lease or a lost notification left
        behind."""
        helpers = [
            asyncio.create_task(
                keep_listening(
                    self._settings.database_url,
                    CHANNEL,
                    self._wake,
                    stop,
                    self._settings.retry_max_seconds,
                    "outbox",
                )
            ),
            asyncio.create_task(self._mark_confirmed()),
        ] + [
            asyncio.create_task(self._publish_committed())
            for _ in range(self._settings.outbox_concurrency)
        ]
        died: list[BaseException] = []  # a helper that ends before stop ends the relay

        def helper_done(task: asyncio.Task[None]) -> None:
            error = None if task.cancelled() else task.exception()
            if error is not None and not stop.is_set():
                died.append(error)
                self._wake.set()

        for helper in helpers:
            helper.add_done_callback(helper_done)
        attempt = 0
        try:
            while not stop.is_set():
                if died:
                    raise died[0]
                self._wake.clear()
                try:
                    # One claim first; when it comes back full, several at once (SKIP
                    # LOCKED keeps them apart), as one relay waiting for confirms would
                    # otherwise set the pace under load.
                    if await self.publish_pending() == self._settings.outbox_batch:
                        await asyncio.gather(
                            *(
                                self._drain_claimed()
                                for _ in range(self._settings.outbox_concurrency)
                            )
                        )
                    attempt = 0
                except Exception as exc:
                    if not is_transient(exc):
                        logger.exception("outbox_relay_failed")
                    else:
                        logger.warning("outbox_relay_retrying", error=type(exc).__name__)
                    if read_only(exc):  # connected to a standby: new connections
                        await self._pool.expire_connections()
                    attempt += 1
                    await asyncio.sleep(backoff(attempt, self._settings.retry_max_seconds))
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self._wake.wait(), timeout=self._settings.outbox_sweep_seconds
                    )
        finally:
            # Stopping: the consumer finishes its in-flight and buffered messages (it
            # takes no new ones) without waiting for room, and drain() publishes them.
            self._stopping = True
            self._room.set()
            for task in helpers:
                task.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)


async def prune_outbox(pool: asyncpg.Pool, retention_hours: float) -> int:
    """Delete published events older than the retention; returns how many."""
    total = 0
    while True:
        status = await pool.execute(Q.prune_published_events, retention_hours, PRUNE_BATCH)
        deleted = int(status.split()[-1])  # "DELETE n"
        total += deleted
        if deleted < PRUNE_BATCH:
            return total
