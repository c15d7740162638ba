"""`leadrouter bench`: end-to-end throughput and latency of the real worker against the
configured PostgreSQL and RabbitMQ, in a throwaway database and exchange/queue names of
its own (`<database>_bench_<id>`, `leadrouter-bench-<id>.*`), removed afterwards.

Throughput mode pre-publishes every lead, then starts the worker(s) and measures from
the first event to the last. Paced mode (`--rate R`) starts the worker(s) first and
publishes R messages per second, measuring each message's publish→event latency.

`--reference` first runs the minimal hand-written pipeline of `worker/tools/bench_reference.py`
(one process, on the same event loop) on the same load and reports leadrouter against it:
on a shared machine whose speed drifts from run to run, two figures measured back to back
compare better than absolute rates taken at different times.

`--schedules` measures the same load twice, back to back: first as it is, then with every
operator given a weekly shift (around the clock, so all still take work, in one of
several IANA zones) and a leave range in the future, and reports the second rate as a
fraction of the first (`ratio_to_no_schedules`): what routing pays for schedules.

`--offers` measures the same load twice, offers off then on (every source with an accept
timeout), and reports the second against the first. With offers on, a simulated operator
app accepts every offer as its `contact.offered` event arrives, publishing without waiting
for each confirm, and a contact counts once its `contact.assigned` (the accept) arrives.

`--history` measures the same load twice, back to back: contacts' history off
(LEADROUTER_HISTORY=off), then on, and reports the second against the first
(`ratio_to_history_off`): what recording every decision costs.

`--rounds N` repeats a comparison N times, every other round in the opposite order, and
reports each ratio as the geometric mean of the rounds' (`round_ratios`): on a shared
machine the second of two back-to-back runs is often the faster, and alternating cancels
that out."""

import asyncio
import json
import random
import resource
import signal
import statistics
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import aiormq
import aiormq.abc
import asyncpg
from aiormq import spec
from aiormq.abc import DeliveredMessage
from rich.console import Console
from rich.progress import Progress

from worker import admin, amqp_writes, availability, log, nodes, topology
from worker.app import Worker
from worker.errors import UserError
from worker.migrate import drop_database, migrate
from worker.settings import Settings
from worker.strategies import DEFAULT_STRATEGY
from worker.tools import bench_reference
from worker.tools.processes import proc_stat, spawn_module, spawn_worker

OPERATORS = 40
WEIGHTS_PER_SOURCE = 4
PUBLISH_WINDOW = 1000  # confirms in flight while pre-publishing
RSS_MILESTONE = 10_000
STALL_SECONDS = 60
_INBOUND_KEY = b'"inbound_message_id": "'
_CONTACT_KEY = b'"contact_id": '
_OPERATOR_KEY = b'"operator_id": '
_ATTEMPT_KEY = b'"attempt": '
ACCEPT_TIMEOUT = 60  # seconds, with --offers: far longer than any run waits for an accept
LEADROUTER, REFERENCE = "leadrouter", "reference"


@dataclass
class Result:
    mode: str
    messages: int
    sources: int
    workers: int  # worker processes; 0: a worker inside the bench's own process
    operators: int
    weights_per_source: int  # operators weighted on each source (chosen at random)
    strategy: str  # every source's
    batch_size: int
    prefetch: int
    seconds: float = 0.0
    messages_per_second: float = 0.0
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    cpu_seconds_per_1000: float = 0.0
    peak_rss_mb: float = 0.0
    rss_at_10000_mb: float | None = None
    rss_at_end_mb: float = 0.0
    # With --reference: the reference pipeline's figures on the same load, and
    # leadrouter's messages/s as a fraction of its.
    reference: dict[str, float] | None = None
    ratio_to_reference: float | None = None
    # With --schedules: every operator had a shift and leave; the same load without them
    # was measured first, and this run's messages/s as a fraction of that one.
    schedules: bool = False
    no_schedules: dict[str, float] | None = None
    ratio_to_no_schedules: float | None = None
    # With --offers: this run had offers on; the same load's figures with offers off, and
    # this run's messages/s as a fraction of those.
    offers: bool = False
    offers_off: dict[str, float] | None = None
    ratio_to_offers_off: float | None = None
    # With --history: the same load's figures with history off, and this run's (on)
    # messages/s as a fraction of those.
    history_off: dict[str, float] | None = None
    ratio_to_history_off: float | None = None
    # With --rounds N (N > 1): each ratio above is the geometric mean of these, one per
    # round, every other round measured in the opposite order.
    round_ratios: dict[str, list[float]] | None = None


def bench_settings(base: Settings, run_id: str) -> Settings:
    parts = urlsplit(base.database_url)
    database = f"{parts.path.lstrip('/') or 'leadrouter'}_bench_{run_id}"
    prefix = f"leadrouter-bench-{run_id}."
    return base.model_copy(
        update={
            "database_url": urlunsplit(parts._replace(path=f"/{database}")),
            "inbound_exchange": prefix + "inbound",
            "inbound_queue": prefix + "inbound",
            "events_exchange": prefix + "events",
            "dead_exchange": prefix + "dead",
            "dead_queue": prefix + "dead",
            "metrics_port": 0,
            "log_level": "WARNING",
        }
    )


def _status_mb(field: str, pid: int | str = "self") -> float:
    """A memory figure of /proc/PID/status (VmRSS: now, VmHWM: peak), in MB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


SCHEDULE_ZONES = ("Europe/Berlin", "America/New_York", "Asia/Tokyo", "Australia/Sydney")


async def _setup_routing(
    pool: asyncpg.Pool,
    sources: int,
    operators: int,
    weights_per_source: int,
    strategy: str,
    rng: random.Random,
    schedules: bool = False,
    accept_timeout: int = 0,
) -> list[str]:
    ops = [
        (await admin.add_operator(pool, f"op{n}", 10_000_000, True))["id"] for n in range(operators)
    ]
    if schedules:  # on shift around the clock (two ranges a day), leave long after the run
        for n, op in enumerate(ops):
            zone = SCHEDULE_ZONES[n % len(SCHEDULE_ZONES)]
            await availability.set_shift(pool, op, "daily 00:00-12:00 12:00-24:00", zone)
            await availability.set_leave(pool, op, ["2099-12-24..2099-12-31"])
    keys = [f"bench-{n}" for n in range(sources)]
    for key in keys:
        await admin.add_source(pool, key, None, "", strategy, accept_timeout=accept_timeout)
        chosen = rng.sample(ops, k=min(weights_per_source, len(ops)))
        await admin.set_weights(pool, key, {op: rng.randint(1, 5) for op in chosen})
    return keys


class _Publisher:
    """Publishes bench leads through aiormq with confirms: lean, so that the bench's own
    CPU does not set the pace on a machine it shares with the worker and the broker. Not
    waiting for each write (`wait=False`; the confirm is still awaited): aiormq holds the
    channel's lock until the write is done, and the publishes of a tick went out one
    after another, each a few loop turns late, the delay counted as the worker's."""

    def __init__(self, channel: aiormq.abc.AbstractChannel, exchange: str, keys: list[str]):
        self._channel, self._exchange, self._keys = channel, exchange, keys
        self._rng = random.Random(42)

    async def send(self, n: int) -> None:
        body = {
            "source": self._keys[n % len(self._keys)],
            "lead": {"external_id": f"bench:{self._rng.randrange(1_000_000)}", "name": "Lead"},
            "message": "Hello, I would like a quote.",
        }
        await cast(aiormq.Channel, self._channel).basic_publish(  # takes `wait`
            json.dumps(body).encode(),
            exchange=self._exchange,
            routing_key="lead.contact",
            properties=spec.Basic.Properties(message_id=f"b-{n}", delivery_mode=2),
            wait=False,
        )


class _OperatorApp:
    """The simulated operator app of `--offers`: accepts every offer at once. Lean like
    the publisher (the ids are read from the event's bytes, no JSON parse), and not
    waiting for each publish's confirm."""

    def __init__(self, channel: aiormq.abc.AbstractChannel, exchange: str) -> None:
        self._channel, self._exchange = channel, exchange
        self._pending: set[asyncio.Future[Any]] = set()

    def offered(self, body: bytes) -> None:
        contact, operator, attempt = (
            _number_after(body, key) for key in (_CONTACT_KEY, _OPERATOR_KEY, _ATTEMPT_KEY)
        )
        future = asyncio.ensure_future(
            cast(aiormq.Channel, self._channel).basic_publish(
                b'{"contact_id": %d, "operator_id": %d}' % (contact, operator),
                exchange=self._exchange,
                routing_key="contact.accept",
                properties=spec.Basic.Properties(
                    message_id=f"accept-{contact}-{attempt}", delivery_mode=2
                ),
                wait=False,
            )
        )
        self._pending.add(future)
        future.add_done_callback(self._pending.discard)


def _number_after(body: bytes, key: bytes) -> int:
    start = body.index(key) + len(key)
    end = start
    while body[end : end + 1].isdigit():
        end += 1
    return int(body[start:end])


class _Events:
    """Counts first events (assigned or queued) per inbound message, with arrival times;
    with an operator app (offers on), `contact.assigned` only, handing it each offer."""

    def __init__(self, expected: int, app: _OperatorApp | None = None) -> None:
        self.app = app
        self.expected = expected
        self.arrived: dict[str, float] = {}
        self.first = self.last = 0.0
        self.rss_at_milestone: float | None = None
        self.milestone_hook = lambda: None
        self.done = asyncio.Event()

    async def on_message(self, message: DeliveredMessage) -> None:
        """Lean on purpose (aiormq, no JSON parse): the bench shares the machine with the
        worker, and its own cost should not set the pace."""
        body = message.body
        if message.routing_key == "contact.closed":
            return
        if self.app is not None and message.routing_key != "contact.assigned":
            if message.routing_key == "contact.offered":
                # The clock starts at the first offer: the whole way, offer and accept.
                self.first = self.first or time.perf_counter()
                self.app.offered(body)
            return
        now = time.perf_counter()
        start = body.index(_INBOUND_KEY) + len(_INBOUND_KEY)
        inbound = body[start : body.index(b'"', start)].decode()
        if inbound in self.arrived:
            return
        self.arrived[inbound] = now
        self.first = self.first or now
        self.last = now
        if len(self.arrived) == RSS_MILESTONE:
            self.milestone_hook()
        if len(self.arrived) >= self.expected:
            self.done.set()


async def run_bench(
    base: Settings,
    messages: int,
    sources: int,
    workers: int,
    rate: float | None,
    console: Console,
    reference: bool = False,
    operators: int = OPERATORS,
    weights_per_source: int = WEIGHTS_PER_SOURCE,
    strategy: str = DEFAULT_STRATEGY,
    schedules: bool = False,
    offers: bool = False,
    history: bool = False,
    rounds: int = 1,
) -> Result:
    """Measure leadrouter; with `reference`, first the reference pipeline on the same
    load: its figures go into `Result.reference`, and in throughput mode leadrouter's
    rate as a fraction of its into `ratio_to_reference`. The team: `operators`, each
    source weighting `weights_per_source` of them (at random, weights 1 to 5), every
    source routing by `strategy`. With
    `offers`, leadrouter with offers off first, then on: the figures of the first go into
    `Result.offers_off`, the ratio into `ratio_to_offers_off`; with `history`, history off
    first, then on (`Result.history_off`, `ratio_to_history_off`); without, as the
    settings say.

    With `rounds` > 1 all of that is measured `rounds` times, every other round in the
    opposite order (what ran first runs last), since on a shared machine the second of
    two back-to-back runs is often the faster: each ratio is then the geometric mean of
    the rounds' (each round's in `Result.round_ratios`), the figures the last round's."""
    team = (operators, weights_per_source, strategy)
    log.configure("WARNING", base.log_format)
    amqp_writes.install()  # the bench's own publishing and reading, lean (see _Publisher)
    if history:
        base = base.model_copy(update={"history": True})
    arms: dict[str, Callable[[], Awaitable[Result]]] = {}
    if reference:
        arms[REFERENCE] = lambda: _measure(
            base, messages, sources, team, 1, rate, console, REFERENCE
        )
    if schedules or offers or history:  # the same load without them
        arms["plain"] = lambda: _measure(
            base.model_copy(update={"history": base.history and not history}),
            messages, sources, team, workers, rate, console, LEADROUTER,
        )  # fmt: skip
    arms[LEADROUTER] = lambda: _measure(
        base, messages, sources, team, workers, rate, console, LEADROUTER, schedules, offers
    )
    ratios: dict[str, list[float]] = {}
    for n in range(rounds):
        order = list(arms) if n % 2 == 0 else list(reversed(arms))
        measured = {name: await arms[name]() for name in order}
        result = _compared(measured, schedules, offers, history, rate is None)
        for name, value in asdict(result).items():
            if name.startswith("ratio_to_") and value is not None:
                ratios.setdefault(name, []).append(value)
    if rounds > 1:
        result.round_ratios = ratios
        for name, values in ratios.items():
            setattr(result, name, round(statistics.geometric_mean(values), 3))
    return result


def _compared(
    measured: dict[str, Result], schedules: bool, offers: bool, history: bool, throughput: bool
) -> Result:
    """One round's leadrouter result, with the figures and ratios of what it is compared
    with: the reference, the same load without schedules, offers or history ("plain")."""
    result = measured[LEADROUTER]

    def against(then: Result) -> tuple[dict[str, float], float | None]:
        figures = {
            k: getattr(then, k)
            for k in ("messages_per_second", "latency_p50_ms", "latency_p99_ms")
            if getattr(then, k) is not None
        } | {"cpu_seconds_per_1000": then.cpu_seconds_per_1000}
        if not throughput:
            return figures, None
        return figures, round(result.messages_per_second / then.messages_per_second, 3)

    if REFERENCE in measured:
        result.reference, result.ratio_to_reference = against(measured[REFERENCE])
    if "plain" in measured:
        figures, ratio = against(measured["plain"])
        if schedules:
            result.no_schedules, result.ratio_to_no_schedules = figures, ratio
        if offers:
            result.offers_off, result.ratio_to_offers_off = figures, ratio
        if history:
            result.history_off, result.ratio_to_history_off = figures, ratio
    return result


async def _measure(
    base: Settings,
    messages: int,
    sources: int,
    team: tuple[int, int, str],  # operators, weights per source, strategy
    workers: int,
    rate: float | None,
    console: Console,
    pipeline: str,
    schedules: bool = False,
    offers: bool = False,
) -> Result:
    run_id = uuid.uuid4().hex[:8]
    settings = bench_settings(base, run_id)
    rng = random.Random(42)
    result = Result(
        mode=f"paced {rate:g}/s" if rate else "throughput",
        messages=messages,
        sources=sources,
        workers=workers,
        operators=team[0],
        weights_per_source=min(team[:2]),
        strategy=team[2],
        batch_size=settings.batch_size if pipeline == LEADROUTER else bench_reference.BATCH,
        prefetch=settings.prefetch if pipeline == LEADROUTER else 2 * bench_reference.BATCH,
        schedules=schedules,
        offers=offers,
    )
    await migrate(settings.database_url, settings.migrations_dir)
    connection = await nodes.connect_robust(settings.amqp_url)
    procs: list[subprocess.Popen[bytes]] = []
    worker: Worker | None = None
    try:
        async with asyncpg.create_pool(settings.database_url, min_size=1, max_size=2) as pool:
            keys = await _setup_routing(
                pool,
                sources,
                *team,
                rng,
                schedules,
                accept_timeout=ACCEPT_TIMEOUT if offers else 0,
            )
            if pipeline == REFERENCE:
                await bench_reference.setup(pool, keys)
        channel = await connection.channel(publisher_confirms=True)
        declared = await topology.declare(channel, settings)
        app = None
        if offers:
            app = _OperatorApp(await channel.get_underlay_channel(), settings.inbound_exchange)
        events = _Events(messages, app)
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(declared.exchanges[settings.events_exchange], "#")
        raw = await channel.get_underlay_channel()
        await raw.basic_consume(queue.name, events.on_message, no_ack=True)

        async def start_workers() -> None:
            nonlocal worker
            if pipeline == REFERENCE:
                procs.append(
                    spawn_module(settings, subprocess.DEVNULL, "worker.tools.bench_reference")
                )
            elif workers:
                procs.extend(spawn_worker(settings, subprocess.DEVNULL) for _ in range(workers))
            else:
                worker = Worker(settings)
                await worker.start()

        def rss_now() -> float:
            return sum(_status_mb("VmRSS", p.pid) for p in procs) if procs else _status_mb("VmRSS")

        def milestone() -> None:
            result.rss_at_10000_mb = round(rss_now(), 1)

        events.milestone_hook = milestone
        sent_at: dict[str, float] = {}
        cpu_before = 0.0 if workers else time.process_time()
        with Progress(console=console, transient=True) as progress:
            publisher = _Publisher(
                await channel.get_underlay_channel(), settings.inbound_exchange, keys
            )
            if rate is None:
                task = progress.add_task("publishing", total=messages)
                for start in range(0, messages, PUBLISH_WINDOW):
                    batch = range(start, min(start + PUBLISH_WINDOW, messages))
                    await asyncio.gather(*(publisher.send(n) for n in batch))
                    progress.update(task, advance=len(batch))
                await start_workers()
            else:
                await start_workers()
                await asyncio.sleep(1)  # let the workers connect before the clock starts
                task = progress.add_task(f"publishing at {rate:g}/s", total=messages)
                started = time.perf_counter()
                pending: set[asyncio.Future[None]] = set()
                sent = 0
                while sent < messages:  # every tick, whatever has fallen due
                    due = min(messages, int((time.perf_counter() - started) * rate) + 1)
                    for n in range(sent, due):
                        sent_at[f"b-{n}"] = time.perf_counter()
                        future = asyncio.ensure_future(publisher.send(n))
                        pending.add(future)
                        future.add_done_callback(pending.discard)
                    progress.update(task, advance=due - sent)
                    sent = due
                    await asyncio.sleep(0.001)
                await asyncio.gather(*pending)
            task = progress.add_task(f"routing ({pipeline})", total=messages)
            last_progress, seen = time.monotonic(), 0
            while not events.done.is_set():
                await asyncio.sleep(0.2)
                progress.update(task, completed=len(events.arrived))
                if len(events.arrived) > seen:
                    last_progress, seen = time.monotonic(), len(events.arrived)
                exited = [p.returncode for p in procs if p.poll() is not None]
                if exited:
                    raise UserError(f"a worker exited with code {exited[0]} during the bench")
                if time.monotonic() - last_progress > STALL_SECONDS:
                    raise UserError(
                        f"no progress for {STALL_SECONDS}s at {seen} of {messages} messages"
                    )
        result.rss_at_end_mb = round(rss_now(), 1)
        if workers:
            cpu = sum(proc_stat(p.pid)[1] for p in procs)
            peak = max(_status_mb("VmHWM", p.pid) for p in procs)
        else:
            cpu = time.process_time() - cpu_before
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result.seconds = round(events.last - events.first, 3)
        result.messages_per_second = round((messages - 1) / max(result.seconds, 1e-9), 1)
        result.cpu_seconds_per_1000 = round(cpu / messages * 1000, 3)
        result.peak_rss_mb = round(peak, 1)
        if sent_at:
            latencies = [(events.arrived[m] - t) * 1000 for m, t in sent_at.items()]
            result.latency_p50_ms = round(_percentile(latencies, 0.50), 2)
            result.latency_p99_ms = round(_percentile(latencies, 0.99), 2)
            result.messages_per_second = round(rate or 0, 1)
        return result
    finally:
        if worker is not None:
            await worker.stop()
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        channel = await connection.channel()
        await topology.delete(channel, settings)
        await connection.close()
        await drop_database(settings.database_url)


def render(result: Result, console: Console) -> None:
    rows = {k: v for k, v in asdict(result).items() if v is not None}
    if not result.workers:
        rows["workers"] = "0 (in-process)"
    width = max(len(k) for k in rows)
    for key, value in rows.items():
        console.print(f"{key:<{width}}  {value}")
