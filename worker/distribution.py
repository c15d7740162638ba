"""The routing transactions. Every function here runs inside a caller's transaction,
after the advisory locks of the sources it touches have been taken in ascending order
(so two transactions never wait on each other's locks in a cycle)."""

import random
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime

import asyncpg

from schemas.events import ContactEventData, build_event
from schemas.inbound import ContactClose, LeadContact
from worker.errors import DeadLetter, Reason
from worker.sql import Q
from worker.strategies import STRATEGIES, Candidate, smooth_lags

_rng = random.SystemRandom()
DRAIN_PAGE = 100


Assignments = Counter[tuple[str, str]]  # (source key, strategy) -> contacts assigned


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a routing transaction did, for logs and metrics."""

    contact_id: int | None = None
    operator_id: int | None = None
    duplicate: bool = False
    late_assignments: int = 0
    assignments: Assignments = field(default_factory=Counter)


async def lock_sources(conn: asyncpg.Connection, source_ids: set[int]) -> None:
    for source_id in sorted(source_ids):
        await conn.execute(Q.lock_source, source_id)


@dataclass(frozen=True, slots=True)
class Route:
    """A source as routing sees it."""

    id: int
    key: str
    strategy: str
    affinity_hours: int | None

    @classmethod
    def of(cls, row: asyncpg.Record) -> "Route":
        return cls(row["id"], row["key"], row["strategy"], row["affinity_hours"])


async def route_new_contact(
    conn: asyncpg.Connection, message: LeadContact, message_id: str
) -> Outcome:
    """Record the contact of a `lead.contact` message and route its source's backlog,
    oldest first, so a new arrival never overtakes a queued contact."""
    row = await conn.fetchrow(Q.source_by_key, message.source)
    if row is None:
        raise DeadLetter(Reason.UNKNOWN_SOURCE, f"no source with key {message.source!r}")
    source = Route.of(row)
    await lock_sources(conn, {source.id})
    if await conn.fetchval(Q.contact_exists_for_message, message_id):
        return Outcome(duplicate=True)

    lead = message.lead
    lead_id = await conn.fetchval(
        Q.upsert_lead, lead.external_id, lead.name, lead.email, lead.phone
    )
    row = await conn.fetchrow(Q.insert_contact, lead_id, source.id, message.message, message_id)
    if row is None:  # the same id under another source's lock: still a duplicate
        return Outcome(duplicate=True)
    contact_id = row["id"]

    assigned = await drain_source(conn, source)
    operator_id = assigned.get(contact_id)
    if operator_id is None:
        await _write_event(
            conn,
            "contact.queued",
            row["created_at"],
            ContactEventData(
                contact_id=contact_id,
                status="open",
                lead_id=lead_id,
                lead_external_id=lead.external_id,
                source=source.key,
                operator_id=None,
                inbound_message_id=message_id,
            ),
        )
    return Outcome(
        contact_id=contact_id,
        operator_id=operator_id,
        late_assignments=len(assigned) - (operator_id is not None),
        assignments=Counter({(source.key, source.strategy): len(assigned)}),
    )


async def close_contact(conn: asyncpg.Connection, message: ContactClose) -> Outcome:
    """Close a contact, free its operator and hand the freed capacity to the backlog of
    the operator's sources. Closing a closed contact changes nothing."""
    contact = await conn.fetchrow(Q.contact_for_close, message.contact_id)
    if contact is None:
        raise DeadLetter(Reason.UNKNOWN_CONTACT, f"no contact with id {message.contact_id}")
    locked = {contact["source_id"], *contact["operator_source_ids"]}
    await lock_sources(conn, locked)

    closed = await conn.fetchrow(Q.close_contact, message.contact_id)
    if closed is None:
        return Outcome(contact_id=message.contact_id, duplicate=True)
    operator_id = closed["operator_id"]
    if operator_id is not None:
        # Before the event row: every event that changes an operator's load is then
        # written under that operator's row lock, so outbox order is commit order per
        # operator and the load after every commit can be replayed from the outbox.
        await conn.execute(Q.release_operator, operator_id)
    await _write_event(
        conn,
        "contact.closed",
        closed["closed_at"],
        ContactEventData(
            contact_id=closed["id"],
            status="closed",
            lead_id=closed["lead_id"],
            lead_external_id=closed["lead_external_id"],
            source=closed["source_key"],
            operator_id=operator_id,
            inbound_message_id=closed["inbound_message_id"],
        ),
    )
    late: Assignments = Counter()
    if operator_id is not None:
        # A queued contact may have been assigned between our read and our locks; only
        # sources we hold the lock of may be routed now, the sweep covers the rest.
        source_ids = {r["source_id"] for r in await conn.fetch(Q.operator_source_ids, operator_id)}
        late = await drain_sources(conn, source_ids & locked)
    return Outcome(
        contact_id=closed["id"],
        operator_id=operator_id,
        late_assignments=late.total(),
        assignments=late,
    )


async def drain_sources(conn: asyncpg.Connection, source_ids: set[int]) -> Assignments:
    """Route the backlog of these sources (their locks must be held). Returns how many
    queued contacts were assigned, per source and strategy."""
    assigned: Assignments = Counter()
    for row in await conn.fetch(Q.sources_by_ids, list(source_ids)):
        route = Route.of(row)
        assigned[(route.key, route.strategy)] += len(await drain_source(conn, route))
    return +assigned


async def drain_source(conn: asyncpg.Connection, source: Route) -> dict[int, int]:
    """Assign the source's queued contacts, oldest first, while anyone can take them.
    Returns {contact id: operator id} of the assignments made."""
    assigned: dict[int, int] = {}
    while True:
        queued = await conn.fetch(Q.queued_contacts, source.id, DRAIN_PAGE)
        for contact in queued:
            preferred = None
            if source.affinity_hours:
                preferred = await conn.fetchval(
                    Q.affinity_operator,
                    contact["lead_id"],
                    source.id,
                    contact["id"],
                    source.affinity_hours,
                )
            claimed = await _claim_operator(conn, source, preferred)
            if claimed is None:
                return assigned
            operator_id, affinity = claimed
            assigned_at = await conn.fetchval(Q.assign_contact, contact["id"], operator_id)
            assigned[contact["id"]] = operator_id
            waited = (assigned_at - contact["created_at"]).total_seconds()
            await _write_event(
                conn,
                "contact.assigned",
                assigned_at,
                ContactEventData(
                    contact_id=contact["id"],
                    status="open",
                    lead_id=contact["lead_id"],
                    lead_external_id=contact["lead_external_id"],
                    source=source.key,
                    operator_id=operator_id,
                    inbound_message_id=contact["inbound_message_id"],
                    queued_seconds=round(max(waited, 0.0), 3),
                    affinity=affinity,
                ),
            )
        if len(queued) < DRAIN_PAGE:
            return assigned


async def _claim_operator(
    conn: asyncpg.Connection, source: Route, preferred: int | None
) -> tuple[int, bool] | None:
    """Choose among the available operators (the preferred one first, if available) and
    claim one unit of capacity. Another source may take an operator's last unit first:
    then choose again among the rest. Returns (operator id, whether by affinity)."""
    strategy = STRATEGIES[source.strategy]
    candidates = [
        Candidate(
            id=r["id"],
            weight=r["weight"],
            open_load=r["open_load"],
            max_load=r["max_load"],
            last_assigned_at=r["last_assigned_at"],
            lag=r["smooth_lag"],
        )
        for r in await conn.fetch(Q.candidates, source.id)
    ]
    by_affinity = any(c.id == preferred for c in candidates)
    while candidates:
        if by_affinity:
            choice = next(c for c in candidates if c.id == preferred)
        else:
            choice = strategy(candidates, _rng)
        if await conn.fetchval(Q.claim_operator, choice.id) is not None:
            if source.strategy == "smooth":
                # An affinity assignment counts too, so shares stay fair over time.
                lags = smooth_lags(candidates, choice.id)
                await conn.execute(Q.update_smooth_lags, source.id, list(lags), list(lags.values()))
            return choice.id, by_affinity
        candidates.remove(choice)
        by_affinity = False
    return None


async def _write_event(
    conn: asyncpg.Connection, routing_key: str, time: datetime, data: ContactEventData
) -> None:
    event = build_event(str(uuid.uuid4()), routing_key, time, data)
    await conn.execute(
        Q.insert_event, uuid.UUID(event.id), data.contact_id, routing_key, event.model_dump_json()
    )
    await conn.execute(Q.notify_outbox)
