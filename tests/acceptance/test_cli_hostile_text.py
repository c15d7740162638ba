"""Text that looks like rich markup or carries terminal control characters, in names,
ids, keys and dead letters, printed by the real commands against real services; and
failures that used to end in a traceback, each now one `error:` line."""

import asyncio
import subprocess
import sys

import aio_pika
import asyncpg

from tests.commands import as_json, leadrouter
from tests.helpers import EventCollector, Expected, lead, raw_message, setup_source, wait_until
from worker.app import Worker
from worker.settings import Settings
from worker.tools.processes import worker_env

MARKUP = "[/]"
LINK = "[link=http://e.x]x[/]"
ESC = "\x1b[2J"
BIDI = "\u202e"


def clean(stdout: str) -> None:
    assert all(ch.isprintable() or ch == "\n" for ch in stdout), repr(stdout)


async def test_markup_and_control_characters_are_shown_as_text(
    pool: asyncpg.Pool,
    settings: Settings,
    broker: aio_pika.abc.AbstractChannel,
    events: EventCollector,
    worker: Worker,
    expected: Expected,
) -> None:
    expected.dead["invalid_schema"] = 1  # the lead published with a hostile routing key
    await setup_source(pool, "tg", [(MARKUP + ESC, 5, 1)])
    await pool.execute("UPDATE sources SET name = $1, description = $2", LINK, BIDI + "desc")
    exchange = await broker.get_exchange(settings.inbound_exchange)
    hostile_lead = lead("tg", MARKUP + ESC + "tg:1", name=BIDI + LINK)
    await exchange.publish(raw_message(hostile_lead, "hostile-1"), "lead.contact")
    await exchange.publish(raw_message(lead("tg", "k:1"), "hostile-2"), MARKUP + ESC)
    await events.wait_for("contact.assigned", 1)
    await wait_until(lambda: asyncio.sleep(0, sum(worker.outcomes.values()) >= 2))

    outputs = {}
    for command in (
        ["operators", "list"],
        ["sources", "list"],
        ["weights", "show", "tg"],
        ["contacts", "list"],
        ["leads", "list"],
        ["leads", "show", MARKUP + ESC + "tg:1"],
        ["stats"],
        ["dlq", "list"],
    ):
        result = await asyncio.to_thread(leadrouter, settings, *command)
        assert "Traceback" not in result.stderr
        clean(result.stdout)
        outputs[" ".join(command[:2])] = result.stdout
    for command in ("operators list", "weights show", "stats"):
        assert MARKUP + "\\x1b[2J" in outputs[command], outputs[command]
    assert "[link=" in outputs["sources list"] and "\\u202edesc" in outputs["sources list"]
    for command in ("contacts list", "leads list", "leads show"):
        assert MARKUP + "\\x1b[2Jtg:1" in outputs[command], outputs[command]
    assert "[link=" in outputs["leads list"] and "\\u202e" in outputs["leads list"]
    assert MARKUP + "\\x1b[2J" in outputs["dlq list"], outputs["dlq list"]

    [letter] = await asyncio.to_thread(as_json, settings, "dlq", "list")
    assert letter["routing_key"] == MARKUP + ESC  # --json: the exact text, JSON-escaped
    shown = await asyncio.to_thread(leadrouter, settings, "dlq", "show", letter["id"])
    clean(shown.stdout)
    assert "routing_key: [/]\\x1b[2J" in shown.stdout


def run(settings: Settings, *args: str | bytes) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        env=worker_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def one_error_line(result: subprocess.CompletedProcess[str], code: int, expect: str) -> None:
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expect in lines[0]
    assert "secret" not in lines[0]


def test_failures_are_one_error_line(settings: Settings) -> None:
    publish = ["publish", "--source", "tg", "--external-id", "x", "--message-id"]
    one_error_line(run(settings, *publish, b"\xff"), 2, "not valid UTF-8")
    one_error_line(run(settings, *publish, "m" * 300), 2, "255 bytes")
    one_error_line(run(settings, "leads", "show", b"tg:\xff"), 2, "not valid UTF-8")

    def with_url(**urls: str) -> Settings:
        return settings.model_copy(update=urls)

    no_vhost = settings.amqp_url.rstrip("/") + "/no-such-vhost"
    one_error_line(run(with_url(amqp_url=no_vhost), "dlq", "list"), 2, "virtual host")
    one_error_line(run(with_url(amqp_url=no_vhost), *publish, "m-1"), 2, "virtual host")
    for amqp_url, expect in [
        ("amqp://guest:secret@127.0.0.1:notaport/", "LEADROUTER_AMQP_URL: malformed"),
        ("amqp://guest:secret@127.0.0.1:99999/", "LEADROUTER_AMQP_URL: malformed"),
        ("amqp:/nohost", "LEADROUTER_AMQP_URL: no host"),
        ("http://127.0.0.1:5672/", "LEADROUTER_AMQP_URL: expected amqp://"),
    ]:
        one_error_line(run(with_url(amqp_url=amqp_url), "dlq", "list"), 2, expect)
    for database_url, expect in [
        ("postgresql://postgres:secret@127.0.0.1:notaport/x", "the port is not a number"),
        ("postgresql://postgres:secret@h1:5432,h2:x/x", "the port is not a number"),
        ("postgresql://[::1/x", "malformed"),
        ("nonsense", "expected postgresql://"),
        ("postgresql://postgres:secret@127.0.0.1/x?sslmode=bogus", "`sslmode` parameter"),
    ]:
        result = run(with_url(database_url=database_url), "operators", "list")
        one_error_line(result, 2, "LEADROUTER_DATABASE_URL: " + expect)
    one_error_line(run(settings, "contract", "--directory", "/proc/nope"), 1, "/proc/nope")
