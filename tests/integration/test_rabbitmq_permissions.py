"""The least RabbitMQ permissions the README documents are enough for the worker: a user
with exactly those, in a vhost of its own, declares the topology, consumes, publishes
events and dead letters; and the ones it gives the dlq commands are enough for them."""

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
from worker import dlq
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


def readme_dlq_permissions() -> tuple[str, str]:
    """The write and read patterns the README gives the `dlq` commands (no configure)."""
    text = " ".join(README.read_text().split())
    found = re.search(r"`dlq` commands need write on `([^`]+)` .*? read on `([^`]+)`", text)
    assert found, "the README no longer says what the dlq commands need"
    return found[1], found[2]


@pytest.fixture
def ops_user(restricted_vhost: str) -> Iterator[str]:
    """A user with only what the README gives the dlq commands, in the restricted vhost."""
    name = f"{restricted_vhost}_ops"
    rabbitmqctl("add_user", name, "pw-" + name)
    try:
        rabbitmqctl(
            "set_permissions", "-p", restricted_vhost, name, "^$", *readme_dlq_permissions()
        )
        yield name
    finally:
        subprocess.run(["rabbitmqctl", "-q", "delete_user", name], check=False, timeout=60)


async def test_dlq_runs_with_the_readme_permissions(
    pool: asyncpg.Pool, settings: Settings, restricted_vhost: str, ops_user: str
) -> None:
    """List, show, replay and purge as a user with only what the README gives the dlq
    commands; a second command is refused as busy, not for a missing permission."""
    host = urlsplit(settings.amqp_url)
    vhost = quote(restricted_vhost)
    base = f"{host.hostname}:{host.port or 5672}/{vhost}"
    worker_user = f"{restricted_vhost}:pw-{restricted_vhost}"
    # The default names: the README's patterns are written for them.
    as_worker = Settings(
        database_url=settings.database_url, amqp_url=f"amqp://{worker_user}@{base}"
    )
    as_ops = Settings(
        database_url=settings.database_url, amqp_url=f"amqp://{ops_user}:pw-{ops_user}@{base}"
    )
    admin_url = settings.amqp_url.rstrip("/") + "/" + vhost
    await setup_source(pool, "tg", [("a", 10, 1)])
    app = Worker(as_worker)
    await app.start()
    try:
        rabbitmqctl("set_permissions", "-p", restricted_vhost, "guest", ".*", ".*", ".*")
        connection = await aio_pika.connect(admin_url)
        async with connection:
            channel = await connection.channel()
            inbound = await channel.get_exchange(as_worker.inbound_exchange)
            for n in range(3):
                await inbound.publish(raw_message(b"{", f"bad-{n}"), "lead.contact")

            async def dead_lettered() -> bool:
                return await dlq.count(as_ops) == 3

            await wait_until(dead_lettered, what="three dead letters")
    finally:
        await app.stop()

    entries = await dlq.list_entries(as_ops)
    assert [(e.message_id, e.reason) for e in entries] == [
        (f"bad-{n}", "invalid_json") for n in range(3)
    ]
    shown = await dlq.show(as_ops, entries[1].id)
    assert shown is not None and shown.body == b"{"
    assert await dlq.replay(as_ops, ids=[entries[0].id]) == 1
    assert await dlq.purge(as_ops, ids=[entries[2].id]) == 1
    assert [e.id for e in await dlq.list_entries(as_ops)] == [entries[1].id]

    other = await aio_pika.connect(admin_url)  # another command, reading the queue
    try:
        queue = await (await other.channel()).get_queue(as_ops.dead_queue)

        async def hold(_message: aio_pika.abc.AbstractIncomingMessage) -> None:
            pass

        await queue.consume(hold, exclusive=True)
        with pytest.raises(dlq.Busy):
            await dlq.list_entries(as_ops)
    finally:
        await other.close()
