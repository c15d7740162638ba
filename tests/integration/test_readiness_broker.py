"""/readyz follows RabbitMQ too: while the broker is unreachable the worker does not claim
to be consuming, and it is ready again once its consumer is restored. /metrics carries
the process_* metrics of prometheus_client's default registry."""

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import pytest

from tests.helpers import CLIENT_LIBRARIES, assert_clean_end, wait_until
from tests.http_probes import Proxy, free_port, get, sample
from worker.app import Worker
from worker.settings import Settings


@pytest.mark.settings(health_interval_seconds=0.2)
async def test_not_consuming_while_rabbitmq_is_unreachable(
    settings: Settings, broker: aio_pika.abc.AbstractChannel, worker_log: list[dict[str, Any]]
) -> None:
    url = urlsplit(settings.amqp_url)
    proxy = Proxy(url.hostname or "127.0.0.1", url.port or 5672)
    await proxy.start()
    userinfo = url.netloc.rsplit("@", 1)[0] + "@" if "@" in url.netloc else ""
    proxied = settings.model_copy(
        update={
            "amqp_url": urlunsplit(url._replace(netloc=f"{userinfo}127.0.0.1:{proxy.port}")),
            "metrics_port": free_port(),
        }
    )
    app = Worker(proxied)
    await app.start()
    port = app.health_port
    assert port is not None

    async def readyz() -> dict[str, bool]:
        status, body = await asyncio.to_thread(get, port, "/readyz")
        state: dict[str, bool] = json.loads(body)
        assert (status == 200) is state["ready"]
        return state

    try:
        await wait_until(lambda: _is(readyz, ready=True), what="ready")

        await proxy.stop()  # RabbitMQ is gone, as far as the worker can tell
        state = await wait_until(lambda: _is(readyz, rabbitmq=False), timeout=10, what="down")
        assert state == {
            "ready": False,
            "postgres": True,
            "rabbitmq": False,
            "consuming": False,
            "dead_letters": True,
            "dead_letter_problem": None,
        }
        await asyncio.sleep(0.5)  # a few probes later: still not claiming to consume
        assert (await readyz())["consuming"] is False

        await proxy.start()
        await wait_until(lambda: _is(readyz, ready=True, consuming=True), timeout=30, what="back")
    finally:
        await app.stop()
        with contextlib.suppress(Exception):
            await proxy.stop()
    # The client libraries report the lost connection at error; nothing else may.
    reports = [e for e in worker_log if str(e.get("logger", "")).startswith(CLIENT_LIBRARIES)]
    await assert_clean_end(settings, [e for e in worker_log if e not in reports])


async def _is(
    readyz: Callable[[], Awaitable[dict[str, bool]]], **expected: bool
) -> dict[str, bool] | None:
    state = await readyz()
    return state if all(state.get(k) is v for k, v in expected.items()) else None


async def test_metrics_include_the_process_metrics(settings: Settings) -> None:
    app = Worker(settings.model_copy(update={"metrics_port": free_port()}))
    await app.start()
    try:
        status, body = await asyncio.to_thread(get, app.health_port, "/metrics")  # type: ignore[arg-type]
    finally:
        await app.stop()
    assert status == 200
    assert sample(body, "process_resident_memory_bytes") > 0
    assert sample(body, "process_cpu_seconds_total") > 0
    assert sample(body, "process_open_fds") > 0
    assert "python_info{" in body and "python_gc_objects_collected_total{" in body
