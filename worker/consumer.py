"""Consumes inbound messages in micro-batches. Deliveries go into a buffer; each batcher
takes what the buffer holds (up to `batch_size`, so a batch of one at low load and no
added wait) and routes it in one transaction. The ack / dead-letter / retry decision is
taken in one place, `_settle`, from the outcome of handling each message."""

import asyncio
import contextlib
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import aio_pika
import aiormq
import asyncpg
from aio_pika.abc import AbstractExchange
from aiormq.abc import DeliveredMessage

from schemas.inbound import (
    ContactAccept,
    ContactClose,
    ContactDecline,
    LeadContact,
    OperatorPresence,
)
from worker import amqp_reads, availability, distribution, log, offers
from worker.decode import Inbound, decode, shown_routing_key
from worker.dlq import OUR_PREFIX, replayable
from worker.errors import ERROR_HEADER, REASON_HEADER, DeadLetter, Reason
from worker.health import Readiness
from worker.metrics import Metrics
from worker.outbox import OutboxRelay
from worker.republish import properties_of, republished
from worker.retry import backoff, is_transient, read_only
from worker.settings import Settings, split_urls

logger = log.get(__name__)
T = TypeVar("T")
PARALLEL_BELOW = 10  # messages in flight or waiting (see Consumer._batcher)
# How long a refused dead letter beyond those held for retrying waits before it goes back
# to the queue (or LEADROUTER_RETRY_MAX_SECONDS if shorter): see _defer_dead_letter.
HAND_BACK_PAUSE_SECONDS = 1.0
# The quorum queue's count of a message's earlier deliveries (returned unacked, by a
# nack or because the channel or worker went away).
DELIVERY_COUNT_HEADER = "x-delivery-count"
# How often the handler failed on a message (a bug), carried on the copies the worker
# publishes itself (see Consumer._settle); trusted only on messages published under the
# worker's own RabbitMQ user, which the broker checks (the user-id property).
FAILURES_HEADER = "x-leadrouter-failures"
# The names of the properties the client could not decode on the message a copy
# replaces (worker/amqp_reads.py leaves them out, so the copy would decode clean):
# trusted as FAILURES_HEADER is, and dead-letters the copy as invalid_properties.
UNDECODABLE_HEADER = "x-leadrouter-undecodable"


@dataclass
class _Delivery:
    message: DeliveredMessage
    channel: Any  # the aiormq channel it came on
    arrived: float
    inbound: Inbound | None = None
    failure: BaseException | None = None  # None once handled: ack
    decided: bool = False  # acked, held or handed back: nothing more to do


@dataclass
class _ChannelAcks:
    busy: set[int] = field(default_factory=set)  # delivered, not decided yet
    done: set[int] = field(default_factory=set)  # to ack
    held: set[int] = field(default_factory=set)  # left unacked on purpose: not acked here


class _AckWindow:
    """Acks many deliveries in one frame. basic.ack multiple=True acks every delivery of
    the channel up to a tag that is still unacknowledged, so it may only reach up to the
    oldest delivery still being handled, and never over one left unacked on purpose (for
    the broker to redeliver): those after such a one are acked one by one. Per channel,
    because delivery tags start again on a channel reopened after a reconnect."""

    def __init__(self) -> None:
        self._channels: dict[Any, _ChannelAcks] = {}

    def delivered(self, d: _Delivery) -> None:
        self._of(d).busy.add(self._tag(d))

    async def hold(self, d: _Delivery) -> None:
        """Left unacked so that the broker redelivers it when the channel closes."""
        state = self._of(d)
        state.busy.discard(self._tag(d))
        state.held.add(self._tag(d))
        await self._flush(d.channel)  # what waited behind it may be acked now

    async def released(self, d: _Delivery) -> None:
        """A nack was sent: the broker no longer counts it as ours."""
        state = self._of(d)
        state.busy.discard(self._tag(d))
        state.held.discard(self._tag(d))
        await self._flush(d.channel)

    async def ack_alone(self, d: _Delivery) -> None:
        """Ack this one delivery now, whatever is still in flight before it (a message
        replaced by its copy, a held dead letter the broker took at last)."""
        state = self._channels.get(d.channel)
        if state is not None:
            state.busy.discard(self._tag(d))
            state.held.discard(self._tag(d))
        if d.channel.is_closed:  # it went back to the queue with the channel
            return
        try:
            await d.channel.basic_ack(self._tag(d), wait=False)
        except Exception as exc:
            logger.warning("ack_failed", error=type(exc).__name__, count=1)
        await self._flush(d.channel)

    async def ack(self, deliveries: Sequence[_Delivery]) -> None:
        for d in deliveries:
            state = self._of(d)
            state.busy.discard(self._tag(d))
            state.done.add(self._tag(d))
        for channel in {d.channel for d in deliveries}:
            await self._flush(channel)

    async def _flush(self, channel: Any) -> None:
        """Ack what is done on this channel and no longer waits behind a delivery still
        being handled: called whenever a delivery stops being busy."""
        state = self._channels.get(channel)
        if state is None:
            return
        if channel.is_closed:  # its deliveries are back in the queue: forget them
            del self._channels[channel]
            return
        limit = min(state.busy, default=None)
        ready = sorted(t for t in state.done if limit is None or t < limit)
        if not ready:
            return
        first_held = min(state.held, default=None)
        together = [t for t in ready if first_held is None or t < first_held]
        alone = [t for t in ready if first_held is not None and t > first_held]
        state.done.difference_update(ready)
        try:
            # Queued for the connection's writer, not waited for: the next batch starts
            # at once, and its events' writes may share the ack's. An ack still queued
            # when the connection drops is lost like one in flight: the redelivery finds
            # the work done.
            if together:
                await channel.basic_ack(together[-1], multiple=True, wait=False)
            for tag in alone:
                await channel.basic_ack(tag, wait=False)
        except Exception as exc:
            # The channel was lost after commit: redeliveries find the work done.
            logger.warning("ack_failed", error=type(exc).__name__, count=len(ready))

    def _of(self, d: _Delivery) -> _ChannelAcks:
        return self._channels.setdefault(d.channel, _ChannelAcks())

    @staticmethod
    def _tag(d: _Delivery) -> int:
        return d.message.delivery_tag or 0


class Consumer:
    def __init__(
        self,
        pool: asyncpg.Pool,
        dead_exchange: AbstractExchange,
        settings: Settings,
        metrics: Metrics,
        relay: OutboxRelay,
        declare_topology: Callable[[], Awaitable[object]],
        inbound_exchange: AbstractExchange | None = None,
        readiness: Readiness | None = None,
    ):
        # Where fresh copies of a message go (same routing key): see _refresh and _settle.
        self._inbound = inbound_exchange
        self._readiness = readiness or Readiness()
        self._relay = relay  # publishes the events each batch commits
        self._declare_topology = declare_topology  # again, when something was deleted
        self._pool = pool
        self._dead = dead_exchange
        self._settings = settings
        self._metrics = metrics
        self.outcomes: Counter[str] = Counter()
        self.stopping = False
        self._buffer: deque[_Delivery] = deque()
        self._arrived = asyncio.Event()
        self._in_flight = 0  # messages in the batches being handled
        self._batchers: list[asyncio.Task[None]] = []
        self._acks = _AckWindow()
        # Dead letters the broker refused (the dead-letter queue full, with
        # reject-publish, or gone), oldest first: held unacked and retried by
        # _retry_dead_letters while the batches go on. Together with the refused ones
        # beyond them, which wait out a pause before going back to the queue, they hold
        # at most half the prefetch window: a quarter each (at least one).
        self._refused: deque[tuple[_Delivery, DeadLetter]] = deque()
        half = max(1, settings.prefetch // 2)
        self._max_refused = max(1, half // 2)
        self._pause_slots = max(1, half - self._max_refused)
        self._pausing = asyncio.Semaphore(self._pause_slots)
        self._paused = 0  # refused dead letters waiting out the pause now
        self._pause_seconds = min(HAND_BACK_PAUSE_SECONDS, settings.retry_max_seconds)
        self._side_tasks: set[asyncio.Task[None]] = set()
        self._retrier: asyncio.Task[None] | None = None
        # Sources a committed batch freed capacity for, routed by one task at a time.
        self._undrained: set[int] = set()
        self._drainer: asyncio.Task[None] | None = None
        # A copy is published before a message's delivery count reaches the limit.
        self._refresh_at = max(1, settings.delivery_limit // 2)
        # Copies carry counts that are trusted under our RabbitMQ user only, so they need
        # one named in the URL (the broker's default, guest, is everybody's): without
        # one, no copies, and the broker's delivery limit is all there is.
        username = urlsplit(split_urls(settings.amqp_url)[0]).username
        self._user = unquote(username) if username else None
        # Publishes in flight by message id: aiormq matches a returned publish to its
        # confirmation by message id, so two with one id must never be in flight at once.
        self._publishing: dict[str, _IdLock] = {}

    def start(self) -> None:
        self._batchers = [
            asyncio.create_task(self._batcher(), name=f"batcher-{n}")
            for n in range(self._settings.concurrent_batches)
        ]

    async def on_message(self, message: DeliveredMessage) -> None:
        """Called by aiormq for each delivery; returns at once. aiormq's own delivery
        object: aio-pika's wrapper and its extra task per message cost more than the
        rest of the intake (measured with py-spy under `leadrouter bench`)."""
        d = _Delivery(message, message.channel, time.perf_counter())
        self._acks.delivered(d)
        if not self.stopping and self._worn(d):
            self._spawn(self._refresh(d))
            return
        self._buffer.append(d)
        self._arrived.set()

    async def drain(self, grace: float) -> int:
        """Let the buffered and in-flight messages finish within `grace` seconds, then
        stop the batchers. Returns how many were abandoned (unacked: the broker
        redelivers them)."""
        deadline = time.monotonic() + grace
        # Two conditions, polled briefly at shutdown only.
        while (self._buffer or self._in_flight) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        self.stopping = True
        abandoned = len(self._buffer) + self._in_flight + len(self._refused) + self._paused
        side = [*self._side_tasks, *([self._retrier] if self._retrier else [])]
        for task in [*self._batchers, *side]:
            task.cancel()
        if self._batchers or side:
            await asyncio.wait(
                [*self._batchers, *side], timeout=max(deadline - time.monotonic(), 1)
            )
        self._buffer.clear()
        self._refused.clear()  # unacked: the broker redelivers them
        return abandoned

    async def _batcher(self) -> None:
        size, linger = self._settings.batch_size, self._settings.batch_linger_seconds
        while True:
            await self._relay.room()  # while the broker lags behind, take nothing more
            # Another transaction starts beside running ones only while they hold few
            # messages and few wait: at low load a message is not held behind another's
            # transaction, and under load one transaction at a time takes full batches,
            # which measured faster (batches of many sources overlap on their locks).
            if not self._buffer or (
                self._in_flight and max(self._in_flight, len(self._buffer)) >= PARALLEL_BELOW
            ):
                self._arrived.clear()
                await self._arrived.wait()
                continue
            if linger and len(self._buffer) < size:
                await asyncio.sleep(linger)
            batch = [self._buffer.popleft() for _ in range(min(size, len(self._buffer)))]
            self._in_flight += len(batch)
            try:
                await self._handle(batch)
            except Exception:
                # Never lose a batcher: hand back what was not settled yet (the delivery
                # limit catches a message that keeps doing this) and carry on.
                logger.exception("batch_crashed", size=len(batch))
                for d in batch:
                    if not d.decided:
                        await self._hand_back(d)
            finally:
                self._in_flight -= len(batch)

    async def _handle(self, batch: list[_Delivery]) -> None:
        """One batch: decode each message, route the valid ones, then settle each (ack,
        dead-letter, or hand back), acking only after the routing committed."""
        self._decode(batch)
        valid = [d for d in batch if d.inbound is not None]
        cancelled = await self._route_valid(valid)
        if cancelled:
            # Shutting down past the grace: leave everything unacked for redelivery
            # (what committed is found done), publish nothing more.
            for d in batch:
                await self._hold(d, "deferred")
            raise asyncio.CancelledError
        to_ack = await asyncio.gather(*(self._settle(d) for d in batch))
        await self._acks.ack([d for d, ack in zip(batch, to_ack, strict=True) if ack])

    def _decode(self, batch: Sequence[_Delivery]) -> None:
        """Each message's inbound, or the dead letter that says why it has none."""
        for d in batch:
            try:
                d.inbound = decode(
                    d.message.body,
                    d.message.routing_key or "",
                    d.message.header.properties.message_id,
                    self._settings.max_message_bytes,
                    self._undecodable(d),
                )
            except DeadLetter as exc:
                d.failure = exc

    async def _route_valid(self, valid: list[_Delivery]) -> bool:
        """Route the decoded messages in one transaction, retrying transient failures;
        each message's failure is left on it. Returns whether we were cancelled."""
        if not valid:
            return False
        try:
            await self._retrying(lambda: self._route(valid))
        except asyncio.CancelledError as exc:
            for d in valid:
                d.failure = exc
            return True
        except Exception as exc:
            if len(valid) > 1 and not is_transient(exc):
                logger.warning("batch_failed_isolating", size=len(valid), error=type(exc).__name__)
                return await self._route_one_by_one(valid)
            for d in valid:
                d.failure = exc
        return False

    async def _route_one_by_one(self, valid: list[_Delivery]) -> bool:
        """A bug somewhere in the batch: one by one, so it cannot take the others down
        with it. Returns whether we were cancelled."""
        for n, d in enumerate(valid):
            try:
                await self._retrying(lambda d=d: self._route([d]))  # type: ignore[misc]
            except asyncio.CancelledError as stop:
                for rest in valid[n:]:
                    rest.failure = stop
                return True
            except Exception as single:
                d.failure = single
        return False

    async def _route(self, deliveries: Sequence[_Delivery]) -> None:
        """One transaction for the batch's messages; marks unknown sources and contacts
        as dead letters and leaves the rest handled. An `operator.presence` message is a
        barrier: what came before it is routed first, then it is applied in a transaction
        of its own, then what came after (an accept then going away keeps the accept)."""
        items: list[tuple[_Delivery, Inbound]] = []
        for d in deliveries:
            if d.inbound is None:
                continue
            if isinstance(d.inbound.body, OperatorPresence):
                if items:
                    await self._route_items(items, len(deliveries))
                    items = []
                await self._presence([(d, d.inbound)])
            else:
                items.append((d, d.inbound))
        if items:
            await self._route_items(items, len(deliveries))

    async def _route_items(self, items: Sequence[tuple[_Delivery, Inbound]], size: int) -> None:
        keys = {i.body.source for _, i in items if isinstance(i.body, LeadContact)}
        ids = {
            i.body.contact_id
            for _, i in items
            if isinstance(i.body, ContactClose | ContactAccept | ContactDecline)
        }
        async with self._pool.acquire() as conn, conn.transaction():
            scope = await distribution.read_scope(conn, keys, ids)
            new, closes, answers = [], [], []
            for d, inbound in items:
                d.failure = None
                body = inbound.body
                if isinstance(body, LeadContact):
                    if body.source in scope.unknown_sources:
                        # Not the key itself: the body holds it, and `dlq list` shows it.
                        d.failure = DeadLetter(
                            Reason.UNKNOWN_SOURCE, "no source with the body's source key"
                        )
                    else:
                        new.append(distribution.NewContact(inbound.message_id, body))
                elif (
                    isinstance(body, ContactClose | ContactAccept | ContactDecline)
                    and body.contact_id in scope.unknown_contacts
                ):
                    d.failure = DeadLetter(
                        Reason.UNKNOWN_CONTACT, "no contact with the body's contact_id"
                    )
                elif isinstance(body, ContactClose):
                    closes.append(body.contact_id)
                elif isinstance(body, ContactAccept | ContactDecline):
                    answers.append(_answer(inbound.message_id, body))
            outcome = await distribution.route(
                conn,
                scope,
                new,
                closes,
                lease=self._settings.outbox_lease_seconds,
                answers=answers,
            )
        self._relay.committed(outcome.events)
        if outcome.undrained:
            self._drain_later(outcome.undrained)
        for (source, strategy), count in outcome.assignments.items():
            self._metrics.assignments.labels(source, strategy).inc(count)
        logger.info(
            "batch_handled",
            size=size,
            contacts=len(outcome.contacts),
            assigned=len(outcome.assigned),
            late_assignments=outcome.late_assignments,
            closed=len(outcome.closed),
            duplicates=len(outcome.duplicates),
            **outcome.answered.counts(),
        )
        for d, inbound in items:
            if d.failure is None and isinstance(inbound.body, LeadContact):
                contact_id = outcome.contacts.get(inbound.message_id)
                logger.debug(
                    "message_handled",
                    message_id=inbound.message_id,
                    source=inbound.body.source,
                    contact_id=contact_id,
                    operator_id=outcome.assigned.get(contact_id) if contact_id else None,
                    duplicate=contact_id is None,
                )

    async def _presence(self, items: Sequence[tuple[_Delivery, Inbound]]) -> None:
        """`operator.presence` messages, each in a transaction of its own (a presence
        change locks the operator's sources); done again on a retry, which changes
        nothing the second time."""
        for d, inbound in items:
            body = inbound.body
            assert isinstance(body, OperatorPresence)
            d.failure = None
            try:
                async with self._pool.acquire() as conn, conn.transaction():
                    await availability.apply_message(
                        conn, body.operator_id, body.status, body.requeue_open
                    )
            except availability.UnknownOperator:
                d.failure = DeadLetter(
                    Reason.UNKNOWN_OPERATOR, "no operator with the body's operator_id"
                )

    async def _retrying(self, attempt_once: Callable[[], Awaitable[T]]) -> T:
        """Retry transient failures with backoff until they pass or we are stopping.
        Requeueing instead would count against the quorum queue's delivery limit."""
        attempt = 0
        while True:
            try:
                return await attempt_once()
            except Exception as exc:
                if not is_transient(exc) or self.stopping:
                    raise
                if read_only(exc):
                    await self._pool.expire_connections()
                attempt += 1
                delay = backoff(attempt, self._settings.retry_max_seconds)
                logger.warning(
                    "transient_failure",
                    error=type(exc).__name__,
                    attempt=attempt,
                    retry_in=round(delay, 3),
                )
                await asyncio.sleep(delay)

    def _count(self, outcome: str) -> None:
        self.outcomes[outcome] += 1
        self._metrics.messages.labels(outcome).inc()

    async def _settle(self, d: _Delivery) -> bool:
        """The one place that decides: returns True to ack (the caller acks many at
        once), dead-letters first when it must, or holds or hands the message back."""
        message, failure = d.message, d.failure
        message_id = message.header.properties.message_id
        try:
            if failure is None:
                self._count("ok")
                d.decided = True
                return True
            if isinstance(failure, DeadLetter):
                logger.warning(
                    "dead_lettered",
                    message_id=message_id,
                    routing_key=shown_routing_key(message.routing_key),
                    reason=str(failure.reason),
                    error=failure.detail,
                )
                if self._refused:  # the broker refuses dead letters: join the queue
                    await self._defer_dead_letter(d, failure)
                    return False
                try:
                    await self._publish_dead(message, failure)
                except Exception as exc:
                    # Never retried here: a dead-letter queue that refuses for hours
                    # must not stall the valid messages of this batch and the next.
                    self._dead_letter_failed(exc)
                    await self._defer_dead_letter(d, failure)
                    return False
                self._dead_lettered(failure)
                d.decided = True
                return True
            if is_transient(failure):
                # Shutting down: unacked, the broker redelivers it; nothing was committed.
                await self._hold(d, "deferred")
                return False
            # A bug. We count the failures ourselves, on a copy (see _refresh: the
            # broker's count also grows with every worker restart, so it cannot tell a
            # bug from a valid message waiting out a stall). Below the limit the copy
            # replaces the message; at the limit it is handed back and the quorum
            # queue's own delivery limit dead-letters it (`delivery_limit`, x-death).
            self._count("error")
            logger.error("message_failed", message_id=message_id, exc_info=failure)
            # Not at once: a failure that hits every message must not burn the whole
            # queue's delivery limits in milliseconds.
            await asyncio.sleep(backoff(3, self._settings.retry_max_seconds))
            failures = self._failures(d) + 1
            if self._copies and failures < self._settings.delivery_limit:
                try:
                    await self._publish_copy(d, failures)
                except Exception as exc:
                    logger.warning("message_copy_failed", error=type(exc).__name__)
                else:
                    d.decided = True
                    return True
            await self._hand_back(d)
            return False
        finally:
            self._metrics.processing.observe(time.perf_counter() - d.arrived)

    @property
    def _copies(self) -> bool:
        """Whether the worker replaces messages by copies (see _refresh and _settle)."""
        return self._inbound is not None and self._user is not None

    def _ours(self, d: _Delivery) -> bool:
        """Published by a worker: our headers on it are trusted (the broker checks the
        user id property against the publishing user)."""
        return self._user is not None and d.message.header.properties.user_id == self._user

    def _failures(self, d: _Delivery) -> int:
        """Handler failures counted on our copies; 0 on anyone else's message."""
        if not self._ours(d):
            return 0
        return _count_header(d.message.header.properties.headers, FAILURES_HEADER)

    def _undecodable(self, d: _Delivery) -> tuple[str, ...]:
        """The properties the client could not decode on this message or, for our copy,
        on the message it replaces."""
        undecodable = amqp_reads.undecodable(d.message)
        if not self._ours(d):
            return undecodable
        carried = (d.message.header.properties.headers or {}).get(UNDECODABLE_HEADER)
        if isinstance(carried, bytes | bytearray):
            carried = carried.decode("utf-8", errors="replace")
        if not isinstance(carried, str):
            return undecodable
        names = tuple(n for n in carried.split(",") if n and n not in undecodable)
        return undecodable + names

    def _worn(self, d: _Delivery) -> bool:
        """Whether the broker's delivery count of this message is halfway to the limit
        and the count is not ours to finish (a message that failed on a bug at every
        copy is left to it, see _settle)."""
        return (
            self._copies
            and _count_header(d.message.header.properties.headers, DELIVERY_COUNT_HEADER)
            >= self._refresh_at
            and self._failures(d) < self._settings.delivery_limit - 1
        )

    async def _refresh(self, d: _Delivery) -> None:
        """Replace a message the broker redelivered often (workers restarted while it
        waited: a held lock, PostgreSQL away) by a fresh copy whose delivery count starts
        at 0, so that waiting out a transient stall never wears out its delivery limit.
        The copy is confirmed before the original is acked; if the ack is lost the
        worker sees both, and is idempotent on the message id. Done on arrival, before
        the message waits for a batch: a worker that is stopped or killed while the
        message waits gets no chance to do it later."""
        try:
            await self._publish_copy(d, self._failures(d))
        except Exception as exc:  # handled as it is; the broker's count goes on
            logger.warning("message_copy_failed", error=type(exc).__name__)
            self._buffer.append(d)
            self._arrived.set()
            return
        self._count("refreshed")
        await self._acks.ack_alone(d)
        logger.info(
            "delivery_count_reset",
            message_id=d.message.header.properties.message_id,
            delivery_count=_count_header(
                d.message.header.properties.headers, DELIVERY_COUNT_HEADER
            ),
        )

    async def _publish_copy(self, d: _Delivery, failures: int) -> None:
        """The same message (body, id or none, routing key, properties) back into the
        inbound exchange, with publisher confirm, carrying `failures` and what the client
        could not decode. The message's own x-leadrouter-* headers are dropped: under our
        user id they would be trusted."""
        assert self._inbound is not None and self._user is not None
        message = d.message
        ours: dict[str, Any] = {FAILURES_HEADER: failures} if failures else {}
        undecodable = self._undecodable(d)
        if undecodable:
            ours[UNDECODABLE_HEADER] = ",".join(undecodable)
        copy = republished(
            message.body,
            message.header.properties.message_id,
            properties_of(message),
            message.header.properties.headers or {},
            keep_header=_copied,
            add_headers=ours,
            expiration=True,  # a copy's time to live starts anew
            user_id=self._user,  # checked by the broker: what makes our headers trusted
        )
        if copy.dropped:
            logger.warning("message_copy_headers_dropped", count=copy.dropped)
        # Mandatory: a copy that reaches no queue must not replace the message.
        async with self._one_per_id(copy.message):
            await self._inbound.publish(copy.message, message.routing_key or "", mandatory=True)

    @contextlib.asynccontextmanager
    async def _one_per_id(self, message: aio_pika.Message) -> AsyncIterator[None]:
        """Wait until no other publish with this message's id is in flight."""
        key = message.message_id or ""
        entry = self._publishing.setdefault(key, _IdLock())
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if not entry.users:
                del self._publishing[key]

    def _dead_lettered(self, failure: DeadLetter) -> None:
        self._count(str(failure.reason))
        self._metrics.dead_letters.labels(str(failure.reason)).inc()

    def _dead_letter_failed(self, exc: BaseException) -> None:
        """The broker did not take a dead letter: not ready, and say why."""
        # PublishError first: it is a DeliveryError too.
        if isinstance(exc, aiormq.exceptions.PublishError):
            cause = "unroutable"  # returned: the queue or its binding is gone
        elif isinstance(exc, aiormq.exceptions.DeliveryError):
            cause = "refused"  # nacked: the dead-letter queue is full (reject-publish)
        else:
            cause = type(exc).__name__
        if self._readiness.dead_letters or self._readiness.dead_letter_problem != cause:
            logger.error(
                "dead_letters_failing",
                exchange=self._settings.dead_exchange,
                queue=self._settings.dead_queue,
                cause=cause,
                error=type(exc).__name__,
                waiting=len(self._refused) + 1,
            )
        self._readiness.dead_letter_problem = cause
        self._readiness.dead_letters = False

    async def _defer_dead_letter(self, d: _Delivery, failure: DeadLetter) -> None:
        """Keep a dead letter the broker did not take unacked, for _retry_dead_letters."""
        if self.stopping:  # unacked, it comes back after the restart
            await self._hold(d, "dead_letter_deferred")
            return
        if len(self._refused) >= self._max_refused:
            # Held ones would fill the prefetch window and stop valid messages: this one
            # goes back to the queue, no publish tried. Not at once, or while the queue
            # refuses a stream of bad messages would go round between us and the broker
            # at full speed: after a pause, in one of a fixed number of slots. When all
            # are taken the batch waits for one, so that at most so many go back per
            # pause, and the held ones stay within half the window.
            await self._pausing.acquire()
            self._paused += 1
            d.decided = True
            self._spawn(self._hand_back_after_pause(d))
            await self._acks.hold(d)
            return
        # In the queue before anything is awaited, so that the next dead letter counts it.
        self._refused.append((d, failure))
        await self._hold(d, "dead_letter_deferred")
        if self._retrier is None or self._retrier.done():
            self._retrier = asyncio.create_task(self._retry_dead_letters(), name="dead-letters")

    async def _hand_back_after_pause(self, d: _Delivery) -> None:
        """Hand a refused dead letter back to the queue once the pause is over, and free
        its slot (also when cancelled at shutdown: unacked, it comes back then)."""
        try:
            await asyncio.sleep(self._pause_seconds)
            self._count("dead_letter_handed_back")
            logger.info(
                "message_dead_letter_handed_back",
                message_id=d.message.header.properties.message_id,
            )
            await self._hand_back(d)
        finally:
            self._paused -= 1
            self._pausing.release()

    async def _retry_dead_letters(self) -> None:
        """Publish the refused dead letters, oldest first, with backoff, acking each once
        the broker confirmed it; ready again when none is left."""
        attempt = 0
        while self._refused:
            d, failure = self._refused[0]
            if d.channel.is_closed:  # it went back to the queue with the channel
                self._refused.popleft()
                continue
            try:
                await self._publish_dead(d.message, failure)
            except Exception as exc:
                attempt += 1
                self._dead_letter_failed(exc)
                if not is_transient(exc):  # this one's own problem: let the others by
                    self._refused.rotate(-1)
                delay = max(backoff(attempt, self._settings.retry_max_seconds), 0.05)
                logger.warning(
                    "dead_letter_retrying",
                    attempt=attempt,
                    retry_in=round(delay, 3),
                    waiting=len(self._refused),
                )
                await asyncio.sleep(delay)
                continue
            attempt = 0
            self._refused.popleft()
            self._dead_lettered(failure)
            await self._acks.ack_alone(d)
        if not self._readiness.dead_letters:
            logger.info("dead_letters_accepted", queue=self._settings.dead_queue)
        self._readiness.dead_letters = True
        self._readiness.dead_letter_problem = None

    def _drain_later(self, source_ids: set[int]) -> None:
        """Have _drain_after_commit route these sources: one task for all the batches,
        so that waiting on a long-held source lock holds one pool connection, not one per
        batch."""
        self._undrained |= source_ids
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.ensure_future(self._drain_after_commit())
            self._side_tasks.add(self._drainer)
            self._drainer.add_done_callback(self._side_tasks.discard)

    async def _drain_after_commit(self) -> None:
        """Route sources committed batches freed capacity for without holding their locks
        (distribution.Outcome.undrained), now rather than at the backlog sweep; the ones
        added meanwhile next."""
        while self._undrained:
            source_ids, self._undrained = self._undrained, set()
            try:
                assigned = await self._retrying(
                    lambda ids=source_ids: distribution.drain_after_commit(self._pool, ids)  # type: ignore[misc]
                )
            except Exception:
                if self.stopping:  # a transient failure at shutdown: the sweep does it later
                    return
                # A bug: the sweep remains the safety net.
                logger.exception("freed_capacity_routing_failed", sources=len(source_ids))
                continue
            logger.info("freed_capacity_routed", sources=len(source_ids), assigned=assigned.total())
            for (source, strategy), count in assigned.items():
                self._metrics.assignments.labels(source, strategy).inc(count)

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    async def _hold(self, d: _Delivery, outcome: str) -> None:
        """Leave it unacked: the broker redelivers it when our channel closes."""
        self._count(outcome)
        logger.info("message_" + outcome, message_id=d.message.header.properties.message_id)
        d.decided = True
        await self._acks.hold(d)

    async def _hand_back(self, d: _Delivery) -> None:
        """nack with requeue; only once it is sent may later acks cover its tag."""
        with contextlib.suppress(Exception):
            await d.channel.basic_nack(d.message.delivery_tag, multiple=False, requeue=True)
        d.decided = True
        await self._acks.released(d)

    async def _publish_dead(self, message: DeliveredMessage, failure: DeadLetter) -> None:
        """The dead copy: body, routing key and the properties that decoded (not the
        expiration, or it would expire in the dead-letter queue, nor the user id, which
        the broker checks against ours). The message's own x-leadrouter-* and dead-letter
        headers are not trusted: dropped before ours are added. Headers that cannot be
        encoded again are dropped too, so that the dead copy can always be published."""
        dead = republished(
            message.body,
            message.header.properties.message_id,
            properties_of(message),
            message.header.properties.headers or {},
            keep_header=replayable,
            add_headers={REASON_HEADER: str(failure.reason), ERROR_HEADER: failure.detail},
            timestamp=datetime.now(UTC),  # when it has none, so that `dlq list` shows an age
        )
        if dead.dropped:
            logger.warning("dead_letter_headers_dropped", count=dead.dropped)
        # Mandatory: if the dead-letter queue is gone we must not ack and lose it.
        try:
            async with self._one_per_id(dead.message):
                await self._dead.publish(dead.message, message.routing_key or "", mandatory=True)
        except aiormq.exceptions.PublishError:
            # Returned unroutable: someone deleted the dead-letter queue or its binding.
            # Declare them again (idempotent) and let the caller retry, rather than wait
            # for an operator while this batch holds its messages.
            logger.warning("dead_letter_queue_missing", queue=self._settings.dead_queue)
            try:
                await self._declare_topology()
            except Exception as exc:  # say why, and retry the publish all the same
                logger.warning("topology_declare_failed", error=type(exc).__name__)
            raise


def _answer(message_id: str, body: ContactAccept | ContactDecline) -> offers.Answer:
    if isinstance(body, ContactAccept):
        return offers.Answer(message_id, body.contact_id, body.operator_id, accept=True)
    return offers.Answer(message_id, body.contact_id, body.operator_id, False, body.reason)


@dataclass
class _IdLock:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


def _copied(header: str) -> bool:
    """Whether a copy carries this header of the message it replaces."""
    return header != DELIVERY_COUNT_HEADER and not header.startswith(OUR_PREFIX)


def _count_header(headers: dict[str, Any] | None, name: str) -> int:
    value = (headers or {}).get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0
