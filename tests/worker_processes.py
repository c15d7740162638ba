"""Worker processes started by tests, their logs, and stopping them."""

import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import asyncpg

from tests.helpers import json_logs, wait_until
from worker.settings import Settings
from worker.tools.processes import spawn_worker


@contextmanager
def worker_processes(settings: Settings, log_dir: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Start worker processes on demand (append to the list); all are ended on exit."""
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def stop_gracefully(procs: list[subprocess.Popen[bytes]], timeout: float = 30) -> None:
    """SIGTERM every worker still running and wait: each must exit 0."""
    running = [p for p in procs if p.poll() is None]
    for proc in running:
        proc.send_signal(signal.SIGTERM)
    for proc in running:
        assert proc.wait(timeout) == 0, f"worker {proc.pid} exited {proc.returncode}"


def logs_of(log_dir: Path, restarts: bool = False) -> list[dict[str, Any]]:
    """The log entries of every worker process started in `log_dir` (see json_logs)."""
    return json_logs(*sorted(log_dir.glob("worker-*.log")), restarts=restarts)


def spawn(settings: Settings, log_dir: Path, n: int) -> subprocess.Popen[bytes]:
    with (log_dir / f"worker-{n}.log").open("wb") as log:  # the child keeps its own copy
        return spawn_worker(settings, log)


def has_started(log_dir: Path, n: int) -> bool:
    """Whether the worker logging to worker-N.log got as far as `worker_started`."""
    return b"worker_started" in (log_dir / f"worker-{n}.log").read_bytes()


async def wait_ready(pool: asyncpg.Pool, settings: Settings, log_dir: Path, n: int) -> None:
    async def started() -> bool:
        return has_started(log_dir, n)

    await wait_until(started, timeout=20, what=f"worker {n} started")


async def started_or_ended(
    procs: list[subprocess.Popen[bytes]], numbers: list[int], log_dir: Path
) -> bool:
    """Whether each of `procs` (logging to worker-N.log, N from `numbers`) has started or
    has exited."""
    return all(
        proc.poll() is not None or has_started(log_dir, n)
        for proc, n in zip(procs, numbers, strict=True)
    )


# The load of every operator after every commit that changed it, replayed from the
# outbox: events that change an operator's load are written under its row lock, so
# their outbox order is their commit order. An offer counts from `contact.offered` until
# it is declined or expires; its acceptance (`contact.assigned` with an attempt) changes
# nothing.
PEAK_LOADS = """
    WITH changes AS (
        SELECT id, (payload -> 'data' ->> 'operator_id')::bigint AS operator_id,
               CASE WHEN routing_key = 'contact.assigned'
                         AND payload -> 'data' ->> 'attempt' IS NOT NULL THEN 0
                    WHEN routing_key IN ('contact.assigned', 'contact.offered') THEN 1
                    ELSE -1 END AS delta
        FROM outbox
        WHERE routing_key IN ('contact.assigned', 'contact.closed', 'contact.offered',
                              'contact.declined', 'contact.expired')
          AND payload -> 'data' ->> 'operator_id' IS NOT NULL
    ), running AS (
        SELECT operator_id, sum(delta) OVER (PARTITION BY operator_id ORDER BY id) AS load
        FROM changes
    )
    SELECT o.id, o.max_load, max(r.load) AS peak, count(*) AS commits
    FROM running r JOIN operators o ON o.id = r.operator_id
    GROUP BY o.id, o.max_load
    ORDER BY o.id
"""
