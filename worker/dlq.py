"""Ops on the dead-letter queue: list, show, replay, purge.

Reading without losing or reordering: every command reads the queue through an exclusive
consumer (manual acks, a prefetch of `max_held`) and does not ack what it looks at; the
ones it replays or purges are acked one by one, and closing the channel hands all the
others back. A *classic* queue puts a requeued message back in its own place, so the
queue keeps its order. A quorum queue (RabbitMQ 3.10, measured) does not: returned
messages come back behind the ones never taken, or shuffled once more than a few are
returned at once, and each return counts as a delivery (x-delivery-count), which
RabbitMQ 4 limits to 20 by default. So the dead-letter queue must be a classic durable
queue.

One command at a time: a second one finds the first one's consumer (or its exclusive
consume is refused, ACCESS_REFUSED) and raises Busy at once, before reading anything.
With basic.get, two commands each saw the queue with holes where the other held
messages, and the ones handed back mid-scan out of order. An exclusive consumer needs
only read on the queue, no configure permission.

Each command looks only at the messages that were in the queue when it took it (see
_walk), so dead letters arriving meanwhile, including the ones its own replays cause,
stay behind them, untouched. It keeps at most `max_held` messages unacked; on a queue
longer than that, it stops there, logs `dlq_scan_capped` and raises ScanIncomplete with
what it found or did (as it does if a counted message is removed meanwhile): "none
found" must never stand for "not looked at".

The reason of a dead letter the broker made (it has `x-death`: the delivery limit, an
expired message) comes from `x-death` alone, never from the message's own headers, which
a publisher may have set. Messages whose properties the client cannot decode are read all
the same (worker/amqp_reads.py), without those properties, and say which they were.

Entry ids: the first 12 hex digits of a SHA-256 of what a dead letter is and never changes
while it lies in the queue: routing key, message id, timestamp, headers (less the ones a
broker adds on redelivery) and body. An id therefore stays valid between a `list` and a
later `replay --id`, whatever else was removed or added in between (a position would not,
and message ids are neither unique nor always there). Copies identical in all of these
share an id and are replayed or purged together, which is harmless since the worker
handles a message id once. A message dead-lettered again after a replay gets the same id.

Message bodies are personal data: nothing here logs them.
"""

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from aiormq.abc import DeliveredMessage

from worker import amqp_reads, log, nodes
from worker.decode import message_id_of, shown_routing_key
from worker.errors import ERROR_HEADER, REASON_HEADER
from worker.republish import republished
from worker.settings import Settings

logger = log.get(__name__)

MAX_HELD = 10_000
MAX_PREFETCH = 65_535  # basic.qos's prefetch count is a 16-bit number
DELIVERY_TIMEOUT = 10.0  # seconds without the next counted message: it was removed
BODY_SHOWN = 64 * 1024  # bytes of a body kept in an Entry
SOURCE_SHOWN = 64  # characters of a source
ID_LENGTH = 12

OUR_PREFIX = "x-leadrouter-"
# Dead-lettering bookkeeping that must not follow a replayed message back to the inbound
# queue; x-delivery-count is what a quorum queue adds on each redelivery.
DEATH_HEADERS = frozenset({"x-death", "x-delivery-count"})
DEATH_PREFIXES = (OUR_PREFIX, "x-first-death-", "x-last-death-")
# Changes while a message lies in a (quorum) queue, so it is left out of the id.
VOLATILE_HEADERS = frozenset({"x-delivery-count"})
PROPERTIES = (
    "content_type",
    "content_encoding",
    "delivery_mode",
    "priority",
    "correlation_id",
    "reply_to",
    "expiration",
    "timestamp",
    "type",
    "user_id",
    "app_id",
)


@dataclass(frozen=True)
class Entry:
    id: str
    reason: str
    error: str
    routing_key: str
    source: str | None
    age_seconds: float | None
    message_id: str | None
    headers: Mapping[str, Any]
    properties: Mapping[str, Any]
    body: bytes  # the first BODY_SHOWN bytes
    body_size: int
    undecodable: tuple[str, ...] = ()  # properties the client could not decode: left out

    @property
    def text(self) -> str:
        """The body as text, with a note of what was cut."""
        return preview(self.body, self.body_size)


# Pure helpers


def entry_id(
    routing_key: str,
    message_id: str | None,
    timestamp: datetime | None,
    headers: Mapping[str, Any],
    body: bytes,
) -> str:
    stable = {k: v for k, v in headers.items() if k not in VOLATILE_HEADERS}
    meta = json.dumps(
        [routing_key, message_id, timestamp, stable], sort_keys=True, default=repr
    ).encode()
    # JSON never contains a raw NUL byte, so it separates the two parts unambiguously.
    return hashlib.sha256(meta + b"\0" + body).hexdigest()[:ID_LENGTH]


def reason_of(headers: Mapping[str, Any]) -> str:
    """The broker's reason if it dead-lettered the message (`delivery_limit`, `expired`,
    `rejected`...), whatever headers the message came with; else our reason header."""
    death = _last_death(headers)
    if death is not None:
        return _text(death.get("reason")) or "unknown"
    return _text(headers.get(REASON_HEADER)) or "unknown"


def error_of(headers: Mapping[str, Any], undecodable: Collection[str] = ()) -> str:
    death = _last_death(headers)
    if death is not None:
        error = (
            f"dead-lettered by the broker ({_text(death.get('reason'))}) "
            f"from queue {_text(death.get('queue'))}"
        )
        if undecodable:
            error += f"; could not decode the AMQP {', '.join(undecodable)}"
        return error
    return _text(headers.get(ERROR_HEADER))


def source_of(body: bytes, max_bytes: int = 1024 * 1024) -> str | None:
    """The body's "source" field, if the body is a JSON object that has a string one."""
    if len(body) > max_bytes:
        return None
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    source = data.get("source") if isinstance(data, dict) else None
    return source[:SOURCE_SHOWN] if isinstance(source, str) else None


def age_of(headers: Mapping[str, Any], timestamp: datetime | None, now: datetime) -> float | None:
    """Seconds since the broker dead-lettered it, else since it was published (our dead
    copies keep the original timestamp); None when neither is known."""
    death = _last_death(headers)
    when = death.get("time") if death else None
    when = when if isinstance(when, datetime) else timestamp
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (now - when).total_seconds())


def replayable(header: str) -> bool:
    """Whether a dead letter's header goes with it when it is published again."""
    return header not in DEATH_HEADERS and not header.startswith(DEATH_PREFIXES)


def replay_headers(headers: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in headers.items() if replayable(k)}


def make_entry(
    *,
    routing_key: str,
    message_id: str | None,
    headers: Mapping[str, Any],
    properties: Mapping[str, Any],
    body: bytes,
    now: datetime,
    max_json_bytes: int = 1024 * 1024,
    undecodable: tuple[str, ...] = (),
) -> Entry:
    timestamp = properties.get("timestamp")
    message_id = message_id_of(message_id)
    return Entry(
        id=entry_id(routing_key, message_id, timestamp, headers, body),
        reason=reason_of(headers),
        error=error_of(headers, undecodable),
        routing_key=routing_key,
        source=source_of(body, max_json_bytes),
        age_seconds=age_of(headers, timestamp, now),
        message_id=message_id,
        headers=dict(headers),
        properties=dict(properties),
        body=body[:BODY_SHOWN],
        body_size=len(body),
        undecodable=undecodable,
    )


def replay_message(entry: Entry, body: bytes) -> aio_pika.Message:
    """The message to put back on the inbound exchange: original id, body and properties,
    without dead-letter headers (nor any that cannot be encoded again). Not the expiration
    (it would only expire again) nor the user id (the broker refuses one that is not the
    publishing user's). A message without an id stays without one, and is dead-lettered
    again as missing_message_id unless its body has one: replaying it twice cannot make
    two contacts."""
    return republished(
        body, entry.message_id, entry.properties, entry.headers, keep_header=replayable
    ).message


def selection(
    *, all: bool = False, reason: str | None = None, ids: Collection[str] = ()
) -> Callable[[Entry], bool]:
    """Which entries a replay or purge takes: exactly one of all, a reason, or ids."""
    if sum((all, reason is not None, bool(ids))) != 1:
        raise ValueError("choose exactly one of: all, a reason, ids")
    if all:
        return lambda _entry: True
    if reason is not None:
        return lambda entry: entry.reason == reason
    wanted = {i.strip().lower() for i in ids}
    return lambda entry: entry.id in wanted


def preview(body: bytes, size: int) -> str:
    text = body.decode("utf-8", errors="replace")
    more = size - len(body)
    return f"{text}\n… [{more} more bytes not shown]" if more > 0 else text


class Busy(Exception):
    """Another dlq command (or some other consumer) is reading the dead-letter queue."""

    def __init__(self, queue: str) -> None:
        super().__init__(f"another dlq command is reading {queue}; try again when it is done")
        self.queue = queue


class ScanIncomplete(Exception):
    """A command stopped before looking at every dead letter that was in the queue when
    it started. `result` is what it returns otherwise: what it found, or how many it
    replayed or purged among those it looked at."""

    def __init__(self, looked: int, total: int, max_held: int | None, result: Any) -> None:
        why = (
            f"it keeps at most {max_held} in place at once (--scan-limit); purge or "
            "replay some of them, or raise the limit, then run it again"
            if max_held is not None
            else "the others were removed meanwhile; run it again"
        )
        super().__init__(f"looked at {looked} of the {total} dead letters only: {why}")
        self.looked = looked
        self.total = total
        self.result = result


@dataclass(frozen=True)
class _Scan:
    looked: int
    total: int
    capped_at: int | None = None  # stopped holding this many
    taken_meanwhile: bool = False  # stopped: something else took the rest

    def check(self, result: Any) -> None:
        if self.capped_at is not None or self.taken_meanwhile:
            raise ScanIncomplete(self.looked, self.total, self.capped_at, result)


def _last_death(headers: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The most recent x-death record (the broker puts it first)."""
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], Mapping):
        return deaths[0]
    return None


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


# Broker I/O

Visit = Callable[[Entry, AbstractIncomingMessage], Awaitable[bool]]


async def count(settings: Settings) -> int:
    """Messages in the dead-letter queue (less any that another command holds)."""
    async with _dead_queue(settings) as (_channel, queue):
        return _ready(queue)


async def list_entries(
    settings: Settings, reason: str | None = None, limit: int = 100, *, max_held: int = MAX_HELD
) -> list[Entry]:
    """The first `limit` entries (with this reason), in queue order. Changes nothing."""
    if limit < 1:
        raise ValueError("limit must be at least 1")
    found: list[Entry] = []

    async def visit(entry: Entry, _message: AbstractIncomingMessage) -> bool:
        if reason is None or entry.reason == reason:
            found.append(entry)
        return len(found) < limit

    async with _dead_queue(settings) as (_channel, queue):
        scan = await _walk(settings, queue, visit, max_held)
    if len(found) < limit:
        scan.check(found)
    return found


async def show(settings: Settings, entry_id: str, *, max_held: int = MAX_HELD) -> Entry | None:
    """The first entry with this id, or None. Changes nothing."""
    wanted = entry_id.strip().lower()
    found: list[Entry] = []

    async def visit(entry: Entry, _message: AbstractIncomingMessage) -> bool:
        if entry.id == wanted:
            found.append(entry)
        return not found

    async with _dead_queue(settings) as (_channel, queue):
        scan = await _walk(settings, queue, visit, max_held)
    if not found:
        scan.check(None)
    return found[0] if found else None


async def replay(
    settings: Settings,
    *,
    all: bool = False,
    reason: str | None = None,
    ids: Collection[str] = (),
    max_held: int = MAX_HELD,
) -> int:
    """Publish the selected dead letters to the inbound exchange, each removed from the
    dead-letter queue only once the broker has confirmed it; returns how many. A crash in
    between leaves a copy in both, which the worker's idempotence on message ids absorbs."""
    selected = selection(all=all, reason=reason, ids=ids)
    replayed = 0

    async with _dead_queue(settings) as (channel, queue):
        inbound = await channel.get_exchange(settings.inbound_exchange)

        async def visit(entry: Entry, message: AbstractIncomingMessage) -> bool:
            nonlocal replayed
            if selected(entry):
                # Mandatory with on_return_raises: an unroutable replay raises instead of
                # being dropped, and its dead letter stays.
                await inbound.publish(
                    replay_message(entry, message.body), entry.routing_key, mandatory=True
                )
                await message.ack()
                replayed += 1
                logger.info(
                    "dlq_replayed",
                    entry_id=entry.id,
                    message_id=entry.message_id,
                    reason=entry.reason,
                    routing_key=shown_routing_key(entry.routing_key),
                )
            return True

        scan = await _walk(settings, queue, visit, max_held)
    logger.info("dlq_replay_done", replayed=replayed)
    scan.check(replayed)
    return replayed


async def purge(
    settings: Settings,
    reason: str | None = None,
    *,
    ids: Collection[str] = (),
    max_held: int = MAX_HELD,
) -> int:
    """Remove the selected dead letters (all of them without a reason or ids); returns
    how many. Unlike queue.purge, it never removes what arrives while it runs."""
    selected = selection(all=reason is None and not ids, reason=reason, ids=ids)
    purged = 0

    async def visit(entry: Entry, message: AbstractIncomingMessage) -> bool:
        nonlocal purged
        if selected(entry):
            await message.ack()
            purged += 1
            logger.info(
                "dlq_purged", entry_id=entry.id, message_id=entry.message_id, reason=entry.reason
            )
        return True

    async with _dead_queue(settings) as (_channel, queue):
        scan = await _walk(settings, queue, visit, max_held)
    logger.info("dlq_purge_done", purged=purged)
    scan.check(purged)
    return purged


@asynccontextmanager
async def _dead_queue(settings: Settings) -> AsyncIterator[tuple[AbstractChannel, AbstractQueue]]:
    amqp_reads.install()  # read messages whose properties the client cannot decode
    connection = await nodes.connect(settings.amqp_url)
    # Closing the connection hands back every message taken and not acked, each to its
    # place in the (classic) queue; this also holds if we crash or are cancelled.
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        yield channel, await channel.get_queue(settings.dead_queue)


async def _walk(settings: Settings, queue: AbstractQueue, visit: Visit, max_held: int) -> _Scan:
    """Show `visit` the messages that were in the queue when this command took it, head
    first, until it returns False; the ones it does not ack stay held until the channel
    closes. Says how far it got, and whether it stopped short of what it was asked to look
    at. Raises Busy if another command (or any other consumer) reads the queue.

    The count is the ready count of a passive declare, which leaves out the messages a
    consumer holds: it is taken when the queue has no consumer, just before this command's
    exclusive consumer starts. Counted after, it would not be exact: the broker does not
    say how many of the messages it has sent were in the queue when it counted (measured:
    the count's answer overtakes some of them). Whatever arrives between the count and the
    consumer's start is behind the counted ones, and left alone like later arrivals. A
    command that started and ended in that moment can only have removed some (replayed or
    purged them): the scan then waits for one that never comes and says it is incomplete."""
    raw = await queue.channel.get_underlay_channel()  # aiormq's, to see what was undecodable
    counted = await raw.queue_declare(queue.name, passive=True)
    if counted.consumer_count:
        logger.warning("dlq_busy", queue=queue.name)
        raise Busy(queue.name)
    snapshot = int(counted.message_count or 0)
    arrived: asyncio.Queue[DeliveredMessage] = asyncio.Queue()

    async def take(message: DeliveredMessage) -> None:
        arrived.put_nowait(message)

    # The broker sends at most `max_held` unacked (prefetch is 16 bits: past that, all).
    await raw.basic_qos(prefetch_count=max_held if max_held <= MAX_PREFETCH else 0)
    try:
        await raw.basic_consume(queue.name, take, no_ack=False, exclusive=True)
    except aiormq.exceptions.ChannelAccessRefused as exc:
        if "exclusive use" not in str(exc):  # not ours to explain (a missing permission)
            raise
        logger.warning("dlq_busy", queue=queue.name)
        raise Busy(queue.name) from None
    held = looked = 0
    while looked < snapshot:
        if held >= max_held:
            logger.warning("dlq_scan_capped", held=held, queue_length=snapshot)
            return _Scan(looked, snapshot, capped_at=max_held)
        try:
            got = await asyncio.wait_for(arrived.get(), DELIVERY_TIMEOUT)
        except TimeoutError:  # removed meanwhile
            return _Scan(looked, snapshot, taken_meanwhile=True)
        looked += 1
        message = aio_pika.IncomingMessage(got, no_ack=False)
        entry = make_entry(
            routing_key=message.routing_key or "",
            message_id=message.message_id,
            headers=message.headers or {},
            properties={p: getattr(message, p) for p in PROPERTIES},
            body=message.body,
            now=datetime.now(UTC),
            max_json_bytes=settings.max_message_bytes,
            undecodable=amqp_reads.undecodable(got),
        )
        go_on = await visit(entry, message)
        if not message.processed:
            held += 1
        if not go_on:
            break
    return _Scan(looked, snapshot)


def _ready(queue: AbstractQueue) -> int:
    result = queue.declaration_result
    return int(result.message_count or 0) if result else 0
