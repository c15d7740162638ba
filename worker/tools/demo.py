"""`leadrouter demo`: the whole job end to end, in a database and AMQP names of its own
(`<database>_demo`, `<exchange or queue>.demo`), so it never touches real routing data."""

import asyncio
import random
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from importlib.resources import as_file, files
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
            await worker.start()
            started = time.perf_counter()
            inbound = declared.exchanges[settings.inbound_exchange]
            keys = [s.key for s in routing.sources]
            await _publish_leads(inbound, keys, leads, out)

            async def routed() -> bool:
                return bool((await pool.fetchrow(Q.count_contacts))["total"] >= leads)

            await _wait("the leads to be routed", routed)
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
