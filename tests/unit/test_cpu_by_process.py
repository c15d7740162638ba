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
    assert kind("/usr/bin/bash ") is None


def test_the_cpu_a_command_used_is_counted() -> None:
    burn = "import time\nend = time.process_time() + 0.5\nwhile time.process_time() < end: pass"
    used = measure([sys.executable, "-c", burn, "leadrouter bench"])
    assert 0.5 <= used["bench"] <= 1.0, used  # its whole CPU, to its end
    assert used["wall_seconds"] >= 0.5
