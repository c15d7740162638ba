"""The outbox relay: publishes committed events with publisher confirms, and marks them
published only after the broker confirmed them. Several relays share the table safely
(FOR UPDATE SKIP LOCKED); a relay killed mid-batch leaves its events to be re-sent."""

import asyncio
import contextlib

import aiormq.abc
import asyncpg
from aio_pika.abc import AbstractChannel
from aiormq import spec

from worker import log
from worker.distribution import WRITER
from worker.failures import backoff, is_transient
from worker.metrics import Metrics
from worker.settings import Settings
from worker.sql import Q

logger = log.get(__name__)
CHANNEL = "leadrouter_outbox"


class OutboxRelay:
    def __init__(
        self, pool: asyncpg.Pool, channel: AbstractChannel, settings: Settings, metrics: Metrics
    ):
        self._pool = pool
        self._channel = channel  # with publisher confirms
        self._settings = settings
        self._metrics = metrics
        self._wake = asyncio.Event()

    def wake(self) -> None:
        self._wake.set()

    def _notified(self, _conn: object, _pid: int, _channel: str, writer: str) -> None:
        if writer != WRITER:  # our own commits wake us directly
            self._wake.set()

    async def publish_pending(self) -> int:
        """Publish one batch of pending events; returns how many."""
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(Q.claim_pending_events, self._settings.outbox_batch)
            if not rows:
                return 0
            channel = await self._channel.get_underlay_channel()
            await asyncio.gather(*(self._publish(channel, r) for r in rows))
            await conn.execute(Q.mark_events_published, [r["id"] for r in rows])
        self._metrics.events_published.inc(len(rows))
        logger.debug("events_published", count=len(rows))
        return len(rows)

    async def _publish(self, channel: aiormq.abc.AbstractChannel, row: asyncpg.Record) -> None:
        properties = spec.Basic.Properties(
            message_id=str(row["event_id"]),
            content_type="application/cloudevents+json",
            delivery_mode=2,  # persistent
            message_type=row["routing_key"],
        )
        # Not mandatory: an event nobody subscribed to yet is not an error. Through
        # aiormq directly: aio-pika's Message objects cost more than the publish itself.
        await channel.basic_publish(
            row["payload"].encode(),
            exchange=self._settings.events_exchange,
            routing_key=row["routing_key"],
            properties=properties,
        )

    async def drain(self) -> None:
        """Publish until nothing is pending."""
        while await self.publish_pending() == self._settings.outbox_batch:
            pass

    async def run(self, stop: asyncio.Event) -> None:
        """Publish whenever a commit notifies us, and sweep on a timer for what a crash or
        a lost notification left behind."""
        listener = asyncio.create_task(self._listen(stop))
        attempt = 0
        try:
            while not stop.is_set():
                self._wake.clear()
                try:
                    # One claim first; when it comes back full, several at once (SKIP
                    # LOCKED keeps them apart), as one relay waiting for confirms would
                    # otherwise set the pace under load.
                    if await self.publish_pending() == self._settings.outbox_batch:
                        await asyncio.gather(
                            *(self.drain() for _ in range(self._settings.outbox_concurrency))
                        )
                    attempt = 0
                except Exception as exc:
                    if not is_transient(exc):
                        logger.exception("outbox_relay_failed")
                    else:
                        logger.warning("outbox_relay_retrying", error=type(exc).__name__)
                    attempt += 1
                    await asyncio.sleep(backoff(attempt, self._settings.retry_max_seconds))
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self._wake.wait(), timeout=self._settings.outbox_sweep_seconds
                    )
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener

    async def _listen(self, stop: asyncio.Event) -> None:
        """Keep a LISTEN connection; reconnect when it drops (the sweep covers the gap),
        backing off when it keeps dropping (a standby in recovery cannot LISTEN)."""
        attempt = 0
        while not stop.is_set():
            if attempt:
                await asyncio.sleep(max(backoff(attempt, self._settings.retry_max_seconds), 0.5))
            attempt += 1
            try:
                conn = await asyncpg.connect(self._settings.database_url)
            except Exception as exc:
                logger.warning("outbox_listen_failed", error=type(exc).__name__)
                continue
            lost = asyncio.Event()
            conn.add_termination_listener(lambda _c, lost=lost: lost.set())
            try:
                await conn.add_listener(CHANNEL, self._notified)
                self._wake.set()  # catch up on what was committed while not listening
                attempt = 0
                await lost.wait()
            except Exception as exc:
                logger.warning("outbox_listen_lost", error=type(exc).__name__)
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.shield(conn.close(timeout=2))
