"""Who takes which queued contact: the routing decision of a whole batch, as a pure
function of what the transaction read under its locks. No I/O, so it is tested alone."""

import random
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from worker.strategies import STRATEGIES, Candidate, smooth_lags


@dataclass(frozen=True, slots=True)
class Queued:
    """An open contact without an operator, oldest first within its source."""

    id: int  # below zero: a contact of this batch, not yet inserted
    source_id: int
    lead: str  # its lead's external id


@dataclass(frozen=True, slots=True)
class Assignment:
    contact_id: int
    source_id: int
    operator_id: int
    affinity: bool


@dataclass
class Plan:
    assignments: list[Assignment]
    lags: dict[tuple[int, int], float]  # (source id, operator id) -> smooth lag to store


def assign(
    queued: Sequence[Queued],
    weights: Mapping[int, Sequence[Candidate]],
    strategies: Mapping[int, str],
    preferred: Mapping[int, int],
    rng: random.Random,
    affinity_sources: Set[int] = frozenset(),
) -> Plan:
    """Walk each source's queue oldest first and give each contact to an operator of that
    source who is active and below max_load, by the source's strategy (or to its
    `preferred` operator: affinity). Capacity is shared across sources: every assignment
    uses one unit of the operator's, whichever source it is for. A source stops at its
    first contact nobody can take, so its older contacts are never overtaken.

    `weights`: per source id, its weighted active operators with their load as read under
    the operators' row locks; `strategies`: per source id; `preferred`: per contact id, the
    operator who had its lead lately (for `affinity_sources`, a lead's earlier contact in
    this same batch counts too)."""
    load: dict[int, int] = {}
    limit: dict[int, int] = {}
    for candidates in weights.values():
        for c in candidates:
            load[c.id], limit[c.id] = c.open_load, c.max_load
    lags = {(s, c.id): c.lag for s, cs in weights.items() for c in cs}
    # Assigned in this batch: later than anything in the database, in batch order.
    latest = max(
        (
            c.last_assigned_at
            for cs in weights.values()
            for c in cs
            if c.last_assigned_at is not None
        ),
        default=datetime.now(UTC),
    )
    last: dict[int, datetime] = {}
    just_had: dict[tuple[str, int], int] = {}  # (lead, source) -> operator, this batch
    plan = Plan([], {})
    blocked: set[int] = set()
    for contact in queued:
        source = contact.source_id
        if source in blocked:
            continue
        # Built directly: dataclasses.replace() would dominate a batch's routing time.
        available = [
            Candidate(
                c.id,
                c.weight,
                load[c.id],
                c.max_load,
                last.get(c.id, c.last_assigned_at),
                lags[(source, c.id)],
            )
            for c in weights.get(source, ())
            if load[c.id] < limit[c.id]
        ]
        if not available:
            blocked.add(source)
            continue
        wanted = preferred.get(contact.id)
        if source in affinity_sources:
            wanted = just_had.get((contact.lead, source), wanted)
        by_affinity = any(c.id == wanted for c in available)
        if by_affinity:
            chosen = next(c for c in available if c.id == wanted)
        else:
            chosen = STRATEGIES[strategies[source]](available, rng)
        load[chosen.id] += 1
        last[chosen.id] = latest + timedelta(microseconds=len(plan.assignments) + 1)
        just_had[(contact.lead, source)] = chosen.id
        if strategies[source] == "smooth":  # affinity counts too, so shares stay fair
            for operator_id, lag in smooth_lags(available, chosen.id).items():
                lags[(source, operator_id)] = lag
                plan.lags[(source, operator_id)] = lag
        plan.assignments.append(Assignment(contact.id, source, chosen.id, by_affinity))
    return plan
