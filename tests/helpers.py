import asyncio
import contextlib
import json
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from schemas.events import ContactEvent, OperatorEvent


class EventCollector:
    """Collects outbound events and lets a test wait for a number of them."""

    def __init__(self) -> None:
        self.events: list[ContactEvent] = []
        self.routing_keys: list[str] = []
        self.operator_events: list[OperatorEvent] = []  # operator.presence_changed
        self._changed = asyncio.Event()

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        if (message.routing_key or "").startswith("operator."):
            operator_event = OperatorEvent.model_validate_json(message.body)
            assert message.message_id == operator_event.id
            self.operator_events.append(operator_event)
            self._changed.set()
            return
        event = ContactEvent.model_validate_json(message.body)
        assert message.message_id == event.id
        self.events.append(event)
        self.routing_keys.append(message.routing_key or "")
        self._changed.set()

    def of(self, routing_key: str) -> list[ContactEvent]:
        return [e for e, k in zip(self.events, self.routing_keys, strict=True) if k == routing_key]

    async def wait_for(
        self, routing_key: str, count: int, timeout: float = 20
    ) -> list[ContactEvent]:
        deadline = time.monotonic() + timeout
        while len(self.of(routing_key)) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"got {len(self.of(routing_key))} {routing_key} events, wanted {count}"
                )
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=min(remaining, 0.5))
        return self.of(routing_key)

    async def wait_for_operator_events(self, count: int, timeout: float = 20) -> list[Any]:
        await wait_until(
            lambda: asyncio.sleep(0, len(self.operator_events) >= count),
            timeout,
            f"{count} operator events (got {len(self.operator_events)})",
        )
        return self.operator_events


async def wait_until(
    check: Callable[[], Awaitable[Any]], timeout: float = 20, what: str = "condition"
) -> Any:
    """Poll `check` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what} (last: {result!r})")
        await asyncio.sleep(0.05)


def raw_message(body: Any, message_id: str | None = None, **kwargs: Any) -> aio_pika.Message:
    """A message as any AMQP client would publish it: bytes as given, or JSON."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return aio_pika.Message(body=data, message_id=message_id, **kwargs)


def lead(source: str, external_id: str, **fields: Any) -> dict[str, Any]:
    return {"source": source, "lead": {"external_id": external_id, **fields}, "message": "hi"}


async def settled(worker: Any, n: int) -> bool:
    """Whether a worker has settled (acked, dead-lettered or handed back) n messages."""
    return sum(worker.outcomes.values()) >= n


def crash_route_on(monkeypatch: Any, external_id: str) -> None:
    """Make routing raise, like a bug would, for batches holding this lead."""
    from worker import distribution

    real = distribution.route

    async def buggy(conn: Any, scope: Any, new: Any = (), *args: Any, **kwargs: Any) -> Any:
        if any(n.body.lead.external_id == external_id for n in new):
            raise RuntimeError("a bug")
        return await real(conn, scope, new, *args, **kwargs)

    monkeypatch.setattr(distribution, "route", buggy)


async def setup_source(
    pool: Any, key: str, operators: list[tuple[str, int, int]], strategy: str | None = None
) -> list[int]:
    """A source (default strategy unless given) and its operators as (name, max_load,
    weight); returns the operator ids."""
    from worker import admin

    await admin.add_source(pool, key, None, "", strategy)
    ids = [
        (await admin.add_operator(pool, name, limit, True))["id"] for name, limit, _ in operators
    ]
    await admin.set_weights(pool, key, {i: w for i, (_, _, w) in zip(ids, operators, strict=True)})
    return ids


async def route_new(conn: Any, source: str, *external_ids: str, lease: float | None = None) -> Any:
    """Route one new contact per lead (message id `m-` and the external id) through the
    routing transaction itself, in the caller's transaction; returns its Outcome."""
    from schemas.inbound import LeadContact
    from worker import distribution

    new = [
        distribution.NewContact(
            f"m-{e}", LeadContact.model_validate({"source": source, "lead": {"external_id": e}})
        )
        for e in external_ids
    ]
    scope = await distribution.read_scope(conn, {source}, ())
    return await distribution.route(conn, scope, new, lease=lease)


async def send(
    broker: Any, settings: Any, routing_key: str, body: Any, message_id: str | None = None
) -> None:
    """Publish one inbound message as an upstream bot would."""
    exchange = await broker.get_exchange(settings.inbound_exchange)
    await exchange.publish(raw_message(body, message_id), routing_key)


async def queue_consumers(amqp_url: str, name: str) -> int | None:
    """A queue's consumer count, None if it does not exist. On a connection of its own:
    a passive declaration of a missing queue closes the channel it is made on."""
    import aiormq.exceptions

    async with await aio_pika.connect(amqp_url) as connection:
        channel = await connection.channel()
        try:
            queue = await channel.declare_queue(name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return None
        return queue.declaration_result.consumer_count


HANDLER_ERRORS = ("message_failed", "batch_crashed")  # a message's handling raised a bug


@dataclass
class Expected:
    """What a test's worker must have left behind when it stopped, for `assert_clean_end`:
    the dead letters still in the dead-letter queue, by reason (those the test took off
    itself are not counted), and the error events it may have logged (a test that makes
    routing crash on purpose)."""

    dead: Counter[str] = field(default_factory=Counter)
    errors: set[str] = field(default_factory=set)


# One line per suite (fault, cluster) that tests/conftest.py prints at the end of the run.
SUMMARIES: list[str] = []

# Client libraries whose tracebacks (through stdlib logging) report a lost connection:
# expected while the fault suite restarts the servers, and retried by the worker.
CLIENT_LIBRARIES = ("aiormq.", "aio_pika.", "asyncpg.")


def json_logs(*paths: Path, restarts: bool = False) -> list[dict[str, Any]]:
    """Worker processes' JSON log lines as `capture_logs` entries (`log_level`, `event`).
    A traceback printed past structlog counts as an error, unless `restarts` (servers were
    restarted on purpose) and a client library's connection report printed it (the same
    for a client library's own JSON error line then); so does a garbled JSON line, except
    the last one, cut short by SIGKILL."""
    entries: list[dict[str, Any]] = []
    for path in paths:
        lines = path.read_text(errors="replace").splitlines()
        reporter = ""  # the stdlib logger whose record a traceback continues
        for n, line in enumerate(lines):
            try:
                entry = json.loads(line)
            except ValueError:
                entry = None
            if isinstance(entry, dict) and "event" in entry:
                level = entry.get("level", "info")
                if restarts and str(entry.get("logger", "")).startswith(CLIENT_LIBRARIES):
                    level = "expected"  # a client library reporting the restart
                entries.append({**entry, "log_level": level})
                reporter = ""
                continue
            if line[:1].isalpha() and not line.startswith("Traceback"):
                reporter = line.split(" ", 1)[0]  # "%(name)s %(message)s" (worker.log)
            expected = restarts and reporter.startswith(CLIENT_LIBRARIES)
            cut_short = n == len(lines) - 1 and line.startswith("{")
            if ("Traceback" in line and not expected) or (line.startswith("{") and not cut_short):
                entries.append({"event": f"{path.name}: {line[:200]}", "log_level": "error"})
    return entries


async def inbound_left(settings: Any) -> int:
    """Messages in the inbound queue once no worker consumes it: with their channels gone,
    what the workers left unacknowledged is ready again (a quorum queue returns a
    consumer's messages in the same step that removes it)."""
    async with await aio_pika.connect(settings.amqp_url) as connection:
        channel = await connection.channel()

        async def no_consumer() -> Any:
            queue = await channel.declare_queue(settings.inbound_queue, passive=True)
            result = queue.declaration_result
            return result if result.consumer_count == 0 else None

        result = await wait_until(no_consumer, timeout=15, what="no consumer left")
        return int(result.message_count)


async def assert_clean_end(
    settings: Any, logs: Sequence[Mapping[str, Any]], expected: Expected | None = None
) -> None:
    """What every test that ran a worker checks once its workers have stopped: the inbound
    queue is empty with nothing unacknowledged (a delivery a worker left unacked is ready
    again once its channel is gone), the dead-letter queue holds exactly what the test
    expects, and no worker logged a handler error (or any error) it did not expect."""
    from worker.dlq import reason_of

    expected = expected or Expected()
    left = await inbound_left(settings)
    assert left == 0, (
        f"{left} message(s) left in the inbound queue: unacknowledged by the stopped worker,"
        " or never taken"
    )
    async with await aio_pika.connect(settings.amqp_url) as connection:
        channel = await connection.channel()
        dead: Counter[str] = Counter()
        queue = await channel.get_queue(settings.dead_queue)
        while (message := await queue.get(fail=False)) is not None:
            dead[reason_of(message.headers or {})] += 1
        # Not acked: they go back when this channel closes.
        assert dead == expected.dead, f"dead letters {dict(dead)}, expected {dict(expected.dead)}"
    errors = [
        dict(e)
        for e in logs
        if e.get("log_level") in {"error", "critical"} and e.get("event") not in expected.errors
    ]
    assert errors == [], f"the worker logged errors: {errors[:5]}"
    assert any(e.get("event") == "worker_started" for e in logs), "no worker's log was captured"


# What the smooth strategy owes each weighted operator, in contacts (below zero: ahead of
# their share): weight * (clock - start) while available, frozen as -weight * (start -
# clock at leaving) while not (migration 0013).
SMOOTH_OWED = """
    SELECT w.source_id, w.operator_id,
           w.weight * CASE WHEN w.available THEN s.smooth_clock - w.smooth_start
                           ELSE -w.smooth_start END AS owed
    FROM source_weights w
    JOIN sources s ON s.id = w.source_id
    ORDER BY w.source_id, w.operator_id
"""
