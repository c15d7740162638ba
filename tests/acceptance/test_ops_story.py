"""The unknown-source story, as ops live it: a bot starts publishing with a source key
nobody created → its messages dead-letter as unknown_source → ops add the source and its
weights → `dlq replay --reason unknown_source` → every lead is assigned, none twice."""

import asyncio
import functools
import json

import aio_pika
import asyncpg

from tests.commands import as_json, leadrouter
from tests.helpers import EventCollector, lead, raw_message, settled, wait_until
from worker.app import Worker
from worker.settings import Settings


async def cli(settings: Settings, *args: str, stdin: str | None = None) -> tuple[int, str, str]:
    """`leadrouter` off the event loop, which the in-process worker needs meanwhile."""
    result = await asyncio.to_thread(
        functools.partial(leadrouter, settings, *args, check=False, stdin=stdin)
    )
    return result.returncode, result.stdout, result.stderr


async def test_unknown_source_story(
    pool: asyncpg.Pool,
    settings: Settings,
    broker: aio_pika.abc.AbstractChannel,
    events: EventCollector,
    worker: Worker,
) -> None:
    exchange = await broker.get_exchange(settings.inbound_exchange)
    for n in range(30):
        await exchange.publish(raw_message(lead("new-bot", f"nb:{n}"), f"nb-{n}"), "lead.contact")
    await exchange.publish(raw_message(b"{oops", "junk-1"), "lead.contact")

    async def all_dead() -> bool:
        return sum(worker.outcomes.values()) >= 31

    await wait_until(all_dead, what="31 messages settled")
    listed = await asyncio.to_thread(as_json, settings, "dlq", "list", "--limit", "100")
    # Handled concurrently: dead letters need not keep the order they were published in.
    assert sorted(e["reason"] for e in listed) == ["invalid_json"] + ["unknown_source"] * 30
    unknown = [e for e in listed if e["reason"] == "unknown_source"]
    assert {e["source"] for e in unknown} == {"new-bot"}
    code, out, _ = await cli(settings, "dlq", "show", unknown[0]["id"])
    # The header does not repeat what the message says; the body, shown too, has it.
    assert code == 0 and "no source with the body's source key" in out
    assert '"source": "new-bot"' in out

    # Ops create the source and its routing.
    op = (
        await asyncio.to_thread(as_json, settings, "operators", "add", "Nia", "--max-load", "50")
    )["id"]
    await asyncio.to_thread(leadrouter, settings, "sources", "add", "new-bot")
    await asyncio.to_thread(leadrouter, settings, "weights", "set", "new-bot", f"{op}=1")

    code, out, err = await cli(settings, "dlq", "replay", "--reason", "unknown_source")
    assert (code, out.strip()) == (0, "replayed 30"), err
    assigned = await events.wait_for("contact.assigned", 30)
    assert sorted(e.data.inbound_message_id for e in assigned) == sorted(
        f"nb-{n}" for n in range(30)
    )
    assert await pool.fetchval("SELECT count(*) FROM contacts") == 30

    # Safe to run twice; the junk stays, in place, until ops purge it.
    code, out, _ = await cli(settings, "dlq", "replay", "--reason", "unknown_source")
    assert out.strip() == "replayed 0"
    [left] = await asyncio.to_thread(as_json, settings, "dlq", "list")
    assert left["reason"] == "invalid_json" and left["message_id"] == "junk-1"
    code, _, err = await cli(settings, "dlq", "purge", "--reason", "invalid_json", stdin="n\n")
    assert code != 0 and "Traceback" not in err
    assert len(await asyncio.to_thread(as_json, settings, "dlq", "list")) == 1
    code, out, _ = await cli(settings, "dlq", "purge", "--reason", "invalid_json", "--yes")
    assert out.strip() == "purged 1"
    assert await asyncio.to_thread(as_json, settings, "dlq", "list") == []

    # A replayed id that was already routed creates nothing new.
    await exchange.publish(raw_message(lead("new-bot", "nb:0"), "nb-0"), "lead.contact")
    await wait_until(lambda: settled(worker, 62), what="the duplicate settled")
    assert await pool.fetchval("SELECT count(*) FROM contacts") == 30
    assert json.loads(json.dumps(worker.outcomes))["ok"] == 31
