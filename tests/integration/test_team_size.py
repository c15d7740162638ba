"""Routing whose cost does not grow with the team: the available flag and the smooth
state kept by the database (migrations 0012-0015), and capacity held with a large team
shared by several sources and worker processes."""

import asyncio
import random
import shutil
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import pytest

from tests import services
from tests.helpers import (
    SMOOTH_OWED,
    EventCollector,
    assert_clean_end,
    lead,
    raw_message,
    route_new,
    setup_source,
    wait_until,
)
from tests.worker_processes import logs_of, spawn, stop_gracefully, wait_ready, worker_processes
from worker import admin, distribution
from worker.migrate import migrate
from worker.retry import is_transient
from worker.settings import Settings
from worker.strategies import Candidate, least_loaded

ROOT = Path(__file__).resolve().parents[2]
LATER = datetime(2100, 1, 1, tzinfo=UTC)  # assigned within the batch: after anything stored
OVER_CAPACITY = """
    SELECT o.id FROM operators o
    LEFT JOIN contacts c ON c.operator_id = o.id AND c.status = 'open'
    GROUP BY o.id HAVING count(c.id) > o.max_load OR count(c.id) <> o.open_load
"""
FLAG_WRONG = """
    SELECT count(*) FROM source_weights w JOIN operators o ON o.id = w.operator_id
    WHERE w.available IS DISTINCT FROM (o.is_active AND o.open_load < o.max_load)
"""
TOTAL_WRONG = """
    SELECT count(*) FROM sources s
    WHERE s.available_weight
          + coalesce((SELECT sum(delta) FROM available_weight_changes c
                      WHERE c.source_id = s.id), 0)
       <> coalesce((SELECT sum(weight) FROM source_weights w
                    WHERE w.source_id = s.id AND w.available), 0)
"""

LOAD_COPY_WRONG = """
    SELECT count(*) FROM source_weights w
    JOIN operators o ON o.id = w.operator_id
    JOIN sources s ON s.id = w.source_id
    WHERE w.least_loaded IS DISTINCT FROM (s.strategy = 'least_loaded')
       OR (w.least_loaded AND (w.open_load, w.last_assigned_at)
                              IS DISTINCT FROM (o.open_load, o.last_assigned_at))
       OR o.least_loaded_sources <> (SELECT count(*) FROM source_weights x
                                     WHERE x.operator_id = o.id AND x.least_loaded)
"""


async def _owed(pool: asyncpg.Pool) -> dict[int, float]:
    return {r["operator_id"]: r["owed"] for r in await pool.fetch(SMOOTH_OWED)}


async def test_the_available_flag_follows_load_activity_and_limits(pool: asyncpg.Pool) -> None:
    a, b = await setup_source(pool, "tg", [("a", 1, 1), ("b", 5, 1)])
    await admin.add_source(pool, "web", None, "", None)
    await admin.set_weights(pool, "web", {a: 2})
    flags = "SELECT operator_id, source_id, available FROM source_weights ORDER BY 1, 2"
    assert all(r["available"] for r in await pool.fetch(flags))
    async with pool.acquire() as conn, conn.transaction():
        await route_new(conn, "tg", "x")  # a (lower id, equal weights) fills up
    assert {(r["operator_id"], r["available"]) for r in await pool.fetch(flags)} == {
        (a, False),  # on both of a's sources
        (b, True),
    }
    await admin.update_operator(pool, b, None, None, False)  # switched off
    await admin.update_operator(pool, a, None, 2, None)  # room again
    assert {(r["operator_id"], r["available"]) for r in await pool.fetch(flags)} == {
        (a, True),
        (b, False),
    }
    assert await pool.fetchval(FLAG_WRONG) == 0
    assert await pool.fetchval(TOTAL_WRONG) == 0
    await admin.set_weights(pool, "tg", {b: 7})  # replaced: a's row removed, b's weight new
    assert await pool.fetchval(TOTAL_WRONG) == 0
    async with pool.acquire() as conn, conn.transaction():  # folded by the next routing
        await distribution.lock_sources(conn, {1, 2})
        await distribution.drain_sources(conn, {1, 2})
    assert await pool.fetchval("SELECT count(*) FROM available_weight_changes") == 0
    assert await pool.fetchval(TOTAL_WRONG) == 0
    totals = "SELECT key, available_weight FROM sources ORDER BY key"
    assert [tuple(r) for r in await pool.fetch(totals)] == [("tg", 0), ("web", 2)]


async def test_what_smooth_owes_an_operator_is_frozen_while_they_are_full(
    pool: asyncpg.Pool,
) -> None:
    """a (max_load 1) takes the first contact and fills: 0.5 ahead of their share. While
    full, b takes four more; when a's contact closes a is still 0.5 ahead, not owed for
    the contacts routed while they could take none."""
    a, b = await setup_source(pool, "tg", [("a", 1, 1), ("b", 10, 1)])
    async with pool.acquire() as conn, conn.transaction():
        outcome = await route_new(conn, "tg", "x")
    assert set(outcome.assigned.values()) == {a}
    assert await _owed(pool) == pytest.approx({a: -0.5, b: 0.5})
    async with pool.acquire() as conn, conn.transaction():
        outcome = await route_new(conn, "tg", "y1", "y2", "y3", "y4")
    assert set(outcome.assigned.values()) == {b}
    assert (await _owed(pool))[a] == pytest.approx(-0.5)
    [contact] = [c for c, op in (await _assigned(pool)).items() if op == a]
    await admin.close_contact(pool, contact)
    assert await _owed(pool) == pytest.approx({a: -0.5, b: 0.5})
    async with pool.acquire() as conn, conn.transaction():  # owed goes first
        outcome = await route_new(conn, "tg", "z")
    assert set(outcome.assigned.values()) == {b}


async def _assigned(pool: asyncpg.Pool) -> dict[int, int]:
    rows = await pool.fetch("SELECT id, operator_id FROM contacts WHERE status = 'open'")
    return {r["id"]: r["operator_id"] for r in rows if r["operator_id"] is not None}


async def test_a_choice_taken_meanwhile_is_retried_not_recorded(
    pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The operators are read without locks: if a concurrent transaction fills the one
    chosen between the read and the claim, the database refuses the claim, and the
    transaction fails as a serialization failure (retried), keeping nothing."""
    [a] = await setup_source(pool, "tg", [("a", 1, 1)])
    decide = distribution._decide

    async def decided_then_taken(*args: Any) -> Any:
        plan = await decide(*args)
        assert [x.operator_id for x in plan.assignments] == [a]
        await pool.execute("UPDATE operators SET open_load = 1 WHERE id = $1", a)  # taken
        return plan

    monkeypatch.setattr(distribution, "_decide", decided_then_taken)
    async with pool.acquire() as conn:
        with pytest.raises(distribution.CapacityTaken) as caught:
            async with conn.transaction():
                await route_new(conn, "tg", "x")
    assert is_transient(caught.value)
    assert await pool.fetchval("SELECT count(*) FROM contacts") == 0
    assert await pool.fetchval("SELECT open_load FROM operators WHERE id = $1", a) == 1


async def test_smooth_lags_are_carried_over_by_the_migration(
    service_urls: tuple[str, str], tmp_path: Path
) -> None:
    pg_url, _ = service_urls
    name = services.unique("lrtest")
    url = services.with_database(pg_url, name)
    before = tmp_path / "migrations"
    before.mkdir()
    for path in sorted((ROOT / "migrations").glob("00*.sql"))[:11]:
        shutil.copy(path, before / path.name)
    try:
        await migrate(url, before)
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(
                "INSERT INTO operators (name, max_load, open_load) VALUES ('a', 5, 0), ('b', 1, 1);"
                "INSERT INTO sources (key, name) VALUES ('tg', 'tg');"
                "INSERT INTO source_weights (source_id, operator_id, weight, smooth_lag)"
                " SELECT s.id, o.id, 2, CASE o.name WHEN 'a' THEN 0.75 ELSE -0.75 END"
                " FROM sources s, operators o"
            )
            await migrate(url, ROOT / "migrations")
            names = {r["id"]: r["name"] for r in await conn.fetch("SELECT id, name FROM operators")}
            flags = {
                r["operator_id"]: r["available"]
                for r in await conn.fetch("SELECT operator_id, available FROM source_weights")
            }
            owed = {r["operator_id"]: r["owed"] for r in await conn.fetch(SMOOTH_OWED)}
        finally:
            await conn.close()
    finally:
        await services.drop_database(pg_url, name)
    assert sorted((names[i], flags[i], owed[i]) for i in owed) == [
        ("a", True, pytest.approx(0.75)),
        ("b", False, pytest.approx(-0.75)),
    ]


@pytest.mark.slow
async def test_a_large_team_shared_by_sources_and_two_workers_never_exceeds_max_load(
    request: pytest.FixtureRequest,
    pool: asyncpg.Pool,
    settings: Settings,
    broker: aio_pika.abc.AbstractChannel,
    events: EventCollector,
    tmp_path: Path,
) -> None:
    """600 operators of capacity 1 or 2, every one weighted on each of 3 sources (one per
    strategy), two worker processes; 1,500 contacts, more than the team can hold: the
    committed state never has anyone over max_load nor a flag or load out of step, and
    what is left waits queued until closes free capacity."""
    operators = [
        (await admin.add_operator(pool, f"op{n}", 1 + n % 2, True))["id"] for n in range(600)
    ]
    capacity = sum(1 + n % 2 for n in range(600))
    for key, strategy in (("tg", "smooth"), ("web", "weighted_random"), ("api", "least_loaded")):
        await admin.add_source(pool, key, None, "", strategy)
        await admin.set_weights(pool, key, {o: 1 + o % 5 for o in operators})
    total = 1500
    exchange = await broker.get_exchange(settings.inbound_exchange)
    problems: list[object] = []

    async def watch() -> None:
        while True:
            problems.extend(dict(r) for r in await pool.fetch(OVER_CAPACITY))
            if await pool.fetchval(FLAG_WRONG):
                problems.append("available flag out of step")
            if await pool.fetchval(TOTAL_WRONG):
                problems.append("available weight out of step")
            if await pool.fetchval(LOAD_COPY_WRONG):
                problems.append("least_loaded copy of the load out of step")
            await asyncio.sleep(0.02)

    watcher = asyncio.create_task(watch())
    request.addfinalizer(watcher.cancel)
    with worker_processes(settings, tmp_path) as procs:
        for n in range(2):
            procs.append(spawn(settings, tmp_path, n))
        for n in range(2):
            await wait_ready(pool, settings, tmp_path, n)
        keys = ("tg", "web", "api")
        for start in range(0, total, 100):
            await asyncio.gather(
                *(
                    exchange.publish(
                        raw_message(lead(keys[n % 3], f"t:{n}"), f"t-{n}"), "lead.contact"
                    )
                    for n in range(start, start + 100)
                )
            )
        await wait_until(
            lambda: pool.fetchval("SELECT count(*) = $1 FROM contacts", total),
            timeout=90,
            what=f"{total} contacts",
        )
        await wait_until(
            lambda: pool.fetchval(
                "SELECT count(*) = $1 FROM contacts WHERE operator_id IS NOT NULL", capacity
            ),
            timeout=30,
            what="the team full",
        )
        # Free everyone once: the backlog (total - capacity) takes the room back.
        assigned = [
            r["id"]
            for r in await pool.fetch("SELECT id FROM contacts WHERE operator_id IS NOT NULL")
        ]
        await asyncio.gather(
            *(
                exchange.publish(raw_message({"contact_id": c}, f"close-{c}"), "contact.close")
                for c in assigned
            )
        )
        await wait_until(
            lambda: pool.fetchval(
                "SELECT count(*) = 0 FROM contacts WHERE status = 'open' AND operator_id IS NULL"
            ),
            timeout=90,
            what="the backlog assigned",
        )
        await asyncio.to_thread(stop_gracefully, procs)
    watcher.cancel()
    await assert_clean_end(settings, logs_of(tmp_path))
    assert problems == []
    assert await pool.fetchval(OVER_CAPACITY.replace("SELECT o.id", "SELECT count(*)", 1)) is None
    assert await pool.fetchval("SELECT count(DISTINCT inbound_message_id) FROM contacts") == total
    assert await pool.fetchval(FLAG_WRONG) == 0
    assert await pool.fetchval(TOTAL_WRONG) == 0


async def test_least_loaded_rows_keep_their_operators_load_through_every_change(
    pool: asyncpg.Pool,
) -> None:
    """The copy of the load on least_loaded weight rows (and the count of such rows per
    operator) follows routing, closes, a change of strategy either way, and weights
    replaced: the index least_loaded reads is never out of step with the operators."""
    a, b, c = await setup_source(
        pool, "tg", [("a", 5, 1), ("b", 5, 2), ("c", 5, 3)], "least_loaded"
    )
    await admin.add_source(pool, "web", None, "", None)
    await admin.set_weights(pool, "web", {a: 1, b: 1})
    async with pool.acquire() as conn, conn.transaction():
        await route_new(conn, "tg", "x", "y", "z")
        await route_new(conn, "web", "w")
    assert await pool.fetchval(LOAD_COPY_WRONG) == 0
    copies = "SELECT operator_id, open_load FROM source_weights WHERE least_loaded ORDER BY 1"
    # x, y, z: c (0/3), b (0/2), then a (0/1 beats b's 1/2); w (web, smooth) takes a or b.
    loads = {r["operator_id"]: r["open_load"] for r in await pool.fetch(copies)}
    assert loads[c] == 1 and loads[a] + loads[b] == 3
    contact = await pool.fetchval("SELECT min(id) FROM contacts WHERE operator_id IS NOT NULL")
    await admin.close_contact(pool, contact)
    assert await pool.fetchval(LOAD_COPY_WRONG) == 0
    await admin.update_source(pool, "web", strategy="least_loaded")
    counts = "SELECT id, least_loaded_sources FROM operators ORDER BY id"
    assert [tuple(r) for r in await pool.fetch(counts)] == [(a, 2), (b, 2), (c, 1)]
    assert await pool.fetchval(LOAD_COPY_WRONG) == 0
    await admin.update_source(pool, "tg", strategy="smooth")
    assert [tuple(r) for r in await pool.fetch(counts)] == [(a, 1), (b, 1), (c, 0)]
    await admin.set_weights(pool, "web", {c: 4})
    assert [tuple(r) for r in await pool.fetch(counts)] == [(a, 0), (b, 0), (c, 1)]
    async with pool.acquire() as conn, conn.transaction():
        await route_new(conn, "web", "v")
    assert await pool.fetchval(LOAD_COPY_WRONG) == 0
    assert await pool.fetchval(FLAG_WRONG) == 0


async def test_least_loaded_reads_a_window_and_chooses_as_over_the_whole_team(
    pool: asyncpg.Pool,
) -> None:
    """300 operators with loads already spread; each batch of 20 goes, contact by contact,
    to whoever has the lowest load per weight over the whole team (then the larger
    weight, then the longest wait, then the lower id), while routing reads 48 of them."""
    team = [(f"op{n}", 6, 1 + n % 4) for n in range(300)]
    ids = await setup_source(pool, "tg", team, "least_loaded")
    await admin.add_source(pool, "web", None, "", None)
    await admin.set_weights(pool, "web", dict.fromkeys(ids, 1))
    async with pool.acquire() as conn, conn.transaction():  # loads spread by another source
        await route_new(conn, "web", *(f"w{n}" for n in range(500)))
    whole = """
        SELECT o.id, w.weight, o.open_load, o.max_load, o.last_assigned_at
        FROM source_weights w JOIN operators o ON o.id = w.operator_id
        JOIN sources s ON s.id = w.source_id
        WHERE s.key = 'tg' AND o.open_load < o.max_load
    """
    for n in range(5):
        free = [
            Candidate(r["id"], r["weight"], r["open_load"], r["max_load"], r["last_assigned_at"])
            for r in await pool.fetch(whole)
        ]
        expected = []
        for i in range(20):
            c = least_loaded(free, random.Random(0))
            expected.append(c.id)
            later = LATER + timedelta(microseconds=i)
            free = [
                replace(x, open_load=x.open_load + 1, last_assigned_at=later) if x is c else x
                for x in free
                if x is not c or x.open_load + 1 < x.max_load
            ]
        async with pool.acquire() as conn, conn.transaction():
            outcome = await route_new(conn, "tg", *(f"t{n}-{i}" for i in range(20)))
        assert [outcome.assigned[c] for c in sorted(outcome.assigned)] == expected
    assert await pool.fetchval(LOAD_COPY_WRONG) == 0


async def test_weighted_random_draws_by_weight_from_its_window(pool: asyncpg.Pool) -> None:
    """200 operators of weights 1-4 on a weighted_random source, 4,000 contacts in batches
    of 50 (each reads 108 operators): the shares per weight follow the weights (chi-square
    at p = 1e-6, so that the test cannot flake: a bias such as the index's tie-break by id
    is far beyond it), and a fresh source does not hand its first contacts out by id."""
    team = [(f"op{n}", 10_000, 1 + n % 4) for n in range(200)]
    ids = await setup_source(pool, "tg", team, "weighted_random")
    weight = {i: 1 + n % 4 for n, i in enumerate(ids)}
    chosen: list[int] = []
    for n in range(80):
        async with pool.acquire() as conn, conn.transaction():
            outcome = await route_new(conn, "tg", *(f"t{n}-{i}" for i in range(50)))
        chosen += [outcome.assigned[c] for c in sorted(outcome.assigned)]
    assert len(chosen) == 4000
    assert len(set(chosen[:50])) > 35  # not the lowest ids first
    total = sum(weight.values())
    statistic = 0.0
    for w in (1, 2, 3, 4):
        expected = 4000 * w * 50 / total
        observed = sum(weight[o] == w for o in chosen)
        statistic += (observed - expected) ** 2 / expected
    assert statistic < 30.66, statistic  # chi-square, 3 degrees of freedom, p = 1e-6
    assert await pool.fetchval(FLAG_WRONG) == 0
