"""Generated junk on the command line: every verb answers with its output or one clean
error line and an exit code, never a traceback. Services point at a closed port, so verbs
that need them fail fast (exit 2) instead of touching anything."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.cli import main

# Verbs that would wait on services for long (worker, demo) or write files (contract)
# are left out; the rest are exercised with junk arguments.
VERBS = [
    ["operators", "add"],
    ["operators", "list"],
    ["operators", "update"],
    ["sources", "add"],
    ["sources", "update"],
    ["sources", "list"],
    ["weights", "set"],
    ["weights", "show"],
    ["contacts", "list"],
    ["contacts", "close"],
    ["leads", "show"],
    ["stats"],
    ["publish"],
    ["dlq", "list"],
    ["dlq", "show"],
    ["dlq", "replay"],
    ["apply"],
    ["nonsense"],
]
junk_arg = st.one_of(
    st.text(max_size=30),
    st.sampled_from(
        [
            "--json",
            "--max-load",
            "-1",
            "0",
            "1=0",
            "x=y",
            "--since",
            "99999999999d",
            "--strategy",
            "--reason",
            "--limit",
            "1e9",
            "'; DROP TABLE operators;--",
            "--affinity-hours",
            "9999999",
            str(2**64),
            "--id",
            "--all",
        ]
    ),
)


@pytest.fixture(autouse=True)
def no_services(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEADROUTER_DATABASE_URL", "postgresql://nobody:pw@127.0.0.1:1/none")
    monkeypatch.setenv("LEADROUTER_AMQP_URL", "amqp://nobody:pw@127.0.0.1:1/")
    monkeypatch.setenv("LEADROUTER_LOG_LEVEL", "CRITICAL")


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(st.sampled_from(VERBS), st.lists(junk_arg, max_size=5))
def test_junk_arguments_end_in_one_clean_line(
    capsys: pytest.CaptureFixture[str], verb: list[str], args: list[str]
) -> None:
    code = main([*verb, *args])
    out, err = capsys.readouterr()
    assert isinstance(code, int)
    assert "Traceback" not in err and "Traceback" not in out
    if code != 0 and err.strip() and not err.startswith("Usage:"):
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(("error:", "aborted")), err
    assert "pw@" not in err, "a password leaked into an error"
