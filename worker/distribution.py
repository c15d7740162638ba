"""The routing transaction. One call handles a whole batch of inbound messages (a batch
of one is the same code): it takes the advisory locks of every source it touches in
ascending order, closes contacts, routes the backlog of every affected source oldest
first and the new contacts behind it, records the new contacts (already assigned where
they can be), set-based, and writes the events to the outbox.

Routing reads the operators without locking them, and only those it may choose: the few
first in its strategy's order by an index (see `routing_state`), so that a contact costs
about the same whatever the size of the team. The write then locks and claims only the
operators chosen, and the database re-checks their capacity there; when a concurrent
transaction took it first, the whole transaction is retried (`CapacityTaken`).

Lock order, everywhere: source advisory locks (ascending), then operator rows (ascending,
`FOR UPDATE`), then lead rows (ascending external id, by the leads upsert), so two
transactions never wait on each other in a cycle in the usual case; the rare cycle between
releasing and claiming operators is a deadlock that PostgreSQL breaks and the caller
retries."""

import asyncio
import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from schemas.inbound import LeadContact
from worker import decisions, offers
from worker.assignment import Assignment, Plan, Queued, Window, assign
from worker.outbox import Event, EventWriter
from worker.queue_order import Heads, serving_order
from worker.retry import in_transaction
from worker.sql import Q
from worker.strategies import Candidate, finish_key, load_key

_rng = random.SystemRandom()
MAX_DRAIN = 10_000  # queued contacts one transaction may assign per source

Assignments = Counter[tuple[str, str]]  # (source key, strategy) -> contacts assigned


class CapacityTaken(asyncpg.SerializationError):
    """An operator this transaction chose (read without a lock) was filled or switched off
    by a concurrent one before the claim: nothing is recorded, and the transaction is
    retried from the start like a serialization failure (transient for the consumer,
    retried by `in_transaction`)."""


@dataclass(frozen=True, slots=True)
class Route:
    """A source as routing sees it."""

    id: int
    key: str
    strategy: str
    affinity_hours: int | None
    accept_timeout: int = 0  # seconds; 0: assigns, else offers (worker/offers.py)
    lifo: bool = False  # newest first within a priority
    receives_overflow: bool = False  # another source's contacts may overflow to it

    @classmethod
    def of(cls, row: asyncpg.Record) -> "Route":
        return cls(
            row["id"],
            row["key"],
            row["strategy"],
            row["affinity_hours"],
            row["accept_timeout"],
            row["queue_order"] == "lifo",
            row["receives_overflow"],
        )


@dataclass(frozen=True, slots=True)
class NewContact:
    """A valid `lead.contact` message of the batch."""

    message_id: str
    body: LeadContact


@dataclass
class Outcome:
    """What a routing transaction did, for acks, logs and metrics."""

    contacts: dict[str, int] = field(default_factory=dict)  # message id -> new contact id
    assigned: dict[int, int] = field(default_factory=dict)  # contact id -> operator id
    duplicates: set[str] = field(default_factory=set)  # message ids seen before
    closed: dict[int, int | None] = field(default_factory=dict)  # contact -> freed operator
    already_closed: set[int] = field(default_factory=set)
    assignments: Assignments = field(default_factory=Counter)
    events: list[Event] = field(default_factory=list)  # leased: the caller publishes them
    # Sources that closes gave capacity to but whose locks this transaction did not hold
    # (the contact's operator or their weights changed between reading the scope and locking): the
    # caller routes them right after commit with `drain_after_commit`.
    undrained: set[int] = field(default_factory=set)
    answered: offers.Answered = field(default_factory=offers.Answered)
    # Offers taken back (declined or lapsed) in this transaction: contact id -> its row.
    withdrawn: dict[int, asyncpg.Record] = field(default_factory=dict)

    @property
    def late_assignments(self) -> int:
        """Queued contacts (not made by this batch) that got an operator."""
        return len(set(self.assigned) - set(self.contacts.values()))


@dataclass
class BatchScope:
    """What a batch will touch, read before its locks (sources and contacts are never
    deleted, so nothing read here can disappear); a batch of new contacts only reads its
    sources and takes their locks in one statement."""

    sources: dict[str, Route]  # by key, for the new contacts
    closes: dict[int, asyncpg.Record]  # contact id -> contacts_for_close row
    unknown_sources: set[str]
    unknown_contacts: set[int]
    locked: bool = False  # the locks are held already

    @property
    def locks(self) -> set[int]:
        ids = {s.id for s in self.sources.values()}
        for row in self.closes.values():
            ids.add(row["source_id"])
            ids.update(row["operator_source_ids"])
        return ids


async def read_scope(
    conn: asyncpg.Connection, source_keys: Iterable[str], close_ids: Iterable[int]
) -> BatchScope:
    keys, ids = set(source_keys), set(close_ids)
    sources: dict[str, Route] = {}
    if keys:
        query = Q.sources_by_keys if ids else Q.lock_sources_by_keys
        sources = {r["key"]: Route.of(r) for r in await conn.fetch(query, list(keys))}
    closes: dict[int, asyncpg.Record] = {}
    if ids:
        closes = {r["id"]: r for r in await conn.fetch(Q.contacts_for_close, list(ids))}
    return BatchScope(sources, closes, keys - set(sources), ids - set(closes), locked=not ids)


# The statements of the worker's transactions, each with arguments that touch nothing.
_PREPARED: tuple[tuple[str, int], ...] = (  # (query, how many array parameters)
    (Q.sources_by_keys, 1),
    (Q.lock_sources_by_keys, 1),
    (Q.contacts_for_close, 1),
    (Q.lock_sources_in_order, 1),
    (Q.close_contacts, 1),
    (Q.release_operators, 2),
    (Q.sources_of_operators, 1),
    (Q.sources_by_ids, 1),
    (Q.record_contacts, 16),
    (Q.previous_operators, 4),
    (Q.assign_contacts, 11),
    (Q.mark_events_published, 1),
    (Q.answer_state, 2),
    (Q.accept_offers, 1),
    (Q.give_back_shares, 3),
)


async def prepare_statements(conn: asyncpg.Connection) -> None:
    """Prepare the worker's statements on a new connection (asyncpg caches them per
    connection), so that the first messages after a start do not wait for it: each runs
    once on empty arrays, in a transaction rolled back."""
    tx = conn.transaction()
    await tx.start()
    try:
        for query, arrays in _PREPARED:
            await conn.fetch(query, *([] for _ in range(arrays)))
        await conn.fetch(Q.routing_state, [], [], 0, [], [])
        await conn.fetch(Q.insert_events, [], [], [], [], None, [], [])
        await conn.fetch(Q.withdraw_offers, [], "declined", [])
        await conn.fetch(Q.overflowed_queued, [], [], 0)
    finally:
        await tx.rollback()


async def lock_sources(conn: asyncpg.Connection, source_ids: set[int]) -> None:
    if source_ids:
        await conn.execute(Q.lock_sources_in_order, sorted(source_ids))


async def route(
    conn: asyncpg.Connection,
    scope: BatchScope,
    new: Sequence[NewContact] = (),
    close_ids: Sequence[int] = (),
    lease: float | None = None,
    answers: Sequence[offers.Answer] = (),
) -> Outcome:
    """Close `close_ids`, apply the `answers` to offers, record `new` and route every
    affected backlog, in the caller's transaction. Messages naming an unknown source or
    contact must have been left out (`scope` read with the answers' contacts among the
    closes). With a `lease` (seconds) the caller publishes `Outcome.events` itself after
    commit; without, the workers' relays are notified."""
    outcome = Outcome()
    locked = scope.locks
    if not scope.locked:
        await lock_sources(conn, locked)
    events = EventWriter()

    drain: set[int] = set()
    freed: set[int] = set()
    if close_ids:
        freed = await _close(conn, close_ids, outcome, events)
    if answers:
        freed |= set(await offers.answer(conn, answers, outcome, events))
        drain.update(r["source_id"] for r in outcome.withdrawn.values())
    if freed:
        # Read again under the locks: a contact queued when its scope was read may have been
        # given to an operator since. Only sources whose lock we hold may be routed
        # now (taking more locks here, after operator rows, could deadlock); the
        # others are left to the caller, after commit, not to the sweep.
        rows = await conn.fetch(Q.sources_of_operators, sorted(freed))
        drain.update({r["source_id"] for r in rows} & locked)
        outcome.undrained = {r["source_id"] for r in rows} - locked
    drain.update(scope.sources[n.body.source].id for n in new)
    routes = [r for r in scope.sources.values() if r.id in drain]
    missing = drain - {r.id for r in routes}
    if missing:
        routes += [Route.of(r) for r in await conn.fetch(Q.sources_by_ids, sorted(missing))]
    await _drain(conn, routes, outcome, events, new)
    if outcome.withdrawn:
        offers.queue_again(outcome, events)
    outcome.events = await events.write(conn, lease)
    return outcome


async def take_back_offers(
    conn: asyncpg.Connection,
    source_ids: set[int],
    contact_ids: Sequence[int],
    how: str = "expired",
    reason: str | None = None,
) -> Outcome:
    """Take these pending offers of these sources back (their locks held), as `how`
    says: expired (they lapsed) or declined (with `reason`: their operator stopped taking
    work), and route them on at once, with the rest of their backlogs; the events go to
    the outbox for the relays. Sources that the operators' freed capacity serves besides
    these are left to the caller (`Outcome.undrained`)."""
    outcome = Outcome()
    events, expired = EventWriter(), EventWriter()
    rows = await offers.withdraw(conn, contact_ids, how, [reason] * len(contact_ids), outcome, None)
    # Their events are built in a thread while routing waits on the database (10,000 of
    # them took a fifth of a bulk expiry's time), and go first, as they happened first.
    building = asyncio.ensure_future(asyncio.to_thread(offers.withdrawn_events, rows, how, expired))
    try:
        freed = sorted({r["operator_id"] for r in rows})
        if freed:
            others = await conn.fetch(Q.sources_of_operators, freed)
            outcome.undrained = {r["source_id"] for r in others} - source_ids
        routes = [Route.of(r) for r in await conn.fetch(Q.sources_by_ids, sorted(source_ids))]
        await _drain(conn, routes, outcome, events)
    finally:
        await building
    events.rows[:0] = expired.rows  # their decisions need no routing detail
    offers.queue_again(outcome, events)
    await events.write(conn, lease=None)
    return outcome


async def drain_sources(conn: asyncpg.Connection, source_ids: set[int]) -> Assignments:
    """Route the backlog of these sources (their locks must be held). Returns how many
    queued contacts were assigned, per source and strategy."""
    outcome = Outcome()
    if not source_ids:  # nothing to read (nor to ask of a database older than this code)
        return outcome.assignments
    routes = [Route.of(r) for r in await conn.fetch(Q.sources_by_ids, sorted(source_ids))]
    events = EventWriter()
    await _drain(conn, routes, outcome, events)
    await events.write(conn, lease=None)
    return outcome.assignments


async def drain_after_commit(pool: asyncpg.Pool, source_ids: set[int]) -> Assignments:
    """Route the backlog of sources that a committed transaction gave capacity to
    without holding their locks, in a transaction of its own that takes them (waiting
    for whoever holds them: their transaction's queued contacts are then visible too).
    Its events go to the outbox, and the relays are notified."""

    async def drain(conn: asyncpg.Connection) -> Assignments:
        await lock_sources(conn, source_ids)
        return await drain_sources(conn, source_ids)

    return await in_transaction(pool, drain)


async def _close(
    conn: asyncpg.Connection, close_ids: Sequence[int], outcome: Outcome, events: EventWriter
) -> set[int]:
    rows = await conn.fetch(Q.close_contacts, sorted(set(close_ids)))
    freed: Counter[int] = Counter()
    for row in rows:
        outcome.closed[row["id"]] = row["operator_id"]
        if row["operator_id"] is not None:
            freed[row["operator_id"]] += 1
        events.closed(row)
    outcome.already_closed = set(close_ids) - set(outcome.closed)
    if freed:
        ids = sorted(freed)
        await conn.execute(Q.release_operators, ids, [freed[i] for i in ids])
    return set(freed)


def _fresh(new: Sequence[NewContact], known: set[str], outcome: Outcome) -> list[NewContact]:
    """The messages of `new` that made no contact yet, once each; the others are
    duplicates."""
    fresh: dict[str, NewContact] = {}
    for item in new:
        if item.message_id in known or item.message_id in fresh:
            outcome.duplicates.add(item.message_id)
        else:
            fresh[item.message_id] = item
    return list(fresh.values())


async def _drain(
    conn: asyncpg.Connection,
    routes: Sequence[Route],
    outcome: Outcome,
    events: EventWriter,
    new: Sequence[NewContact] = (),
) -> None:
    """Assign the queued contacts of these sources, oldest first per source, while
    anyone can take them; then record the batch's `new` contacts (whose sources must be
    among these) behind them, except duplicates. A new contact is inserted already
    assigned when someone can take it and no older contact of its source is left
    waiting, else queued: one write per contact, not two."""
    if not routes:
        return
    by_id = {r.id: r for r in routes}
    homes: dict[int, str] = {}  # overflowed contact id -> its own source's key
    whole: set[int] = set()
    while True:
        state = await _read_state(conn, by_id, new, whole)
        fresh = _fresh(new, state.known, outcome)
        takes = state.takes
        sources = [s for s in sorted(takes) if takes[s] > 0]
        source_ids = {r.key: r.id for r in routes}
        heads = state.heads
        receiving = [s for s in sources if by_id[s].receives_overflow]
        if receiving:
            homes = await _read_overflowed(conn, receiving, by_id, heads)
        wanted = _serving_order(fresh, heads, sources, source_ids)
        explain = decisions.Collector() if events.recording else None
        decided = await _decide(conn, state, wanted, sources, by_id, explain)
        if not decided.unread:
            break
        # A source's window did not hold the choice for sure (smooth: many operators ahead
        # of their share with early finishes): read its candidates whole, once.
        whole |= decided.unread
        outcome.duplicates.clear()
    if explain is not None:
        _explained(explain, events, fresh, sources, source_ids)
    await _write_decisions(conn, decided, fresh, by_id, source_ids, outcome, events, homes)


def _explained(
    explain: decisions.Collector,
    events: EventWriter,
    fresh: Sequence[NewContact],
    sources: Sequence[int],
    source_ids: dict[str, int],
) -> None:
    """Hand what routing decided each contact on to the event writer (history); a new
    contact routing did not reach is queued because nobody was available for its source,
    or behind older contacts of its source that were not read."""
    routed = set(sources)
    for i, n in enumerate(fresh, 1):
        if -i not in explain.details:
            none = source_ids[n.body.source] not in routed
            explain.details[-i] = decisions.NO_OPERATOR if none else decisions.BEHIND_BACKLOG
    events.routing.update(explain.details)


@dataclass
class _State:
    """What routing reads of its sources, in one statement, under their locks."""

    weights: dict[int, list[Candidate]]  # per source, available operators it may choose
    windows: dict[int, Window]  # per source with an available operator
    takes: dict[int, int]  # per source with an available operator: what may be assigned
    heads: dict[int, Heads]  # per source: its first queued contacts in its order
    known: set[str]  # message ids of the batch's new contacts already recorded


async def _read_state(
    conn: asyncpg.Connection, by_id: dict[int, Route], new: Sequence[NewContact], whole: set[int]
) -> _State:
    weights: dict[int, list[Candidate]] = defaultdict(list)
    windows: dict[int, tuple[asyncpg.Record, int | None]] = {}
    takes: dict[int, int] = {}
    queued: dict[int, list[Queued]] = defaultdict(list)
    known: set[str] = set()
    arriving = Counter(n.body.source for n in new)
    ids = list(by_id)
    state = await conn.fetch(
        Q.routing_state,
        ids,
        [n.message_id for n in new],
        MAX_DRAIN,
        [arriving[by_id[i].key] for i in ids],
        [i in whole for i in ids],
    )
    for r in state:
        kind = r["kind"]
        if kind == "candidate":
            weights[r["source_id"]].append(
                Candidate(
                    id=r["id"],
                    weight=r["weight"],
                    open_load=r["open_load"],
                    max_load=r["max_load"],
                    last_assigned_at=r["last_assigned_at"],
                    start=r["start"],
                )
            )
        elif kind == "clock":
            windows[r["source_id"]] = (r, r["read_limit"])
            takes[r["source_id"]] = MAX_DRAIN if r["take"] is None else r["take"]
        elif kind == "queued":
            queued[r["source_id"]].append(_queued(r))
        else:
            known.add(r["message_id"])
    heads = {s: Heads(r.lifo, []) for s, r in by_id.items()}
    for source, contacts in queued.items():
        heads[source].add(contacts, full=len(contacts) >= takes[source])
    read: dict[int, Window] = {}
    for source, (r, read_limit) in windows.items():
        cs = weights.get(source, [])
        limited = read_limit is not None and len(cs) >= read_limit
        order = load_key if by_id[source].strategy == "least_loaded" else finish_key
        read[source] = Window(
            r["start"], r["weight"], r["bound"], order(cs[-1]) if limited else None
        )
    return _State(weights, read, takes, heads, known)


def _queued(r: asyncpg.Record) -> Queued:
    """A queued contact as routing_state and overflowed_queued read it."""
    skip = frozenset(r["skip"]) if r["skip"] else _NOBODY
    return Queued(r["id"], r["source_id"], r["lead_external_id"], skip, r["priority"])


async def _read_overflowed(
    conn: asyncpg.Connection,
    receiving: Sequence[int],
    by_id: dict[int, Route],
    heads: dict[int, Heads],
) -> dict[int, str]:
    """Add to `heads` the queued contacts of other sources that overflowed to these ones
    (in each one's order, as many as its operators could take). Returns their own
    sources' keys, which their events carry."""
    rows = await conn.fetch(
        Q.overflowed_queued, list(receiving), [by_id[s].lifo for s in receiving], MAX_DRAIN
    )
    read: dict[int, list[Queued]] = defaultdict(list)
    homes: dict[int, str] = {}
    for r in rows:
        read[r["source_id"]].append(_queued(r))
        homes[r["id"]] = r["home_key"]
    takes = {r["source_id"]: r["take"] for r in rows}
    for source in receiving:
        contacts = read.get(source, [])
        heads[source].add(contacts, full=len(contacts) >= takes.get(source, MAX_DRAIN))
    return homes


def _serving_order(
    fresh: Sequence[NewContact],
    heads: dict[int, Heads],
    sources: Sequence[int],
    source_ids: dict[str, int],
) -> list[Queued]:
    """Who is served first: each source's queue in its order, the fresh contacts that may
    be assigned now among them (with ids below zero until inserted: newer than any stored
    one), and the sources merged by priority, then age. A fresh contact may be placed
    only before everything its source did not read (a read that filled the source's take
    may have left older or more urgent contacts unread): else it is queued."""
    placeable = set(sources)
    queues = {s: list(heads[s].contacts) for s in sources}
    newcomers: list[Queued] = []
    for i, n in enumerate(fresh, 1):
        source = source_ids[n.body.source]
        q = Queued(-i, source, n.body.lead.external_id, priority=n.body.priority)
        if source in placeable and heads[source].placeable(q):
            queues[source].append(q)
            newcomers.append(q)
    if len(newcomers) == sum(map(len, queues.values())) and _in_arrival_order(newcomers, heads):
        return newcomers  # no backlog: arrival order (the common case, without sorting)
    ordered = {}
    for s in sources:
        h = Heads(heads[s].lifo, queues[s])
        ordered[s] = h.ordered()
    return serving_order(ordered)


def _in_arrival_order(newcomers: Sequence[Queued], heads: dict[int, Heads]) -> bool:
    """Whether serving these new contacts in arrival order is serving them by priority,
    then age: one priority among them, and no source newest first."""
    return len({q.priority for q in newcomers}) <= 1 and not any(
        heads[q.source_id].lifo for q in newcomers
    )


async def _decide(
    conn: asyncpg.Connection,
    state: _State,
    wanted: list[Queued],
    sources: Sequence[int],
    by_id: dict[int, Route],
    explain: decisions.Collector | None,
) -> Plan:
    """Who takes which contact, in the serving order (and, with `explain`, on what)."""
    preferred = await _previous_operators(conn, wanted, by_id, state.weights)
    return assign(
        wanted,
        state.weights,
        {s: by_id[s].strategy for s in sources},
        preferred,
        _rng,
        affinity_sources={s for s in sources if by_id[s].affinity_hours},
        windows=state.windows,
        explain=explain,
    )


async def _write_decisions(
    conn: asyncpg.Connection,
    decided: Plan,
    fresh: Sequence[NewContact],
    by_id: dict[int, Route],
    source_ids: dict[str, int],
    outcome: Outcome,
    events: EventWriter,
    homes: dict[int, str],
) -> None:
    """Assign the queued contacts given an operator, then insert the fresh ones."""
    earlier = [a for a in decided.assignments if a.contact_id > 0]
    # The smooth strategy's state goes with the first write, so that an operator filled
    # by the second one leaves at the batch's final clock (see migration 0013's trigger).
    smooth = _smooth_arrays(decided)
    if earlier:
        await _assign_queued(conn, earlier, by_id, outcome, events, smooth, homes)
    if fresh:
        placed = {-a.contact_id: a for a in decided.assignments if a.contact_id < 0}
        stored = _NO_SMOOTH if earlier else smooth
        await _insert(conn, fresh, placed, by_id, source_ids, outcome, events, stored)


_NO_SMOOTH: list[list[Any]] = [[], [], [], [], []]
_NOBODY: frozenset[int] = frozenset()


def _smooth_arrays(plan: Plan) -> list[list[Any]]:
    """The smooth state to store: starts ($ source ids, operator ids, starts), clocks
    (source ids, clocks)."""
    keys = list(plan.starts)
    return [
        [k[0] for k in keys],
        [k[1] for k in keys],
        [plan.starts[k] for k in keys],
        list(plan.clocks),
        list(plan.clocks.values()),
    ]


def _claims(assignments: Iterable[Assignment]) -> list[list[int]]:
    claimed = Counter(a.operator_id for a in assignments)
    ids = sorted(claimed)
    return [ids, [claimed[i] for i in ids]]


async def _assign_queued(
    conn: asyncpg.Connection,
    assignments: Sequence[Assignment],
    routes: dict[int, Route],
    outcome: Outcome,
    events: EventWriter,
    smooth: list[list[Any]],
    homes: dict[int, str],
) -> None:
    args = [
        [a.contact_id for a in assignments],
        [a.operator_id for a in assignments],
        *_claims(assignments),
        *smooth,
    ]
    timeouts = [routes[a.source_id].accept_timeout for a in assignments]  # 0: no offer
    routing = [a.source_id for a in assignments]  # an overflowed contact's: the target
    rows = {r["id"]: r for r in await conn.fetch(Q.assign_contacts, *args, timeouts, routing)}
    if len(rows) != len(assignments):
        # An operator chosen was filled or switched off by a concurrent transaction (or
        # the contact was taken: its source's lock makes that impossible): roll the whole
        # batch back rather than record a half-done routing, and retry it.
        raise CapacityTaken(f"assigned {len(rows)} of {len(assignments)} contacts")
    for a in assignments:
        row, route_ = rows[a.contact_id], routes[a.source_id]
        _assigned(outcome, route_, a.contact_id, a.operator_id)
        key = homes.get(a.contact_id, route_.key)  # an overflowed one keeps its own
        _given(events, route_, row, row["lead_external_id"], key, a)


async def _insert(
    conn: asyncpg.Connection,
    fresh: Sequence[NewContact],
    placed: dict[int, Assignment],  # by position in `fresh`, from 1
    routes: dict[int, Route],
    source_ids: dict[str, int],  # by key
    outcome: Outcome,
    events: EventWriter,
    smooth: list[list[Any]],
) -> None:
    """Upsert the leads of `fresh` and insert its contacts, assigned as `placed` says,
    claiming the operators' capacity in the same statement."""
    leads: dict[str, list[str | None]] = {}
    for item in fresh:  # later messages' fields win, as one by one
        lead = item.body.lead
        merged = leads.setdefault(lead.external_id, [None, None, None])
        for i, value in enumerate((lead.name, lead.email, lead.phone)):
            merged[i] = value if value is not None else merged[i]
    order = sorted(leads)
    operators = [placed[i].operator_id if i in placed else None for i in range(1, len(fresh) + 1)]
    args = [
        order,
        *([leads[e][i] for e in order] for i in range(3)),
        [i.body.lead.external_id for i in fresh],
        [source_ids[i.body.source] for i in fresh],
        operators,
        [i.body.message for i in fresh],
        [i.message_id for i in fresh],
        *smooth,
        [i.body.priority for i in fresh],
        [routes[source_ids[i.body.source]].accept_timeout for i in fresh],  # 0: no offer
    ]
    rows = await conn.fetch(Q.record_contacts, *args)
    if not all(r["claimed"] for r in rows):
        raise CapacityTaken("an operator's capacity was taken meanwhile: nothing recorded")
    position = {n.message_id: i for i, n in enumerate(fresh, 1)}
    for row in rows:
        message_id = row["inbound_message_id"]
        outcome.contacts[message_id] = row["id"]
        if events.recording:  # decided on as -position, before it had an id
            events.routing[row["id"]] = events.routing.get(-position[message_id], {})
        item = fresh[position[message_id] - 1]
        external_id, route_ = item.body.lead.external_id, routes[row["source_id"]]
        if row["operator_id"] is None:
            events.queued(row, external_id, route_.key)
        else:
            a = placed[position[message_id]]
            _assigned(outcome, route_, row["id"], a.operator_id)
            _given(events, route_, row, external_id, route_.key, a)
    # Inserted by a concurrent transaction after our check: duplicates all the same.
    outcome.duplicates.update(position.keys() - {r["inbound_message_id"] for r in rows})


def _given(
    events: EventWriter,
    route_: Route,
    row: asyncpg.Record,
    lead_external_id: str,
    source_key: str,
    a: Assignment,
) -> None:
    """The event of a contact routing gave an operator: offered, for a source that makes
    offers, else assigned."""
    if route_.accept_timeout:
        offers.offered(
            events, row, lead_external_id, source_key, a, row["attempt"], row["offer_expires_at"]
        )
    else:
        events.assigned(row, lead_external_id, source_key, a)


def _assigned(outcome: Outcome, route_: Route, contact_id: int, operator_id: int) -> None:
    """Given an operator: assigned, or offered (an assignment once accepted)."""
    outcome.assigned[contact_id] = operator_id
    if not route_.accept_timeout:
        outcome.assignments[(route_.key, route_.strategy)] += 1


async def _previous_operators(
    conn: asyncpg.Connection,
    queued: Sequence[Queued],
    routes: dict[int, Route],
    weights: dict[int, list[Candidate]],
) -> dict[int, int]:
    """Contact id -> the operator who had its lead through the same source lately. Those
    of them available for the source but not among what routing read of it are added
    to its candidates in `weights`."""
    wanted = [q for q in queued if routes[q.source_id].affinity_hours]
    if not wanted:
        return {}
    rows = await conn.fetch(
        Q.previous_operators,
        [q.id for q in wanted],
        [q.lead for q in wanted],
        [q.source_id for q in wanted],
        [routes[q.source_id].affinity_hours for q in wanted],
    )
    for r in rows:
        candidates = weights.get(r["source_id"])
        if r["weight"] is None or candidates is None:  # unavailable, or nobody is
            continue
        if all(c.id != r["operator_id"] for c in candidates):
            candidates.append(
                Candidate(
                    id=r["operator_id"],
                    weight=r["weight"],
                    open_load=r["open_load"],
                    max_load=r["max_load"],
                    last_assigned_at=r["last_assigned_at"],
                    start=r["start"],
                )
            )
    return {r["contact_id"]: r["operator_id"] for r in rows}
