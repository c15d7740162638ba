"""Where a benchmark's CPU goes on this machine: runs a command and reports the CPU seconds
used meanwhile by the command itself and what it started (as `bench` and, for the
leadrouter worker processes among them, `worker`), RabbitMQ (every beam.smp of the
machine) and PostgreSQL's backends of bench databases (their database name has `_bench_`
in it; not the server's background processes), from /proc (Linux; the servers must run on
this machine). RabbitMQ and the backends are counted whoever uses them: run nothing else
meanwhile. The command's own output goes to standard error, the figures to standard
output as JSON.

    python -m worker.tools.cpu_by_process leadrouter bench --offers

On a machine whose cores the worker shares with the broker and the database, throughput
follows the CPU all of them spend per message, not the worker's alone."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from worker.tools.processes import proc_stat

SAMPLE_SECONDS = 0.2


def kind(cmdline: str) -> str | None:
    """Which of the reported kinds a process is, by its command line (`bench` stands for
    anything the command started that is not a worker)."""
    if "beam.smp" in cmdline:
        return "rabbitmq"
    if cmdline.startswith("postgres:"):
        return "postgresql" if "_bench_" in cmdline else None
    if "worker.cli worker" in cmdline or "worker.tools.bench_reference" in cmdline:
        return "worker"
    return "bench"


# Counted only for the command and what it started.
_OURS = frozenset({"bench", "worker"})


def _processes(root: int, known: dict[int, str]) -> dict[int, tuple[str, float]]:
    """Per process of a reported kind: (kind, CPU seconds so far). `root`: the command's
    pid; `known`: the kinds found before, by pid (a process that has exited but is not
    reaped yet shows its final CPU, but no command line)."""
    seen: dict[int, tuple[int, str, float]] = {}  # pid -> (parent pid, command line, CPU)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            parent, cpu = proc_stat(entry.name)
        except OSError:  # gone meanwhile
            continue
        seen[int(entry.name)] = (parent, cmdline, cpu)
    ours = {root}
    grew = True
    while grew:  # the command's descendants
        before = len(ours)
        ours |= {pid for pid, (parent, _, _) in seen.items() if parent in ours}
        grew = len(ours) > before
    out = {}
    for pid, (_, cmdline, cpu) in seen.items():
        found = known.get(pid) or (kind(cmdline) if cmdline else None)
        if found is not None and (pid in ours) == (found in _OURS):
            out[pid] = (found, cpu)
    return out


def measure(command: list[str]) -> dict[str, float]:
    """Run `command` (its output sent to standard error); CPU seconds per kind while it
    ran. A process that ends before the command counts up to its last reading
    (SAMPLE_SECONDS apart); the command itself, to its end."""
    last = _processes(-1, {})  # the servers' processes, before
    first = {pid: cpu for pid, (_, cpu) in last.items()}
    began = time.monotonic()
    with subprocess.Popen(command, stdout=sys.stderr) as proc:
        exited = False
        while not exited:
            # Looked at before the reading: once it has exited (not reaped, WNOWAIT), the
            # reading has its final CPU.
            exited = bool(os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT))
            last.update(_processes(proc.pid, {pid: found for pid, (found, _) in last.items()}))
            if not exited:
                time.sleep(SAMPLE_SECONDS)
    used: dict[str, float] = {}
    for pid, (found, cpu) in last.items():
        used[found] = used.get(found, 0.0) + cpu - first.get(pid, 0.0)
    return {"wall_seconds": round(time.monotonic() - began, 1)} | {
        k: round(v, 1) for k, v in sorted(used.items())
    }


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    print(json.dumps(measure(sys.argv[1:])))


if __name__ == "__main__":
    main()
