"""`leadrouter simulate ROUTING_FILE`: what a routing would have done with the traffic of a
period, next to what really happened. The routing is the database's as it is, changed as
applying the file would change it (`leadrouter apply` takes the same files); the traffic
is read in one READ ONLY transaction, and the replay itself (simulator.py) runs in memory:
nothing is written."""

from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from rich.console import Console
from rich.table import Table

from worker import routing_file
from worker.errors import UserError
from worker.simulator import (
    Operator,
    Record,
    Report,
    Routing,
    Source,
    actual,
    microseconds,
    simulate,
)
from worker.sql import Q
from worker.terminal import cell


@dataclass(frozen=True, slots=True)
class Period:
    start: datetime
    end: datetime


def period(since: timedelta | None, start: str | None, end: str | None) -> Period:
    """`--since 7d`, or `--from ISO [--to ISO]` (a time without an offset is UTC); the end
    defaults to now, and the default period is the last 7 days."""
    now = datetime.now(UTC)
    if since is not None and (start is not None or end is not None):
        raise UserError("give --since, or --from and --to, not both")
    if start is None:
        if end is not None:
            raise UserError("--to goes with --from")
        return Period(now - (since or timedelta(days=7)), now)
    begin = _instant(start, "--from")
    finish = _instant(end, "--to") if end is not None else now
    if begin >= finish:
        raise UserError(f"the period is empty: --from {start} is not before its end")
    return Period(begin, finish)


def _instant(text: str, option: str) -> datetime:
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise UserError(
            f"{option}: {text!r} is not an ISO 8601 time, e.g. 2026-12-01T09:00:00+00:00"
        ) from None
    return at if at.tzinfo else at.replace(tzinfo=UTC)


@dataclass
class Outcome:
    period: Period
    actual: Report
    simulated: Report
    names: dict[int, str]  # operator id -> name
    contacts: int  # arrivals replayed

    def as_dict(self) -> dict[str, Any]:
        return {"actual": self.actual.as_dict(), "simulated": self.simulated.as_dict()}


async def run(
    pool: asyncpg.Pool, desired: routing_file.RoutingFile, when: Period, seed: int = 0
) -> Outcome:
    """Read the routing and the traffic (READ ONLY, one snapshot), replay, compare."""
    async with pool.acquire() as conn, conn.transaction(readonly=True, isolation="repeatable_read"):
        current = await _read_routing(conn)
        routing = changed_by(current, desired)
        hours = max((s.affinity_hours or 0 for s in routing.sources.values()), default=0)
        rows = await conn.fetch(
            Q.simulation_contacts, when.start, when.end, when.start - timedelta(hours=hours)
        )
    records = [_record(r) for r in rows]
    start, end = microseconds(when.start), microseconds(when.end)
    simulated = simulate(routing, records, start, end, seed)
    names = {o.id: o.name for o in (*current.operators.values(), *routing.operators.values())}
    arrivals = sum(start <= r.created < end for r in records)
    return Outcome(when, actual(records, current, start, end), simulated, names, arrivals)


def _record(r: asyncpg.Record) -> Record:
    return Record(*r)


async def _read_routing(conn: asyncpg.Connection) -> Routing:
    operators = {
        r["id"]: Operator(r["id"], r["name"], r["max_load"], r["is_active"])
        for r in await conn.fetch(Q.list_operators)
    }
    weights: dict[int, dict[int, int]] = {}
    for w in await conn.fetch(Q.simulation_weights):
        weights.setdefault(w["source_id"], {})[w["operator_id"]] = w["weight"]
    rows = await conn.fetch(Q.list_sources)
    ids = {r["key"]: r["id"] for r in rows}
    sources = {
        r["id"]: Source(
            r["id"],
            r["key"],
            r["strategy"],
            weights.get(r["id"], {}),
            r["affinity_hours"] or None,
            r["queue_order"] == "lifo",
            ids[r["overflow_to"]] if r["overflow_to"] else None,
            r["overflow_after"],
        )
        for r in rows
    }
    return Routing(operators, sources)


def changed_by(current: Routing, desired: routing_file.RoutingFile) -> Routing:
    """The routing `current` becomes when `desired` is applied (pure). An operator only the
    file names gets an id below zero; a source must exist already (its recorded contacts
    are what is replayed)."""
    by_key = {s.key: s for s in current.sources.values()}
    for i, spec in enumerate(desired.sources):
        if spec.key not in by_key:
            raise UserError(
                f"sources[{i}].key: no source {spec.key!r} in the database "
                "(simulate replays the recorded contacts of existing sources)"
            )
    # The same checks as apply: names that resolve to one operator, known weights.
    routing_file.plan(
        routing_file.State(
            tuple(
                routing_file.Operator(o.id, o.name, o.max_load, o.active)
                for o in current.operators.values()
            )
        ),
        desired,
    )
    operators = dict(current.operators)
    ids = {o.name: o.id for o in operators.values()}
    for i, op in enumerate(desired.operators):
        operator_id = ids.get(op.name, -(i + 1))
        ids[op.name] = operator_id
        operators[operator_id] = Operator(operator_id, op.name, op.max_load, op.active)
    sources = dict(current.sources)
    for i, spec in enumerate(desired.sources):
        target = None
        if spec.overflow_to is not None:
            if spec.overflow_to not in by_key:
                raise UserError(f"sources[{i}].overflow_to: no source {spec.overflow_to!r}")
            target = by_key[spec.overflow_to].id
        found = by_key[spec.key]
        sources[found.id] = replace(
            found,
            strategy=spec.strategy,
            weights=found.weights
            if spec.weights is None
            else {ids[name]: w for name, w in spec.weights.items()},
            affinity_hours=spec.affinity_hours or None,
            lifo=spec.queue_order == "lifo",
            overflow_to=target,
            overflow_after=spec.overflow_after or None,
        )
    return Routing(operators, sources)


def render(outcome: Outcome, console: Console) -> None:
    when = outcome.period
    console.print(
        f"{outcome.contacts} contacts from {when.start.isoformat(timespec='seconds')} "
        f"to {when.end.isoformat(timespec='seconds')}, replayed"
    )
    a, s = outcome.actual, outcome.simulated
    shares = Table("source", "operator", "actual", "simulated", title="assigned")
    for source, operator_id in sorted(a.assigned.keys() | s.assigned.keys()):
        name = outcome.names.get(operator_id, "?")
        shares.add_row(
            cell(source),
            cell(f"{operator_id} {name}"),
            str(a.assigned[(source, operator_id)]),
            str(s.assigned[(source, operator_id)]),
        )
    console.print(shares)
    summary = Table("", "actual", "simulated")
    ad, sd = a.as_dict(), s.as_dict()
    for key in ("p50", "p95", "max"):
        summary.add_row(
            f"wait {key} (s)",
            _shown(ad["wait_seconds"][key]),  # type: ignore[index]
            _shown(sd["wait_seconds"][key]),  # type: ignore[index]
        )
    for key in ("queued", "overflowed", "expired"):
        summary.add_row(key, str(ad[key]), str(sd[key]))
    console.print(summary)


def _shown(value: object) -> str:
    return "-" if value is None else str(value)
