"""A contact's history: every decision about it (offered, assigned, declined, expired,
requeued, overflowed, queued, closed, answer_rejected, waiting), one `contact_decisions`
row each, written by the statement that writes the decision's event, so in the same
transaction (worker/outbox.py). What routing decided on comes from worker/decisions.py.

This module owns the table: the setting that turns recording on or off, a decision's
stored form (`detail`), reading a contact's story back (`explain`) and pruning."""

import json
from collections.abc import Mapping
from typing import Any

import asyncpg

from worker.decisions import expand
from worker.errors import UserError
from worker.sql import Q

PRUNE_BATCH = 5000  # rows looked at per statement

_recording = True


def configure(on: bool) -> None:
    """Record history or not (LEADROUTER_HISTORY), for every event writer of the process
    from now on: the worker and the CLI set it from their settings at start."""
    global _recording
    _recording = on


def recording() -> bool:
    return _recording


# The events whose decision routing made (the others say what happened without it).
_ROUTED = frozenset({"contact.offered", "contact.assigned", "contact.queued"})
# What an event's data says of the decision besides the operator and source.
_EXTRA = ("attempt", "reason", "answer", "overflow_to", "requeued_from", "queued_seconds")


def detail(key: str, data: Mapping[str, Any], routing: Mapping[int, dict[str, Any]]) -> str:
    """The stored decision of a contact event (`data` is its event's data): no lead's
    personal data, only ids, the source and the numbers routing decided on."""
    out: dict[str, Any] = {"source": data["source"]}
    if data["operator_id"] is not None:
        out["operator_id"] = data["operator_id"]
    if data.get("affinity"):
        out["affinity"] = True
    for name in _EXTRA:
        value = data.get(name)
        if value is not None:
            out[name] = value
    if key in _ROUTED:
        out.update(routing.get(data["contact_id"], ()))
    return _encode(out)


_encode = json.JSONEncoder(separators=(",", ":")).encode


# A decline made on an operator's behalf (worker/availability.py) says why they could not.
_UNAVAILABLE = {
    "operator away": "away",
    "operator offline": "offline",
    "operator off shift": "off shift",
    "operator on leave": "on leave",
    "operator inactive": "inactive",
}


async def explain(conn: asyncpg.Connection, contact_id: int) -> dict[str, Any]:
    """The contact's decisions in order, in the shape `contacts explain --json` prints.
    An operator its offers skip is shown with why (declined, expired, or away, off shift,
    … when they were declined on their behalf), from how their latest offer before that
    decision ended."""
    rows = await conn.fetch(Q.contact_history, contact_id)
    if not rows:
        raise UserError(f"no contact {contact_id}")
    offers = await conn.fetch(Q.offer_outcomes, contact_id)
    decisions = [_decision(r, offers) for r in rows if r["id"] is not None]
    source_ids = {d["routed_by"] for d in decisions if "routed_by" in d}
    keys = {r["id"]: r["key"] for r in await conn.fetch(Q.sources_by_ids, sorted(source_ids))}
    for d in decisions:
        if "routed_by" in d:
            d["routed_by"] = keys.get(d["routed_by"], d["routed_by"])
    return {
        "contact_id": contact_id,
        "source": rows[0]["source"],
        "status": rows[0]["status"],
        "decisions": decisions,
    }


def _decision(row: asyncpg.Record, offers: list[asyncpg.Record]) -> dict[str, Any]:
    stored = json.loads(row["detail"])
    out: dict[str, Any] = {"kind": row["kind"], "at": row["at"].isoformat()}
    out.update(expand(stored) if "candidates" in stored else stored)
    out.setdefault("operator_id", None)
    out.setdefault("candidates", [])
    out.setdefault("skipped", [])
    before = out.get("attempt")  # the offers made before this decision
    for s in out.get("skipped", []):
        if s["why"] == "skip":
            s["why"] = _skipped_why(s["operator_id"], before, offers)
    return out


def _skipped_why(operator_id: int, before: int | None, offers: list[asyncpg.Record]) -> str:
    ended = [
        o
        for o in offers
        if o["operator_id"] == operator_id
        and o["outcome"] is not None
        and (before is None or o["attempt"] < before)
    ]
    if not ended:
        return "declined"
    last = ended[-1]
    if last["outcome"] == "declined" and last["reason"] in _UNAVAILABLE:
        return _UNAVAILABLE[last["reason"]]
    return str(last["outcome"])


async def prune_history(pool: asyncpg.Pool, retention_hours: float) -> int:
    """Delete decisions older than the retention; returns how many."""
    total = 0
    while True:
        status = await pool.execute(Q.prune_decisions, retention_hours, PRUNE_BATCH)
        deleted = int(status.split()[-1])  # "DELETE n"
        total += deleted
        if deleted < PRUNE_BATCH:
            return total
