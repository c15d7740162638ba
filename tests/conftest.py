import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import pytest
import structlog

from tests import services
from tests.helpers import SUMMARIES, EventCollector, Expected, assert_clean_end
from worker import topology
from worker.app import Worker
from worker.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def found_services() -> Iterator[services.Services]:
    with services.find_services() as found:
        yield found


@pytest.fixture(scope="session")
def service_urls(found_services: services.Services) -> tuple[str, str]:
    if found_services.problem:
        services.cannot_run(found_services.problem)
    assert found_services.pg_url and found_services.amqp_url
    return found_services.pg_url, found_services.amqp_url


@pytest.fixture(scope="session")
def template_database(service_urls: tuple[str, str]) -> Iterator[str]:
    """One migrated database per session, cloned for each test."""
    with services.template_database(service_urls[0], str(ROOT / "migrations")) as name:
        yield name


@pytest.fixture
async def database_url(service_urls: tuple[str, str], template_database: str) -> AsyncIterator[str]:
    pg_url, _ = service_urls
    name = services.unique("lrtest")
    await services.create_database(pg_url, name, template=template_database)
    yield services.with_database(pg_url, name)
    await services.drop_database(pg_url, name)


@pytest.fixture
async def settings(
    database_url: str, service_urls: tuple[str, str], request: pytest.FixtureRequest
) -> AsyncIterator[Settings]:
    """Settings with a database and exchange/queue names of this test's own;
    `@pytest.mark.settings(name=value)` overrides fields."""
    marker = request.node.get_closest_marker("settings")
    overrides = marker.kwargs if marker else {}
    prefix = services.unique("lrtest")
    settings = Settings(
        database_url=database_url,
        amqp_url=service_urls[1],
        inbound_exchange=f"{prefix}.inbound",
        inbound_queue=f"{prefix}.inbound",
        events_exchange=f"{prefix}.events",
        dead_exchange=f"{prefix}.dead",
        dead_queue=f"{prefix}.dead",
        shutdown_grace_seconds=5,
        outbox_sweep_seconds=1,
        outbox_lease_seconds=2,
        retry_max_seconds=1,
        metrics_port=0,  # several workers share this host; health tests pick a port
        log_format="json",
    ).model_copy(update=overrides)
    yield settings
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        await topology.delete(await connection.channel(), settings)


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    async with asyncpg.create_pool(database_url, min_size=1, max_size=4) as pool:
        yield pool


@pytest.fixture
async def broker(settings: Settings) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    """A confirming channel with the topology declared, as an upstream bot would have."""
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await topology.declare(channel, settings)
        yield channel


@pytest.fixture
async def events(
    broker: aio_pika.abc.AbstractChannel, settings: Settings
) -> AsyncIterator[EventCollector]:
    """Every event the worker publishes, read from a queue bound before it starts."""
    collector = EventCollector()
    queue = await broker.declare_queue(exclusive=True, auto_delete=True)
    await queue.bind(settings.events_exchange, "#")
    tag = await queue.consume(collector.on_message, no_ack=True)
    yield collector
    await queue.cancel(tag)


@pytest.fixture
def worker_log() -> Iterator[list[dict[str, Any]]]:
    """Every log entry (info and up) of the in-process workers of this test. The whole
    configuration is set, and put back after: an earlier test may have configured
    structlog for a command (the bench logs warnings only)."""
    before = structlog.get_config()
    capture = structlog.testing.LogCapture()
    structlog.configure(
        processors=[capture],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        cache_logger_on_first_use=False,
    )
    try:
        yield capture.entries
    finally:
        structlog.configure(**before)


@pytest.fixture
def expected() -> Expected:
    """What the test's worker must leave behind (see assert_clean_end); tests that leave
    dead letters or crash routing on purpose say so here."""
    return Expected()


@pytest.fixture
async def worker(
    settings: Settings,
    broker: aio_pika.abc.AbstractChannel,
    worker_log: list[dict[str, Any]],
    expected: Expected,
    request: pytest.FixtureRequest,
) -> AsyncIterator[Worker]:
    """A worker in this process; once stopped, it must have left everything clean."""
    app = Worker(settings)
    await app.start()
    yield app
    await app.stop()
    if not request.node.stash.get(CALL_FAILED, False):  # else the test's own failure says it
        await assert_clean_end(settings, worker_log, expected)


CALL_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call":
        item.stash[CALL_FAILED] = report.failed
    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The suites' one-line summaries (fault, cluster), outside pytest's capture."""
    for line in SUMMARIES:
        terminalreporter.write_line(line)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything outside tests/unit talks to real services."""
    for item in items:
        if "unit" not in item.path.parts:
            item.add_marker(pytest.mark.services)
