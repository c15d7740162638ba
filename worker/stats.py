"""`leadrouter stats`: who got what, per source, next to the configured weights."""

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from rich.console import Console
from rich.table import Table

from worker.errors import UserError
from worker.sql import Q
from worker.terminal import cell

_DURATION = re.compile(r"^(\d+)([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
BAR_WIDTH = 24
MAX_WINDOW = timedelta(days=36_500)


def parse_duration(text: str) -> timedelta:
    """`90s`, `15m`, `24h`, `7d`, `2w`."""
    match = _DURATION.match(text.strip())
    if not match or int(match[1]) > 10_000_000:
        raise UserError(f"invalid duration {text!r}: use a number and one of s, m, h, d, w (24h)")
    window = timedelta(**{_UNITS[match[2]]: int(match[1])})
    if window > MAX_WINDOW:
        raise UserError(f"duration {text!r} reaches back further than 100 years")
    return window


@dataclass
class OperatorShare:
    operator_id: int
    operator_name: str
    is_active: bool
    weight: int
    weight_share: float
    assigned: int
    observed_share: float
    open_now: int
    load: int
    max_load: int
    presence: str = "online"
    shift: str | None = None  # with its time zone in brackets
    scheduled: bool = True  # on shift and not on leave
    available: bool = True  # active, online, on shift, not on leave
    # Sources that make offers (or made some in the window) only: how the operator
    # answered them.
    offers: "OfferCounts | None" = None


@dataclass
class OfferCounts:
    offered: int
    accepted: int
    declined: int
    expired: int
    acceptance_rate: float | None  # accepted of those answered or expired
    median_accept_seconds: float | None


@dataclass
class SourceStats:
    source: str
    strategy: str
    queued_now: int
    assigned: int = 0
    operators: list[OperatorShare] = field(default_factory=list)
    queue_order: str = "fifo"
    oldest_queued_seconds: float = 0.0  # how long the oldest queued contact has waited
    overflowed: int = 0  # contacts of the window that overflowed to another source
    waiting_alerts: int = 0  # contacts of the window that emitted contact.waiting
    accept_timeout: int = 0  # seconds; 0: offers off


def offer_counts(row: dict[str, Any]) -> OfferCounts:
    decided = row["accepted"] + row["declined"] + row["expired"]
    seconds = row["accept_seconds"]
    return OfferCounts(
        offered=row["offered"],
        accepted=row["accepted"],
        declined=row["declined"],
        expired=row["expired"],
        acceptance_rate=row["accepted"] / decided if decided else None,
        median_accept_seconds=round(seconds, 3) if seconds is not None else None,
    )


def shares(sources: list[dict[str, Any]], rows: list[dict[str, Any]]) -> list[SourceStats]:
    """Group the rows by source and compute configured and observed shares. Pure."""
    by_key = {
        s["source"]: SourceStats(
            s["source"],
            s["strategy"],
            s["queued_now"],
            queue_order=s.get("queue_order", "fifo"),
            oldest_queued_seconds=round(s.get("oldest_queued_seconds", 0.0), 3),
            overflowed=s.get("overflowed", 0),
            waiting_alerts=s.get("waiting_alerts", 0),
            accept_timeout=s.get("accept_timeout", 0),
        )
        for s in sources
    }
    offering = {r["source"] for r in rows if r.get("offered") or by_key[r["source"]].accept_timeout}
    for row in rows:
        by_key[row["source"]].assigned += row["assigned"]
    for key, stats in by_key.items():
        mine = [r for r in rows if r["source"] == key]
        total_weight = sum(r["weight"] for r in mine)
        for r in mine:
            stats.operators.append(
                OperatorShare(
                    operator_id=r["operator_id"],
                    operator_name=r["operator_name"],
                    is_active=r["is_active"],
                    weight=r["weight"],
                    weight_share=r["weight"] / total_weight if total_weight else 0.0,
                    assigned=r["assigned"],
                    observed_share=r["assigned"] / stats.assigned if stats.assigned else 0.0,
                    open_now=r["open_now"],
                    load=r["load"],
                    max_load=r["max_load"],
                    presence=r["presence"],
                    shift=f"{r['shift']} ({r['time_zone']})" if r["shift"] else None,
                    scheduled=r["scheduled"],
                    available=r["available"],
                    offers=offer_counts(r) if key in offering else None,
                )
            )
    return list(by_key.values())


async def collect(
    pool: asyncpg.Pool, source_key: str | None, since: timedelta | None
) -> list[SourceStats]:
    start = datetime.now(UTC) - since if since else datetime.min.replace(tzinfo=UTC)
    sources = [dict(r) for r in await pool.fetch(Q.stats_sources, source_key, start)]
    if source_key is not None and not sources:
        raise UserError(f"no source with key {source_key!r}")
    rows = [dict(r) for r in await pool.fetch(Q.stats_rows, source_key, start)]
    return shares(sources, rows)


def bar(share: float, target: float, width: int = BAR_WIDTH) -> str:
    """Observed share as a bar, with `|` where the configured share would end."""
    filled = round(share * width)
    cells = ["█" if i < filled else " " for i in range(width)]
    mark = min(round(target * width), width - 1) if target else None
    if mark is not None:
        cells[mark] = "|" if cells[mark] == " " else "▌"
    return "".join(cells)


def _queueing(s: SourceStats) -> str:
    """What the title says of the backlog beyond its size, only where there is something."""
    parts = []
    if s.queued_now:
        parts.append(f"oldest waiting {s.oldest_queued_seconds:.0f}s")
    if s.queue_order != "fifo":
        parts.append(f"{s.queue_order} order")
    if s.overflowed:
        parts.append(f"{s.overflowed} overflowed")
    if s.waiting_alerts:
        parts.append(f"{s.waiting_alerts} waiting alerts")
    return "".join(f", {p}" for p in parts)


def render(stats: list[SourceStats], console: Console, since: str | None) -> None:
    window = f"since {since} ago" if since else "all time"
    for s in stats:
        offering = any(op.offers is not None for op in s.operators)
        table = Table(
            "operator",
            "weight",
            "share",
            "assigned",
            "observed",
            "observed, | at the weight",
            "open",
            "load",
            title=cell(
                f"{s.source} ({s.strategy}): {s.assigned} assigned {window}, "
                f"{s.queued_now} queued now" + _queueing(s)
            ),
            title_justify="left",
        )
        if offering:
            table.add_column("offered: accepted/declined/expired, rate, p50 to accept")
        for op in s.operators:
            name = op.operator_name + ("" if op.is_active else " (inactive)")
            name += "" if op.presence == "online" else f" ({op.presence})"
            name += "" if op.scheduled else " (off shift or on leave)"
            values: tuple[object, ...] = (
                f"{op.operator_id} {name}",
                op.weight,
                f"{op.weight_share:.0%}",
                op.assigned,
                f"{op.observed_share:.0%}",
                bar(op.observed_share, op.weight_share),
                op.open_now,
                f"{op.load}/{op.max_load}",
            )
            if offering:
                values += _offer_cells(op.offers)
            table.add_row(*map(cell, values))
        console.print(table)
    if not stats:
        console.print("no sources yet: leadrouter sources add KEY")


def _offer_cells(counts: OfferCounts | None) -> tuple[object, ...]:
    if counts is None:
        return ("",)
    rate = "-" if counts.acceptance_rate is None else f"{counts.acceptance_rate:.0%}"
    p50 = "-" if counts.median_accept_seconds is None else f"{counts.median_accept_seconds:.1f}s"
    return (
        f"{counts.offered}: {counts.accepted}/{counts.declined}/{counts.expired}, {rate}, {p50}",
    )
