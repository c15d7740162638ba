"""The `leadrouter` command as a person or a script uses it, run as a subprocess."""

import re
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from tests import services
from tests.commands import as_json, fails_cleanly, leadrouter
from tests.helpers import setup_source
from worker.settings import Settings
from worker.tools.processes import worker_env


def test_admin_verbs_end_to_end(settings: Settings) -> None:
    alice = as_json(settings, "operators", "add", "Alice", "--max-load", "3")
    bob = as_json(settings, "operators", "add", "Bob", "--inactive")
    assert alice == {
        "id": alice["id"],
        "name": "Alice",
        "is_active": True,
        "max_load": 3,
        "load": 0,
    }
    assert bob["is_active"] is False and bob["max_load"] == 10
    source = as_json(
        settings,
        "sources",
        "add",
        "telegram-bot",
        "--name",
        "Telegram",
        "--description",
        "main bot",
        "--strategy",
        "weighted_random",
    )
    assert source["key"] == "telegram-bot" and source["strategy"] == "weighted_random"
    assert [s["key"] for s in as_json(settings, "sources", "list")] == ["telegram-bot"]

    out = leadrouter(
        settings, "weights", "set", "telegram-bot", f"{alice['id']}=10", f"{bob['id']}=30"
    )
    assert "2 weight(s) set" in out.stdout
    assert as_json(settings, "weights", "show", "telegram-bot") == [
        {"operator_id": alice["id"], "operator_name": "Alice", "weight": 10},
        {"operator_id": bob["id"], "operator_name": "Bob", "weight": 30},
    ]
    updated = as_json(
        settings,
        "operators",
        "update",
        str(bob["id"]),
        "--active",
        "--max-load",
        "5",
        "--name",
        "Robert",
    )
    assert updated["is_active"] is True and updated["max_load"] == 5 and updated["name"] == "Robert"
    listed = as_json(settings, "operators", "list")
    assert [(o["name"], o["load"]) for o in listed] == [("Alice", 0), ("Robert", 0)]
    assert as_json(settings, "contacts", "list", "--status", "open") == []

    table = leadrouter(settings, "operators", "list").stdout
    assert "Alice" in table and "max_load" in table

    fails_cleanly(settings, "sources", "add", "telegram-bot", expect="already exists")
    fails_cleanly(settings, "weights", "set", "telegram-bot", f"{alice['id']}=0", expect="positive")
    fails_cleanly(
        settings, "weights", "set", "telegram-bot", "424242=1", expect="no operator with id 424242"
    )
    fails_cleanly(settings, "weights", "set", "nope", f"{alice['id']}=1", expect="no source")
    fails_cleanly(settings, "operators", "add", "Carol", "--max-load", "-1", expect="max-load")
    fails_cleanly(settings, "operators", "update", "424242", "--active", expect="no operator")
    fails_cleanly(settings, "contacts", "close", "424242", expect="no contact")
    fails_cleanly(settings, "sources", "add", "Not A Slug", expect="invalid source")


async def test_contacts_list_and_close(settings: Settings, pool: asyncpg.Pool) -> None:

    [op] = await setup_source(pool, "tg", [("a", 1, 1)])
    source_id = await pool.fetchval("SELECT id FROM sources")
    for n in range(2):
        lead_id = await pool.fetchval(
            "INSERT INTO leads (external_id) VALUES ($1) RETURNING id", f"c:{n}"
        )
        await pool.execute(
            "INSERT INTO contacts (lead_id, source_id, inbound_message_id) VALUES ($1, $2, $3)",
            lead_id,
            source_id,
            f"c-{n}",
        )
    leadrouter(settings, "operators", "update", str(op), "--max-load", "1")  # drains one
    contacts = as_json(settings, "contacts", "list")
    assert [(c["lead_external_id"], c["operator_id"]) for c in contacts] == [
        ("c:0", op),
        ("c:1", None),
    ]
    assert [c["id"] for c in as_json(settings, "contacts", "list", "--unassigned")] == [
        contacts[1]["id"]
    ]
    assert as_json(settings, "contacts", "list", "--source", "other") == []

    out = leadrouter(settings, "contacts", "close", str(contacts[0]["id"])).stdout
    assert "1 queued contact(s) assigned" in out
    assert (
        "already closed" in leadrouter(settings, "contacts", "close", str(contacts[0]["id"])).stdout
    )
    after = as_json(settings, "contacts", "list", "--operator", str(op), "--status", "open")
    assert [c["id"] for c in after] == [contacts[1]["id"]]
    # The CLI publishes nothing itself: the events wait in the outbox for the worker.
    assert await pool.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL") == 3


def test_concurrent_migrate_creates_the_database_once(
    service_urls: tuple[str, str], settings: Settings
) -> None:
    pg_url, _ = service_urls
    name = services.unique("lrtest_migrate")
    fresh = settings.model_copy(update={"database_url": services.with_database(pg_url, name)})
    try:
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "worker.cli", "migrate"],
                env=worker_env(fresh),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(3)
        ]
        outputs = [p.communicate(timeout=60) for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0], outputs
        applied = sorted(int(out.split()[1]) for out, _ in outputs)
        migrations = len(list((Path(__file__).parents[2] / "migrations").glob("*.sql")))
        assert applied == [0, 0, migrations]
        assert leadrouter(fresh, "migrate").stdout.strip() == "applied 0 migration(s)"
    finally:
        import asyncio

        asyncio.run(services.drop_database(pg_url, name))


def test_unreachable_database_is_one_masked_line(settings: Settings) -> None:
    down = settings.model_copy(
        update={"database_url": "postgresql://someone:s3cret@127.0.0.1:1/nothing"}
    )
    result = leadrouter(down, "operators", "list", check=False)
    assert result.returncode == 2
    assert "s3cret" not in result.stderr and "***" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_unmigrated_database_says_what_to_do(
    service_urls: tuple[str, str], settings: Settings
) -> None:
    import asyncio

    name = services.unique("lrtest_empty")
    asyncio.run(services.create_database(service_urls[0], name))
    try:
        empty = settings.model_copy(
            update={"database_url": services.with_database(service_urls[0], name)}
        )
        result = leadrouter(empty, "operators", "list", check=False)
        assert result.returncode == 2 and "leadrouter migrate" in result.stderr
    finally:
        asyncio.run(services.drop_database(service_urls[0], name))


@pytest.mark.slow
def test_demo_runs_end_to_end(settings: Settings, service_urls: tuple[str, str]) -> None:
    import asyncio

    demo_db = settings.database_url.rsplit("/", 1)[1] + "_demo"
    try:
        result = leadrouter(settings, "demo", "--leads", "200")
        assert "200 leads routed" in result.stdout
        assert "telegram-bot (smooth)" in result.stdout and "observed" in result.stdout
        assert "partner-api (weighted_random)" in result.stdout
        assert "queued now" in result.stdout
        assert "offers on web-form: the operators' app accepted" in result.stdout
        # web-form's offers column: offered: accepted/declined/expired, rate, p50
        assert re.search(r"\d+: \d+/\d+/\d+, \d+%, \d+\.\ds", result.stdout)
    finally:  # the demo's own database, kept by the demo for people to inspect
        asyncio.run(services.drop_database(service_urls[0], demo_db))


def test_sources_update(settings: Settings) -> None:
    as_json(settings, "sources", "add", "tg")
    source = as_json(
        settings,
        "sources",
        "update",
        "tg",
        "--strategy",
        "least_loaded",
        "--affinity-hours",
        "24",
        "--name",
        "Telegram",
    )
    assert (source["strategy"], source["affinity_hours"], source["name"]) == (
        "least_loaded",
        24,
        "Telegram",
    )
    assert (
        as_json(settings, "sources", "update", "tg", "--affinity-hours", "0")["affinity_hours"]
        is None
    )
    assert as_json(settings, "sources", "list")[0]["strategy"] == "least_loaded"
    assert as_json(settings, "sources", "add", "new")["strategy"] == "smooth"  # the default
    fails_cleanly(settings, "sources", "update", "nope", "--name", "x", expect="no source")
    result = leadrouter(settings, "sources", "update", "tg", "--strategy", "fastest", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr


async def test_stats_show_observed_share_next_to_weight(
    settings: Settings, pool: asyncpg.Pool
) -> None:

    a, b = await setup_source(pool, "tg", [("a", 10, 1), ("b", 10, 3)])
    source_id = await pool.fetchval("SELECT id FROM sources")
    for n, operator in enumerate([a, b, b, b, None]):
        lead_id = await pool.fetchval(
            "INSERT INTO leads (external_id) VALUES ($1) RETURNING id", f"s:{n}"
        )
        await pool.execute(
            "INSERT INTO contacts"
            " (lead_id, source_id, operator_id, assigned_at, inbound_message_id)"
            " VALUES ($1, $2, $3, CASE WHEN $3::bigint IS NULL THEN NULL ELSE now() END, $4)",
            lead_id,
            source_id,
            operator,
            f"s-{n}",
        )
    [tg] = as_json(settings, "stats")
    assert (tg["source"], tg["assigned"], tg["queued_now"]) == ("tg", 4, 1)
    assert [
        (o["operator_id"], o["weight_share"], o["observed_share"], o["assigned"])
        for o in tg["operators"]
    ] == [(a, 0.25, 0.25, 1), (b, 0.75, 0.75, 3)]
    table = leadrouter(settings, "stats", "--since", "1h").stdout
    assert "tg" in table and "75%" in table and "|" in table
    assert as_json(settings, "stats", "--source", "tg", "--since", "1h")[0]["assigned"] == 4
    fails_cleanly(settings, "stats", "--since", "soon", expect="invalid duration")
    fails_cleanly(settings, "stats", "--source", "nope", expect="no source")


async def test_publish_then_leads_show_the_whole_story(
    settings: Settings, pool: asyncpg.Pool, worker: object, events: object
) -> None:
    """A bot developer tries the contract with `publish`; ops follow the lead."""
    from tests.helpers import EventCollector, setup_source

    assert isinstance(events, EventCollector)
    [op] = await setup_source(pool, "tg", [("Ann", 5, 1)])
    await admin_source_web(pool, op)
    out = leadrouter(
        settings,
        "publish",
        "--source",
        "tg",
        "--external-id",
        "tg:42",
        "--name",
        "Lee",
        "--email",
        "lee@example.com",
        "--message-id",
        "pub-1",
    )
    assert out.stdout.strip() == "published lead.contact pub-1"
    leadrouter(
        settings,
        "publish",
        "--source",
        "web",
        "--external-id",
        "tg:42",
        "--phone",
        "+1 555 0100",
        "--message",
        "again",
    )
    await events.wait_for("contact.assigned", 2)

    lead = as_json(settings, "leads", "show", "tg:42")
    assert (lead["name"], lead["email"], lead["phone"]) == ("Lee", "lee@example.com", "+1 555 0100")
    assert sorted((c["source"], c["operator_name"], c["status"]) for c in lead["contacts"]) == [
        ("tg", "Ann", "open"),
        ("web", "Ann", "open"),
    ]
    [listed] = as_json(settings, "leads", "list")
    assert (listed["external_id"], listed["contacts"], listed["open_contacts"]) == ("tg:42", 2, 2)
    assert "tg:42" in leadrouter(settings, "leads", "show", "tg:42").stdout

    fails_cleanly(settings, "leads", "show", "nobody", expect="no lead")
    fails_cleanly(
        settings,
        "publish",
        "--source",
        "tg",
        "--external-id",
        "x",
        "--email",
        "nope",
        expect="not an e-mail address",
    )
    fails_cleanly(
        settings, "publish", "--source", "Bad Key", "--external-id", "x", expect="invalid message"
    )


async def admin_source_web(pool: asyncpg.Pool, operator_id: int) -> None:
    from worker import admin

    await admin.add_source(pool, "web", None, "", None)
    await admin.set_weights(pool, "web", {operator_id: 1})


def test_apply_a_routing_file(settings: Settings, tmp_path: Path) -> None:
    example = str(Path(__file__).resolve().parents[2] / "examples" / "routing.yaml")
    preview = leadrouter(settings, "apply", example, "--dry-run").stdout
    assert "would create operator Alice" in preview and "would change" in preview
    assert as_json(settings, "operators", "list") == []  # a dry run changes nothing
    applied = leadrouter(settings, "apply", example).stdout
    assert "create source telegram-bot" in applied
    assert (
        leadrouter(settings, "apply", example)
        .stdout.strip()
        .endswith("changed 0, 10 already as written")
    )
    assert [o["name"] for o in as_json(settings, "operators", "list")] == [
        "Alice",
        "Bob",
        "Carol",
        "Dan",
    ]
    bad = tmp_path / "bad.toml"
    bad.write_text('[[sources]]\nkey = "x"\nweights = { Nobody = 1 }\n')
    fails_cleanly(settings, "apply", str(bad), expect="no operator named 'Nobody'")
    fails_cleanly(settings, "apply", str(tmp_path / "missing.toml"), expect="missing.toml")


def test_contract_files_are_in_sync(settings: Settings, tmp_path: Path) -> None:
    assert "up to date" in leadrouter(settings, "contract", "--check").stdout
    out = leadrouter(settings, "contract", "--directory", str(tmp_path)).stdout
    assert "wrote 6 file(s)" in out and (tmp_path / "asyncapi.yaml").exists()
    (tmp_path / "asyncapi.yaml").write_text("stale")
    fails_cleanly(
        settings, "contract", "--directory", str(tmp_path), "--check", expect="asyncapi.yaml"
    )


def test_values_the_database_cannot_take_are_one_line(settings: Settings) -> None:
    """Found by review: these reached the database and came back as tracebacks."""
    fails_cleanly(
        settings, "operators", "add", "A", "--max-load", "3000000000", expect="--max-load"
    )
    fails_cleanly(settings, "stats", "--since", "800000d", expect="100 years")
    result = subprocess.run(  # an argument that is not UTF-8 arrives with surrogates
        [
            sys.executable,
            "-m",
            "worker.cli",
            "leads",
            "show",
            b"\xff".decode("utf-8", "surrogateescape"),
        ],
        env=worker_env(settings),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0 and b"Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
