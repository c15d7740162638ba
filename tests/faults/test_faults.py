"""Nothing lost, nothing doubled, capacity never exceeded, while worker processes are
SIGKILLed and RabbitMQ and PostgreSQL restart under them.

Two worker processes take 5,000 lead.contact messages (1 in 50 deliberately bad, of every
reason the worker gives), a CRM closes contacts all along, a worker is SIGKILLed and
restarted every few seconds, RabbitMQ restarts once and PostgreSQL once. Then every
guarantee is checked and one summary line printed.

It restarts and kills servers of its own, never the machine's: a PostgreSQL instance and a
RabbitMQ node started on free loopback ports for the run and removed afterwards
(tests/faults/conftest.py). Run it alone: pytest tests/faults -s (under two minutes).
"""

import asyncio
import contextlib
import json
import random
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import asyncpg
import pika
import pika.exceptions
import pytest

from tests.helpers import SUMMARIES, assert_clean_end, lead, wait_until
from tests.servers import OwnServers
from tests.worker_processes import PEAK_LOADS, logs_of, spawn, started_or_ended
from worker import admin
from worker.errors import REASON_HEADER
from worker.settings import Settings

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(600)]

TOTAL = 5000
BAD_EVERY = 50
PACE_SECONDS = 45  # publishing is spread over this long, so the faults hit mid-stream
KILL_EVERY_SECONDS = 5.0
RABBITMQ_RESTART_AT = 12.0
POSTGRES_RESTART_AT = 27.0
MAX_MESSAGE_BYTES = 64 * 1024
BAD_KINDS = [  # (reason, routing key, body, has a message id)
    ("invalid_json", "lead.contact", b'{"source": ', True),
    ("invalid_schema", "contact.close", json.dumps({"contact_id": "7"}).encode(), True),
    ("missing_message_id", "lead.contact", json.dumps(lead("tg", "nobody")).encode(), False),
    ("unknown_source", "lead.contact", json.dumps(lead("no-such-bot", "x")).encode(), True),
    ("unknown_contact", "contact.close", json.dumps({"contact_id": 10**12}).encode(), True),
    ("too_large", "lead.contact", b" " * (MAX_MESSAGE_BYTES + 1), True),
]
SOURCES = ["tg", "web", "wa"]
OFFER_SECONDS = 2  # with offers on: the web source's accept timeout


class Publisher:
    """pika in a thread: sends exactly what it is given (no stamped ids), and keeps
    retrying each message through a broker restart until it is confirmed."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.retries = 0
        self._connection: pika.BlockingConnection | None = None
        self._channel: Any = None

    def publish(self, routing_key: str, body: bytes, message_id: str | None) -> None:
        while True:
            try:
                if self._channel is None:
                    self._connection = pika.BlockingConnection(
                        pika.URLParameters(self.settings.amqp_url)
                    )
                    self._channel = self._connection.channel()
                    self._channel.confirm_delivery()
                self._channel.basic_publish(
                    self.settings.inbound_exchange,
                    routing_key,
                    body,
                    pika.BasicProperties(message_id=message_id, delivery_mode=2),
                    mandatory=True,
                )
                return
            except (pika.exceptions.AMQPError, OSError):
                self.retries += 1
                self.close()
                time.sleep(0.5)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self._connection is not None and self._connection.is_open:
                self._connection.close()
        self._connection = self._channel = None


def dead_letter_key(reason: str, message_id: str | None, body: bytes) -> str:
    """What tells one bad message from another: its id, or the body of an id-less one."""
    return body.decode() if reason == "missing_message_id" else str(message_id)


def plan(rng: random.Random) -> list[tuple[str, str, bytes, str | None]]:
    """(kind, routing key, body, message id) for every message, bad ones spread evenly."""
    messages = []
    for n in range(TOTAL):
        if n % BAD_EVERY == BAD_EVERY - 1:
            reason, key, body, has_id = BAD_KINDS[(n // BAD_EVERY) % len(BAD_KINDS)]
            if not has_id:  # told apart by their bodies
                body = json.dumps(lead("tg", f"nobody:{n}")).encode()
            messages.append((reason, key, body, f"bad-{n}" if has_id else None))
        else:
            body = json.dumps(lead(rng.choice(SOURCES), f"f:{rng.randrange(3000)}")).encode()
            messages.append(("valid", "lead.contact", body, f"f-{n}"))
    return messages


@pytest.mark.parametrize(
    ("offers", "team"),
    [(False, 6), (True, 6), (False, 400)],
    ids=["offers-off", "offers-on", "large-team"],
)
async def test_nothing_lost_doubled_or_over_capacity_through_faults(
    settings: Settings,
    pool: asyncpg.Pool,
    tmp_path: Path,
    own_servers: OwnServers,
    offers: bool,
    team: int,
) -> None:
    """With `offers`, the `web` source makes offers (2 s to answer) and an operator app
    accepts most, declines some and ignores a few, through the same faults. With a large
    `team`, every operator (capacity 1 or 2) is weighted on all three sources, so routing
    reads a window of each (issue 14's bounded path) and capacity still runs out."""
    # The fixtures' database and broker are the suite's own servers: those restart.
    assert settings.amqp_url == own_servers.rabbitmq.url
    assert urlsplit(settings.database_url).port == own_servers.postgres.port
    settings = settings.model_copy(
        update={
            "max_message_bytes": MAX_MESSAGE_BYTES,
            "prefetch": 16,
            "shutdown_grace_seconds": 5,
        }
    )
    large = team > 6
    ops = [
        (await admin.add_operator(pool, f"op{n}", 1 + n % 2 if large else 25, True))["id"]
        for n in range(team)
    ]
    for i, key in enumerate(SOURCES):
        await admin.add_source(
            pool, key, None, "", ["smooth", "weighted_random", "least_loaded"][i]
        )
        if large:
            await admin.set_weights(pool, key, {op: 1 + n % 5 for n, op in enumerate(ops)})
        else:
            await admin.set_weights(pool, key, {ops[(i + j) % 6]: j + 1 for j in range(4)})
    if offers:
        await admin.update_source(pool, "web", accept_timeout=OFFER_SECONDS)
    rng = random.Random(2024)
    messages = plan(rng)
    valid_ids = {m[3] for m in messages if m[0] == "valid"}
    bad_ids = Counter(m[0] for m in messages if m[0] != "valid")
    bad = {dead_letter_key(m[0], m[3], m[2]): m[0] for m in messages if m[0] != "valid"}
    assert len(bad) == sum(bad_ids.values())

    # Declare the topology and a durable event queue that outlives the broker restart.
    events: dict[str, tuple[int, str, int | None]] = {}
    offered: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    event_copies = Counter[str]()
    connection = await aio_pika.connect_robust(settings.amqp_url)
    channel = await connection.channel(publisher_confirms=True)
    from worker import topology

    declared = await topology.declare(channel, settings)
    event_queue = await channel.declare_queue(f"{settings.events_exchange}.faults", durable=True)
    await event_queue.bind(declared.exchanges[settings.events_exchange], "#")

    async def on_event(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        data = json.loads(message.body)
        # A contact may be offered (declined, expired, queued) again: the attempt tells
        # one state change from another; a rejected answer is one event per answer.
        again = data["data"].get("attempt")
        if data["type"].endswith("answer_rejected"):
            again = data["id"]
        events[data["id"]] = (data["data"]["contact_id"], data["type"], again)
        if data["type"].endswith("contact.offered") and data["id"] not in event_copies:
            offered.put_nowait(data["data"])
        event_copies[data["id"]] += 1
        await message.ack()

    await event_queue.consume(on_event)

    workers = [spawn(settings, tmp_path, n) for n in range(2)]
    numbers = [0, 1]  # each worker's log: worker-N.log
    spawned = 2
    killed = 0
    restarts: list[str] = []
    publisher = Publisher(settings)
    done_publishing = threading.Event()
    closes_sent: set[int] = set()  # contacts the CRM tried to close
    closes_confirmed: set[int] = set()  # ... and the broker confirmed the close message

    def publish_all() -> None:
        pause = PACE_SECONDS / TOTAL
        for _kind, key, body, message_id in messages:
            publisher.publish(key, body, message_id)
            time.sleep(pause)
        done_publishing.set()

    async def crm() -> None:
        """Close assigned contacts now and then, so capacity keeps moving between sources."""
        closer = await aio_pika.connect_robust(settings.amqp_url)
        async with closer:
            ch = await closer.channel(publisher_confirms=True)
            exchange = await ch.get_exchange(settings.inbound_exchange)
            while not done_publishing.is_set():
                with contextlib.suppress(Exception):
                    rows = await pool.fetch(
                        "SELECT id FROM contacts WHERE status = 'open' AND operator_id IS NOT NULL"
                        " ORDER BY random() LIMIT 10"
                    )
                    for row in rows:
                        closes_sent.add(row["id"])
                        await exchange.publish(
                            aio_pika.Message(
                                json.dumps({"contact_id": row["id"]}).encode(),
                                message_id=f"close-{row['id']}",
                            ),
                            "contact.close",
                        )
                        closes_confirmed.add(row["id"])
                await asyncio.sleep(0.2)

    answers = Counter[str]()

    async def operator_app() -> None:
        """Answers offers as they come: most accepted, some declined, a few ignored."""
        if not offers:
            return
        app = await aio_pika.connect_robust(settings.amqp_url)
        async with app:
            ch = await app.channel(publisher_confirms=True)
            exchange = await ch.get_exchange(settings.inbound_exchange)
            while not done_publishing.is_set() or not offered.empty():
                try:
                    data = await asyncio.wait_for(offered.get(), 0.5)
                except TimeoutError:
                    continue
                roll = rng.random()
                answer = "accept" if roll < 0.7 else "decline" if roll < 0.9 else "ignore"
                answers[answer] += 1
                if answer == "ignore":
                    continue
                with contextlib.suppress(Exception):  # a broker restart: the offer expires
                    await exchange.publish(
                        aio_pika.Message(
                            json.dumps(
                                {
                                    "contact_id": data["contact_id"],
                                    "operator_id": data["operator_id"],
                                }
                            ).encode(),
                            message_id=f"{answer}-{data['contact_id']}-{data['attempt']}",
                        ),
                        f"contact.{answer}",
                    )

    async def chaos() -> None:
        nonlocal killed, spawned
        started = time.monotonic()
        next_kill = started + KILL_EVERY_SECONDS
        while not done_publishing.is_set():
            now = time.monotonic() - started
            if "rabbitmq" not in restarts and now > RABBITMQ_RESTART_AT:
                restarts.append("rabbitmq")
                await asyncio.to_thread(own_servers.rabbitmq.restart)
            if "postgres" not in restarts and now > POSTGRES_RESTART_AT:
                restarts.append("postgres")
                await asyncio.to_thread(own_servers.postgres.restart)
            if time.monotonic() > next_kill:
                victim = rng.randrange(len(workers))
                workers[victim].send_signal(signal.SIGKILL)
                await asyncio.to_thread(workers[victim].wait)
                killed += 1
                workers[victim] = spawn(settings, tmp_path, spawned)
                numbers[victim] = spawned
                spawned += 1
                next_kill = time.monotonic() + KILL_EVERY_SECONDS * rng.uniform(0.6, 1.4)
            await asyncio.sleep(0.1)

    started = time.monotonic()
    try:
        await asyncio.gather(asyncio.to_thread(publish_all), crm(), chaos(), operator_app())

        async def settled() -> bool:
            with contextlib.suppress(Exception):
                seen = {
                    r["inbound_message_id"]
                    for r in await pool.fetch(
                        "SELECT inbound_message_id FROM contacts"
                        " WHERE inbound_message_id LIKE 'f-%'"
                    )
                }
                pending = await pool.fetchval(
                    "SELECT count(*) FROM outbox WHERE published_at IS NULL"
                )
                outbox = {
                    str(r["event_id"]) for r in await pool.fetch("SELECT event_id FROM outbox")
                }
                open_ = await pool.fetchval(
                    "SELECT count(*) FROM contacts WHERE id = ANY($1::bigint[])"
                    " AND status = 'open'",
                    list(closes_confirmed),
                )
                return seen == valid_ids and pending == 0 and outbox <= set(events) and not open_
            return False

        await wait_until(
            settled, timeout=180, what="every valid lead routed and every event received"
        )
    finally:
        # One respawned just before the end may still be importing, and a SIGTERM before
        # its handler is set ends it by default (-15). A graceful stop is what is checked,
        # so each is given time to start first.
        with contextlib.suppress(AssertionError):
            await wait_until(
                lambda: started_or_ended(workers, numbers, tmp_path),
                timeout=30,
                what="the last workers started",
            )
        for proc in workers:
            proc.send_signal(signal.SIGTERM)
        exits = []
        for proc in workers:
            try:
                exits.append(await asyncio.to_thread(proc.wait, 20))
            except subprocess.TimeoutExpired:
                proc.kill()
                exits.append(None)
        publisher.close()
    elapsed = time.monotonic() - started
    assert exits == [0, 0], f"the last workers exited {exits} on SIGTERM"

    # Every valid message made exactly one contact; nothing else made one.
    contacts = await pool.fetch("SELECT inbound_message_id FROM contacts")
    ids = Counter(r["inbound_message_id"] for r in contacts)
    lost = len(valid_ids - set(ids))
    duplicated = sum(n - 1 for n in ids.values() if n > 1)
    strangers = set(ids) - valid_ids
    # One event row per state change, each received at least once, ids unique per change.
    outbox = await pool.fetch("SELECT event_id, contact_id, routing_key FROM outbox")
    first_events = {r["contact_id"] for r in outbox if r["routing_key"] != "contact.closed"}
    missing_events = len(
        first_events ^ {c["id"] for c in await pool.fetch("SELECT id FROM contacts")}
    )
    outbox_ids = {str(r["event_id"]) for r in outbox}
    unreceived = len(outbox_ids - set(events))
    strange_events = len(set(events) - outbox_ids)  # received, yet no outbox row says so
    per_change = Counter(events.values())
    # Every close the broker confirmed was done, once; no contact closed by anyone else.
    closed = {r["id"] for r in await pool.fetch("SELECT id FROM contacts WHERE status = 'closed'")}
    closed_events = Counter(r["contact_id"] for r in outbox if r["routing_key"] == "contact.closed")
    # Capacity: replayed after every commit, and the counters match the rows.
    peaks = [dict(r) for r in await pool.fetch(PEAK_LOADS)]
    over_capacity = sum(p["peak"] > p["max_load"] for p in peaks)
    drifted = await pool.fetchval(
        "SELECT count(*) FROM operators o WHERE open_load <>"
        " (SELECT count(*) FROM contacts c WHERE c.operator_id = o.id AND c.status = 'open')"
    )
    # The dead-letter queue holds the bad messages, each reason as often as it was sent.
    dead_letters: Counter[tuple[str, str]] = Counter()  # (identity, reason) -> copies
    dq = await channel.get_queue(settings.dead_queue)
    while (message := await dq.get(fail=False)) is not None:
        await message.ack()
        reason = str((message.headers or {}).get(REASON_HEADER))
        dead_letters[(dead_letter_key(reason, message.message_id, message.body), reason)] += 1
    await event_queue.delete(if_unused=False, if_empty=False)
    await connection.close()
    # A worker killed between a dead letter's confirm and its ack dead-letters it again
    # when redelivered: at least once, like everything else; counted, never more than
    # what the killed workers held.
    copies = sum(dead_letters.values()) - len(dead_letters)

    summary = (
        f"fault suite: sent={TOTAL} valid={len(valid_ids)} killed={killed} "
        f"restarts={'+'.join(restarts)} lost={lost} duplicated={duplicated} "
        f"over-capacity={over_capacity} dead-lettered={len(dead_letters)} "
        f"(bad sent {sum(bad_ids.values())}, copies {copies}) closes={len(closes_sent)} "
        f"events={len(outbox)} "
        f"event-redeliveries={sum(event_copies.values()) - len(event_copies)} "
        f"publish-retries={publisher.retries} seconds={elapsed:.0f}"
    )
    if large:
        summary += f" operators={team} (each on every source)"
    if offers:
        kinds = Counter(r["routing_key"] for r in outbox)
        summary += (
            f" offers={kinds['contact.offered']} accepted-by-app={answers['accept']}"
            f" declined={kinds['contact.declined']} expired={kinds['contact.expired']}"
            f" rejected={kinds['contact.answer_rejected']}"
        )
    SUMMARIES.append(summary)

    assert killed >= 5 and restarts == ["rabbitmq", "postgres"], summary
    assert (lost, duplicated, strangers) == (0, 0, set()), summary
    assert (missing_events, unreceived, strange_events) == (0, 0, 0), summary
    assert all(n == 1 for n in per_change.values()), "two event ids for one state change"
    assert closes_confirmed <= closed <= closes_sent, summary
    assert closed_events == Counter(closed), "one contact.closed event per closed contact"
    assert over_capacity == 0 and drifted == 0, (summary, peaks)
    # Exactly the bad messages dead-lettered, each with its reason; never a valid one.
    assert dict(dead_letters.keys()) == bad, summary
    assert len(dead_letters) == len(bad), "a message dead-lettered with two reasons"
    assert copies <= killed * settings.prefetch, summary
    await assert_clean_end(settings, logs_of(tmp_path, restarts=True))
