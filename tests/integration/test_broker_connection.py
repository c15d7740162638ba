"""The worker's RabbitMQ connection, seen from the broker: it carries a connection_name
(host and pid) that `rabbitmqctl list_connections` shows; and when the broker closes it,
the libraries' own log lines are JSON lines like ours, traceback in one field."""

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from tests.helpers import wait_until
from worker.settings import Settings
from worker.tools.processes import spawn_worker

pytestmark = pytest.mark.slow


def rabbitmqctl(*args: str) -> str:
    result = subprocess.run(
        ["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=60, check=True
    )
    return result.stdout


@pytest.fixture
def local_broker_cli(settings: Settings) -> None:
    """rabbitmqctl of the broker the tests use (this machine's)."""
    if shutil.which("rabbitmqctl") is None or os.environ.get("LEADROUTER_TEST_AMQP_URL"):
        pytest.skip("needs rabbitmqctl of the local broker the tests use")
    try:
        rabbitmqctl("list_connections", "name")
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"rabbitmqctl cannot reach the local broker: {exc}")


def connections_of(pid: int) -> list[tuple[str, str]]:
    """(broker-side pid, client_properties) of the connections named after this process."""
    name = f"leadrouter worker {socket.gethostname()} pid {pid}"
    found = []
    for line in rabbitmqctl("list_connections", "pid", "client_properties").splitlines():
        erlang_pid, _, properties = line.partition("\t")
        if f'{{"connection_name","{name}"}}' in properties:
            found.append((erlang_pid, properties))
    return found


async def test_connection_name_and_json_logs_when_the_broker_drops_it(
    settings: Settings, tmp_path: Path, local_broker_cli: None
) -> None:
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as output:
        proc = spawn_worker(settings, output)
    try:

        async def logged(text: str) -> bool:
            return text in log_path.read_text()

        await wait_until(lambda: logged("worker_started"), timeout=30, what="worker started")
        (connection,) = await asyncio.to_thread(connections_of, proc.pid)
        assert '"product","aiormq"' in connection[1]

        await asyncio.to_thread(
            rabbitmqctl, "close_connection", connection[0], "closed by the test"
        )
        await wait_until(lambda: logged("consuming_restored"), timeout=30, what="reconnect")
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    lines = log_path.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line, or this fails
    theirs = [r for r in records if r["logger"].startswith(("aiormq", "aio_pika"))]
    assert theirs, "the libraries logged nothing about the closed connection"
    assert any("closed by the test" in json.dumps(r) for r in theirs)
    for record in records:
        assert {"event", "level", "logger", "timestamp"} <= set(record)
    assert any("Traceback" in r.get("exception", "") for r in theirs)
