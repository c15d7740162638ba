"""Consumes inbound messages. The ack / dead-letter / retry decision is taken in one
place, `_settle`, from the outcome of handling a message."""

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import aio_pika
import asyncpg
import structlog
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage

from schemas.inbound import LeadContact
from worker import distribution, log
from worker.decode import Inbound, decode
from worker.errors import ERROR_HEADER, REASON_HEADER, DeadLetter
from worker.failures import backoff, is_transient
from worker.metrics import Metrics
from worker.settings import Settings

logger = log.get(__name__)


class Consumer:
    def __init__(
        self,
        pool: asyncpg.Pool,
        dead_exchange: AbstractExchange,
        settings: Settings,
        metrics: Metrics,
    ):
        self._pool = pool
        self._dead = dead_exchange
        self._settings = settings
        self._metrics = metrics
        self.outcomes: Counter[str] = Counter()
        self.stopping = False
        self.in_flight: set[asyncio.Task[None]] = set()

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        """Called by aio-pika in a task of its own for each delivery."""
        task = asyncio.current_task()
        assert task is not None
        self.in_flight.add(task)
        started = time.perf_counter()
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(
            message_id=message.message_id,
            routing_key=message.routing_key,
            delivery_tag=message.delivery_tag,
        )
        try:
            failure = await self._outcome_of(message)
            await self._settle(message, failure)
            if isinstance(failure, asyncio.CancelledError):
                raise failure
        finally:
            self.in_flight.discard(task)
            self._metrics.processing.observe(time.perf_counter() - started)

    async def _outcome_of(self, message: AbstractIncomingMessage) -> BaseException | None:
        """Handle the message; None on success, else what went wrong."""
        try:
            inbound = decode(
                message.body,
                message.routing_key or "",
                message.message_id,
                self._settings.max_message_bytes,
            )
            structlog.contextvars.bind_contextvars(message_id=inbound.message_id)
            await self._retrying(lambda: self._route(inbound))
        except (Exception, asyncio.CancelledError) as exc:
            return exc
        return None

    async def _route(self, inbound: Inbound) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            if isinstance(inbound.body, LeadContact):
                structlog.contextvars.bind_contextvars(source=inbound.body.source)
                outcome = await distribution.route_new_contact(
                    conn, inbound.body, inbound.message_id
                )
            else:
                structlog.contextvars.bind_contextvars(contact_id=inbound.body.contact_id)
                outcome = await distribution.close_contact(conn, inbound.body)
        for (source, strategy), count in outcome.assignments.items():
            self._metrics.assignments.labels(source, strategy).inc(count)
        logger.info(
            "message_handled",
            kind=inbound.routing_key,
            contact_id=outcome.contact_id,
            operator_id=outcome.operator_id,
            duplicate=outcome.duplicate,
            late_assignments=outcome.late_assignments,
        )

    async def _retrying(self, attempt_once: Callable[[], Awaitable[None]]) -> None:
        """Retry transient failures with backoff until they pass or we are stopping.
        Requeueing instead would count against the quorum queue's delivery limit."""
        attempt = 0
        while True:
            try:
                await attempt_once()
                return
            except Exception as exc:
                if not is_transient(exc) or self.stopping:
                    raise
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

    async def _settle(
        self, message: AbstractIncomingMessage, failure: BaseException | None
    ) -> None:
        """The one place that acks, dead-letters or hands a message back."""
        if failure is None:
            self._count("ok")
            await self._ack(message)
        elif isinstance(failure, DeadLetter):
            logger.warning("dead_lettered", reason=str(failure.reason), error=failure.detail)
            try:
                await self._retrying(lambda: self._publish_dead(message, failure))
            except Exception:
                # Stopping while the broker is away: leave it unacked, it comes back.
                logger.warning("dead_letter_deferred")
                return
            self._count(str(failure.reason))
            self._metrics.dead_letters.labels(str(failure.reason)).inc()
            await self._ack(message)
        elif isinstance(failure, asyncio.CancelledError) or is_transient(failure):
            # Shutting down: unacked, the broker redelivers it; nothing was committed.
            self._count("deferred")
            logger.info("message_deferred", error=type(failure).__name__)
        else:
            # A bug. The broker counts the redeliveries and dead-letters the message at
            # the queue's delivery limit, so it can neither loop forever nor be lost.
            self._count("error")
            logger.error("message_failed", exc_info=failure)
            with contextlib.suppress(Exception):
                await message.nack(requeue=True)

    async def _publish_dead(self, message: AbstractIncomingMessage, failure: DeadLetter) -> None:
        headers = dict(message.headers or {})
        headers[REASON_HEADER] = str(failure.reason)
        headers[ERROR_HEADER] = failure.detail
        dead = aio_pika.Message(
            body=message.body,
            headers=headers,
            message_id=message.message_id,
            content_type=message.content_type,
            timestamp=message.timestamp or datetime.now(UTC),  # so `dlq list` shows an age
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        # Mandatory: if the dead-letter queue is gone we must not ack and lose it.
        await self._dead.publish(dead, message.routing_key or "", mandatory=True)

    async def _ack(self, message: AbstractIncomingMessage) -> None:
        try:
            await message.ack()
        except Exception as exc:
            # The channel was lost after commit: the redelivery finds the work done.
            logger.warning("ack_failed", error=type(exc).__name__)
