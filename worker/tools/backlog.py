"""How the backlog scales: `python -m worker.tools.backlog --contacts 100000` fills a
throwaway database (named after the configured one, `_backlog_<id>`, dropped afterwards)
with a source holding N queued contacts of mixed priorities (0-9) and one operator who
cannot take any, then

1. prints the plan (EXPLAIN ANALYZE, BUFFERS) of `routing_state`, the read that decides
   who is served next, when the operator has room for one contact, and the index it uses;
2. times assigning one queued contact when capacity appears, `--rounds` times: the
   operator is given one more place, then one routing transaction (the source's lock,
   `routing_state`, `assign_contacts`, the event) runs as after a close; reported are the
   database's own execution time of the two statements that do the work (from EXPLAIN
   ANALYZE of each round) and the whole transaction seen from the client;
3. drains the whole backlog (the operator given room for all of it), one transaction of
   up to distribution.MAX_DRAIN at a time, checking after each that nothing it left
   queued outranks what it assigned (priority order), and reports the time.

Uses LEADROUTER_DATABASE_URL's server; never touches that database itself."""

import argparse
import asyncio
import json
import statistics
import time
import uuid
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from worker import admin, distribution, source_queueing
from worker.migrate import drop_database, migrate
from worker.settings import Settings
from worker.sql import Q, Queries

B = Queries("worker.tools", "backlog.sql")


def _database_url(base: str, run_id: str) -> str:
    parts = urlsplit(base)
    name = f"{parts.path.lstrip('/') or 'leadrouter'}_backlog_{run_id}"
    return urlunsplit(parts._replace(path=f"/{name}"))


async def _explain(conn: asyncpg.Connection, query: str, *args: object) -> dict[str, object]:
    [row] = await conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {query}", *args)
    [plan] = json.loads(row[0])
    return dict(plan)


def _indexes(plan: dict[str, object]) -> set[str]:
    found: set[str] = set()

    def walk(node: dict[str, object]) -> None:
        if "Index Name" in node:
            found.add(str(node["Index Name"]))
        for child in node.get("Plans", []) or []:  # type: ignore[attr-defined]
            walk(child)

    walk(plan["Plan"])  # type: ignore[arg-type]
    return found


async def _text_plan(conn: asyncpg.Connection, query: str, *args: object) -> str:
    rows = await conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS) {query}", *args)
    return "\n".join(r[0] for r in rows)


async def run(base: Settings, contacts: int, rounds: int, lifo: bool) -> None:
    url = _database_url(base.database_url, uuid.uuid4().hex[:8])
    await migrate(url)
    try:
        async with asyncpg.create_pool(url, min_size=1, max_size=2) as pool:
            await _measure(pool, contacts, rounds, lifo)
    finally:
        await drop_database(url)


async def _measure(pool: asyncpg.Pool, contacts: int, rounds: int, lifo: bool) -> None:
    change = source_queueing.QueueingChange(queue_order="lifo" if lifo else None)
    source = await source_queueing.add_source(
        pool, change, key="backlog", name=None, description="", strategy=None
    )
    source_id = int(str(source["id"]))
    operator = (await admin.add_operator(pool, "busy", 0, True))["id"]
    await admin.set_weights(pool, "backlog", {operator: 1})
    started = time.perf_counter()
    await pool.execute(B.fill_backlog, contacts, source_id)
    await pool.execute("ANALYZE")
    print(f"filled {contacts} queued contacts in {time.perf_counter() - started:.1f}s")

    args: tuple[object, ...] = ([source_id], [], distribution.MAX_DRAIN, [0], [False])
    async with pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        await pool.execute(B.give_one_place, operator)
        await distribution.lock_sources(conn, {source_id})
        print("\nrouting_state with room for one contact:\n")
        print(await _text_plan(conn, Q.routing_state, *args))
        await tx.rollback()

    db_ms: list[float] = []
    client_ms: list[float] = []
    indexes: set[str] = set()
    for _ in range(rounds):
        await pool.execute(B.give_one_place, operator)
        async with pool.acquire() as conn:
            # The database's own time: the read and the write that assign one contact,
            # measured by EXPLAIN ANALYZE in a transaction rolled back.
            tx = conn.transaction()
            await tx.start()
            await distribution.lock_sources(conn, {source_id})
            plan = await _explain(conn, Q.routing_state, *args)
            indexes |= _indexes(plan)
            [queued] = [
                r["id"] for r in await conn.fetch(Q.routing_state, *args) if r["kind"] == "queued"
            ]
            write = await _explain(
                conn, Q.assign_contacts, [queued], [operator], [operator], [1], [], [], [], [], []
            )
            await tx.rollback()
            db_ms.append(
                float(plan["Planning Time"])  # type: ignore[arg-type]
                + float(plan["Execution Time"])  # type: ignore[arg-type]
                + float(write["Planning Time"])  # type: ignore[arg-type]
                + float(write["Execution Time"])  # type: ignore[arg-type]
            )
            # The real thing, seen from the client (round trips included).
            began = time.perf_counter()
            async with conn.transaction():
                await distribution.lock_sources(conn, {source_id})
                assigned = await distribution.drain_sources(conn, {source_id})
            client_ms.append((time.perf_counter() - began) * 1000)
            assert assigned.total() == 1, assigned
    print(f"\nindexes used by routing_state: {', '.join(sorted(indexes))}")
    print(
        f"assign one queued contact ({rounds} rounds, {contacts} queued): database time "
        f"(routing_state + assign_contacts, planning and execution) median "
        f"{statistics.median(db_ms):.2f} ms, p95 {_p95(db_ms):.2f} ms; whole transaction "
        f"from the client median {statistics.median(client_ms):.2f} ms, "
        f"p95 {_p95(client_ms):.2f} ms"
    )

    await pool.execute(B.set_max_load, operator, contacts + rounds)
    began = time.perf_counter()
    transactions = 0
    while True:
        async with pool.acquire() as conn, conn.transaction():
            await distribution.lock_sources(conn, {source_id})
            await distribution.drain_sources(conn, {source_id})
            check = await conn.fetchrow(B.drained_now, source_id)
        transactions += 1
        if check["assigned"] and check["highest_left"] is not None:
            assert check["lowest_assigned"] >= check["highest_left"], (
                f"priority {check['highest_left']} left queued behind {check['lowest_assigned']}"
            )
        if not check["left"]:
            break
    print(
        f"drained the rest ({contacts - rounds}) in {time.perf_counter() - began:.1f}s, "
        f"{transactions} transactions, each leaving nothing queued above what it assigned"
    )


def _p95(values: list[float]) -> float:
    return sorted(values)[max(0, round(0.95 * len(values)) - 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contacts", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--lifo", action="store_true", help="the source serves newest first")
    options = parser.parse_args()
    asyncio.run(run(Settings(), options.contacts, options.rounds, options.lifo))


if __name__ == "__main__":
    main()
