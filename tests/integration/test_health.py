"""/metrics moves while the worker works; /readyz follows PostgreSQL's reachability, and
the worker stops taking messages while PostgreSQL is away, then resumes on its own."""

import asyncio
import contextlib
import json
from collections import Counter
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import asyncpg
import pytest

from tests.helpers import (
    EventCollector,
    Expected,
    assert_clean_end,
    lead,
    raw_message,
    settled,
    setup_source,
    wait_until,
)
from tests.http_probes import Proxy, free_port, get, sample
from worker.app import Worker
from worker.settings import Settings


async def setup(pool: asyncpg.Pool) -> None:
    await setup_source(pool, "tg", [("a", 100, 1)])


async def test_metrics_move_while_the_worker_works(
    pool: asyncpg.Pool,
    settings: Settings,
    broker: aio_pika.abc.AbstractChannel,
    events: EventCollector,
    worker_log: list[dict[str, Any]],
) -> None:
    await setup(pool)
    app = Worker(settings.model_copy(update={"metrics_port": free_port()}))
    await app.start()
    try:
        assert app.health_port is not None
        exchange = await broker.get_exchange(settings.inbound_exchange)
        for n in range(20):
            await exchange.publish(raw_message(lead("tg", f"m:{n}"), f"m-{n}"), "lead.contact")
        await exchange.publish(raw_message(lead("nope", "m:x"), "m-x"), "lead.contact")
        await events.wait_for("contact.assigned", 20)
        await wait_until(lambda: settled(app, 21), what="21 messages settled")

        async def scraped() -> str | None:
            status, body = await asyncio.to_thread(get, app.health_port, "/metrics")  # type: ignore[arg-type]
            ok = status == 200 and sample(body, "leadrouter_events_published_total") >= 20
            return body if ok else None

        metrics = await wait_until(scraped, what="metrics")
    finally:
        await app.stop()
    assert sample(metrics, 'leadrouter_messages_total{outcome="ok"}') == 20
    assert sample(metrics, 'leadrouter_messages_total{outcome="unknown_source"}') == 1
    assert sample(metrics, 'leadrouter_dead_letters_total{reason="unknown_source"}') == 1
    assert sample(metrics, 'leadrouter_assignments_total{source="tg",strategy="smooth"}') == 20
    assert sample(metrics, "leadrouter_processing_seconds_count") == 21
    assert "leadrouter_queued_contacts " in metrics and "leadrouter_outbox_pending " in metrics
    assert "m:1" not in metrics  # no personal data in labels
    await assert_clean_end(settings, worker_log, Expected(Counter(unknown_source=1)))


@pytest.mark.settings(health_interval_seconds=0.2)
async def test_readiness_follows_postgres_and_consuming_pauses(
    pool: asyncpg.Pool,
    settings: Settings,
    broker: aio_pika.abc.AbstractChannel,
    events: EventCollector,
    worker_log: list[dict[str, Any]],
) -> None:
    await setup(pool)
    url = urlsplit(settings.database_url)
    proxy = Proxy(url.hostname or "127.0.0.1", url.port or 5432)
    await proxy.start()
    netloc = (
        url.netloc.rsplit("@", 1)[0] + f"@127.0.0.1:{proxy.port}"
        if "@" in url.netloc
        else f"127.0.0.1:{proxy.port}"
    )
    proxied = settings.model_copy(
        update={
            "database_url": urlunsplit(url._replace(netloc=netloc)),
            "metrics_port": free_port(),
        }
    )
    app = Worker(proxied)
    await app.start()
    port = app.health_port
    assert port is not None
    try:

        async def ready(expected: bool) -> bool:
            status, body = await asyncio.to_thread(get, port, "/readyz")
            return (status == 200) is expected and json.loads(body)["ready"] is expected

        await wait_until(lambda: ready(True), what="ready")
        assert (await asyncio.to_thread(get, port, "/healthz"))[0] == 200

        await proxy.stop()  # PostgreSQL is gone, as far as the worker can tell
        await wait_until(lambda: ready(False), timeout=10, what="not ready")
        _status, body = await asyncio.to_thread(get, port, "/readyz")
        assert json.loads(body)["postgres"] is False and json.loads(body)["consuming"] is False
        assert (await asyncio.to_thread(get, port, "/healthz"))[0] == 200  # alive all the same

        exchange = await broker.get_exchange(settings.inbound_exchange)
        await exchange.publish(raw_message(lead("tg", "w:1"), "while-down"), "lead.contact")
        await asyncio.sleep(1)
        queue = await broker.declare_queue(settings.inbound_queue, passive=True)
        assert queue.declaration_result.message_count == 1, "paused: the message waits"

        await proxy.start()
        await wait_until(lambda: ready(True), timeout=20, what="ready again")
        [assigned] = await events.wait_for("contact.assigned", 1, timeout=20)
        assert assigned.data.inbound_message_id == "while-down"
        assert app.outcomes == {"ok": 1}
    finally:
        await app.stop()
        with contextlib.suppress(Exception):
            await proxy.stop()
    await assert_clean_end(settings, worker_log)
