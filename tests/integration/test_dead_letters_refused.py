"""A dead-letter queue that refuses messages (`x-max-length` with `reject-publish`, so
the broker nacks the worker's confirmed publish) makes the worker not ready and says
why, while valid messages go on; the refused dead letter waits unacked and is
dead-lettered once the queue takes messages again."""

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aio_pika
import asyncpg
import pytest
from structlog.testing import capture_logs

from tests.helpers import EventCollector, lead, raw_message, settled, setup_source, wait_until
from tests.http_probes import free_port, get
from tests.raw_amqp import dead_letters
from worker.app import Worker
from worker.consumer import HAND_BACK_PAUSE_SECONDS
from worker.errors import REASON_HEADER
from worker.settings import Settings


@asynccontextmanager
async def refusing_dead_letters(
    channel: aio_pika.abc.AbstractChannel, settings: Settings
) -> AsyncIterator[None]:
    """Dead letters route only to a queue that holds nothing and refuses the rest (the
    worker's own dead-letter queue is declared with fixed arguments, so a full one is
    made of another queue); on exit the worker's queue takes them again."""
    dead_queue = await channel.get_queue(settings.dead_queue)
    full = await channel.declare_queue(
        f"{settings.dead_queue}.full",
        arguments={"x-max-length": 0, "x-overflow": "reject-publish"},
    )
    await full.bind(settings.dead_exchange, "#")
    await dead_queue.unbind(settings.dead_exchange, "#")
    try:
        yield
    finally:
        await full.unbind(settings.dead_exchange, "#")
        await full.delete(if_unused=False, if_empty=False)
        await dead_queue.bind(settings.dead_exchange, "#")


async def readyz(port: int) -> tuple[int, dict[str, Any]]:
    status, body = await asyncio.to_thread(get, port, "/readyz")
    return status, json.loads(body)


@pytest.mark.settings(health_interval_seconds=0.2, retry_max_seconds=0.5, prefetch=50)
async def test_refused_dead_letters_make_the_worker_not_ready_and_valid_messages_go_on(
    pool: asyncpg.Pool,
    settings: Settings,
    broker: aio_pika.abc.AbstractChannel,
    events: EventCollector,
) -> None:
    await setup_source(pool, "tg", [("a", 1000, 1)])
    app = Worker(settings.model_copy(update={"metrics_port": free_port()}))
    exchange = await broker.get_exchange(settings.inbound_exchange)
    with capture_logs() as logs:
        await app.start()
        try:
            port = app.health_port
            assert port is not None
            await wait_until(lambda: _ready(port, True), what="ready")
            async with refusing_dead_letters(broker, settings):
                await exchange.publish(raw_message(b"{not json", "bad-1"), "lead.contact")
                await wait_until(lambda: _ready(port, False), timeout=10, what="not ready")
                status, body = await readyz(port)
                assert status == 503
                assert body["dead_letters"] is False and body["dead_letter_problem"] == "refused"
                assert body["postgres"] and body["rabbitmq"] and body["consuming"]

                # Sent after the refused one, and more than half the prefetch window:
                # none waits behind it.
                for start in range(0, 60, 20):
                    await asyncio.gather(
                        *(
                            exchange.publish(
                                raw_message(lead("tg", f"v:{n}"), f"v-{n}"), "lead.contact"
                            )
                            for n in range(start, start + 20)
                        )
                    )
                await events.wait_for("contact.assigned", 60, timeout=20)
                await wait_until(lambda: settled(app, 60), what="60 acked")
                assert app.outcomes["ok"] == 60 and app.outcomes["invalid_json"] == 0
                assert (await readyz(port))[0] == 503, "still refused: still not ready"

            # The queue takes messages again: the held dead letter goes there, once.
            await wait_until(lambda: _ready(port, True), timeout=10, what="ready again")
            [dead] = await dead_letters(settings, 1)
            assert dead.message_id == "bad-1" and dead.body == b"{not json"
            assert (dead.headers or {}).get(REASON_HEADER) == "invalid_json"
            await wait_until(lambda: settled(app, 61), what="61 settled")
            assert app.outcomes["invalid_json"] == 1
        finally:
            await app.stop()

    # Acked: nothing went back to the queue when the worker's channel closed.
    queue = await broker.declare_queue(settings.inbound_queue, passive=True)
    assert queue.declaration_result.message_count == 0
    assert await dead_letters(settings, 0) == []
    assert await pool.fetchval("SELECT count(*) FROM contacts") == 60
    failing = [e for e in logs if e["event"] == "dead_letters_failing"]
    assert failing and failing[0]["cause"] == "refused" and failing[0]["log_level"] == "error"


async def _ready(port: int, expected: bool) -> bool:
    status, body = await readyz(port)
    return (status == 200) is expected and body["ready"] is expected


@pytest.mark.settings(health_interval_seconds=0.2, retry_max_seconds=0.3, prefetch=4)
async def test_refused_dead_letters_never_fill_the_prefetch_window(
    pool: asyncpg.Pool,
    settings: Settings,
    broker: aio_pika.abc.AbstractChannel,
    events: EventCollector,
) -> None:
    """At most half the window is held, whatever waits for what; further refused ones go
    back to the queue at once and come again, so valid messages keep a way through."""
    await setup_source(pool, "tg", [("a", 1000, 1)])
    app = Worker(settings)
    exchange = await broker.get_exchange(settings.inbound_exchange)
    await app.start()
    most_held = 0

    async def sample() -> None:
        nonlocal most_held
        assert app.consumer is not None
        while True:
            channels = app.consumer._acks._channels.values()
            most_held = max(most_held, sum(len(c.held) for c in channels))
            await asyncio.sleep(0.005)

    sampler = asyncio.create_task(sample())
    try:
        async with refusing_dead_letters(broker, settings):
            for n in range(6):
                await exchange.publish(raw_message(b"{not json", f"bad-{n}"), "lead.contact")
            for n in range(20):
                await exchange.publish(raw_message(lead("tg", f"v:{n}"), f"v-{n}"), "lead.contact")
            await events.wait_for("contact.assigned", 20, timeout=20)
            assert app.outcomes["ok"] == 20 and app.outcomes["dead_letter_handed_back"] > 0
            assert app.readiness.ready() is False
        await wait_until(lambda: _outcome(app, "invalid_json", 6), what="6 dead-lettered")
        await wait_until(lambda: asyncio.sleep(0, app.readiness.ready()), what="ready again")
    finally:
        sampler.cancel()
        await app.stop()
    assert 0 < most_held <= settings.prefetch // 2
    dead = await dead_letters(settings, 6)
    assert sorted(d.message_id or "" for d in dead) == [f"bad-{n}" for n in range(6)]
    assert await dead_letters(settings, 0) == []


async def _outcome(app: Worker, outcome: str, count: int) -> bool:
    return app.outcomes[outcome] >= count


@pytest.mark.settings(retry_max_seconds=0.2)
async def test_a_dead_letter_that_cannot_be_published_does_not_hold_up_the_others(
    pool: asyncpg.Pool,
    settings: Settings,
    broker: aio_pika.abc.AbstractChannel,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A failure of its own (not the broker's): it waits, unacked and retried, with the
    worker not ready and saying why, while later dead letters go by."""
    from worker.consumer import Consumer

    real = Consumer._publish_dead

    async def broken_for_one(self: Consumer, message: Any, failure: Any) -> None:
        if message.header.properties.message_id == "bad-1":
            raise ValueError("cannot encode")
        await real(self, message, failure)

    monkeypatch.setattr(Consumer, "_publish_dead", broken_for_one)
    app = Worker(settings)
    await app.start()
    try:
        exchange = await broker.get_exchange(settings.inbound_exchange)
        await exchange.publish(raw_message(b"{not json", "bad-1"), "lead.contact")
        await wait_until(lambda: asyncio.sleep(0, not app.readiness.dead_letters), what="failing")
        await exchange.publish(raw_message(b"{not json", "bad-2"), "lead.contact")
        [dead] = await dead_letters(settings, 1)
        assert dead.message_id == "bad-2"
        assert app.readiness.dead_letters is False
        assert app.readiness.dead_letter_problem == "ValueError"
    finally:
        await app.stop()
    queue = await broker.declare_queue(settings.inbound_queue, passive=True)
    assert queue.declaration_result.message_count == 1, "bad-1 went back to the queue"


@pytest.mark.settings(health_interval_seconds=0.2, retry_max_seconds=0.3, prefetch=20)
async def test_a_stream_of_refused_dead_letters_does_not_go_round_at_full_speed(
    pool: asyncpg.Pool,
    settings: Settings,
    broker: aio_pika.abc.AbstractChannel,
    events: EventCollector,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While the dead-letter queue refuses, bad messages keep coming and valid ones with
    them: those beyond the refused ones held for retrying go back to the queue after a
    pause, a few at a time, instead of coming straight back; no publish is tried for
    them. Valid ones all make contacts; once the queue takes messages again, every bad
    one is dead-lettered once."""
    from worker.consumer import Consumer

    deliveries: list[float] = []  # when the worker saw a bad message
    attempts: list[float] = []  # when it tried to publish a dead letter
    real_on_message, real_publish_dead = Consumer.on_message, Consumer._publish_dead

    async def seen(self: Consumer, message: Any) -> None:
        if (message.header.properties.message_id or "").startswith("bad-"):
            deliveries.append(time.monotonic())
        await real_on_message(self, message)

    async def publishing(self: Consumer, message: Any, failure: Any) -> None:
        attempts.append(time.monotonic())
        await real_publish_dead(self, message, failure)

    monkeypatch.setattr(Consumer, "on_message", seen)
    monkeypatch.setattr(Consumer, "_publish_dead", publishing)
    await setup_source(pool, "tg", [("a", 1000, 1)])
    app = Worker(settings)
    exchange = await broker.get_exchange(settings.inbound_exchange)
    await app.start()
    assert app.consumer is not None
    most_held = 0

    async def sample() -> None:
        nonlocal most_held
        assert app.consumer is not None
        while True:
            channels = app.consumer._acks._channels.values()
            most_held = max(most_held, sum(len(c.held) for c in channels))
            await asyncio.sleep(0.005)

    sampler = asyncio.create_task(sample())
    rounds, published_at = 40, []
    try:
        async with refusing_dead_letters(broker, settings):
            for n in range(rounds):  # 4 seconds: 10 bad and 10 valid ones a second
                published_at.append(time.monotonic())
                await exchange.publish(raw_message(b"{not json", f"bad-{n}"), "lead.contact")
                await exchange.publish(raw_message(lead("tg", f"v:{n}"), f"v-{n}"), "lead.contact")
                await asyncio.sleep(0.1)
            # The last three seconds: the held ones are in place and the rest go round.
            start, end = published_at[10], time.monotonic()
            seen_bad = sum(start <= t <= end for t in deliveries)
            new_bad = sum(start <= t <= end for t in published_at)
            tried = sum(start <= t <= end for t in attempts)
            await events.wait_for("contact.assigned", rounds, timeout=30)
            assert app.readiness.dead_letters is False
        await wait_until(lambda: _outcome(app, "invalid_json", rounds), timeout=30, what="all dead")
    finally:
        sampler.cancel()
        await app.stop()

    # A quarter of the window waits out the pause (the README's bound); each of those
    # slots hands back at most one per pause, and a handed-back one may come again as
    # the copy that replaces it (its delivery count reset), hence twice.
    slots = settings.prefetch // 2 - settings.prefetch // 4
    pause = min(HAND_BACK_PAUSE_SECONDS, settings.retry_max_seconds)
    bound = new_bad + 2 * slots * ((end - start) / pause + 1)
    assert 0 < seen_bad <= bound, f"{seen_bad} deliveries of bad messages in {end - start:.1f}s"
    # Only the oldest held one is retried, at most once per 50 ms of backoff.
    assert tried <= (end - start) / 0.05 + 1
    assert 0 < most_held <= settings.prefetch // 2
    assert await pool.fetchval("SELECT count(*) FROM contacts") == rounds
    dead = await dead_letters(settings, rounds)
    assert sorted(d.message_id or "" for d in dead) == sorted(f"bad-{n}" for n in range(rounds))
    assert await dead_letters(settings, 0) == []
