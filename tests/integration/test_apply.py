"""`leadrouter apply`: a routing file applied to a real database, all or nothing."""

import asyncio
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from worker import admin, distribution
from worker.errors import UserError
from worker.routing_file import RoutingFile, apply, load, parse

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
# The TOML flavour ships in the package: the demo applies it.
SAMPLE_TOML = Path(__file__).resolve().parents[2] / "worker" / "tools" / "demo_routing.toml"


def example() -> RoutingFile:
    return load(SAMPLE_TOML)


async def snapshot(pool: asyncpg.Pool) -> dict[str, list[tuple[Any, ...]]]:
    """Every row apply may touch, smooth state included."""
    queries = {
        "operators": "SELECT id, name, is_active, max_load, open_load FROM operators ORDER BY id",
        "sources": "SELECT id, key, name, description, strategy, affinity_hours"
        " FROM sources ORDER BY id",
        "weights": "SELECT source_id, operator_id, weight, available, smooth_start"
        " FROM source_weights ORDER BY source_id, operator_id",
        "contacts": "SELECT id, operator_id, status FROM contacts ORDER BY id",
        "outbox": "SELECT id, contact_id, routing_key FROM outbox ORDER BY id",
    }
    return {name: [tuple(r) for r in await pool.fetch(sql)] for name, sql in queries.items()}


async def weights(pool: asyncpg.Pool, key: str) -> dict[str, int]:
    return {r["operator_name"]: r["weight"] for r in await admin.show_weights(pool, key)}


async def queue_contact(pool: asyncpg.Pool, source_key: str, n: int) -> int:
    """An open contact nobody could take, as the worker stores it."""
    source_id = await pool.fetchval("SELECT id FROM sources WHERE key = $1", source_key)
    lead_id = await pool.fetchval(
        "INSERT INTO leads (external_id) VALUES ($1) RETURNING id", f"q:{n}"
    )
    contact_id: int = await pool.fetchval(
        "INSERT INTO contacts (lead_id, source_id, inbound_message_id)"
        " VALUES ($1, $2, $3) RETURNING id",
        lead_id,
        source_id,
        f"q-{n}",
    )
    return contact_id


async def test_apply_creates_everything(pool: asyncpg.Pool) -> None:
    changes = await apply(pool, example(), dry_run=False)
    assert {c.kind for c in changes} == {"create"}
    assert len(changes) == 4 + 3 + 3
    rows = await admin.list_operators(pool)
    assert [(o["name"], o["max_load"], o["is_active"]) for o in rows] == [
        ("Alice", 1000, True),
        ("Bob", 1000, True),
        ("Carol", 1000, True),
        ("Dan", 10, True),
    ]
    sources = [(s["key"], s["name"], s["strategy"]) for s in await admin.list_sources(pool)]
    assert sources == [
        ("telegram-bot", "Telegram bot", "smooth"),
        ("web-form", "Web form", "least_loaded"),
        ("partner-api", "Partner API", "weighted_random"),
    ]
    assert await weights(pool, "telegram-bot") == {"Alice": 1, "Bob": 3, "Carol": 6}
    assert await weights(pool, "web-form") == {"Alice": 1, "Bob": 1, "Carol": 1}
    assert await weights(pool, "partner-api") == {"Dan": 1}


async def test_applying_twice_changes_nothing(pool: asyncpg.Pool) -> None:
    first = await apply(pool, example(), dry_run=False)
    # Routing state that a re-apply must keep: smooth lags are reset only by new weights.
    await pool.execute("UPDATE source_weights SET smooth_start = 0.5")
    before = await snapshot(pool)
    second = await apply(pool, load(EXAMPLES / "routing.yaml"), dry_run=False)
    assert [c.what for c in second] == [c.what for c in first]
    assert {c.kind for c in second} == {"unchanged"}
    assert await snapshot(pool) == before


async def test_dry_run_changes_nothing(pool: asyncpg.Pool) -> None:
    empty = await snapshot(pool)
    planned = await apply(pool, example(), dry_run=True)
    assert {c.kind for c in planned} == {"create"}
    assert await snapshot(pool) == empty

    assert await apply(pool, example(), dry_run=False) == planned
    applied = await snapshot(pool)
    changed = parse(
        '[[operators]]\nname = "Dan"\nmax_load = 20\n'
        '[[sources]]\nkey = "partner-api"\nweights = { Dan = 1, Alice = 2 }\n',
        "toml",
    )
    assert [str(c) for c in await apply(pool, changed, dry_run=True)] == [
        "update operator Dan: max_load 10 → 20",
        "update source partner-api: name 'Partner API' → 'partner-api', "
        "description 'Leads pushed by partners' → '', strategy 'weighted_random' → 'smooth'",
        "update weights partner-api: Alice - → 2",
    ]
    assert await snapshot(pool) == applied


async def test_an_invalid_file_changes_nothing(pool: asyncpg.Pool) -> None:
    text = (SAMPLE_TOML).read_text(encoding="utf-8")
    broken = parse(text + '\n[[sources]]\nkey = "last"\nweights = { Zed = 1 }\n', "toml")
    with pytest.raises(UserError) as raised:
        await apply(pool, broken, dry_run=False)
    assert str(raised.value) == (
        "sources[3].weights.Zed: no operator named 'Zed' in the file or the database"
    )
    assert await admin.list_operators(pool) == []
    assert await admin.list_sources(pool) == []


async def test_a_failure_while_applying_rolls_everything_back(
    pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    await apply(pool, parse('[[operators]]\nname = "Alice"\nmax_load = 1\n', "toml"), False)
    before = await snapshot(pool)

    async def broken_drain(conn: asyncpg.Connection, source_ids: set[int]) -> int:
        raise RuntimeError("the last step fails")

    monkeypatch.setattr(distribution, "drain_sources", broken_drain)
    with pytest.raises(RuntimeError, match="the last step fails"):
        await apply(pool, example(), dry_run=False)
    assert await snapshot(pool) == before


async def test_operator_names_are_unique_so_apply_always_resolves_them(
    pool: asyncpg.Pool,
) -> None:
    """Once, two operators could share a name, and apply then refused to run; the
    database now refuses the second one, so a name in a file always means one operator."""
    bob = await admin.add_operator(pool, "Bob", 1, True)
    with pytest.raises(UserError, match="an operator named 'Bob' already exists"):
        await admin.add_operator(pool, "Bob", 2, True)
    other = await admin.add_operator(pool, "Robert", 2, True)
    with pytest.raises(UserError, match="an operator named 'Bob' already exists"):
        await admin.update_operator(pool, other["id"], name="Bob")
    await apply(pool, example(), dry_run=False)
    named_bob = await pool.fetch("SELECT id FROM operators WHERE name = 'Bob'")
    assert [r["id"] for r in named_bob] == [bob["id"]]


async def test_new_weights_drain_the_backlog(pool: asyncpg.Pool) -> None:
    # partner-api exists with nobody to take its contacts: they wait queued.
    await apply(pool, parse('[[sources]]\nkey = "partner-api"\n', "toml"), dry_run=False)
    queued = [await queue_contact(pool, "partner-api", n) for n in range(12)]

    await apply(pool, example(), dry_run=False)

    rows = await pool.fetch(
        "SELECT c.id, o.name FROM contacts c LEFT JOIN operators o ON o.id = c.operator_id"
        " ORDER BY c.id"
    )
    # Dan's max_load is 10: the oldest ten go to him, the rest keep waiting.
    assert [(r["id"], r["name"]) for r in rows] == [
        *((contact_id, "Dan") for contact_id in queued[:10]),
        *((contact_id, None) for contact_id in queued[10:]),
    ]
    assert await pool.fetchval("SELECT open_load FROM operators WHERE name = 'Dan'") == 10
    events = await pool.fetch(
        "SELECT contact_id FROM outbox WHERE routing_key = 'contact.assigned'"
        " AND published_at IS NULL ORDER BY contact_id"
    )
    assert [e["contact_id"] for e in events] == queued[:10]


async def test_more_capacity_drains_sources_the_file_does_not_name(pool: asyncpg.Pool) -> None:
    dan = await admin.add_operator(pool, "Dan", 0, True)
    await admin.add_source(pool, "other", None, "", "smooth")
    await admin.set_weights(pool, "other", {dan["id"]: 1})
    contact_id = await queue_contact(pool, "other", 1)

    changes = await apply(pool, parse('[[operators]]\nname = "Dan"\nmax_load = 1\n', "toml"), False)

    assert [str(c) for c in changes] == ["update operator Dan: max_load 0 → 1"]
    assert (
        await pool.fetchval("SELECT operator_id FROM contacts WHERE id = $1", contact_id)
        == (dan["id"])
    )
    assert await pool.fetchval("SELECT count(*) FROM outbox") == 1
    assert await weights(pool, "other") == {"Dan": 1}  # not named by the file: left alone


async def test_concurrent_applies_create_each_operator_once(pool: asyncpg.Pool) -> None:
    # Two open connections, so that neither apply waits for a connect and both read
    # the empty state unless the apply lock keeps the second one waiting.
    async with pool.acquire(), pool.acquire():
        pass
    first, second = await asyncio.gather(
        apply(pool, example(), dry_run=False), apply(pool, example(), dry_run=False)
    )
    kinds = {frozenset(c.kind for c in changes) for changes in (first, second)}
    assert kinds == {frozenset({"create"}), frozenset({"unchanged"})}
    names = [o["name"] for o in await admin.list_operators(pool)]
    assert names == ["Alice", "Bob", "Carol", "Dan"]
    assert len(await admin.list_sources(pool)) == 3
