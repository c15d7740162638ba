"""Finding PostgreSQL and RabbitMQ for the tests, and throwaway databases and topology.

Order: LEADROUTER_TEST_DATABASE_URL / LEADROUTER_TEST_AMQP_URL; else the standard ports
on localhost if they answer; else testcontainers where Docker runs; else skip with a
message naming what is missing. Under CI=true a missing service fails instead."""

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from worker import migrate

LOCAL_PG = "postgresql://postgres@127.0.0.1:5432/postgres"
LOCAL_AMQP = "amqp://guest:guest@127.0.0.1:5672/"


@dataclass
class Services:
    pg_url: str | None
    amqp_url: str | None
    problem: str | None = None


def _answers(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 0), timeout=1):
            return True
    except OSError:
        return False


def _docker_runs() -> bool:
    if shutil.which("docker") is None:
        return False
    result = subprocess.run(["docker", "info"], capture_output=True, timeout=20, check=False)
    return result.returncode == 0


@contextlib.contextmanager
def find_services() -> Iterator[Services]:
    pg = os.environ.get("LEADROUTER_TEST_DATABASE_URL") or (
        LOCAL_PG if _answers(LOCAL_PG) else None
    )
    amqp = os.environ.get("LEADROUTER_TEST_AMQP_URL") or (
        LOCAL_AMQP if _answers(LOCAL_AMQP) else None
    )
    with contextlib.ExitStack() as stack:
        if (pg is None or amqp is None) and _docker_runs():
            if pg is None:
                from testcontainers.postgres import PostgresContainer

                container = stack.enter_context(PostgresContainer("postgres:16-alpine"))
                pg = container.get_connection_url(driver=None)
            if amqp is None:
                from testcontainers.rabbitmq import RabbitMqContainer

                rabbit = stack.enter_context(RabbitMqContainer("rabbitmq:3.13-management"))
                params = rabbit.get_connection_params()
                amqp = f"amqp://guest:guest@{params.host}:{params.port}/"
        missing = [n for n, url in (("PostgreSQL", pg), ("RabbitMQ", amqp)) if url is None]
        problem = None
        if missing:
            problem = (
                f"{' and '.join(missing)} not found: set LEADROUTER_TEST_DATABASE_URL / "
                "LEADROUTER_TEST_AMQP_URL, run them on localhost's standard ports, or run Docker"
            )
        yield Services(pg, amqp, problem)


def cannot_run(reason: str) -> None:
    """Skip the test saying why, or under CI=true fail it: a runner that lacks something
    must not pass by running nothing."""
    if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
        pytest.fail(f"CI must run this test: {reason}")
    pytest.skip(reason)


@contextlib.contextmanager
def template_database(server_url: str, migrations: str) -> Iterator[str]:
    """One migrated database, cloned for each test, dropped on exit."""
    name = unique("lrtest_tpl")
    asyncio.run(migrate.migrate(with_database(server_url, name), Path(migrations)))
    try:
        yield name
    finally:
        asyncio.run(drop_database(server_url, name))


def with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


async def create_database(server_url: str, name: str, template: str | None = None) -> None:
    conn = await asyncpg.connect(with_database(server_url, "postgres"))
    try:
        clause = f' TEMPLATE "{template}"' if template else ""
        await conn.execute(f'CREATE DATABASE "{name}"{clause}')
    finally:
        await conn.close()


async def drop_database(server_url: str, name: str) -> None:
    await migrate.drop_database(with_database(server_url, name))
