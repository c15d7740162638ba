"""The worker process: connects, declares the topology, consumes, relays the outbox,
sweeps the backlog, reports health, and shuts down gracefully."""

import asyncio
import contextlib
import gc
import os
import socket
import time
import uuid
from collections import Counter

import aiormq.exceptions
import asyncpg
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection
from aiormq import spec

from worker import (
    amqp_reads,
    amqp_writes,
    distribution,
    history,
    log,
    nodes,
    offers,
    timers,
    topology,
)
from worker.availability import ScheduleKeeper
from worker.consumer import Consumer
from worker.health import HealthServer, Readiness
from worker.metrics import Metrics
from worker.outbox import OutboxRelay, prune_outbox
from worker.retry import backoff, connect_with_retry, is_transient, stopped_within
from worker.settings import Settings, mask_url
from worker.sql import Q

logger = log.get(__name__)
CONNECT_ATTEMPTS = 20
PRUNE_INTERVAL_SECONDS = 60


class Worker:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.metrics = Metrics()
        self.readiness = Readiness()
        self.consumer: Consumer | None = None
        self.relay: OutboxRelay | None = None
        self._health: HealthServer | None = None
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._pool: asyncpg.Pool | None = None
        self._connection: AbstractRobustConnection | None = None
        self._consume_channel: AbstractRobustChannel | None = None
        self._consumer_tag: str | None = None  # None: not consuming (paused, or cancelled)
        self._cancelled_by_broker = False
        self._consuming = asyncio.Lock()  # _consume and _pause
        # The side task whose death stopped the worker (`leadrouter worker` then exits 1).
        self.failure: str | None = None

    @property
    def outcomes(self) -> Counter[str]:
        """Messages settled by this worker, by outcome."""
        return self.consumer.outcomes if self.consumer else Counter()

    @property
    def health_port(self) -> int | None:
        return self._health.port if self._health else None

    async def start(self) -> None:
        s = self.settings
        history.configure(s.history)
        if s.metrics_port:
            # First, so that a port taken by another process fails the start at once.
            self._health = HealthServer(
                s.metrics_host,
                s.metrics_port,
                self.metrics,
                self.readiness,
                stale_after=max(10 * s.health_interval_seconds, 30),
            )
            self._health.start()
        logger.info(
            "worker_starting",
            database=mask_url(s.database_url),
            amqp=mask_url(s.amqp_url),
            queue=s.inbound_queue,
            prefetch=s.prefetch,
        )
        self._pool = await connect_with_retry(
            "postgres",
            lambda: asyncpg.create_pool(
                s.database_url,
                min_size=1,
                max_size=s.pool_size,
                reset=_keep_session,
                init=distribution.prepare_statements,
            ),
            CONNECT_ATTEMPTS,
            s.retry_max_seconds,
        )
        amqp_writes.install()  # events published together go out in one write
        amqp_reads.install()  # a message with undecodable properties is dead-lettered
        self._connection = await connect_with_retry(
            "rabbitmq",
            # The first node of the list that answers; another one at once when it goes.
            lambda: nodes.connect_robust(
                s.amqp_url, client_properties={"connection_name": connection_name()}
            ),
            CONNECT_ATTEMPTS,
            s.retry_max_seconds,
        )
        # Robust channels re-declare what was declared on them after a reconnect.
        publish_channel = await self._connection.channel(
            publisher_confirms=True, on_return_raises=True
        )
        # Not the dead-letter queue on the robust channels: on a cluster it lives on one
        # node, and declaring it again on reconnecting would fail while that node is down,
        # keeping the worker off the other nodes (dead letters wait meanwhile: returned
        # unroutable, they are held and retried). Declared once here, on a channel of its
        # own, and again whenever dead-lettering finds it missing.
        try:
            await self._declare_topology()
        except aiormq.exceptions.ChannelNotFoundEntity as exc:
            # Its node is down: start all the same, on the other nodes.
            logger.warning("dead_letter_queue_unavailable", error=type(exc).__name__)
        declared = await topology.declare(publish_channel, s, dead_queue=False)
        self._consume_channel = await self._connection.channel(publisher_confirms=False)
        await self._consume_channel.set_qos(prefetch_count=s.prefetch)
        await topology.declare(self._consume_channel, s, dead_queue=False)
        # It consumes through aiormq (see Consumer.on_message), so aio-pika does not
        # restore that consumer after a reconnect: we do, once the channel is back.
        self._consume_channel.reopen_callbacks.add(self._consume_again)

        self.relay = OutboxRelay(self._pool, publish_channel, s, self.metrics)
        self.consumer = Consumer(
            self._pool,
            declared.exchanges[s.dead_exchange],
            s,
            self.metrics,
            self.relay,
            self._declare_topology,
            inbound_exchange=declared.exchanges[s.inbound_exchange],
            readiness=self.readiness,
        )
        self.consumer.start()
        await self._consume()
        self._tasks = [
            asyncio.create_task(self.relay.run(self._stop), name="outbox-relay"),
            asyncio.create_task(self._sweep_backlog(), name="backlog-sweep"),
            asyncio.create_task(self._prune_outbox(), name="outbox-prune"),
            asyncio.create_task(self._probe(), name="health-probe"),
            asyncio.create_task(
                offers.DeadlineKeeper(
                    self._pool, self._stopped_within, self.relay.wake, s.retry_max_seconds
                ).run(),
                name="offer-deadlines",
            ),
            asyncio.create_task(
                timers.run_timers(
                    self._pool, self._stop, self.metrics, self.relay.wake, s.retry_max_seconds
                ),
                name="timers",
            ),
            asyncio.create_task(
                ScheduleKeeper(self._pool, s, self.metrics).run(self._stop), name="schedule"
            ),
        ]
        for task in self._tasks:
            task.add_done_callback(self._side_task_done)
        logger.info("worker_started", metrics_port=self.health_port)

    def _side_task_done(self, task: asyncio.Task[None]) -> None:
        """The side tasks run until stop; one that ends before (a bug got past its own
        retries) would leave the worker running without it, still reporting ready. So
        the worker stops instead, and exits non-zero for its supervisor to restart it."""
        error = None if task.cancelled() else task.exception()
        if self._stop.is_set() and error is None:
            return  # stopping: cancelled, or returned as asked
        self.failure = self.failure or task.get_name()
        self.readiness.consuming = False
        if error is not None:
            logger.error("side_task_failed", task=task.get_name(), exc_info=error)
        else:
            logger.error("side_task_ended", task=task.get_name())
        self._stop.set()

    async def stop(self) -> None:
        """Stop taking messages, let in-flight ones finish, publish what they committed,
        then close; all within the grace period (then unfinished work is rolled back and
        redelivered by the broker)."""
        logger.info("worker_stopping")
        deadline = time.monotonic() + self.settings.shutdown_grace_seconds

        def left() -> float:
            return max(deadline - time.monotonic(), 0.5)

        self._stop.set()
        # The probe first: it could otherwise resume consuming behind our back.
        for task in self._tasks:
            if task.get_name() == "health-probe":
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._consumer_tag is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._pause(), timeout=left())
        self.readiness.consuming = False
        if self.consumer is not None:
            abandoned = await self.consumer.drain(left())
            if abandoned:  # rolled back or never started; the broker redelivers them
                logger.warning("in_flight_abandoned", count=abandoned)
        if self.relay is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.relay.drain(), timeout=left())
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._connection.close(), timeout=left())
        if self._pool is not None:
            try:
                await asyncio.wait_for(self._pool.close(), timeout=left())
            except Exception:  # a connection stuck in a query: do not wait for it
                self._pool.terminate()
        if self._health is not None:
            self._health.stop()
        logger.info("worker_stopped", outcomes=dict(self.outcomes))

    async def _declare_topology(self) -> None:
        """Declare the topology again, on a channel of its own: one the broker refuses
        (someone re-created a queue with other arguments) closes only that channel, and
        the robust channels' lists of what to restore after a reconnect do not grow."""
        assert self._connection is not None
        channel = await self._connection.channel()
        try:
            await topology.declare(channel, self.settings)
        finally:
            with contextlib.suppress(Exception):
                await channel.close()

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Run until request_stop() (a signal handler in the CLI)."""
        try:
            await self.start()
            # The process's start-up objects stay: keep them out of the collector's full
            # passes, which otherwise stall the loop for tens of milliseconds now and then.
            gc.collect()
            gc.freeze()
            await self._stop.wait()
        finally:  # also after a failed start: release what it had opened
            await asyncio.shield(self.stop())

    async def _consume(self, again: bool = False) -> None:
        """Start consuming; `again`: on a reopened channel, only if we were consuming.
        Under one lock with _pause, and the tag is ours before the broker hears of it, so
        that a pause or a stop racing with this always finds the consumer to cancel."""
        assert self._consume_channel is not None and self.consumer is not None
        async with self._consuming:
            if self._stop.is_set() or (again and self._consumer_tag is None):
                return
            if self._cancelled_by_broker:  # the queue was deleted: declare it again first
                await topology.declare(self._consume_channel, self.settings, dead_queue=False)
                self._cancelled_by_broker = False
            channel = await self._consume_channel.get_underlay_channel()
            channel.on_consumer_cancel_callbacks.add(self._on_broker_cancel)
            self._consumer_tag = f"leadrouter.{uuid.uuid4().hex}"
            await channel.basic_consume(
                self.settings.inbound_queue,
                self.consumer.on_message,
                consumer_tag=self._consumer_tag,
            )
            self.readiness.consuming = True

    async def _consume_again(self, _channel: object) -> None:
        """The channel reopened after a reconnect (prefetch and declarations restored by
        aio-pika): consume on it again, unless paused or stopping. A failure here would
        go unseen (aio-pika gathers these callbacks quietly): the probe takes over."""
        try:
            await self._consume(again=True)
        except Exception as exc:
            logger.warning("consume_restore_failed", error=type(exc).__name__)
            self._consumer_tag = None
            self.readiness.consuming = False
        else:
            logger.info("consuming_restored")

    def _on_broker_cancel(self, frame: spec.Basic.Cancel) -> None:
        """The broker ended our consumer (the queue was deleted): the probe declares the
        queue again and resumes."""
        if frame.consumer_tag == self._consumer_tag:
            logger.warning("consumer_cancelled_by_broker")
            self._consumer_tag = None
            self._cancelled_by_broker = True
            self.readiness.consuming = False

    async def _pause(self) -> None:
        """Stop taking messages; those in flight keep retrying until PostgreSQL is back."""
        assert self._consume_channel is not None
        async with self._consuming:
            self.readiness.consuming = False
            if self._consumer_tag is not None:
                tag, self._consumer_tag = self._consumer_tag, None
                channel = await self._consume_channel.get_underlay_channel()
                await channel.basic_cancel(tag)

    async def _probe(self) -> None:
        """Check both services, update the gauges and readiness, and pause consuming
        while PostgreSQL is unreachable (messages wait in RabbitMQ meanwhile)."""
        assert self._pool is not None and self._connection is not None
        interval = self.settings.health_interval_seconds
        while not self._stop.is_set():
            try:
                counts = await asyncio.wait_for(self._pool.fetchrow(Q.health_counts), interval * 2)
                self.metrics.queued_contacts.set(counts["queued"])
                self.metrics.outbox_pending.set(counts["outbox_pending"])
                postgres = True
            except Exception as exc:
                postgres = False
                if self.readiness.postgres:
                    logger.warning("postgres_unreachable", error=type(exc).__name__)
            self.readiness.postgres = postgres
            self.readiness.rabbitmq = self._connection.connected.is_set()
            if not self.readiness.rabbitmq:  # the consumer is gone with the connection;
                self.readiness.consuming = False  # restored (and set) once it is back
            try:
                if not postgres and self._consumer_tag is not None:
                    await self._pause()
                    logger.warning("consuming_paused")
                elif postgres and self._consumer_tag is None and not self._stop.is_set():
                    await self._consume()
                    logger.info("consuming_resumed")
            except Exception as exc:  # the broker is away too: try again next round
                logger.warning("consumer_toggle_failed", error=type(exc).__name__)
            self.readiness.heartbeat = time.monotonic()
            self.metrics.ready.set(self.readiness.ready())
            await self._stopped_within(interval)

    async def _stopped_within(self, seconds: float) -> bool:
        """Wait this long, or less if asked to stop; returns whether we are stopping."""
        return await stopped_within(self._stop, seconds)

    async def _prune_outbox(self) -> None:
        """Keep the outbox from growing without bound: published events are deleted once
        older than the retention (every worker does it; they do not get in each other's
        way, nor in the relays': pending rows are never touched). Contacts' history is
        pruned here too, by its own retention."""
        assert self._pool is not None
        while not await self._stopped_within(PRUNE_INTERVAL_SECONDS):
            try:
                pruned = await prune_outbox(self._pool, self.settings.outbox_retention_hours)
                forgotten = await history.prune_history(
                    self._pool, self.settings.history_retention_hours
                )
            except Exception as exc:  # PostgreSQL away: next time
                logger.warning("outbox_prune_failed", error=type(exc).__name__)
                continue
            if pruned:
                logger.info("outbox_pruned", events=pruned)
            if forgotten:
                logger.info("history_pruned", decisions=forgotten)

    async def _sweep_backlog(self) -> None:
        """The safety net: capacity is normally handed out by the transaction that frees
        it; this catches what that could not (e.g. a source it did not hold the lock of)."""
        assert self._pool is not None
        attempt = 0
        while not await self._stopped_within(self.settings.backlog_sweep_seconds):
            try:
                assigned = await sweep_backlog(self._pool)
                attempt = 0
            except Exception as exc:
                attempt += 1
                if not is_transient(exc):
                    logger.exception("backlog_sweep_failed")
                await asyncio.sleep(backoff(attempt, self.settings.retry_max_seconds))
                continue
            if assigned:
                logger.info("backlog_swept", assigned=assigned)
                if self.relay is not None:  # at once, even if LISTEN is reconnecting
                    self.relay.wake()


def connection_name() -> str:
    """How the broker lists this worker's connection (`rabbitmqctl list_connections name
    client_properties`, the management UI), so ops can tell which process holds it."""
    return f"leadrouter worker {socket.gethostname()} pid {os.getpid()}"


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Skip the reset query asyncpg runs on every release (a round trip per transaction):
    the worker keeps no session state; its locks end with their transactions."""


async def sweep_backlog(pool: asyncpg.Pool) -> int:
    """Assign queued contacts of every source someone can take work from."""
    total = 0
    for row in await pool.fetch(Q.sources_with_backlog):
        async with pool.acquire() as conn, conn.transaction():
            await distribution.lock_sources(conn, {row["source_id"]})
            total += (await distribution.drain_sources(conn, {row["source_id"]})).total()
    return total
