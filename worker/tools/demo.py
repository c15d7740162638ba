"""`leadrouter demo`: the whole job end to end, in a database and AMQP names of its own
(`<database>_demo`, `<exchange or queue>.demo`), so it never touches real routing data."""

import asyncio
import json
import random
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from importlib.resources import as_file, files
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import asyncpg
import click
from rich.console import Console
from rich.progress import Progress

from schemas.inbound import ContactClose, Lead, LeadContact
from worker import log, nodes, publisher, routing_file, stats, topology
from worker.app import Worker
from worker.migrate import drop_database, migrate
from worker.settings import Settings, mask_url
from worker.sql import Q

TIMEOUT_SECONDS = 60
PUBLISH_BATCH = 200
# The simulated operator app of the source with offers: how it answers an offer.
ACCEPTS, DECLINES = 0.8, 0.12  # the rest it ignores: the offer expires
PENDING_OFFERS = "SELECT count(*) FROM contacts WHERE offer_expires_at IS NOT NULL"


def demo_settings(settings: Settings) -> Settings:
    parts = urlsplit(settings.database_url)
    database = (parts.path.lstrip("/") or "leadrouter") + "_demo"
    names = ("inbound_exchange", "inbound_queue", "events_exchange", "dead_exchange", "dead_queue")
    return settings.model_copy(
        update={
            "database_url": urlunsplit(parts._replace(path=f"/{database}")),
            **{name: getattr(settings, name) + ".demo" for name in names},
            "metrics_port": _free_port(settings.metrics_host, settings.metrics_port),
            "shutdown_grace_seconds": 5.0,
        }
    )


def _free_port(host: str, preferred: int) -> int:
    """The configured metrics port, or any free one if a real worker already has it."""
    with socket.socket() as probe:
        try:
            probe.bind((host, preferred))
        except OSError:
            probe.bind((host, 0))
        return int(probe.getsockname()[1])


async def run_demo(base: Settings, leads: int) -> None:
    settings = demo_settings(base)
    log.configure("WARNING", base.log_format)  # the tables below are the demo's output
    out = Console(width=None if Console().is_terminal else 120)
    out.print(
        f"demo database {mask_url(settings.database_url)}, broker {mask_url(settings.amqp_url)}"
    )
    out.print(
        f"metrics while it runs: http://{settings.metrics_host}:{settings.metrics_port}/metrics"
    )
    await drop_database(settings.database_url)  # start from empty every time
    await migrate(settings.database_url, settings.migrations_dir)

    async with asyncpg.create_pool(settings.database_url, min_size=1, max_size=4) as pool:
        with as_file(files("worker.tools").joinpath("demo_routing.toml")) as sample:
            routing = routing_file.load(sample)
        await routing_file.apply(pool, routing, dry_run=False)
        out.print(
            f"applied the sample routing: {len(routing.operators)} operators, "
            f"{len(routing.sources)} sources"
        )
        connection = await nodes.connect_robust(settings.amqp_url)
        worker = Worker(settings)
        try:
            channel = await connection.channel(publisher_confirms=True)
            declared = await topology.declare(channel, settings)
            events = await channel.declare_queue(exclusive=True)
            await events.bind(declared.exchanges[settings.events_exchange], "#")
            inbound = declared.exchanges[settings.inbound_exchange]
            app = _OperatorApp(inbound)
            offers = await channel.declare_queue(exclusive=True)
            await offers.bind(declared.exchanges[settings.events_exchange], "contact.offered")
            await offers.consume(app.on_offer, no_ack=True)
            await worker.start()
            started = time.perf_counter()
            keys = [s.key for s in routing.sources]
            await _publish_leads(inbound, keys, leads, out)

            async def routed() -> bool:
                return bool((await pool.fetchrow(Q.count_contacts))["total"] >= leads)

            async def offers_settled() -> bool:
                return bool(await pool.fetchval(PENDING_OFFERS) == 0)

            await _wait("the leads to be routed", routed)
            await _wait("every offer to be answered or expire", offers_settled)
            closed = await _close_some(pool, inbound)

            async def all_closed() -> bool:
                return bool((await pool.fetchrow(Q.count_contacts))["closed"] >= closed)

            async def all_published() -> bool:
                return bool(await pool.fetchval(Q.count_pending_events) == 0)

            await _wait("the contacts to be closed", all_closed)
            await _wait("the events to be published", all_published)
            elapsed = time.perf_counter() - started
            kinds = await _count_events(events)
            out.print(
                f"{leads} leads routed and {closed} contacts closed in {elapsed:.1f}s; events "
                + ", ".join(f"{k}={v}" for k, v in sorted(kinds.items()))
            )
            offering = [s.key for s in routing.sources if s.accept_timeout]
            out.print(
                f"offers on {', '.join(offering)}: the operators' app accepted "
                f"{app.answered['accept']}, declined {app.answered['decline']} and ignored "
                f"{app.answered['ignore']} of {sum(app.answered.values())} offers; "
                f"{kinds['contact.declined']} declined and {kinds['contact.expired']} expired "
                f"moved on to the next operator at once, {kinds['contact.answer_rejected']} "
                "answers came too late"
            )
            stats.render(await stats.collect(pool, None, None), out, None)
        finally:
            await worker.stop()
            channel = await connection.channel()
            await topology.delete(channel, settings)
            await connection.close()
    click.echo(
        f"inspect it: LEADROUTER_DATABASE_URL={mask_url(settings.database_url)} "
        "leadrouter contacts list --source partner-api"
    )


async def _publish_leads(
    exchange: aio_pika.abc.AbstractExchange, keys: list[str], count: int, out: Console
) -> None:
    rng = random.Random(7)
    with Progress(console=out, transient=not out.is_terminal) as progress:
        task = progress.add_task("publishing leads", total=count)
        for start in range(0, count, PUBLISH_BATCH):
            batch = []
            for n in range(start, min(start + PUBLISH_BATCH, count)):
                # One lead in five writes again: it is recognised by external_id.
                lead_no = rng.randrange(n) if n > 10 and rng.random() < 0.2 else n
                body = LeadContact(
                    source=rng.choice(keys),
                    lead=Lead(external_id=f"demo:{lead_no}", name=f"Lead {lead_no}"),
                    message="Hello, I would like a quote.",
                )
                msg = publisher.lead_contact_message(body, f"demo-lead-{n}")
                batch.append(publisher.publish(exchange, "lead.contact", msg))
            await asyncio.gather(*batch)
            progress.update(task, advance=len(batch))


class _OperatorApp:
    """The operators' app for the source with offers: accepts most offers, declines some
    and ignores a few (they expire and move on), each a moment after it arrives."""

    def __init__(self, exchange: aio_pika.abc.AbstractExchange) -> None:
        self._exchange = exchange
        self._rng = random.Random(11)
        self.answered: Counter[str] = Counter()
        self._tasks: set[asyncio.Task[None]] = set()

    async def on_offer(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        data = json.loads(message.body)["data"]
        roll = self._rng.random()
        answer = (
            "accept" if roll < ACCEPTS else "decline" if roll < ACCEPTS + DECLINES else "ignore"
        )
        self.answered[answer] += 1
        if answer != "ignore":
            task = asyncio.create_task(self._answer(answer, data))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _answer(self, answer: str, data: dict[str, Any]) -> None:
        await asyncio.sleep(self._rng.uniform(0.05, 0.5))  # the person reads it first
        body: dict[str, Any] = {
            "contact_id": data["contact_id"],
            "operator_id": data["operator_id"],
        }
        if answer == "decline":
            body["reason"] = "busy"
        await publisher.publish(
            self._exchange,
            f"contact.{answer}",
            aio_pika.Message(
                json.dumps(body).encode(),
                message_id=f"demo-{answer}-{data['contact_id']}-{data['attempt']}",
                content_type="application/json",
            ),
        )


async def _close_some(pool: asyncpg.Pool, exchange: aio_pika.abc.AbstractExchange) -> int:
    """Close a third of the assigned contacts by message, as a CRM would."""
    ids = [r["id"] for r in await pool.fetch(Q.assigned_contact_ids, 1_000_000)][::3]
    await asyncio.gather(
        *(
            publisher.publish(
                exchange,
                "contact.close",
                publisher.contact_close_message(ContactClose(contact_id=i), f"demo-close-{i}"),
            )
            for i in ids
        )
    )
    return len(ids)


async def _wait(what: str, done: Callable[[], Awaitable[bool]]) -> None:
    deadline = time.monotonic() + TIMEOUT_SECONDS
    while not await done():
        if time.monotonic() > deadline:
            raise click.ClickException(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def _count_events(queue: aio_pika.abc.AbstractQueue) -> Counter[str]:
    kinds: Counter[str] = Counter()
    while (message := await queue.get(fail=False, no_ack=True)) is not None:
        kinds[message.routing_key or ""] += 1
    return kinds
