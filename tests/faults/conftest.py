"""The fault suite restarts and kills servers, so it never uses the machine's own: it
starts a PostgreSQL instance and a RabbitMQ node of its own on free loopback ports
(tests/servers.py) for the session, and removes them afterwards."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import servers, services

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def own_servers() -> Iterator[servers.OwnServers]:
    problem = servers.unavailable()
    if problem:
        services.cannot_run(f"fault suite: cannot start servers of its own: {problem}")
    with servers.own_servers() as started:
        yield started


@pytest.fixture(scope="session")
def service_urls(own_servers: servers.OwnServers) -> tuple[str, str]:
    """Overrides the suite-wide fixture: every fixture of these tests (databases, topology,
    workers) uses the servers of our own."""
    return own_servers.postgres.url, own_servers.rabbitmq.url


@pytest.fixture(scope="session")
def template_database(service_urls: tuple[str, str]) -> Iterator[str]:
    with services.template_database(service_urls[0], str(ROOT / "migrations")) as name:
        yield name
