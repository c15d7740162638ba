"""LEADROUTER_AMQP_URL naming several nodes, and a database connection left on a server
that turned read-only, against the real single-node services. A node is stood in for by a
TCP forwarder to the real broker: closing it is a node going away (its port refuses from
then on). The real cluster and failover are tests/cluster."""

import asyncio
import contextlib
import socket
import time
from collections import Counter
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import asyncpg
import pytest

from tests.commands import leadrouter
from tests.helpers import Expected, assert_clean_end, lead, raw_message, setup_source, wait_until
from worker.app import Worker
from worker.settings import Settings, mask_url


class Forwarder:
    """A TCP port that forwards every connection to the broker's port, as a node would
    take it; `close` drops them all and stops listening."""

    def __init__(self, target_port: int, cut_on: bytes | None = None) -> None:
        self._target = target_port
        self._cut_on = cut_on  # the node goes away when a client sends this
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._pipes: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def url(self, broker_url: str) -> str:
        parts = urlsplit(broker_url)
        return parts._replace(
            netloc=f"{parts.netloc.rpartition('@')[0]}@127.0.0.1:{self.port}"
        ).geturl()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target)
        self._writers += [writer, up_writer]
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst, src is reader))
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    async def _pipe(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, from_client: bool
    ) -> None:
        with contextlib.suppress(Exception):
            while data := await src.read(65536):
                if from_client and self._cut_on is not None and self._cut_on in data:
                    asyncio.get_running_loop().create_task(self.close())
                    return
                dst.write(data)
                await dst.drain()
        dst.close()

    async def close(self) -> None:
        """The node goes away: every connection cut at once, the port closed."""
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        for task in list(self._pipes):
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)


def closed_port() -> int:
    """A loopback port nothing listens on (a node that is down)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def broker_port(settings: Settings) -> int:
    return urlsplit(settings.amqp_url).port or 5672


async def contacts(pool: asyncpg.Pool) -> int:
    return int(await pool.fetchval("SELECT count(*) FROM contacts"))


async def test_worker_uses_the_first_node_that_answers(
    settings: Settings,
    pool: asyncpg.Pool,
    broker: aio_pika.abc.AbstractChannel,
    worker_log: list[dict[str, Any]],
) -> None:
    await setup_source(pool, "tg", [("a", 100, 1)])
    down = f"amqp://guest:secret@127.0.0.1:{closed_port()}/"
    listed = settings.model_copy(update={"amqp_url": f"{down},{settings.amqp_url}"})
    worker = Worker(listed)
    started = time.monotonic()
    await worker.start()
    try:
        assert time.monotonic() - started < 5, "waited for the node that is down"
        exchange = await broker.get_exchange(settings.inbound_exchange)
        await exchange.publish(raw_message(lead("tg", "x:1"), "m-1"), "lead.contact")
        await wait_until(lambda: contacts(pool), what="the lead routed")
    finally:
        await worker.stop()
    unavailable = [e for e in worker_log if e["event"] == "amqp_node_unavailable"]
    assert unavailable and all("secret" not in str(e) for e in unavailable)
    await assert_clean_end(settings, worker_log)


async def test_worker_moves_to_another_node_at_once_when_its_node_goes(
    settings: Settings,
    pool: asyncpg.Pool,
    broker: aio_pika.abc.AbstractChannel,
    worker_log: list[dict[str, Any]],
) -> None:
    """Consuming, relaying and dead-lettering all continue on the other node well
    before aio-pika's 5 s reconnect interval; what was in flight is redelivered and
    found done (one contact per message)."""
    await setup_source(pool, "tg", [("a", 10_000, 1)])
    node = Forwarder(broker_port(settings))
    await node.start()
    listed = settings.model_copy(
        update={"amqp_url": f"{node.url(settings.amqp_url)},{settings.amqp_url}"}
    )
    events = await broker.declare_queue(exclusive=True)
    await events.bind(settings.events_exchange, "#")
    exchange = await broker.get_exchange(settings.inbound_exchange)
    worker = Worker(listed)
    await worker.start()
    try:
        await asyncio.gather(
            *(
                exchange.publish(raw_message(lead("tg", f"x:{n}"), f"m-{n}"), "lead.contact")
                for n in range(300)
            )
        )
        await wait_until(lambda: contacts(pool), what="routing under way")
        await node.close()
        lost_at = time.monotonic()

        async def consuming_again() -> bool:
            return worker.readiness.ready() and worker.readiness.consuming

        await wait_until(consuming_again, timeout=10, what="consuming on the other node")
        moved_in = time.monotonic() - lost_at
        assert moved_in < 2.5, f"took {moved_in:.1f}s to move to the other node"
        # New messages, and a bad one (dead-lettered through the new connection).
        await asyncio.gather(
            *(
                exchange.publish(raw_message(lead("tg", f"y:{n}"), f"n-{n}"), "lead.contact")
                for n in range(100)
            )
        )
        await exchange.publish(raw_message(b"{", "bad-1"), "lead.contact")

        async def all_routed() -> bool:
            return await contacts(pool) == 400

        await wait_until(all_routed, timeout=30, what="every lead routed")

        async def all_published() -> bool:
            return not await pool.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL")

        await wait_until(all_published, timeout=30, what="every event published")
    finally:
        await worker.stop()
        await node.close()
    ids = await pool.fetch("SELECT inbound_message_id FROM contacts")
    assert len({r["inbound_message_id"] for r in ids}) == 400
    moved = [e for e in worker_log if e["event"] == "amqp_node_unavailable"]
    assert moved and moved[0]["next_node"] == mask_url(settings.amqp_url)
    received = 0
    while (message := await events.get(fail=False)) is not None:
        await message.ack()
        received += 1
    assert received >= 400  # at least once each (a lost confirm publishes again)
    await assert_clean_end(settings, worker_log, Expected(dead=Counter(invalid_json=1)))


def test_cli_publish_skips_a_node_that_is_down(settings: Settings, broker: object) -> None:
    down = f"amqp://guest:guest@127.0.0.1:{closed_port()}/"
    listed = settings.model_copy(update={"amqp_url": f"{down},{settings.amqp_url}"})
    out = leadrouter(
        listed, "publish", "--source", "tg", "--external-id", "x", "--message-id", "p-1"
    )
    assert out.stdout.strip() == "published lead.contact p-1"


def test_cli_dlq_skips_a_node_that_is_down(settings: Settings, broker: object) -> None:
    down = f"amqp://guest:guest@127.0.0.1:{closed_port()}/"
    listed = settings.model_copy(update={"amqp_url": f"{down},{settings.amqp_url}"})
    out = leadrouter(listed, "dlq", "list", "--json")
    assert out.returncode == 0 and out.stdout.strip().startswith("[")


@pytest.mark.settings(pool_size=2)
async def test_connections_to_a_server_turned_read_only_are_replaced(
    settings: Settings,
    pool: asyncpg.Pool,
    broker: aio_pika.abc.AbstractChannel,
    worker_log: list[dict[str, Any]],
) -> None:
    """A connection made before a failover may stay with a server that is now a standby
    (read-only): the worker drops the pool's connections and makes new ones (which
    `target_session_attrs=read-write` sends to the new primary), rather than retry on the
    old ones for ever."""
    await setup_source(pool, "tg", [("a", 100, 1)])
    worker = Worker(settings)
    await worker.start()
    try:
        assert worker._pool is not None
        # Every connection of the worker's pool turned read-only, as a demoted server's are.
        held = [await worker._pool.acquire() for _ in range(settings.pool_size)]
        for conn in held:
            await conn.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
        for conn in held:
            await worker._pool.release(conn)
        exchange = await broker.get_exchange(settings.inbound_exchange)
        await exchange.publish(raw_message(lead("tg", "x:1"), "m-1"), "lead.contact")
        await wait_until(lambda: contacts(pool), timeout=10, what="the lead routed")
    finally:
        await worker.stop()
    # Met, and retried, by whichever came first: a batch or the outbox relay.
    assert any(
        e["event"] in {"transient_failure", "outbox_relay_retrying"}
        and e["error"] == "ReadOnlySQLTransactionError"
        for e in worker_log
    )
    await assert_clean_end(settings, worker_log)


async def test_cli_publish_goes_to_another_node_when_its_node_goes_before_the_confirm(
    settings: Settings, pool: asyncpg.Pool, broker: aio_pika.abc.AbstractChannel
) -> None:
    """The first node goes away as the message reaches it, before any confirm: `publish`
    publishes it again on the other node, and the lead is routed once."""
    await setup_source(pool, "tg", [("a", 100, 1)])
    node = Forwarder(broker_port(settings), cut_on=b"cut-here")
    await node.start()
    listed = settings.model_copy(
        update={"amqp_url": f"{node.url(settings.amqp_url)},{settings.amqp_url}"}
    )
    try:
        out = await asyncio.to_thread(
            leadrouter,
            listed,
            "publish",
            "--source",
            "tg",
            "--external-id",
            "x",
            "--message-id",
            "cut-here",
            check=False,
        )
    finally:
        await node.close()
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "published lead.contact cut-here"
    assert "publish_retrying" in out.stderr
    queue = await broker.get_queue(settings.inbound_queue)
    message = await queue.get(fail=False)
    assert message is not None and message.message_id == "cut-here"
    await message.ack()
    assert await queue.get(fail=False) is None  # once: the cut copy never reached a queue
