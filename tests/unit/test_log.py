"""Logging: in JSON mode every line is one JSON object, the libraries' lines (stdlib
logging, asyncio, warnings) included, with a traceback as one field; the console renderer
honours NO_COLOR; invalid log settings are refused."""

import io
import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest

from worker import log
from worker.cli import main

# Runs in a child: logging configuration is process-wide.
EMIT = textwrap.dedent(
    """
    import asyncio, gc, logging, warnings
    from worker import log

    log.configure("INFO", "json")
    try:
        raise ValueError("ours")
    except ValueError:
        log.get("worker.app").exception("side_task_failed", task="outbox-relay")
    try:
        raise ConnectionError("theirs")
    except ConnectionError:
        theirs = logging.getLogger("aiormq.connection")
        theirs.warning("Reader exited %s", "abnormally", exc_info=True)
    logging.getLogger("aio_pika.robust_connection").info("Connection attempt (info: hidden)")

    async def fail():
        raise RuntimeError("never retrieved")

    async def main():
        task = asyncio.create_task(fail())
        await asyncio.sleep(0.01)
        del task

    asyncio.run(main())
    gc.collect()
    warnings.warn("asyncpg-like warning\\nover two lines", ResourceWarning, stacklevel=1)
    """
)


def emitted(fmt_env: dict[str, str] | None = None) -> list[str]:
    env = {**os.environ, **(fmt_env or {})}
    result = subprocess.run(
        [sys.executable, "-W", "always", "-c", EMIT],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=True,
    )
    assert result.stdout == ""
    return result.stderr.splitlines()


def test_every_line_is_json_third_party_included() -> None:
    lines = emitted()
    records = [json.loads(line) for line in lines]  # fails on any line that is not JSON
    by_logger = {r["logger"]: r for r in records}
    assert set(by_logger) == {"worker.app", "aiormq.connection", "asyncio", "py.warnings"}
    for record in records:
        assert {"event", "level", "timestamp", "logger"} <= set(record)

    ours = by_logger["worker.app"]
    assert ours["level"] == "error" and ours["event"] == "side_task_failed"
    assert "ValueError: ours" in ours["exception"]

    theirs = by_logger["aiormq.connection"]
    assert theirs["level"] == "warning" and theirs["event"] == "Reader exited abnormally"
    assert (
        theirs["exception"].startswith("Traceback")
        and "ConnectionError: theirs" in (theirs["exception"])
    )
    assert "never retrieved" in json.dumps(by_logger["asyncio"])
    assert by_logger["asyncio"]["level"] == "error"
    assert "asyncpg-like warning" in by_logger["py.warnings"]["event"]
    assert by_logger["py.warnings"]["level"] == "warning"


def test_a_crash_is_one_json_line() -> None:
    script = "from worker import log\nlog.configure('INFO', 'json')\nraise RuntimeError('boom')\n"
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    record = json.loads(line)
    assert record["event"] == "crashed" and record["level"] == "critical"
    assert "RuntimeError: boom" in record["exception"]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("no_color", [None, "1"])
def test_console_colors_follow_no_color(
    monkeypatch: pytest.MonkeyPatch, no_color: str | None
) -> None:
    terminal = Terminal()
    if no_color is None:
        monkeypatch.delenv("NO_COLOR", raising=False)
    else:
        monkeypatch.setenv("NO_COLOR", no_color)
    try:
        log.configure("INFO", "auto", stream=terminal)  # a terminal: the console renderer
        log.get("worker.app").warning("consuming_paused", queue="q")
        logging.getLogger("asyncpg.pool").warning("theirs too")
    finally:
        log.configure("INFO", "json")
    output = terminal.getvalue()
    assert "consuming_paused" in output and "theirs too" in output
    assert not output.lstrip().startswith("{")
    assert ("\x1b[" in output) == (no_color is None)


@pytest.mark.parametrize(("level", "fmt"), [("LOUD", "json"), ("INFO", "xml"), ("", "auto")])
def test_configure_refuses_unknown_values(level: str, fmt: str) -> None:
    with pytest.raises(ValueError, match="unknown log"):
        log.configure(level, fmt)


@pytest.mark.parametrize(
    ("variable", "value"),
    [("LEADROUTER_LOG_LEVEL", "LOUD"), ("LEADROUTER_LOG_FORMAT", "xml")],
)
def test_invalid_log_setting_is_one_error_line_exit_2(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    variable: str,
    value: str,
) -> None:
    monkeypatch.setenv(variable, value)
    assert main(["operators", "list"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"error: invalid setting: {variable}:")


def test_log_level_is_case_insensitive(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.settings import Settings

    monkeypatch.setenv("LEADROUTER_LOG_LEVEL", "debug")
    assert Settings().log_level == "DEBUG"


def test_a_library_line_never_carries_a_message(monkeypatch: pytest.MonkeyPatch) -> None:
    """aiormq logs a returned publish it cannot match with the whole message (its body is
    personal data): the arguments are withheld, and so is an exception that carries one."""
    from aiormq.abc import DeliveredMessage

    for name in ("aiormq", "aio_pika"):  # a one-shot CLI command in this process quiets them
        library = logging.getLogger(name)
        monkeypatch.setattr(library, "level", library.level)  # restored afterwards
        library.setLevel(logging.NOTSET)
    stream = io.StringIO()
    message = DeliveredMessage(
        delivery=None,  # type: ignore[arg-type]
        header=None,  # type: ignore[arg-type]
        body=b'{"phone": "+15550001111"}',
        channel=None,  # type: ignore[arg-type]
    )
    try:
        log.configure("INFO", "json", stream=stream)
        logging.getLogger("aiormq.channel").error("Unhandled message %r returning", message)
        logging.getLogger("aio_pika.exchange").warning("body %s", b"+15550001111")
        try:
            raise RuntimeError(message)
        except RuntimeError:
            logging.getLogger("aio_pika.queue").exception("failed for %s", "queue-a")
        logging.getLogger("aiormq.connection").warning("Reader exited %s", "abnormally")
    finally:
        log.configure("INFO", "json")
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert "15550001111" not in stream.getvalue()
    assert [r["event"] for r in records] == [
        f"Unhandled message {log.REDACTED!r} returning",
        f"body {log.REDACTED}",
        f"failed for queue-a (RuntimeError: {log.REDACTED})",
        "Reader exited abnormally",  # the rest untouched
    ]
    assert all("exception" not in r for r in records)
