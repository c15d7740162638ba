"""The least RabbitMQ permissions the README documents are enough for the worker: a user
with exactly those, in a vhost of its own, declares the topology, consumes, publishes
events and dead letters."""

import re
import shutil
import subprocess
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import aio_pika
import asyncpg
import pytest

from tests.helpers import (
    EventCollector,
    Expected,
    assert_clean_end,
    crash_route_on,
    lead,
    raw_message,
    setup_source,
    wait_until,
)
from tests.services import cannot_run
from worker.app import Worker
from worker.settings import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_permissions() -> list[str]:
    """The three patterns of the README's `rabbitmqctl set_permissions` command."""
    text = README.read_text()
    block = text[text.index("rabbitmqctl set_permissions") :].split("```")[0]
    patterns = re.findall(r"'([^']+)'", block)
    assert len(patterns) == 3, block
    return patterns


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture
def restricted_vhost(settings: Settings) -> Iterator[str]:
    if shutil.which("rabbitmqctl") is None:
        cannot_run("rabbitmqctl is not on PATH: cannot create a restricted user")
    if urlsplit(settings.amqp_url).hostname not in {"127.0.0.1", "localhost"}:
        cannot_run("the broker is not local: rabbitmqctl cannot manage it")
    name = f"lrtest_{uuid.uuid4().hex[:12]}"
    try:
        rabbitmqctl("add_vhost", name)
        rabbitmqctl("add_user", name, "pw-" + name)
    except (subprocess.CalledProcessError, PermissionError) as exc:
        cannot_run(f"cannot manage RabbitMQ users here: {exc}")
    try:
        rabbitmqctl("set_permissions", "-p", name, name, *readme_permissions())
        yield name
    finally:
        subprocess.run(["rabbitmqctl", "-q", "delete_vhost", name], check=False, timeout=60)
        subprocess.run(["rabbitmqctl", "-q", "delete_user", name], check=False, timeout=60)


async def test_worker_runs_with_the_readme_permissions(
    pool: asyncpg.Pool,
    settings: Settings,
    restricted_vhost: str,
    worker_log: list[dict[str, Any]],
) -> None:
    host = urlsplit(settings.amqp_url)
    user = f"{restricted_vhost}:pw-{restricted_vhost}"
    url = f"amqp://{user}@{host.hostname}:{host.port or 5672}/{quote(restricted_vhost)}"
    # The default names: the README's patterns are written for them.
    defaults = Settings(database_url=settings.database_url, amqp_url=url, log_format="json")
    await setup_source(pool, "tg", [("a", 10, 1)])

    # An admin (guest) publishes as a bot would and listens to the events.
    admin_url = settings.amqp_url.rstrip("/") + "/" + quote(restricted_vhost)
    app = Worker(defaults)
    await app.start()
    try:
        rabbitmqctl("set_permissions", "-p", restricted_vhost, "guest", ".*", ".*", ".*")
        connection = await aio_pika.connect(admin_url)
        async with connection:
            channel = await connection.channel()
            collector = EventCollector()
            queue = await channel.declare_queue(exclusive=True)
            await queue.bind(defaults.events_exchange, "#")
            await queue.consume(collector.on_message, no_ack=True)
            inbound = await channel.get_exchange(defaults.inbound_exchange)
            await inbound.publish(raw_message(lead("tg", "p:1"), "perm-1"), "lead.contact")
            await inbound.publish(raw_message(b"{", "perm-2"), "lead.contact")
            await collector.wait_for("contact.assigned", 1)
            dead = await channel.get_queue(defaults.dead_queue, ensure=False)

            async def dead_lettered() -> bool:
                message = await dead.get(fail=False)
                return message is not None and message.message_id == "perm-2"

            await wait_until(dead_lettered, what="the bad message dead-lettered")
    finally:
        await app.stop()
    assert app.outcomes == {"ok": 1, "invalid_json": 1}
    as_admin = defaults.model_copy(update={"amqp_url": admin_url})
    await assert_clean_end(as_admin, worker_log, Expected(Counter(invalid_json=1)))


async def test_worker_copies_messages_with_the_readme_permissions(
    pool: asyncpg.Pool,
    settings: Settings,
    restricted_vhost: str,
    monkeypatch: pytest.MonkeyPatch,
    worker_log: list[dict[str, Any]],
) -> None:
    """A crashing message is replaced by a copy that counts the failure (published to
    the inbound exchange under the worker's user): with the limit at 2 it fails twice as
    often as the broker's count alone allows (2 x 2 against 2 + 1)."""
    host = urlsplit(settings.amqp_url)
    user = f"{restricted_vhost}:pw-{restricted_vhost}"
    url = f"amqp://{user}@{host.hostname}:{host.port or 5672}/{quote(restricted_vhost)}"
    limited = Settings(
        database_url=settings.database_url,
        amqp_url=url,
        log_format="json",
        delivery_limit=2,
        retry_max_seconds=0.2,
    )
    await setup_source(pool, "tg", [("a", 10, 1)])
    crash_route_on(monkeypatch, "boom")
    app = Worker(limited)
    await app.start()
    try:
        admin_url = settings.amqp_url.rstrip("/") + "/" + quote(restricted_vhost)
        rabbitmqctl("set_permissions", "-p", restricted_vhost, "guest", ".*", ".*", ".*")
        connection = await aio_pika.connect(admin_url)
        async with connection:
            channel = await connection.channel()
            inbound = await channel.get_exchange(limited.inbound_exchange)
            await inbound.publish(raw_message(lead("tg", "boom"), "crash-1"), "lead.contact")
            dead = await channel.get_queue(limited.dead_queue, ensure=False)

            async def dead_lettered() -> bool:
                message = await dead.get(fail=False)
                return message is not None and message.message_id == "crash-1"

            await wait_until(dead_lettered, what="the crashing message dead-lettered")
    finally:
        await app.stop()
    assert app.outcomes == {"error": 4}
    as_admin = limited.model_copy(update={"amqp_url": admin_url})
    await assert_clean_end(
        as_admin, worker_log, Expected(Counter(delivery_limit=1), errors={"message_failed"})
    )
