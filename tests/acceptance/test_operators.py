"""Operators through the command: names are unique (the CLI, `apply` and `migrate` on a
database that already holds a duplicate), and `operators update --json` shows the load
after the queued contacts it just assigned."""

import shutil
from pathlib import Path

import asyncpg

from tests import services
from tests.commands import as_json, fails_cleanly, leadrouter
from tests.helpers import setup_source
from worker.migrate import packaged
from worker.settings import Settings


async def test_update_json_shows_the_load_after_draining(
    settings: Settings, pool: asyncpg.Pool
) -> None:
    [op] = await setup_source(pool, "tg", [("a", 0, 1)])
    source_id = await pool.fetchval("SELECT id FROM sources")
    for n in range(3):
        lead_id = await pool.fetchval(
            "INSERT INTO leads (external_id) VALUES ($1) RETURNING id", f"q:{n}"
        )
        await pool.execute(
            "INSERT INTO contacts (lead_id, source_id, inbound_message_id) VALUES ($1, $2, $3)",
            lead_id,
            source_id,
            f"q-{n}",
        )
    updated = as_json(settings, "operators", "update", str(op), "--max-load", "2")
    assert updated["max_load"] == 2 and updated["load"] == 2  # two of the three queued
    assert [(o["id"], o["load"]) for o in as_json(settings, "operators", "list")] == [(op, 2)]
    unchanged = as_json(settings, "operators", "update", str(op), "--name", "b")
    assert unchanged["load"] == 2 and unchanged["name"] == "b"


def test_names_are_unique(settings: Settings, tmp_path: Path) -> None:
    alice = as_json(settings, "operators", "add", "Alice")
    bob = as_json(settings, "operators", "add", "Bob")
    fails_cleanly(settings, "operators", "add", "Alice", expect="'Alice' already exists")
    fails_cleanly(
        settings, "operators", "update", str(bob["id"]), "--name", "Alice", expect="already"
    )
    # The same name again is no change; a free one is fine.
    assert as_json(settings, "operators", "update", str(alice["id"]), "--name", "Alice")
    assert as_json(settings, "operators", "update", str(bob["id"]), "--name", "Robert")

    # apply matches by name: an operator of that name is updated, never created twice.
    routing = tmp_path / "routing.toml"
    routing.write_text('[[operators]]\nname = "Alice"\nmax_load = 7\n', encoding="utf-8")
    assert "update operator Alice" in leadrouter(settings, "apply", str(routing)).stdout
    listed = as_json(settings, "operators", "list")
    assert [(o["name"], o["max_load"]) for o in listed] == [("Alice", 7), ("Robert", 10)]


async def test_migrate_refuses_existing_duplicates_until_renamed(
    settings: Settings, service_urls: tuple[str, str], tmp_path: Path
) -> None:
    """A database from before names were unique, with two operators of one name."""
    before = tmp_path / "migrations"
    before.mkdir()
    for migration in sorted(p.name for p in packaged().iterdir() if p.name.endswith(".sql")):
        if migration < "0011":
            shutil.copy(str(packaged() / migration), before / migration)
    name = services.unique("lrtest_dup")
    url = services.with_database(service_urls[0], name)
    old = settings.model_copy(update={"database_url": url, "migrations_dir": before})
    new = settings.model_copy(update={"database_url": url, "migrations_dir": None})
    try:
        leadrouter(old, "migrate")
        ids = [as_json(old, "operators", "add", n)["id"] for n in ("Alice", "Bob", "Alice")]

        result = leadrouter(new, "migrate", check=False)
        assert result.returncode == 1 and result.stdout == ""
        assert result.stderr == (
            "error: migration 0011_unique_operator_names.sql refused: operator names must be "
            f"unique, and these are not: 'Alice' (ids {ids[0]}, {ids[2]}) (rename all but one "
            "of each with `leadrouter operators update ID --name NEW`, then run `leadrouter "
            "migrate` again)\n"
        )
        # Read directly: `operators list` reads columns of later migrations.
        conn = await asyncpg.connect(url)
        try:
            names = [r["name"] for r in await conn.fetch("SELECT name FROM operators ORDER BY id")]
        finally:
            await conn.close()
        assert names == ["Alice", "Bob", "Alice"]

        leadrouter(old, "operators", "update", str(ids[2]), "--name", "Alice 2")
        assert "0011_unique_operator_names.sql" in leadrouter(new, "migrate").stdout
        fails_cleanly(new, "operators", "add", "Bob", expect="already exists")
    finally:
        await services.drop_database(service_urls[0], name)
