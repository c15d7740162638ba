"""`leadrouter`: the one command. Lists print a table for people and --json for scripts;
wrong input prints one line on stderr and exits non-zero."""

import asyncio
import errno
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from functools import wraps
from pathlib import Path
from typing import Any, ParamSpec, TypeVar
from urllib.parse import parse_qs, urlsplit

import aiormq.exceptions
import asyncpg
import click
import pydantic
import uvloop
from rich.console import Console
from rich.table import Table
from yarl import URL

from worker import admin, history, log, source_queueing
from worker.errors import Reason, UserError
from worker.settings import Settings, mask_url, split_urls
from worker.stats import parse_duration
from worker.strategies import DEFAULT_STRATEGY, STRATEGIES
from worker.terminal import cell, shown

P = ParamSpec("P")
T = TypeVar("T")
BIGINT = click.IntRange(1, 2**63 - 1)
MAX_LOAD = click.IntRange(0, 2**31 - 1)
CONNECTION_ERRORS = (
    OSError,
    asyncpg.InvalidAuthorizationSpecificationError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    aiormq.exceptions.AMQPConnectionError,
)


def run_async(fn: Callable[P, Awaitable[T]]) -> Callable[P, T]:
    @wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        if Settings().event_loop == "uvloop":
            return uvloop.run(fn(*args, **kwargs))  # type: ignore[arg-type]
        return asyncio.run(fn(*args, **kwargs))  # type: ignore[arg-type]

    return wrapper


async def _pool(settings: Settings) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=2)
    assert pool is not None
    return pool


class SettingError(click.ClickException):
    """A LEADROUTER_* variable the services' client libraries could not even parse."""

    exit_code = 2

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"invalid setting: LEADROUTER_{name.upper()}: {problem}")


def _settings(long_running: bool = False) -> Settings:
    settings = Settings()
    _check_settings(settings)
    log.configure(settings.log_level, settings.log_format)
    history.configure(settings.history)
    if not long_running:
        # A one-shot command reports a failure in one line of its own; the AMQP
        # libraries' connection logging would add lines that say the same.
        for name in ("aiormq", "aio_pika"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    return settings


def _check_settings(settings: Settings) -> None:
    """Refuse here, in one line, what the client libraries would refuse with a traceback
    (a ValueError deep in yarl or urllib): text that is not UTF-8 (a byte a shell passed
    on as it was), and URLs whose scheme, host or port cannot be read."""
    for name, value in settings.model_dump().items():
        if isinstance(value, str) and not _is_utf8(value):
            raise SettingError(name, "not valid UTF-8")  # not shown: it may hold a password
    if problem := _amqp_url_problem(settings.amqp_url):
        raise SettingError("amqp_url", problem)
    if problem := _database_url_problem(settings.database_url):
        raise SettingError("database_url", problem)


def _amqp_url_problem(urls: str) -> str | None:
    """What aio-pika, which reads each URL with yarl, would fail on (a comma-separated
    list names the nodes of one cluster)."""
    for url in split_urls(urls):
        if problem := _one_amqp_url_problem(url):
            return problem
    return None


def _one_amqp_url_problem(url: str) -> str | None:
    try:
        parsed = URL(url)
        parsed.port  # noqa: B018 (reading it checks it)
    except ValueError as exc:
        return f"malformed ({_without_password(str(exc), url)})"
    if parsed.scheme not in ("amqp", "amqps"):
        return f"expected amqp://user:password@host:port/vhost, not {mask_url(url)}"
    if not parsed.host:
        return f"no host in {mask_url(url)}"
    return None


def _database_url_problem(url: str) -> str | None:
    """What asyncpg, which reads the URL with urllib and int() of each port, would fail on
    with a ValueError (the rest it reports as ClientConfigurationError, handled in main)."""
    try:
        parts = urlsplit(url)
        if parts.query:
            parse_qs(parts.query, strict_parsing=True)
    except ValueError as exc:
        return f"malformed ({_without_password(str(exc), url)})"
    if parts.scheme not in ("postgresql", "postgres"):
        return f"expected postgresql://user:password@host:port/database, not {mask_url(url)}"
    for host in parts.netloc.partition("@")[2 if "@" in parts.netloc else 0].split(","):
        port = host.rpartition("]")[2] if host.startswith("[") else host
        _, colon, port = port.rpartition(":")
        if colon and port and not port.isdigit():
            return f"the port is not a number: {mask_url(url)}"
    return None


def _without_password(text: str, url: str) -> str:
    userinfo = url.partition("://")[2].rpartition("@")[0]
    password = userinfo.partition(":")[2]
    return text.replace(password, "***") if password else text


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _usage(check: Callable[[T], object]) -> Callable[[click.Context, click.Parameter, T], T]:
    """A click callback that runs `check` on the value: what it refuses is a malformed
    command line (exit 2, like a value out of range), not a failure of the command."""

    def callback(_ctx: click.Context, _param: click.Parameter, value: T) -> T:
        if value is not None and value != ():
            try:
                check(value)
            except UserError as exc:
                raise click.BadParameter(str(exc)) from None
        return value

    return callback


class _FilePath(click.Path):
    """click.Path, with a NUL byte refused as a malformed command line (click's own check
    calls os.stat, which raises ValueError on one: a traceback, not an error line)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if "\x00" in os.fsdecode(value):
            self.fail("a file name holds no NUL byte", param, ctx)
        return super().convert(value, param, ctx)


def _print_rows(
    rows: Sequence[dict[str, Any]], columns: Sequence[str], as_json: bool, width: int = 120
) -> None:
    """A table (`width` when not printed to a terminal), or a JSON array."""
    if as_json:
        click.echo(json.dumps([{c: r[c] for c in r} for r in rows], default=_json_default))
        return
    table = Table(*columns)
    for row in rows:
        table.add_row(*(cell(_cell(row.get(c))) for c in columns))
    _console(width).print(table)


def _print_one(row: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(row, default=_json_default))
    else:
        _say(" ".join(f"{k}={_cell(v)}" for k, v in row.items()))


def _warn(message: str) -> None:
    """One line on stderr: the command did what it was asked, and this is worth knowing."""
    click.echo("warning: " + shown(message), err=True)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.isoformat(timespec="seconds")
    return str(value)


def _say(line: str) -> None:
    """One line on stdout, control characters shown escaped (`--json` output needs no
    help: json.dumps escapes them)."""
    click.echo(shown(line))


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot encode {type(value).__name__}")


@click.group()
@click.version_option(package_name="leadrouter", prog_name="leadrouter")
def cli() -> None:
    """leadrouter: distributes inbound leads from RabbitMQ among operators."""


@cli.command()
@run_async
async def migrate() -> None:
    """Create the database if needed and apply pending migrations."""
    from worker.migrate import migrate as run_migrations

    settings = _settings()
    applied = await run_migrations(settings.database_url, settings.migrations_dir)
    _say(f"applied {len(applied)} migration(s)" + (f": {', '.join(applied)}" if applied else ""))


@cli.command()
@run_async
async def worker() -> None:
    """Consume inbound leads until SIGTERM or SIGINT."""
    from worker.app import Worker

    app = Worker(_settings(long_running=True))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, app.request_stop)
    await app.run()
    if app.failure:  # logged as side_task_failed; the supervisor restarts us
        raise click.exceptions.Exit(1)


@cli.command()
@click.option("--leads", default=3000, show_default=True, type=click.IntRange(1, 100_000))
@run_async
async def demo(leads: int) -> None:
    """Run the whole job end to end in a database and topology of its own."""
    from worker.tools.demo import run_demo

    await run_demo(_settings(), leads)


# --- operators ---------------------------------------------------------------------


@cli.group()
def operators() -> None:
    """People who take contacts."""


@operators.command("add")
@click.argument("name")
@click.option(
    "--max-load", default=10, show_default=True, type=MAX_LOAD, help="Most open contacts."
)
@click.option("--inactive", is_flag=True, help="Create switched off.")
@click.option("--json", "as_json", is_flag=True)
@run_async
async def operators_add(name: str, max_load: int, inactive: bool, as_json: bool) -> None:
    """Add an operator; prints it with its id."""
    async with await _pool(_settings()) as pool:
        _print_one(await admin.add_operator(pool, name, max_load, not inactive), as_json)


@operators.command("list")
@click.option("--json", "as_json", is_flag=True)
@run_async
async def operators_list(as_json: bool) -> None:
    """Every operator with its load."""
    async with await _pool(_settings()) as pool:
        rows = await admin.list_operators(pool)
    columns = ["id", "name", "is_active", "max_load", "load", "presence", "shift", "available"]
    # --json adds time_zone, leave, on_shift and on_leave.
    _print_rows(rows, columns, as_json, width=160)


@operators.command("presence")
@click.argument("operator_id", type=BIGINT)
@click.argument("status", metavar="online|away|offline")
@click.option(
    "--requeue-open",
    is_flag=True,
    help="Going away or offline: also hand their open contacts back to the queue.",
)
@click.option("--json", "as_json", is_flag=True)
@run_async
async def operators_presence(
    operator_id: int, status: str, requeue_open: bool, as_json: bool
) -> None:
    """Set whether an operator takes work: online, away or offline."""
    from worker import availability

    availability.check_status(status)
    async with await _pool(_settings()) as pool:
        changed = await availability.set_presence(pool, operator_id, status, "cli", requeue_open)
    _print_availability(changed, as_json)


@operators.command("shift")
@click.argument("operator_id", type=BIGINT)
@click.argument("shift", required=False, metavar='["mon-fri 09:00-18:00, sat 10:00-14:00"]')
@click.option("--tz", "time_zone", help="IANA time zone of the shift, e.g. Europe/Berlin.")
@click.option("--clear", is_flag=True, help="No shift: always on (leave still counts).")
@click.option("--json", "as_json", is_flag=True)
@run_async
async def operators_shift(
    operator_id: int, shift: str | None, time_zone: str | None, clear: bool, as_json: bool
) -> None:
    """Show, set or clear an operator's weekly shift (days, then HH:MM-HH:MM ranges;
    22:00-06:00 runs overnight)."""
    from worker import availability

    async with await _pool(_settings()) as pool:
        if clear or shift is not None:
            if clear and shift is not None:
                raise UserError("give a shift or --clear, not both")
            changed = await availability.set_shift(pool, operator_id, shift, time_zone)
            _print_availability(changed, as_json)
        else:
            if time_zone is not None:
                raise UserError("--tz goes with a shift")
            _print_one(await _availability_of(pool, operator_id), as_json)


@operators.command("leave")
@click.argument("operator_id", type=BIGINT)
@click.argument("ranges", nargs=-1, metavar="[YYYY-MM-DD..YYYY-MM-DD]...")
@click.option("--clear", is_flag=True, help="Remove all their leave (before adding RANGES).")
@click.option("--json", "as_json", is_flag=True)
@run_async
async def operators_leave(
    operator_id: int, ranges: tuple[str, ...], clear: bool, as_json: bool
) -> None:
    """Show, add or clear an operator's leave: inclusive date ranges in their shift's time
    zone (UTC without a shift)."""
    from worker import availability

    async with await _pool(_settings()) as pool:
        if clear or ranges:
            changed = await availability.set_leave(pool, operator_id, ranges, clear)
            _print_availability(changed, as_json)
        else:
            _print_one(await _availability_of(pool, operator_id), as_json)


async def _availability_of(pool: asyncpg.Pool, operator_id: int) -> dict[str, Any]:
    rows = [r for r in await admin.list_operators(pool) if r["id"] == operator_id]
    if not rows:
        raise UserError(f"no operator with id {operator_id}")
    keep = ("id", "name", "presence", "shift", "time_zone", "leave", "on_shift", "on_leave")
    return {k: rows[0][k] for k in (*keep, "available")}


def _print_availability(changed: Any, as_json: bool) -> None:
    row = {**changed.operator, "requeued": changed.requeued, "assigned": changed.assigned}
    _print_one(row, as_json)


@operators.command("update")
@click.argument("operator_id", type=BIGINT)
@click.option("--name")
@click.option("--max-load", type=MAX_LOAD)
@click.option("--active/--inactive", default=None)
@click.option("--json", "as_json", is_flag=True)
@run_async
async def operators_update(
    operator_id: int, name: str | None, max_load: int | None, active: bool | None, as_json: bool
) -> None:
    """Change an operator. Freed capacity goes to queued contacts at once."""
    async with await _pool(_settings()) as pool:
        row, drained = await admin.update_operator(pool, operator_id, name, max_load, active)
    warning = admin.max_load_warning(row)
    _print_one({**row, "warning": warning} if as_json else row, as_json)
    if drained and not as_json:
        _say(f"assigned {drained} queued contact(s)")
    if warning:
        _warn(warning)


# --- sources -----------------------------------------------------------------------


@cli.group()
def sources() -> None:
    """Channels and bots that leads come from."""


STRATEGY = click.option(
    "--strategy",
    type=click.Choice(list(STRATEGIES)),
    help=f"How to choose among available operators (default {DEFAULT_STRATEGY}).",
)
AFFINITY = click.option(
    "--affinity-hours",
    type=click.IntRange(0, 24 * 365),
    help="Send a lead who wrote within N hours back to the same operator (0: off).",
)

SECONDS = click.IntRange(0, source_queueing.MAX_SECONDS)


def _queueing_options(f: Any) -> Any:
    """The per-source queueing settings (source_queueing.py), the same on add and update."""
    for option in reversed(
        (
            click.option(
                "--queue-order",
                type=click.Choice(source_queueing.QUEUE_ORDERS),
                help="Serve the backlog oldest (fifo, the default) or newest (lifo) first,"
                " within each priority.",
            ),
            click.option(
                "--overflow-to",
                metavar="KEY",
                help="After --overflow-after seconds queued, a contact may also go to this"
                " source's operators.",
            ),
            click.option(
                "--overflow-after", type=SECONDS, help="Seconds before overflowing (0: off)."
            ),
            click.option(
                "--alert-after",
                type=SECONDS,
                help="Emit contact.waiting once for a contact still queued after this many"
                " seconds (0: off).",
            ),
        )
    ):
        f = option(f)
    return f


ACCEPT_TIMEOUT = click.option(
    "--accept-timeout",
    "accept_timeout",
    type=click.IntRange(0, admin.MAX_ACCEPT_TIMEOUT),
    help="Offer each contact to its operator, who must accept within SECONDS (0: off).",
)
EXPIRE_TO_AWAY = click.option(
    "--expire-to-away",
    "expire_to_away",
    type=click.IntRange(0, admin.MAX_EXPIRE_TO_AWAY),
    metavar="N",
    help="Set an operator away once N offers of this source in a row lapse (0: never).",
)


@sources.command("add")
@click.argument("key")
@click.option("--name")
@click.option("--description", default="")
@STRATEGY
@AFFINITY
@_queueing_options
@ACCEPT_TIMEOUT
@EXPIRE_TO_AWAY
@click.option("--json", "as_json", is_flag=True)
@run_async
async def sources_add(
    key: str,
    name: str | None,
    description: str,
    strategy: str | None,
    affinity_hours: int | None,
    queue_order: str | None,
    overflow_to: str | None,
    overflow_after: int | None,
    alert_after: int | None,
    accept_timeout: int | None,
    expire_to_away: int | None,
    as_json: bool,
) -> None:
    """Add a source that bots publish with KEY."""
    change = source_queueing.QueueingChange(queue_order, overflow_to, overflow_after, alert_after)
    async with await _pool(_settings()) as pool:
        row = await source_queueing.add_source(
            pool,
            change,
            key=key,
            name=name,
            description=description,
            strategy=strategy,
            affinity_hours=affinity_hours,
            accept_timeout=accept_timeout or 0,
            expire_to_away=expire_to_away or 0,
        )
    _print_one(row, as_json)


@sources.command("update")
@click.argument("key")
@click.option("--name")
@click.option("--description")
@STRATEGY
@AFFINITY
@_queueing_options
@ACCEPT_TIMEOUT
@EXPIRE_TO_AWAY
@click.option("--json", "as_json", is_flag=True)
@run_async
async def sources_update(
    key: str,
    name: str | None,
    description: str | None,
    strategy: str | None,
    affinity_hours: int | None,
    queue_order: str | None,
    overflow_to: str | None,
    overflow_after: int | None,
    alert_after: int | None,
    accept_timeout: int | None,
    expire_to_away: int | None,
    as_json: bool,
) -> None:
    """Change a source's name, description, strategy, affinity, queueing or offers."""
    change = source_queueing.QueueingChange(queue_order, overflow_to, overflow_after, alert_after)
    async with await _pool(_settings()) as pool:
        row = await source_queueing.update_source(
            pool,
            change,
            key=key,
            name=name,
            description=description,
            strategy=strategy,
            affinity_hours=affinity_hours,
            accept_timeout=accept_timeout,
            expire_to_away=expire_to_away,
        )
    _print_one(row, as_json)


@sources.command("list")
@click.option("--json", "as_json", is_flag=True)
@run_async
async def sources_list(as_json: bool) -> None:
    """Every source."""
    async with await _pool(_settings()) as pool:
        rows = await admin.list_sources(pool)
    # The queueing settings (queue_order, overflow_to, overflow_after, alert_after) are in
    # --json; the table stays narrow enough to read.
    columns = ["id", "key", "name", "description", "strategy", "affinity_hours"]
    if any(r.get("accept_timeout") for r in rows):  # a column of its own once offers are used
        columns.append("accept_timeout")
    if not all(r.get("history") for r in rows):  # ... and once a source records no history
        columns.append("history")
    _print_rows(rows, columns, as_json)


@sources.command("history")
@click.argument("key")
@click.argument("state", type=click.Choice(["on", "off"]))
@click.option("--json", "as_json", is_flag=True)
@run_async
async def sources_history(key: str, state: str, as_json: bool) -> None:
    """Record the source's decisions (contacts explain) from now on, or not."""
    async with await _pool(_settings()) as pool:
        row = await admin.set_source_history(pool, key, state == "on")
    _print_one(row, as_json)


# --- weights -----------------------------------------------------------------------


def _parse_weights(pairs: Sequence[str]) -> dict[int, int]:
    weights: dict[int, int] = {}
    for pair in pairs:
        operator, sep, weight = pair.partition("=")
        try:
            if not sep:
                raise ValueError
            operator_id, value = int(operator), int(weight)
        except ValueError:
            raise UserError(f"invalid weight {pair!r}: expected OPERATOR_ID=WEIGHT") from None
        if not 1 <= operator_id < 2**63:
            raise UserError(f"invalid operator id {operator_id}")
        if not 1 <= value < 2**31:
            raise UserError(f"weight for operator {operator_id} must be a positive integer")
        if operator_id in weights:
            raise UserError(f"operator {operator_id} is given twice")
        weights[operator_id] = value
    return weights


@cli.group()
def weights() -> None:
    """Each operator's share of a source's traffic."""


@weights.command("set")
@click.argument("source_key")
@click.argument("pairs", nargs=-1, metavar="OPERATOR_ID=WEIGHT...", callback=_usage(_parse_weights))
@run_async
async def weights_set(source_key: str, pairs: tuple[str, ...]) -> None:
    """Replace the source's weights (none given: remove them all)."""
    parsed = _parse_weights(pairs)
    async with await _pool(_settings()) as pool:
        drained = await admin.set_weights(pool, source_key, parsed)
    _say(f"{source_key}: {len(parsed)} weight(s) set, {drained} queued contact(s) assigned")


@weights.command("show")
@click.argument("source_key")
@click.option("--json", "as_json", is_flag=True)
@run_async
async def weights_show(source_key: str, as_json: bool) -> None:
    """The source's weights."""
    async with await _pool(_settings()) as pool:
        rows = await admin.show_weights(pool, source_key)
    _print_rows(rows, ["operator_id", "operator_name", "weight"], as_json)


# --- contacts ----------------------------------------------------------------------


@cli.group()
def contacts() -> None:
    """Appeals of leads through sources."""


@contacts.command("list")
@click.option("--source", "source_key")
@click.option("--operator", "operator_id", type=BIGINT)
@click.option("--status", type=click.Choice(["open", "closed"]))
@click.option("--unassigned", is_flag=True, help="Only queued contacts.")
@click.option("--limit", default=1000, show_default=True, type=click.IntRange(1, 1_000_000))
@click.option("--json", "as_json", is_flag=True)
@run_async
async def contacts_list(
    source_key: str | None,
    operator_id: int | None,
    status: str | None,
    unassigned: bool,
    limit: int,
    as_json: bool,
) -> None:
    """Contacts, oldest first."""
    async with await _pool(_settings()) as pool:
        rows = await admin.list_contacts(pool, source_key, operator_id, status, unassigned, limit)
    _print_rows(
        rows, ["id", "lead_external_id", "source", "operator_id", "status", "created_at"], as_json
    )


@contacts.command("close")
@click.argument("contact_id", type=BIGINT)
@run_async
async def contacts_close(contact_id: int) -> None:
    """Close a contact; its operator's freed capacity goes to the backlog at once."""
    async with await _pool(_settings()) as pool:
        outcome = await admin.close_contact(pool, contact_id)
    if contact_id in outcome.already_closed:
        _say(f"contact {contact_id} was already closed")
    else:
        _say(f"contact {contact_id} closed; {outcome.late_assignments} queued contact(s) assigned")


@contacts.command("explain")
@click.argument("contact_id", type=BIGINT)
@click.option("--json", "as_json", is_flag=True)
@run_async
async def contacts_explain(contact_id: int, as_json: bool) -> None:
    """The contact's story, decision by decision: who routing could choose, with their
    load, limit, weight and the strategy's numbers, who was skipped and why, and what came
    of it."""
    async with await _pool(_settings()) as pool, pool.acquire() as conn:
        story = await history.explain(conn, contact_id)
    if as_json:
        click.echo(json.dumps(story))
        return
    _say(f"contact {contact_id} ({story['source']}, {story['status']})")
    if not story["decisions"]:
        _say("no decision recorded (history off, or pruned)")
    console = _console()
    for d in story["decisions"]:
        _say("")
        _say(f"{d['at']}  {d['kind']}  {_decision_summary(d)}")
        if d.get("candidates"):
            columns = list(d["candidates"][0])
            table = Table(*columns, title=f"candidates ({d['strategy']}, {d['read']} read)")
            for c in d["candidates"]:
                table.add_row(*(cell(_cell(c.get(k))) for k in columns))
            console.print(table)
        if d.get("skipped"):
            _say("skipped: " + ", ".join(f"{s['operator_id']} ({s['why']})" for s in d["skipped"]))


_RESULTS = {
    "chosen": "chosen by the strategy",
    "affinity": "by affinity (had the lead lately)",
    "nobody": "nobody could take it: queued",
    "passed_over": "only operators it skips could take it: waits for someone else",
    "behind": "an earlier contact of the source found nobody: queued behind it",
    "no_operator": "nobody available for the source: queued",
    "behind_backlog": "older contacts of the source wait: queued behind them",
}


def _decision_summary(d: dict[str, Any]) -> str:
    """One line: who, through which source, why."""
    parts = []
    if d.get("operator_id") is not None:
        parts.append(f"operator {d['operator_id']}")
    parts.append(f"source {d['source']}")
    if d.get("routed_by") not in (None, d["source"]):
        parts.append(f"routed by {d['routed_by']}")
    for name in ("attempt", "reason", "answer", "overflow_to", "requeued_from"):
        if d.get(name) is not None:
            parts.append(f"{name.replace('_', ' ')} {d[name]}")
    if d.get("result"):
        parts.append(_RESULTS.get(d["result"], d["result"]))
    return ", ".join(parts)


@contacts.command("accept")
@click.argument("contact_id", type=BIGINT)
@click.option("--operator", "operator_id", type=BIGINT, required=True)
@run_async
async def contacts_accept(contact_id: int, operator_id: int) -> None:
    """Accept the offer of a contact for its operator, as their app would."""
    async with await _pool(_settings()) as pool:
        outcome = await admin.answer_offer(pool, contact_id, operator_id, accept=True)
    _answered(outcome, contact_id, operator_id, "accepted")


@contacts.command("decline")
@click.argument("contact_id", type=BIGINT)
@click.option("--operator", "operator_id", type=BIGINT, required=True)
@click.option("--reason", help="Why, in a few words (at most 256 characters).")
@run_async
async def contacts_decline(contact_id: int, operator_id: int, reason: str | None) -> None:
    """Decline the offer of a contact for its operator: it is offered to the next one."""
    async with await _pool(_settings()) as pool:
        outcome = await admin.answer_offer(pool, contact_id, operator_id, False, reason)
    _answered(outcome, contact_id, operator_id, "declined")


def _answered(outcome: Any, contact_id: int, operator_id: int, done: str) -> None:
    """What an answer did, in one line; a rejected one is an error (exit 1), though its
    `contact.answer_rejected` event was written as for a message."""
    answered = outcome.answered
    if answered.rejected:
        [reason] = answered.rejected
        why = {
            "expired": "its offer to them expired",
            "not_offered": "it is not offered to them",
            "closed": "it is closed",
        }[reason]
        raise UserError(f"contact {contact_id} not {done} by operator {operator_id}: {why}")
    if answered.repeated:
        _say(f"contact {contact_id} was already {done} by operator {operator_id}")
    elif done == "accepted":
        _say(f"contact {contact_id} accepted: assigned to operator {operator_id}")
    else:
        now = outcome.assigned.get(contact_id)
        then = f"offered to operator {now}" if now else "queued"
        _say(f"contact {contact_id} declined by operator {operator_id}; {then}")


# --- leads -------------------------------------------------------------------------


@cli.group()
def leads() -> None:
    """End customers and their contacts across sources."""


@leads.command("list")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 1_000_000))
@click.option("--json", "as_json", is_flag=True)
@run_async
async def leads_list(limit: int, as_json: bool) -> None:
    """Leads, newest first."""
    async with await _pool(_settings()) as pool:
        rows = await admin.list_leads(pool, limit)
    _print_rows(
        rows, ["id", "external_id", "name", "contacts", "open_contacts", "updated_at"], as_json
    )


@leads.command("show")
@click.argument("external_id")
@click.option("--json", "as_json", is_flag=True)
@run_async
async def leads_show(external_id: str, as_json: bool) -> None:
    """A lead with every contact it made, who handled each, and when."""
    async with await _pool(_settings()) as pool:
        lead = await admin.show_lead(pool, external_id)
    if as_json:
        click.echo(json.dumps(lead, default=_json_default))
        return
    contacts = lead.pop("contacts")
    _print_one(lead, as_json=False)
    _print_rows(
        contacts,
        ["id", "source", "operator_id", "operator_name", "status", "created_at", "closed_at"],
        as_json=False,
    )


# --- publish -----------------------------------------------------------------------


@cli.command()
@click.option("--source", "source_key", required=True, help="Source key, e.g. telegram-bot.")
@click.option("--external-id", required=True, help="The lead's id in the bot's world.")
@click.option("--name")
@click.option("--email")
@click.option("--phone")
@click.option("--message", default="")
@click.option("--message-id", help="Idempotency key (default: a new uuid).")
@click.option(
    "--priority", type=click.IntRange(0, 9), default=0, help="0-9, higher first (default 0)."
)
@run_async
async def publish(
    source_key: str,
    external_id: str,
    name: str | None,
    email: str | None,
    phone: str | None,
    message: str,
    message_id: str | None,
    priority: int,
) -> None:
    """Publish one lead.contact message, as a bot would (to try the contract)."""
    import uuid

    from pydantic import ValidationError

    from schemas.inbound import Lead, LeadContact
    from worker.decode import describe
    from worker.publisher import publish_lead

    try:
        body = LeadContact(
            source=source_key,
            lead=Lead(external_id=external_id, name=name, email=email, phone=phone),
            message=message,
            priority=priority,
        )
    except ValidationError as exc:
        raise click.UsageError(f"invalid message: {describe(exc)}") from None
    from aio_pika.exceptions import PublishError

    message_id = message_id or str(uuid.uuid4())
    if len(message_id.encode()) > 255 or "\x00" in message_id:
        # An AMQP short string, which the worker would also refuse with a NUL in it.
        raise click.BadParameter(
            "at most 255 bytes, without NUL characters", param_hint="'--message-id'"
        )
    try:
        await publish_lead(_settings(), body, message_id)
    except PublishError:
        raise UserError(
            "the broker returned the message: no queue is bound to the inbound exchange; "
            "start `leadrouter worker` once to declare it"
        ) from None
    _say(f"published lead.contact {message_id}")


# --- stats -------------------------------------------------------------------------


@cli.command()
@click.option("--source", "source_key", help="Only this source.")
@click.option(
    "--since",
    help="Only contacts assigned in this window, e.g. 24h, 7d.",
    callback=_usage(parse_duration),
)
@click.option("--json", "as_json", is_flag=True)
@run_async
async def stats(source_key: str | None, since: str | None, as_json: bool) -> None:
    """Who got what per source: observed share next to the configured weight."""
    from dataclasses import asdict

    from worker.stats import collect, render

    window = parse_duration(since) if since else None
    async with await _pool(_settings()) as pool:
        result = await collect(pool, source_key, window)
    if as_json:
        click.echo(json.dumps([_offers_only_if_used(asdict(s)) for s in result]))
    else:
        render(result, _console(), since)


# --- simulate ----------------------------------------------------------------------


@cli.command()
@click.argument("file", type=_FilePath(dir_okay=False, path_type=Path))
@click.option(
    "--since",
    help="The last this long, e.g. 24h, 7d (the default: 7d).",
    callback=_usage(parse_duration),
)
@click.option("--from", "start", help="Period start, ISO 8601 (UTC unless it says).")
@click.option("--to", "end", help="Period end, ISO 8601 (default: now).")
@click.option("--seed", default=0, show_default=True, help="Seeds weighted_random's choices.")
@click.option("--json", "as_json", is_flag=True)
@run_async
async def simulate(
    file: Path, since: str | None, start: str | None, end: str | None, seed: int, as_json: bool
) -> None:
    """Replay a period's recorded contacts through a routing file's routing, in memory,
    and print the result next to what really happened. Reads only; writes nothing."""
    from worker import routing_file
    from worker import simulate as simulation

    when = simulation.period(parse_duration(since) if since else None, start, end)
    desired = routing_file.load(file)
    async with await _pool(_settings()) as pool:
        outcome = await simulation.run(pool, desired, when, seed)
    if as_json:
        click.echo(json.dumps(outcome.as_dict()))
    else:
        simulation.render(outcome, _console())


def _offers_only_if_used(source: dict[str, Any]) -> dict[str, Any]:
    """A source that never made offers shows no offer fields, as before offers existed."""
    if not source["accept_timeout"] and all(o["offers"] is None for o in source["operators"]):
        del source["accept_timeout"]
        for o in source["operators"]:
            del o["offers"]
    return source


def _console(width: int = 120) -> Console:
    # Cells are Text (never markup); a plain string printed by mistake is not read either.
    return Console(
        width=None if Console().is_terminal else width, markup=False, emoji=False, highlight=False
    )


# --- dlq ---------------------------------------------------------------------------

REASONS = click.Choice([str(r) for r in Reason])
SCAN_INCOMPLETE = 3  # exit code: the dlq command did not look at every dead letter
DLQ_BUSY = 4  # exit code: another dlq command is reading the queue; nothing was done
scan_limit = click.option(
    "--scan-limit",
    default=10_000,  # worker.dlq.MAX_HELD (not imported here: the CLI starts lean)
    show_default=True,
    type=click.IntRange(1, 1_000_000),
    help="Most dead letters looked at and left in place at once; past them it stops, "
    "says so and exits 3.",
)


@cli.group()
def dlq() -> None:
    """The dead-letter queue: inspect, replay, purge."""


def _entry_row(entry: Any) -> dict[str, Any]:
    return {
        "id": entry.id,
        "reason": entry.reason,
        "error": entry.error,
        "routing_key": entry.routing_key,
        "source": entry.source,
        "message_id": entry.message_id,
        "age_seconds": None if entry.age_seconds is None else round(entry.age_seconds, 1),
    }


@dlq.command("list")
@click.option("--reason", type=REASONS)
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--json", "as_json", is_flag=True)
@scan_limit
@run_async
async def dlq_list(reason: str | None, limit: int, as_json: bool, scan_limit: int) -> int:
    """Dead letters, oldest first (looking changes nothing)."""
    from worker import dlq as dead

    settings = _settings()
    incomplete = None
    try:
        entries = await dead.list_entries(settings, reason, limit, max_held=scan_limit)
    except dead.ScanIncomplete as exc:
        entries, incomplete = exc.result, exc
    except dead.Busy as exc:
        return _fail(str(exc), DLQ_BUSY)
    rows = [_entry_row(e) for e in entries]
    _print_rows(rows, ["id", "reason", "routing_key", "source", "age_seconds", "error"], as_json)
    if not as_json:
        _say(f"{len(rows)} shown of {await dead.count(settings)} in {settings.dead_queue}")
    return _fail(str(incomplete), SCAN_INCOMPLETE) if incomplete else 0


@dlq.command("show")
@click.argument("entry_id")
@click.option("--json", "as_json", is_flag=True)
@scan_limit
@run_async
async def dlq_show(entry_id: str, as_json: bool, scan_limit: int) -> int:
    """One dead letter in full: headers, properties, body."""
    from worker import dlq as dead

    try:
        entry = await dead.show(_settings(), entry_id, max_held=scan_limit)
    except dead.ScanIncomplete as exc:
        return _fail(f"no dead letter with id {entry_id!r} found; {exc}", SCAN_INCOMPLETE)
    except dead.Busy as exc:
        return _fail(str(exc), DLQ_BUSY)
    if entry is None:
        raise UserError(f"no dead letter with id {entry_id!r}")
    full = {
        **_entry_row(entry),
        "headers": dict(entry.headers),
        "properties": dict(entry.properties),
        "undecodable_properties": list(entry.undecodable),
        "body_size": entry.body_size,
        "body": entry.text,
    }
    if as_json:
        click.echo(json.dumps(full, default=str))
    else:
        for key, value in full.items():
            _say(f"{key}: {value}")
    return 0


@dlq.command("replay")
@click.option("--all", "everything", is_flag=True, help="Every dead letter.")
@click.option("--reason", type=REASONS, help="Those dead-lettered for this reason.")
@click.option("--id", "ids", multiple=True, help="These entries (ids from `dlq list`).")
@scan_limit
@run_async
async def dlq_replay(
    everything: bool, reason: str | None, ids: tuple[str, ...], scan_limit: int
) -> int:
    """Put dead letters back on the inbound exchange, with their original message id and
    routing key; each leaves the dead-letter queue only once the broker confirmed it."""
    from aio_pika.exceptions import PublishError

    from worker import dlq as dead

    if sum((everything, reason is not None, bool(ids))) != 1:
        raise click.UsageError("say which: --all, --reason R or --id ID (one of them)")
    settings = _settings()
    incomplete = None
    try:
        replayed = await dead.replay(
            settings, all=everything, reason=reason, ids=ids, max_held=scan_limit
        )
    except dead.ScanIncomplete as exc:
        replayed, incomplete = exc.result, exc
    except dead.Busy as exc:
        return _fail(str(exc), DLQ_BUSY)
    except PublishError:
        raise UserError(
            f"the inbound exchange {settings.inbound_exchange!r} routes nowhere; start "
            "`leadrouter worker` once to declare its queue (nothing was removed)"
        ) from None
    _say(f"replayed {replayed}")
    return _fail(str(incomplete), SCAN_INCOMPLETE) if incomplete else 0


@dlq.command("purge")
@click.option("--reason", type=REASONS, help="Only those dead-lettered for this reason.")
@click.option("--yes", is_flag=True, help="Do not ask.")
@scan_limit
@run_async
async def dlq_purge(reason: str | None, yes: bool, scan_limit: int) -> int:
    """Delete dead letters for good."""
    from worker import dlq as dead

    settings = _settings()
    if not yes:
        what = f"dead letters with reason {reason}" if reason else "ALL dead letters"
        total = await dead.count(settings)
        click.confirm(f"Delete {what} ({total} in the queue)?", abort=True, err=True)
    incomplete = None
    try:
        purged = await dead.purge(settings, reason, max_held=scan_limit)
    except dead.ScanIncomplete as exc:
        purged, incomplete = exc.result, exc
    except dead.Busy as exc:
        return _fail(str(exc), DLQ_BUSY)
    _say(f"purged {purged}")
    return _fail(str(incomplete), SCAN_INCOMPLETE) if incomplete else 0


# --- bench -------------------------------------------------------------------------


@cli.command()
@click.option("--messages", default=20_000, show_default=True, type=click.IntRange(1, 10_000_000))
@click.option("--sources", default=50, show_default=True, type=click.IntRange(1, 10_000))
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=click.IntRange(0, 64),
    help="Worker processes, as deployed (0: a worker inside the bench's own process).",
)
@click.option(
    "--operators",
    default=40,
    show_default=True,
    type=click.IntRange(1, 100_000),
    help="Operators in the team.",
)
@click.option(
    "--weights-per-source",
    default=4,
    show_default=True,
    type=click.IntRange(1, 100_000),
    help="Operators weighted on each source, chosen at random (at most --operators).",
)
@click.option(
    "--strategy",
    default=DEFAULT_STRATEGY,
    show_default=True,
    type=click.Choice(list(STRATEGIES)),
    help="Every source's strategy.",
)
@click.option("--rate", type=click.FloatRange(min=1), help="Paced mode: messages per second.")
@click.option(
    "--reference",
    is_flag=True,
    help="First run the minimal hand-written pipeline on the same load, and compare.",
)
@click.option(
    "--schedules",
    is_flag=True,
    help="Measure twice: as is, then with every operator given a shift and leave; compare.",
)
@click.option(
    "--offers",
    is_flag=True,
    help="Run the load with offers off, then on (a simulated app accepts every offer), "
    "and compare.",
)
@click.option(
    "--history",
    is_flag=True,
    help="Measure twice: contacts' history off, then on; compare.",
)
@click.option(
    "--rounds",
    default=1,
    show_default=True,
    type=click.IntRange(1, 20),
    help="Repeat the comparison, every other round in the opposite order; ratios are "
    "the rounds' geometric mean.",
)
@click.option("--json", "as_json", is_flag=True)
@run_async
async def bench(
    messages: int,
    sources: int,
    workers: int,
    operators: int,
    weights_per_source: int,
    strategy: str,
    rate: float | None,
    reference: bool,
    schedules: bool,
    offers: bool,
    history: bool,
    rounds: int,
    as_json: bool,
) -> None:
    """Measure end-to-end throughput (or paced latency) in a throwaway database."""
    from dataclasses import asdict

    from worker.tools.bench import render, run_bench

    console = _console()
    result = await run_bench(
        _settings(),
        messages,
        sources,
        workers,
        rate,
        console,
        reference,
        operators=operators,
        weights_per_source=weights_per_source,
        strategy=strategy,
        schedules=schedules,
        offers=offers,
        history=history,
        rounds=rounds,
    )
    if as_json:
        click.echo(json.dumps(asdict(result)))
    else:
        render(result, console)


# --- apply -------------------------------------------------------------------------


@cli.command()
@click.argument("file", type=_FilePath(dir_okay=False, path_type=Path))
@click.option("--dry-run", is_flag=True, help="Print what would change; change nothing.")
@click.option("--json", "as_json", is_flag=True)
@run_async
async def apply(file: Path, dry_run: bool, as_json: bool) -> None:
    """Make operators, sources and weights what a routing file (TOML or YAML) says."""
    from dataclasses import asdict

    from worker import routing_file

    routing = routing_file.load(file)
    async with await _pool(_settings()) as pool:
        changes = await routing_file.apply(pool, routing, dry_run)
        # Operator names the file uses are unique in the database (apply checked).
        loads = {r["name"]: r for r in await admin.list_operators(pool)}
    updated = {c.name for c in changes if c.entity == "operator" and c.kind == "update"}
    warnings: dict[str, str] = {}
    for op in routing.operators:
        if op.name in updated and (
            warning := admin.max_load_warning({**loads[op.name], "max_load": op.max_load})
        ):
            warnings[op.name] = ("if applied, " if dry_run else "") + warning
    if as_json:
        click.echo(
            json.dumps(
                [
                    {
                        **asdict(c),
                        "warning": warnings.get(c.name) if c.entity == "operator" else None,
                    }
                    for c in changes
                ]
            )
        )
    else:
        for change in changes:
            if change.kind != "unchanged":
                _say(("would " if dry_run else "") + str(change))
        changed = sum(c.kind != "unchanged" for c in changes)
        verb = "would change" if dry_run else "changed"
        _say(f"{file}: {verb} {changed}, {len(changes) - changed} already as written")
    for warning in warnings.values():
        _warn(warning)


# --- contract ----------------------------------------------------------------------


@cli.command()
@click.option(
    "--directory",
    type=_FilePath(file_okay=False, path_type=Path),
    help="Where to write (default: the schemas/ folder of this checkout).",
)
@click.option("--check", is_flag=True, help="Only report stale files; exit 1 if any.")
def contract(directory: Path | None, check: bool) -> None:
    """Generate the JSON Schemas and the AsyncAPI document from the pydantic models."""
    from worker.tools import contract as generator

    directory = directory or generator.DEFAULT_DIRECTORY
    if check:
        stale = generator.stale(directory)
        if stale:
            raise UserError(f"stale in {directory}: {', '.join(stale)}; run `leadrouter contract`")
        _say(f"{directory}: up to date")
        return
    written = generator.write(directory)
    _say(f"{directory}: wrote {len(written)} file(s)")
    for path in written:
        _say(f"  {path.name}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: runs the CLI and turns every expected failure into one line."""
    args = list(sys.argv[1:] if argv is None else argv)
    for arg in args:
        if not _is_utf8(arg):  # a byte the shell passed on as it was, e.g. $'\xff'
            return _fail(f"an argument is not valid UTF-8: {arg!r}", 2)
    try:
        result = cli.main(args=args, prog_name="leadrouter", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.exceptions.NoArgsIsHelpError as exc:  # `leadrouter` alone: show the help
        click.echo(exc.ctx.get_help() if exc.ctx else "", err=True)
        return 2
    except click.Abort:
        return _fail("aborted", 1, prefix="")
    except click.ClickException as exc:
        return _fail(exc.format_message(), exc.exit_code)
    except UserError as exc:
        return _fail(str(exc), 1)
    except pydantic.ValidationError as exc:
        if exc.title != "Settings":  # not a LEADROUTER_* variable: a bug, show it whole
            raise
        problems = "; ".join(
            f"LEADROUTER_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors()
        )
        return _fail(f"invalid setting: {problems}", 2)
    except CONNECTION_ERRORS as exc:
        if isinstance(exc, OSError) and exc.filename is not None:  # a file, not a service
            return _fail(f"{exc.strerror}: {exc.filename}", 1)
        if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
            return _fail(f"the metrics port is taken ({exc}); set LEADROUTER_METRICS_PORT", 2)
        settings = Settings()
        return _fail(
            f"cannot reach a service ({type(exc).__name__}: {exc}); "
            f"database {mask_url(settings.database_url)}, broker {mask_url(settings.amqp_url)}",
            2,
        )
    except asyncpg.UndefinedTableError:
        return _fail("the database has no schema yet; run `leadrouter migrate`", 2)
    except aiormq.exceptions.ChannelNotFoundEntity as exc:
        return _fail(f"{exc}; start `leadrouter worker` once to declare the topology", 2)
    except asyncpg.InvalidCatalogNameError as exc:
        return _fail(f"{exc}; run `leadrouter migrate` to create it", 2)
    except asyncpg.ClientConfigurationError as exc:
        return _fail(f"invalid setting: LEADROUTER_DATABASE_URL: {exc}", 2)
    except aiormq.exceptions.InvalidFrameError as exc:
        if "Connection.OpenOk" not in str(exc):
            raise
        # RabbitMQ closes the connection instead of opening it; aiormq does not say why.
        return _fail(
            "the broker would not open a connection: does the virtual host exist, and may "
            f"the user use it? broker {mask_url(Settings().amqp_url)}",
            2,
        )
    except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        # Anything else the database refused (a deadlock with another admin, a value it
        # cannot store): one line; running the command again is safe.
        return _fail(f"the database refused: {type(exc).__name__}: {exc}", 1)
    return result if isinstance(result, int) else 0


def _fail(message: str, code: int, prefix: str = "error: ") -> int:
    """One line on stderr, whatever the message echoes back (control characters of a
    user's argument are shown escaped, not obeyed)."""
    click.echo(prefix + shown(message), err=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
