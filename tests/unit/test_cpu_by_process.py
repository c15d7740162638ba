"""worker/tools/cpu_by_process.py: which process is which, and the CPU a command used."""

import sys

from worker.tools.cpu_by_process import kind, measure


def test_processes_are_told_apart_by_their_command_line() -> None:
    assert kind("/usr/lib/erlang/erts-13/bin/beam.smp -W w -- -root /usr/lib/erlang") == "rabbitmq"
    assert kind("postgres: postgres leadrouter_bench_ab12cd34 127.0.0.1(5012) idle") == (
        "postgresql"
    )
    assert kind("postgres: postgres lrtest_1 127.0.0.1(5013) idle") is None  # not a bench's
    assert kind("postgres: checkpointer ") is None
    assert kind("/venv/bin/python -m worker.cli worker ") == "worker"
    assert kind("/venv/bin/python /venv/bin/leadrouter bench --offers ") == "bench"


def test_the_cpu_of_the_command_is_counted_to_its_end() -> None:
    """The command burns 0.5 s of CPU and exits at once, between two readings: counted
    whole (read while it waits to be reaped), and nothing is taken for a worker."""
    burn = "import time\nend = time.process_time() + 0.5\nwhile time.process_time() < end: pass"
    used = measure([sys.executable, "-c", burn])
    assert 0.45 <= used["bench"] <= 0.8, used
    assert "worker" not in used
