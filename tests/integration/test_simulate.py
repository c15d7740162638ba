"""`simulate` against real PostgreSQL: traffic made by the real routing transaction
(arrivals, closes, both in one transaction, backlogs drained), replayed through the
routing file that set it up, gives back exactly what happened for the deterministic
strategies; a changed file changes the shares; nothing in the database changes."""

import json
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from schemas.inbound import LeadContact
from tests.commands import fails_cleanly, leadrouter
from worker import distribution, offers, routing_file, simulate
from worker.settings import Settings

LIVE = """
[[operators]]
name = "a"
max_load = 2
[[operators]]
name = "b"
max_load = 3
[[operators]]
name = "c"
max_load = 2

[[sources]]
key = "web"
strategy = "smooth"
affinity_hours = 1
weights = { a = 1, b = 2, c = 3 }

[[sources]]
key = "tg"
strategy = "least_loaded"
weights = { a = 2, b = 1 }

[[sources]]
key = "mail"
strategy = "smooth"
queue_order = "lifo"
weights = { c = 1, b = 1 }
"""


def _file(tmp_path: Path, text: str, name: str = "routing.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


async def _drive(pool: asyncpg.Pool, sources: list[str], steps: int, seed: int) -> None:
    """Traffic through the worker's routing transaction: new contacts (a few leads come
    back, some with priority), closes of open contacts, and both in one transaction."""
    rng = random.Random(seed)
    n = 0
    for _ in range(steps):
        new = []
        for _ in range(rng.choice([0, 1, 1, 2, 3])):
            n += 1
            body = {
                "source": rng.choice(sources),
                "lead": {"external_id": f"lead:{rng.randrange(40)}"},
                "priority": rng.choice([0, 0, 0, 5]),
            }
            new.append(distribution.NewContact(f"m-{n}", LeadContact.model_validate(body)))
        open_ids = [
            r["id"] for r in await pool.fetch("SELECT id FROM contacts WHERE status = 'open'")
        ]
        closes = rng.sample(open_ids, min(len(open_ids), rng.choice([0, 0, 1, 2])))
        async with pool.acquire() as conn, conn.transaction():
            scope = await distribution.read_scope(conn, {x.body.source for x in new}, closes)
            await distribution.route(conn, scope, new, closes)


async def _setup(pool: asyncpg.Pool, text: str, tmp_path: Path) -> routing_file.RoutingFile:
    desired = routing_file.load(_file(tmp_path, text))
    await routing_file.apply(pool, desired, dry_run=False)
    return desired


def _whole() -> simulate.Period:
    now = datetime.now(UTC)
    return simulate.Period(now - timedelta(hours=1), now + timedelta(seconds=1))


async def test_the_live_routing_reproduces_what_happened(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    live = await _setup(pool, LIVE, tmp_path)
    await _drive(pool, ["web", "tg", "mail"], steps=300, seed=7)
    outcome = await simulate.run(pool, live, _whole())
    assert outcome.contacts > 300
    # Some waited: the backlog's draining is replayed too, not only arrivals.
    assert outcome.actual.queued > 20
    assert outcome.actual.waits and max(outcome.actual.waits) > 0
    assert outcome.simulated.given == outcome.actual.given
    assert outcome.simulated.as_dict() == outcome.actual.as_dict()


async def test_a_changed_routing_file_changes_the_shares(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    live = await _setup(pool, LIVE, tmp_path)
    await _drive(pool, ["web"], steps=200, seed=3)
    before = await simulate.run(pool, live, _whole())
    # Room for everyone, and web by equal weights to a and b only (no affinity).
    changed = (
        LIVE.replace("affinity_hours = 1\n", "")
        .replace("max_load = 2", "max_load = 1000")
        .replace("max_load = 3", "max_load = 1000")
    )
    changed = changed.replace("weights = { a = 1, b = 2, c = 3 }", "weights = { a = 1, b = 1 }")
    outcome = await simulate.run(pool, routing_file.parse(changed, "toml"), _whole())
    ids = {r["name"]: r["id"] for r in await pool.fetch("SELECT id, name FROM operators")}
    counts = {r["operator_id"]: r["count"] for r in outcome.as_dict()["simulated"]["assigned"]}
    assert set(counts) == {ids["a"], ids["b"]}
    assert abs(counts[ids["a"]] - counts[ids["b"]]) <= 1  # smooth: exact shares
    assert sum(counts.values()) == before.contacts  # nobody waits now
    assert outcome.simulated.queued == 0 and outcome.simulated.as_dict()["wait_seconds"]["max"] == 0
    assert before.actual.queued > 0  # it did wait for real
    assert outcome.actual.as_dict() == before.actual.as_dict()  # what happened is the same


async def test_weighted_random_is_replayed_within_its_spread(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    text = """
[[operators]]
name = "a"
max_load = 100000
[[operators]]
name = "b"
max_load = 100000
[[sources]]
key = "web"
strategy = "weighted_random"
weights = { a = 1, b = 3 }
"""
    live = await _setup(pool, text, tmp_path)
    await _drive(pool, ["web"], steps=300, seed=5)
    outcome = await simulate.run(pool, live, _whole(), seed=11)
    b = await pool.fetchval("SELECT id FROM operators WHERE name = 'b'")
    n = outcome.contacts
    for report in (outcome.actual, outcome.simulated):
        share = report.assigned[("web", b)] / n
        spread = 4 * (0.75 * 0.25 / n) ** 0.5  # four standard deviations
        assert abs(share - 0.75) < spread, share
    assert sum(outcome.simulated.assigned.values()) == n
    # Another seed, other choices: it is random, not a copy of what happened.
    other = await simulate.run(pool, live, _whole(), seed=12)
    assert other.simulated.given != outcome.simulated.given


TWO = """
[[operators]]
name = "a"
max_load = 1
[[operators]]
name = "c"
max_load = 5
[[sources]]
key = "web"
weights = { a = 1 }
[[sources]]
key = "mail"
weights = { c = 1 }
"""


async def _one(pool: asyncpg.Pool, source: str, message_id: str) -> None:
    body = LeadContact.model_validate({"source": source, "lead": {"external_id": message_id}})
    async with pool.acquire() as conn, conn.transaction():
        scope = await distribution.read_scope(conn, {source}, ())
        await distribution.route(conn, scope, [distribution.NewContact(message_id, body)])


async def test_contacts_open_at_the_start_hold_capacity_and_overflow_is_replayed(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    live = await _setup(pool, TWO, tmp_path)
    await _one(pool, "web", "old")  # a has it, open, from before the period
    await pool.execute(
        "UPDATE contacts SET created_at = created_at - interval '2 hours', "
        "assigned_at = assigned_at - interval '2 hours'"
    )
    start = datetime.now(UTC)
    await _one(pool, "web", "new")  # queued: a is full
    period = simulate.Period(start, start + timedelta(seconds=30))
    replayed = await simulate.run(pool, live, period)
    assert replayed.contacts == 1
    assert replayed.simulated.as_dict() == replayed.actual.as_dict()
    assert replayed.simulated.queued == 1 and not replayed.simulated.assigned
    # The same with web overflowing to mail after a second: c takes it then.
    what_if = TWO.replace(
        'key = "web"\n', 'key = "web"\noverflow_to = "mail"\noverflow_after = 1\n'
    )
    outcome = await simulate.run(pool, routing_file.parse(what_if, "toml"), period)
    report = outcome.simulated.as_dict()
    c = await pool.fetchval("SELECT id FROM operators WHERE name = 'c'")
    assert report["overflowed"] == 1 and report["queued"] == 1
    assert report["assigned"] == [{"source": "web", "operator_id": c, "count": 1}]
    assert report["wait_seconds"]["max"] == 1.0
    assert outcome.actual.overflowed == 0
    # A period before anything: nothing arrives.
    earlier = simulate.Period(start - timedelta(hours=5), start - timedelta(hours=4))
    assert (await simulate.run(pool, live, earlier)).contacts == 0


async def test_offers_that_lapsed_are_counted_and_simulated_as_accepted(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    text = TWO.replace('key = "web"\n', 'key = "web"\naccept_timeout = 30\n').replace(
        "weights = { a = 1 }", "weights = { a = 1, c = 1 }"
    )
    live = await _setup(pool, text, tmp_path)
    start = datetime.now(UTC)
    await _one(pool, "web", "offered")
    first = await pool.fetchval("SELECT operator_id FROM contacts")
    # It lapses: expired as the workers do, and offered to the other one.
    await pool.execute(
        "UPDATE contacts SET offer_expires_at = now() - interval '1 second'; "
        "UPDATE offers SET expires_at = now() - interval '1 second'"
    )
    web = await pool.fetchval("SELECT id FROM sources WHERE key = 'web'")
    assert await offers.expire_source(pool, web) == 1
    second = await pool.fetchval("SELECT operator_id FROM contacts")
    assert second != first
    outcome = await simulate.run(pool, live, simulate.Period(start, datetime.now(UTC)))
    assert outcome.actual.expired == 1 and outcome.simulated.expired == 0
    assert outcome.actual.given == {
        outcome.actual.waits and next(iter(outcome.actual.given)): second
    }
    # The simulation's offer is accepted at once, by the operator routing chose first.
    assert list(outcome.simulated.given.values()) == [first]
    assert outcome.simulated.waits == [0]


# Every table simulate could touch, each read whole as text.
DIGESTED = [
    f"SELECT md5(coalesce(string_agg(t::text, ',' ORDER BY t::text), '')) FROM {table} t"  # noqa: S608
    for table in (
        "operators",
        "sources",
        "source_weights",
        "leads",
        "contacts",
        "outbox",
        "offers",
        "contact_overflows",
        "available_weight_changes",
    )
]


async def test_the_command_reads_only_and_prints_json(
    pool: asyncpg.Pool, settings: Settings, tmp_path: Path
) -> None:
    await _setup(pool, LIVE, tmp_path)
    await _drive(pool, ["web", "tg"], steps=80, seed=9)
    digest = " UNION ALL ".join(DIGESTED)
    before = await pool.fetch(digest)
    path = _file(tmp_path, LIVE.replace("weights = { a = 2, b = 1 }", "weights = { a = 1 }"))
    result = leadrouter(settings, "simulate", str(path), "--since", "1h", "--json")
    data: dict[str, Any] = json.loads(result.stdout)
    assert set(data) == {"actual", "simulated"}
    for report in data.values():
        assert set(report) == {"assigned", "wait_seconds", "queued", "overflowed", "expired"}
        assert set(report["wait_seconds"]) == {"p50", "p95", "max"}
        for row in report["assigned"]:
            assert set(row) == {"source", "operator_id", "count"} and row["count"] > 0
    a = await pool.fetchval("SELECT id FROM operators WHERE name = 'a'")
    assert {r["operator_id"] for r in data["simulated"]["assigned"] if r["source"] == "tg"} == {a}
    text = leadrouter(settings, "simulate", str(path), "--since", "1h").stdout
    assert "simulated" in text and "wait p95" in text
    assert await pool.fetch(digest) == before


@pytest.mark.parametrize(
    ("args", "text", "expect"),
    [
        (["--since", "7x"], None, "invalid duration"),
        (["--from", "yesterday"], None, "not an ISO 8601 time"),
        (["--from", "2026-12-02T00:00:00", "--to", "2026-12-01T00:00:00"], None, "empty"),
        (["--since", "1d", "--from", "2026-12-01T00:00:00"], None, "not both"),
        (["--to", "2026-12-01T00:00:00"], None, "--to goes with --from"),
        ([], '[[sources]]\nkey = "nowhere"\n', "no source 'nowhere' in the database"),
        ([], '[[sources]]\nkey = "web"\nweights = { Zed = 1 }\n', "no operator named 'Zed'"),
        ([], '[[sources]]\nkey = "web"\nstrategy = "fastest"\n', "unknown strategy"),
        ([], "[[sources]\n", "invalid TOML"),
        ([], None, "cannot read"),
    ],
)
async def test_bad_input_is_one_error_line(
    pool: asyncpg.Pool,
    settings: Settings,
    tmp_path: Path,
    args: list[str],
    text: str | None,
    expect: str,
) -> None:
    await _setup(pool, LIVE, tmp_path)
    path = (
        tmp_path / "missing.toml"
        if text is None and expect == "cannot read"
        else _file(tmp_path, text if text is not None else LIVE, "what-if.toml")
    )
    fails_cleanly(settings, "simulate", str(path), *args, expect=expect)


async def test_the_bench_seeds_a_week_and_times_simulate(settings: Settings) -> None:
    from worker.tools import simulate_bench

    result = await simulate_bench.run(settings, 600, 30, repeat=1)
    assert (result.contacts, result.replayed) == (600, 600)
    assert result.actual_queued == 60  # one in ten waited for real
    assert len(result.simulate_seconds) == 1 and result.simulate_seconds[0] > 0
    name = settings.database_url.rsplit("/", 1)[1] + "_simbench"
    conn = await asyncpg.connect(settings.database_url)
    try:  # the scratch database is gone
        assert not await conn.fetchval("SELECT count(*) FROM pg_database WHERE datname = $1", name)
    finally:
        await conn.close()
