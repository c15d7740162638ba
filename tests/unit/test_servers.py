"""The fault suite's own servers are cleaned up after a run that died before removing
them: what a dead run left is stopped and removed, a live run's is left alone, and a pid
file naming someone else's process (pids are reused) kills nothing."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import servers

DEAD_PID = 2**22 + 1  # above Linux's pid_max: no such process


def sleeper(marker: Path) -> subprocess.Popen[bytes]:
    """A process whose environment names `marker`, as our servers' name their directory."""
    return subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"],
        env={**os.environ, "RABBITMQ_MNESIA_BASE": str(marker / "rabbitmq" / "mnesia")},
    )


def test_a_dead_runs_servers_are_stopped_and_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(servers, "BASE", tmp_path)
    dead = tmp_path / f"run-{DEAD_PID}-abc"
    (dead / "rabbitmq").mkdir(parents=True)
    proc = sleeper(dead)
    try:
        (dead / "rabbitmq" / "rabbitmq.pid").write_text(f"{proc.pid}\n")
        live = tmp_path / f"run-{os.getpid()}-def"  # this process: a run still going
        live.mkdir()
        servers.remove_stale()
        assert proc.wait(10) == -9  # SIGKILLed
        assert not dead.exists() and live.exists()
    finally:
        proc.kill()


def test_a_reused_pid_is_not_killed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(servers, "BASE", tmp_path)
    dead = tmp_path / f"run-{DEAD_PID}-abc"
    (dead / "rabbitmq").mkdir(parents=True)
    stranger = sleeper(tmp_path / "somewhere-else")
    try:
        (dead / "rabbitmq" / "rabbitmq.pid").write_text(f"{stranger.pid}\n")
        servers.remove_stale()
        assert stranger.poll() is None, "a process that is not ours was killed"
        assert not dead.exists()
    finally:
        stranger.kill()
        stranger.wait()
