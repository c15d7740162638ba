"""Lowering an operator's max-load below their open contacts works (they keep them) and
says so: one `warning:` line on stderr, and a `warning` field with --json."""

import asyncio
import json
from pathlib import Path

import aio_pika
import asyncpg

from tests.commands import leadrouter
from tests.helpers import EventCollector, lead, raw_message, setup_source
from worker.app import Worker
from worker.settings import Settings


def warnings(stderr: str) -> list[str]:
    lines = stderr.strip().splitlines()
    assert all(line.startswith("warning: ") for line in lines), stderr
    return lines


async def three_open_contacts(
    pool: asyncpg.Pool, settings: Settings, broker: aio_pika.abc.AbstractChannel
) -> int:
    [ann] = await setup_source(pool, "tg", [("Ann", 5, 1)])
    exchange = await broker.get_exchange(settings.inbound_exchange)
    for n in range(3):
        await exchange.publish(raw_message(lead("tg", f"ml:{n}"), f"ml-{n}"), "lead.contact")
    return ann


async def test_operators_update_below_the_load_warns(
    pool: asyncpg.Pool,
    settings: Settings,
    broker: aio_pika.abc.AbstractChannel,
    events: EventCollector,
    worker: Worker,
) -> None:
    ann = await three_open_contacts(pool, settings, broker)
    await events.wait_for("contact.assigned", 3)

    def update(*args: str) -> tuple[str, str]:
        result = leadrouter(settings, "operators", "update", str(ann), *args)
        return result.stdout, result.stderr

    out, err = await asyncio.to_thread(update, "--max-load", "1")
    assert "max_load=1" in out and "load=3" in out
    assert warnings(err) == [
        f"warning: operator {ann} (Ann) keeps their 3 open contacts, over max-load 1, and "
        "gets no new contact until fewer than 1 are open"
    ]
    out, err = await asyncio.to_thread(update, "--max-load", "0", "--json")
    row = json.loads(out)
    assert (row["max_load"], row["load"]) == (0, 3)
    assert row["warning"].endswith("gets no new contact while max-load is 0")
    assert len(warnings(err)) == 1
    assert await pool.fetchval("SELECT count(*) FROM contacts WHERE status = 'open'") == 3

    # At or above the load: nothing to say.
    out, err = await asyncio.to_thread(update, "--max-load", "3", "--json")
    assert json.loads(out)["warning"] is None and err == ""
    out, err = await asyncio.to_thread(update, "--max-load", "4")
    assert err == ""


async def test_apply_below_the_load_warns(
    pool: asyncpg.Pool,
    settings: Settings,
    broker: aio_pika.abc.AbstractChannel,
    events: EventCollector,
    worker: Worker,
    tmp_path: Path,
) -> None:
    ann = await three_open_contacts(pool, settings, broker)
    await events.wait_for("contact.assigned", 3)
    file = tmp_path / "routing.toml"
    file.write_text('[[operators]]\nname = "Ann"\nmax_load = 2\n')
    expected = (
        f"operator {ann} (Ann) keeps their 3 open contacts, over max-load 2, and gets no new "
        "contact until fewer than 2 are open"
    )

    dry = await asyncio.to_thread(leadrouter, settings, "apply", str(file), "--dry-run")
    assert warnings(dry.stderr) == [f"warning: if applied, {expected}"]
    applied = await asyncio.to_thread(leadrouter, settings, "apply", str(file), "--json")
    [change] = json.loads(applied.stdout)
    assert (change["kind"], change["warning"]) == ("update", expected)
    assert warnings(applied.stderr) == [f"warning: {expected}"]
    assert await pool.fetchval("SELECT max_load FROM operators WHERE id = $1", ann) == 2
    # Applied again, nothing changes and nothing is said again.
    again = await asyncio.to_thread(leadrouter, settings, "apply", str(file))
    assert again.stderr == ""
