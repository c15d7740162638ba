"""A side task of the worker (the outbox relay and its helpers, the backlog sweep, the
outbox prune, the health probe, the timers) that dies is never silent: a real `leadrouter worker`
process logs it with its error and exits non-zero, for its supervisor to restart it."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from worker.settings import Settings
from worker.tools.processes import worker_env

pytestmark = pytest.mark.slow

# The child: the real CLI, with one side task's coroutine replaced by one that breaks
# (as a bug past the task's own retries would) once the worker is up.
CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from worker import app, cli, outbox, timers

    target, how = sys.argv[1], sys.argv[2]

    async def broken(*args, **kwargs):
        await asyncio.sleep(1)
        if how == "raise":
            raise RuntimeError("side task broke")

    owner, name = target.split(".")
    owners = {"Worker": app.Worker, "OutboxRelay": outbox.OutboxRelay, "timers": timers}
    setattr(owners[owner], name, broken)
    sys.exit(cli.main(["worker"]))
    """
)


@pytest.mark.parametrize(
    ("target", "task"),
    [
        ("OutboxRelay.run", "outbox-relay"),
        ("OutboxRelay._mark_confirmed", "outbox-relay"),  # a helper of the relay
        ("Worker._sweep_backlog", "backlog-sweep"),
        ("Worker._prune_outbox", "outbox-prune"),
        ("Worker._probe", "health-probe"),
        ("timers.tick", "timers"),  # a bug in a tick is not retried as transient
    ],
)
def test_a_side_task_that_dies_stops_the_worker_non_zero(
    settings: Settings, tmp_path: Path, target: str, task: str
) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD, encoding="utf-8")
    result = subprocess.run(
        [sys.executable, str(script), target, "raise"],
        env=worker_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
    )
    records = [json.loads(line) for line in result.stderr.splitlines()]
    events = [r["event"] for r in records]
    assert result.returncode == 1, result.stderr[-3000:]
    assert "worker_started" in events and events[-1] == "worker_stopped", events
    (failed,) = [r for r in records if r["event"] == "side_task_failed"]
    assert failed["task"] == task and failed["level"] == "error"
    assert "RuntimeError: side task broke" in failed["exception"]


def test_a_side_task_that_returns_early_stops_the_worker_too(
    settings: Settings, tmp_path: Path
) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD, encoding="utf-8")
    result = subprocess.run(
        [sys.executable, str(script), "Worker._sweep_backlog", "return"],
        env=worker_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
    )
    records = [json.loads(line) for line in result.stderr.splitlines()]
    assert result.returncode == 1, result.stderr[-3000:]
    assert {"event": "side_task_ended", "task": "backlog-sweep"}.items() <= next(
        r for r in records if r["event"] == "side_task_ended"
    ).items()
