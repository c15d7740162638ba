"""Starting `leadrouter worker` as a child process (the bench, the tests), and reading a
process's CPU (the bench, cpu_by_process)."""

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import IO, Any

from worker.settings import Settings

# Resolved here, in the parent: between fork and exec the child may only make the call.
_prctl: Any = None
with contextlib.suppress(OSError, AttributeError):  # not Linux: children may outlive us
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
PR_SET_PDEATHSIG = 1


def proc_stat(pid: int | str) -> tuple[int, float]:
    """A process's parent pid and the CPU seconds it has used (user and system), from
    /proc/PID/stat (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def worker_env(settings: Settings) -> dict[str, str]:
    """This environment with every LEADROUTER_* variable taken from `settings`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEADROUTER_")}
    for name, value in settings.model_dump().items():
        if value is not None:  # None: the default (e.g. the package's migrations)
            env[f"LEADROUTER_{name.upper()}"] = str(value)
    return env


def _die_with_parent() -> None:
    if _prctl is not None:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def spawn_worker(settings: Settings, output: IO[bytes] | int) -> subprocess.Popen[bytes]:
    """A worker process that dies with us: one left behind by a killed bench or test run
    would go on consuming."""
    return spawn_module(settings, output, "worker.cli", "worker")


def spawn_module(
    settings: Settings, output: IO[bytes] | int, module: str, *args: str
) -> subprocess.Popen[bytes]:
    """`python -m MODULE ARGS` with `settings` in its environment, dying with us."""
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        env=worker_env(settings),
        stdout=output,
        stderr=subprocess.STDOUT,
        preexec_fn=_die_with_parent,
    )
