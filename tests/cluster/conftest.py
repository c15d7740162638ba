"""The cluster suite stops and kills servers, so it never uses the machine's own: it
starts three RabbitMQ nodes joined into one cluster and a PostgreSQL primary with a
streaming standby, on free loopback ports (tests/servers.py), for the session, and
removes them afterwards, also when it fails."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import servers, services

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def own_cluster() -> Iterator[servers.OwnCluster]:
    problem = servers.cluster_unavailable()
    if problem:
        services.cannot_run(f"cluster suite: cannot start servers of its own: {problem}")
    with servers.own_cluster() as started:
        yield started


@pytest.fixture(scope="session")
def service_urls(own_cluster: servers.OwnCluster) -> tuple[str, str]:
    """Overrides the suite-wide fixture: the fixtures' databases live on the primary (found
    through both hosts, so also after the failover), their topology on the first node."""
    return own_cluster.database_url, own_cluster.amqp_urls[0]


@pytest.fixture(scope="session")
def template_database(service_urls: tuple[str, str]) -> Iterator[str]:
    with services.template_database(service_urls[0], str(ROOT / "migrations")) as name:
        yield name
