"""Beyond one machine: worker processes on a 3-node RabbitMQ cluster and a PostgreSQL
primary with a standby lose nothing, double nothing and never exceed capacity while, with
leads flowing all along, the node holding the inbound queue's leader is stopped (a fourth
worker starts meanwhile), another node is SIGKILLed, and the PostgreSQL primary is stopped
and its standby promoted. Each worker is given every node (in an order of its own, so
they spread over the cluster) and both database hosts; nobody tells them what happened.

Routing must resume within RESUME_SECONDS of each fault; one summary line is printed.
The servers are the suite's own (tests/cluster/conftest.py). Run it alone:
pytest tests/cluster -s (about a minute and a half)."""

import asyncio
import contextlib
import itertools
import json
import signal
import subprocess
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import pytest

from tests.helpers import CLIENT_LIBRARIES, SUMMARIES, Expected, assert_clean_end, lead, wait_until
from tests.servers import OwnCluster, OwnRabbitMQ
from tests.worker_processes import PEAK_LOADS, has_started, logs_of, spawn
from worker import admin, nodes, topology
from worker.settings import Settings

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(600)]

WORKERS = 3
RATE = 120  # messages published per second, all along (at most)
FLOW_SECONDS = 4  # of traffic on the healed cluster between faults
STREAMS = 4  # publishing at once, each waiting for its confirms
BAD_EVERY = 50  # one message in this many is not JSON
RESUME_SECONDS = 15.0  # routing must resume within this long after each fault
# A worker whose node went consumes on another this soon: at once, not after the lost
# node's reconnect interval (5 s).
MOVE_SECONDS = 3.0
SOURCES = ["tg", "web", "wa"]


class Progress:
    """When routing made progress: the times at which the number of contacts grew."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self.changes: list[float] = []
        self.count = 0

    async def watch(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(Exception):  # the failover: sampled again after
                count = await self._pool.fetchval("SELECT count(*) FROM contacts")
                if count > self.count:
                    self.count = count
                    self.changes.append(time.monotonic())
            await asyncio.sleep(0.1)

    async def resumed_after(self, done: float) -> float:
        """The first progress after `done` (waits up to RESUME_SECONDS for it)."""

        async def seen() -> float | None:
            return next((t for t in self.changes if t > done), None)

        return float(await wait_until(seen, timeout=RESUME_SECONDS, what="routing resumed"))

    def stalled(self, start: float, resumed: float) -> float:
        """The longest time without progress from the fault's start until it resumed."""
        times = [start, *(t for t in self.changes if start < t <= resumed)]
        return max(b - a for a, b in itertools.pairwise(times))


class Publisher:
    """Publishes leads at RATE in STREAMS, each on a channel of its own and with a message
    id of its own, waiting for the broker's confirm and retrying (on another node) until
    it comes: `sent` holds the confirmed ones, as an upstream bot would count them."""

    def __init__(self, amqp_url: str, exchange: str) -> None:
        self._url = amqp_url
        self._exchange = exchange
        self.sent: list[str] = []
        self.bad: list[str] = []  # not JSON: each must be dead-lettered
        self.retries = 0

    async def run(self, stop: asyncio.Event) -> None:
        connection = await nodes.connect_robust(self._url)
        try:
            await asyncio.gather(*(self._stream(connection, s, stop) for s in range(STREAMS)))
        finally:
            with contextlib.suppress(Exception):
                await connection.close()

    async def _stream(
        self, connection: aio_pika.abc.AbstractConnection, stream: int, stop: asyncio.Event
    ) -> None:
        channel = None
        n = 0
        while not stop.is_set():
            message_id = f"{stream}-{n}"
            if n % BAD_EVERY == BAD_EVERY - 1:
                channel = await self._one(connection, channel, f"bad-{message_id}", b'{"source": ')
                self.bad.append(f"bad-{message_id}")
            else:
                body = json.dumps(lead(SOURCES[n % len(SOURCES)], f"x:{message_id}")).encode()
                channel = await self._one(connection, channel, f"c-{message_id}", body)
                self.sent.append(f"c-{message_id}")
            n += 1
            await asyncio.sleep(STREAMS / RATE)

    async def _one(
        self,
        connection: aio_pika.abc.AbstractConnection,
        channel: aio_pika.abc.AbstractChannel | None,
        message_id: str,
        body: bytes,
    ) -> aio_pika.abc.AbstractChannel:
        """Publish until confirmed; returns the channel that got the confirm."""
        while True:
            try:
                if channel is None:
                    channel = connection.channel(publisher_confirms=True)
                    await asyncio.wait_for(channel.initialize(), timeout=10)
                exchange = await channel.get_exchange(self._exchange, ensure=False)
                await asyncio.wait_for(
                    exchange.publish(
                        aio_pika.Message(
                            body, message_id=message_id, delivery_mode=aio_pika.DeliveryMode(2)
                        ),
                        "lead.contact",
                        mandatory=True,
                    ),
                    timeout=10,
                )
            except Exception:  # the node went away before the confirm: again, elsewhere
                self.retries += 1
                # And on a fresh channel: RabbitMQ 3.10 nacks every later publish of a
                # channel whose quorum queue client still names the stopped leader's node
                # (it asks that node alone, again at each publish, until it is back).
                if channel is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(channel.close(), timeout=5)
                channel = None
                await asyncio.sleep(0.2)
                continue
            return channel


def leader(cluster: OwnCluster, queue: str) -> OwnRabbitMQ:
    """The node that holds the quorum queue's leader."""
    for node in cluster.rabbitmq:
        result = node.ctl("list_queues", "name", "leader", "--no-table-headers", check=False)
        if result.returncode != 0:
            continue
        for line in result.stdout.splitlines():
            name, _, where = line.partition("\t")
            if name == queue:
                return next(n for n in cluster.rabbitmq if n.node == where.strip())
    raise AssertionError(f"no node knows the leader of {queue}")


def queue_status(cluster: OwnCluster) -> str:
    """Each running node's view of the queues: leader, members, online members."""
    views = []
    for node in cluster.rabbitmq:
        result = node.ctl("list_queues", "name", "leader", "members", "online", check=False)
        views.append(f"{node.node}: {result.stdout.strip() or result.stderr.strip()[:200]}")
    return " | ".join(views)


def replicated(cluster: OwnCluster, queue: str) -> bool:
    """Every node is an online member of the queue (after a node came back)."""
    result = cluster.rabbitmq[0].ctl(
        "list_queues", "name", "online", "--no-table-headers", check=False
    )
    if result.returncode != 0:
        return False
    online: list[str] = []
    for line in result.stdout.splitlines():  # name<TAB>[node, node, ...]
        name, _, members = line.partition("\t")
        if name == queue:
            online = [m for m in members.strip("[] ").split(", ") if m]
    return len(online) == len(cluster.rabbitmq)


async def back_in_the_cluster(cluster: OwnCluster, node: OwnRabbitMQ, queue: str) -> None:
    await asyncio.to_thread(node.start)

    async def ready() -> bool:
        return await asyncio.to_thread(replicated, cluster, queue)

    await wait_until(ready, timeout=60, what=f"{node.node} back among the queue's members")


async def test_nothing_lost_doubled_or_over_capacity_across_node_and_database_failover(
    settings: Settings, pool: asyncpg.Pool, tmp_path: Path, own_cluster: OwnCluster
) -> None:
    cluster = own_cluster
    urls = cluster.amqp_urls
    assert settings.amqp_url == urls[0] and "target_session_attrs" in settings.database_url
    # The topology is declared once the cluster formed: the inbound quorum queue has a
    # member on every node.
    connection = await aio_pika.connect(urls[0])
    async with connection:
        await topology.declare(await connection.channel(), settings)
    assert await asyncio.to_thread(replicated, cluster, settings.inbound_queue)

    ops = [(await admin.add_operator(pool, f"op{n}", 150, True))["id"] for n in range(6)]
    for i, key in enumerate(SOURCES):
        await admin.add_source(
            pool, key, None, "", ["smooth", "weighted_random", "least_loaded"][i]
        )
        await admin.set_weights(pool, key, {ops[(i + j) % 6]: j + 1 for j in range(4)})

    def worker_settings(n: int) -> Settings:
        order = urls[n % len(urls) :] + urls[: n % len(urls)]
        return settings.model_copy(update={"amqp_url": ",".join(order), "prefetch": 50})

    workers = [spawn(worker_settings(n), tmp_path, n) for n in range(WORKERS)]
    progress = Progress(pool)
    publisher = Publisher(",".join(urls), settings.inbound_exchange)
    stop_publishing, stop_watching = asyncio.Event(), asyncio.Event()
    flows = [
        asyncio.create_task(publisher.run(stop_publishing)),
        asyncio.create_task(progress.watch(stop_watching)),
    ]
    faults: list[tuple[str, float, float]] = []  # (what, stalled seconds, resumed after)

    async def fault(what: str, action: Any) -> None:
        start = time.monotonic()
        await asyncio.to_thread(action)
        done = time.monotonic()
        try:
            resumed = await progress.resumed_after(done)
        except AssertionError as exc:  # say where the queue stood
            status = await asyncio.to_thread(queue_status, cluster)
            raise AssertionError(f"{what}: {exc}; the inbound queue: {status}") from None
        faults.append((what, progress.stalled(start, resumed), resumed - done))

    started = time.monotonic()
    try:

        async def flowing() -> bool:
            return progress.count > 200

        await wait_until(flowing, what="leads flowing")
        # 1. The node holding the inbound queue's leader is stopped (and comes back).
        first = leader(cluster, settings.inbound_queue)
        # Declared through the first node, the dead-letter queue (a classic queue) lives
        # there too: it is down with it.
        assert first.url == urls[0], "the queue's leader is not where it was declared"
        await fault("leader-node-stopped", first.shutdown)
        # A worker started meanwhile, given the node that is down first, starts on the
        # others (without the dead-letter queue) and takes part in what follows.
        workers.append(spawn(worker_settings(0), tmp_path, WORKERS))

        async def late_worker_started() -> bool:
            return has_started(tmp_path, WORKERS)

        await wait_until(late_worker_started, timeout=30, what="a worker started on two nodes")
        await back_in_the_cluster(cluster, first, settings.inbound_queue)
        await asyncio.sleep(FLOW_SECONDS)
        # 2. Another node's process is SIGKILLed (the leader's, unless that is the first).
        holder = leader(cluster, settings.inbound_queue)
        victim = holder if holder is not first else others(cluster, first)[0]
        await fault("node-killed", victim.kill)
        await back_in_the_cluster(cluster, victim, settings.inbound_queue)
        await asyncio.sleep(FLOW_SECONDS)
        # 3. The PostgreSQL primary is stopped and the standby promoted.
        await fault("postgres-failover", lambda: failover(cluster))
        await asyncio.sleep(FLOW_SECONDS)  # leads keep flowing to the new primary a while
        stop_publishing.set()
        await flows[0]
        sent = set(publisher.sent)

        async def settled() -> bool:
            with contextlib.suppress(Exception):
                seen = {
                    r["inbound_message_id"]
                    for r in await pool.fetch("SELECT inbound_message_id FROM contacts")
                }
                pending = await pool.fetchval(
                    "SELECT count(*) FROM outbox WHERE published_at IS NULL"
                )
                return sent <= seen and pending == 0
            return False

        await wait_until(settled, timeout=120, what="every lead routed, every event published")
    finally:
        stop_publishing.set()
        stop_watching.set()
        # A publisher still waiting for a confirm (the test failed: the queue took
        # nothing) is given up after a while, rather than hang the run.
        _, waiting = await asyncio.wait(flows, timeout=30)
        for task in waiting:
            task.cancel()
        await asyncio.gather(*flows, return_exceptions=True)
        for proc in workers:
            proc.send_signal(signal.SIGTERM)
        exits = []
        for proc in workers:
            try:
                exits.append(await asyncio.to_thread(proc.wait, 30))
            except subprocess.TimeoutExpired:
                proc.kill()
                exits.append(None)
    elapsed = time.monotonic() - started

    ids = Counter(
        r["inbound_message_id"] for r in await pool.fetch("SELECT inbound_message_id FROM contacts")
    )
    lost = len(sent - set(ids))
    duplicated = sum(n - 1 for n in ids.values() if n > 1)
    strangers = len(set(ids) - sent)  # routed, yet never confirmed to the publisher
    peaks = [dict(r) for r in await pool.fetch(PEAK_LOADS)]
    over_capacity = sum(p["peak"] > p["max_load"] for p in peaks)
    drifted = await pool.fetchval(
        "SELECT count(*) FROM operators o WHERE open_load <>"
        " (SELECT count(*) FROM contacts c WHERE c.operator_id = o.id AND c.status = 'open')"
    )
    # Every bad message dead-lettered (at least once: a worker whose node went between a
    # dead letter's confirm and the ack dead-letters it again when it is redelivered).
    dead: Counter[str] = Counter()
    async with await aio_pika.connect(urls[0]) as connection:
        queue = await (await connection.channel()).get_queue(settings.dead_queue)
        while (message := await queue.get(fail=False)) is not None:
            await message.ack()
            dead[str(message.message_id)] += 1
    logs = logs_of(tmp_path, restarts=True)
    moves = worker_moves(logs)
    stalls = " ".join(f"{what}={stalled:.1f}s" for what, stalled, _ in faults)
    summary = (
        f"cluster suite: workers={len(workers)} nodes={len(urls)} sent={len(sent)} lost={lost} "
        f"duplicated={duplicated} over-capacity={over_capacity} "
        f"without-progress: {stalls} worker-moves={len(moves)} "
        f"(longest {max(moves, default=0):.1f}s) dead-lettered={len(dead)}/{len(publisher.bad)} "
        f"publish-retries={publisher.retries} seconds={elapsed:.0f}"
    )
    SUMMARIES.append(summary)

    assert exits == [0] * (WORKERS + 1), f"the workers exited {exits} on SIGTERM"
    assert [what for what, _, _ in faults] == [
        "leader-node-stopped",
        "node-killed",
        "postgres-failover",
    ], summary
    assert (lost, duplicated, over_capacity, drifted) == (0, 0, 0, 0), (summary, peaks)
    assert strangers == 0, summary  # each unconfirmed one was published again until confirmed
    assert all(resumed <= RESUME_SECONDS for _, _, resumed in faults), summary
    assert all(stalled <= RESUME_SECONDS for _, stalled, _ in faults), summary
    assert moves and max(moves) <= MOVE_SECONDS, summary
    assert set(dead) == set(publisher.bad), summary
    # The client libraries log a lost connection and each refused attempt as errors of
    # their own; the worker's own log must have none but one: the dead-letter queue, a
    # classic queue, lives on the first node, and while that node is down dead letters
    # are refused (held and retried, the worker not ready meanwhile).
    await assert_clean_end(
        settings,
        [e for e in logs if not str(e.get("logger", "")).startswith(CLIENT_LIBRARIES)],
        Expected(errors={"dead_letters_failing"}),
    )


def worker_moves(logs: list[dict[str, Any]]) -> list[float]:
    """For each time a worker lost its node: seconds until it consumed again (elsewhere)."""
    moves = []
    lost: datetime | None = None
    for entry in logs:  # each worker's entries in order, one worker after another
        at = datetime.fromisoformat(str(entry.get("timestamp", "")).replace("Z", "+00:00"))
        if entry["event"] == "amqp_node_unavailable" and entry.get("wait_seconds") == 0:
            lost = lost or at
        elif entry["event"] == "consuming_restored" and lost is not None:
            moves.append((at - lost).total_seconds())
            lost = None
        elif entry["event"] == "worker_started":
            lost = None
    return moves


def others(cluster: OwnCluster, but: OwnRabbitMQ) -> list[OwnRabbitMQ]:
    return [n for n in cluster.rabbitmq if n is not but]


def failover(cluster: OwnCluster) -> None:
    cluster.primary.stop_clean()
    cluster.standby.promote()
