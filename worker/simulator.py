"""Recorded traffic replayed through a routing, in memory: the arrivals and closes of a
period, event by event in time order, routed by the same pure code the worker runs
(`assignment.assign` and the strategies), with a state of its own that mirrors what the
database keeps (loads, the smooth clocks and starts, who had a lead). No I/O: simulate.py
reads the records and the routing, and reports.

Times are integer microseconds since the epoch, so that a replay of what really happened
lands on exactly the instants it happened at (a handling time added back to an assignment
time gives the recorded close)."""

import bisect
import heapq
import math
import random
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from worker.assignment import Plan, Queued, Window, assign
from worker.queue_order import Rank, rank, serving_order
from worker.strategies import Candidate

SECOND = 1_000_000  # microseconds
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def microseconds(at: datetime) -> int:
    return (at - EPOCH) // timedelta(microseconds=1)


@dataclass(frozen=True, slots=True)
class Operator:
    id: int  # below zero: an operator only the routing file names
    name: str
    max_load: int
    active: bool


@dataclass(frozen=True, slots=True)
class Source:
    id: int
    key: str
    strategy: str
    weights: Mapping[int, int]  # operator id -> weight
    affinity_hours: int | None = None
    lifo: bool = False
    overflow_to: int | None = None  # source id
    overflow_after: int | None = None  # seconds


@dataclass(frozen=True, slots=True)
class Routing:
    operators: Mapping[int, Operator]
    sources: Mapping[int, Source]


@dataclass(frozen=True, slots=True)
class Record:
    """A contact as recorded (times in microseconds)."""

    id: int
    source_id: int
    lead: str  # its lead's external id
    priority: int
    created: int
    assigned: int | None  # when it was (last) given an operator
    closed: int | None
    operator_id: int | None  # who has it now
    overflowed: bool = False  # it overflowed to another source
    expired: int = 0  # offers of it that lapsed unanswered

    @property
    def handling(self) -> int | None:
        """How long its operator had it: what a simulated assignment keeps it too."""
        if self.assigned is None or self.closed is None:
            return None
        return self.closed - self.assigned


@dataclass
class Report:
    """What happened to the contacts that arrived in the period."""

    assigned: Counter[tuple[str, int]] = field(default_factory=Counter)  # (source, op) -> n
    waits: list[int] = field(default_factory=list)  # microseconds, arrival to assignment
    queued: int = 0  # not given an operator on arrival
    overflowed: int = 0
    expired: int = 0
    given: dict[int, int] = field(default_factory=dict)  # contact -> its operator

    def as_dict(self) -> dict[str, object]:
        return {
            "assigned": [
                {"source": s, "operator_id": o, "count": n}
                for (s, o), n in sorted(self.assigned.items())
            ],
            "wait_seconds": {
                "p50": _seconds(_percentile(self.waits, 0.50)),
                "p95": _seconds(_percentile(self.waits, 0.95)),
                "max": _seconds(max(self.waits, default=None)),
            },
            "queued": self.queued,
            "overflowed": self.overflowed,
            "expired": self.expired,
        }


def _percentile(values: list[int], q: float) -> int | None:
    """Nearest rank: the smallest value with at least q of them at or below it."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(math.ceil(q * len(ordered)), 1) - 1]


def _seconds(us: int | None) -> float | None:
    return None if us is None else round(us / SECOND, 3)


def actual(records: Sequence[Record], routing: Routing, start: int, end: int) -> Report:
    """What really happened to the contacts that arrived in [start, end): an assignment
    counts when it came by `end`; queued means not given an operator in the transaction
    that recorded it."""
    report = Report()
    for r in records:
        if not start <= r.created < end:
            continue
        assigned = r.assigned is not None and r.assigned <= end
        if assigned and r.operator_id is not None:
            assert r.assigned is not None
            report.assigned[(routing.sources[r.source_id].key, r.operator_id)] += 1
            report.waits.append(r.assigned - r.created)
            report.given[r.id] = r.operator_id
        report.queued += not (assigned and r.assigned == r.created)
        report.overflowed += r.overflowed
        report.expired += r.expired
    return report


# Events at one instant: closes first, then arrivals (one routing transaction), then
# overflow timers.
_CLOSE, _OVERFLOW = 0, 2
_NONE: frozenset[int] = frozenset()


class _Queue:
    """One source's backlog in its order (its own contacts and those overflowed to it)."""

    def __init__(self, lifo: bool) -> None:
        self.lifo = lifo
        self.order: list[tuple[Rank, int]] = []
        self.contacts: dict[int, tuple[tuple[Rank, int], Queued]] = {}  # id -> (place, it)

    def add(self, q: Queued) -> None:
        place = (rank(q, self.lifo), q.id)
        bisect.insort(self.order, place)
        self.contacts[q.id] = (place, q)

    def remove(self, contact_id: int) -> None:
        found = self.contacts.pop(contact_id, None)
        if found is not None:
            del self.order[bisect.bisect_left(self.order, found[0])]

    def heads(self, take: int) -> list[Queued]:
        """The first `take`, as routing reads them (no more could be assigned)."""
        contacts = self.contacts
        return [contacts[i][1] for _, i in self.order[:take]]


class _Replay:
    def __init__(
        self, routing: Routing, records: Sequence[Record], start: int, end: int, seed: int
    ) -> None:
        self.routing = routing
        self.start, self.end = start, end
        self.rng = random.Random(seed)
        self.records = {r.id: r for r in records}
        self.load = dict.fromkeys(routing.operators, 0)
        self.last: dict[int, datetime] = {}  # operator -> their last assignment
        self.sources_of: dict[int, list[int]] = defaultdict(list)
        self.weights_of: dict[int, list[tuple[int, int]]] = defaultdict(list)  # (source, w)
        for s in routing.sources.values():
            for o, w in s.weights.items():
                self.sources_of[o].append(s.id)
                self.weights_of[o].append((s.id, w))
        # The smooth state as the database keeps it (migration 0013): per source a clock;
        # per weight row a start, stored as start - clock while its operator is away.
        self.clock: dict[int, float] = dict.fromkeys(routing.sources, 0.0)
        self.starts: dict[tuple[int, int], float] = {
            (s.id, o): 0.0 for s in routing.sources.values() for o in s.weights
        }
        self.queues = {s.id: _Queue(s.lifo) for s in routing.sources.values()}
        # Room per operator: max_load when active, 0 otherwise (or unknown to the routing).
        self.cap = {o.id: o.max_load if o.active else 0 for o in routing.operators.values()}
        # Per source, its available operators as routing would read them now: each kept
        # up to date whenever its operator's load, last assignment or start changes.
        self.candidates: dict[int, dict[int, Candidate]] = {s: {} for s in routing.sources}
        self.holder: dict[int, int] = {}  # open contact -> its operator
        self.had: dict[tuple[str, int], tuple[int, int]] = {}  # (lead, source) -> (created, op)
        self.events: list[tuple[int, int, int]] = []  # (time, kind, contact id)
        self.arrivals: list[Record] = []  # in time order
        self.strategies = {s.id: s.strategy for s in routing.sources.values()}
        self.affinity_sources = frozenset(
            s.id for s in routing.sources.values() if s.affinity_hours
        )
        self.affinity = bool(self.affinity_sources)
        self.report = Report()
        self.counted: set[int] = set()

    # --- the state ---

    def _refresh(self, operator_id: int) -> None:
        """Their candidates, after a change of their load, last assignment or starts."""
        load, cap = self.load[operator_id], self.cap[operator_id]
        if load < cap:
            last = self.last.get(operator_id)
            for s, weight in self.weights_of[operator_id]:
                self.candidates[s][operator_id] = Candidate(
                    operator_id, weight, load, cap, last, start=self.starts[(s, operator_id)]
                )
        else:
            for s, _ in self.weights_of[operator_id]:
                self.candidates[s].pop(operator_id, None)

    def _flip(self, operator_id: int, now_available: bool) -> None:
        """An operator became available or not: their starts turn absolute or relative."""
        for s in self.sources_of.get(operator_id, ()):
            key = (s, operator_id)
            self.starts[key] += self.clock[s] if now_available else -self.clock[s]

    def _take(self, operator_id: int) -> None:
        """One more contact (routing chose them: they had room)."""
        self.load[operator_id] += 1
        if self.load[operator_id] == self.cap[operator_id]:
            self._flip(operator_id, False)

    def _release(self, operator_id: int) -> None:
        before = self.load[operator_id]
        self.load[operator_id] = max(before - 1, 0)
        if before >= self.cap[operator_id] > self.load[operator_id]:
            self._flip(operator_id, True)
        self._refresh(operator_id)

    # --- setting up ---

    def seed(self, records: Sequence[Record]) -> set[int]:
        """Contacts before the period: those open at its start count toward their real
        operator's load until their real close, those queued wait in the backlog, and
        those given an operator lately tell affinity who had the lead. Returns the
        sources with a backlog at the start. (Nobody was routed yet: every smooth start
        is 0, and stays so whatever the load.)"""
        backlog: set[int] = set()
        for r in sorted(records, key=lambda r: (r.created, r.id)):
            if r.created >= self.start:
                if r.created < self.end:
                    self.counted.add(r.id)
                    self.arrivals.append(r)
                continue
            if r.closed is not None and r.closed <= self.start:
                if r.operator_id is not None and self.affinity:
                    self._had(r, r.operator_id)
                continue
            if r.assigned is not None and r.assigned <= self.start and r.operator_id is not None:
                self.holder[r.id] = r.operator_id
                self.load[r.operator_id] += 1
                if self.affinity:
                    self._had(r, r.operator_id)
                if r.closed is not None:
                    self._push(r.closed, _CLOSE, r.id)
            else:
                self._enqueue(r, self.start)
                backlog.add(r.source_id)
        return backlog

    def _push(self, at: int, kind: int, contact_id: int) -> None:
        if at <= self.end:
            heapq.heappush(self.events, (at, kind, contact_id))

    def _enqueue(self, r: Record, now: int) -> None:
        self.queues[r.source_id].add(Queued(r.id, r.source_id, r.lead, priority=r.priority))
        source = self.routing.sources[r.source_id]
        if source.overflow_to is not None and source.overflow_after:
            self._push(max(r.created + source.overflow_after * SECOND, now), _OVERFLOW, r.id)
        if r.handling is None and r.closed is not None:
            self._push(r.closed, _CLOSE, r.id)  # it went away unassigned: so it does here

    def _dequeue(self, r: Record) -> None:
        self.queues[r.source_id].remove(r.id)
        target = self.routing.sources[r.source_id].overflow_to
        if target is not None:
            self.queues[target].remove(r.id)

    def _had(self, r: Record, operator_id: int) -> None:
        key = (r.lead, r.source_id)
        if key not in self.had or self.had[key][0] <= r.created:
            self.had[key] = (r.created, operator_id)

    # --- running ---

    def run(self, backlog: set[int]) -> Report:
        for operator_id in self.sources_of:
            self._refresh(operator_id)
        if backlog:
            self._route(self.start, backlog)
        arrivals, events, n, i = self.arrivals, self.events, len(self.arrivals), 0
        while events or i < n:
            now = min(
                events[0][0] if events else self.end + 1,
                arrivals[i].created if i < n else self.end + 1,
            )
            drain: set[int] = set()
            while events and events[0][0] == now and events[0][1] == _CLOSE:
                drain.update(self._close(heapq.heappop(events)[2]))
            arriving: list[int] = []
            while i < n and arrivals[i].created == now:
                r = arrivals[i]
                i += 1
                self._enqueue(r, now)
                arriving.append(r.id)
                drain.add(r.source_id)
            while events and events[0][0] == now:
                _, kind, contact_id = heapq.heappop(events)
                if kind == _CLOSE:  # an arrival's own, at once
                    drain.update(self._close(contact_id))
                else:
                    drain.update(self._overflow(contact_id))
            assigned = self._route(now, drain) if drain else _NONE
            for contact_id in arriving:
                self.report.queued += contact_id not in assigned
        key = {s.id: s.key for s in self.routing.sources.values()}
        self.report.assigned.update(
            (key[self.records[c].source_id], o) for c, o in self.report.given.items()
        )
        return self.report

    def _close(self, contact_id: int) -> list[int]:
        """Close it: its operator's sources are routed (capacity may have appeared)."""
        operator_id = self.holder.pop(contact_id, None)
        if operator_id is None:  # queued (or gone): it leaves the backlog
            self._dequeue(self.records[contact_id])
            return []
        self._release(operator_id)
        return self.sources_of.get(operator_id, [])

    def _overflow(self, contact_id: int) -> list[int]:
        """Still queued `overflow_after` after it came: its target's operators may take it
        too (one hop: a target's own overflow is not followed)."""
        r = self.records[contact_id]
        if contact_id not in self.queues[r.source_id].contacts:
            return []
        target = self.routing.sources[r.source_id].overflow_to
        assert target is not None
        self.queues[target].add(Queued(contact_id, target, r.lead, priority=r.priority))
        if contact_id in self.counted:
            self.report.overflowed += 1
        return [target]

    def _route(self, now: int, source_ids: set[int]) -> Set[int]:
        """One routing transaction over these sources' backlogs, as the worker's reads it:
        each source's available operators, and as many of its first queued contacts as
        they have room for. Returns the contacts given an operator."""
        queues: dict[int, list[Queued]] = {}
        weights: dict[int, list[Candidate]] = {}
        windows: dict[int, Window] = {}
        for source_id in sorted(source_ids) if len(source_ids) > 1 else source_ids:
            queue, available = self.queues[source_id], self.candidates[source_id]
            if not queue.contacts or not available:
                continue
            candidates = weights[source_id] = list(available.values())
            # Each candidate has room for one at least: a queue no longer than them is
            # read whole.
            if len(queue.order) <= len(candidates):
                queues[source_id] = queue.heads(len(candidates))
            else:
                queues[source_id] = queue.heads(sum(c.max_load - c.open_load for c in candidates))
            if self.strategies[source_id] == "smooth":
                total = sum(c.weight for c in candidates)
                windows[source_id] = Window(self.clock[source_id], total)
        if not queues:
            return _NONE
        # One source's queue is its own serving order.
        wanted = serving_order(queues) if len(queues) > 1 else next(iter(queues.values()))
        preferred = self._preferred(wanted, now) if self.affinity else {}
        return self._apply(self._decide(wanted, weights, preferred, windows), now)

    def _preferred(self, wanted: Sequence[Queued], now: int) -> dict[int, int]:
        """Who had each contact's lead through the routing source within its affinity
        window (by the latest such contact)."""
        out: dict[int, int] = {}
        for q in wanted:
            hours = self.routing.sources[q.source_id].affinity_hours
            if not hours:
                continue
            had = self.had.get((q.lead, q.source_id))
            if had is not None and had[0] >= now - hours * 3600 * SECOND:
                out[q.id] = had[1]
        return out

    def _decide(
        self,
        wanted: list[Queued],
        weights: Mapping[int, Sequence[Candidate]],
        preferred: Mapping[int, int],
        windows: Mapping[int, Window],
    ) -> Plan:
        """The one call of the worker's routing decision. Every available operator of
        each source is among its candidates (none left unread), so a smooth source's
        window carries only its clock and total weight."""
        return assign(
            wanted,
            weights,
            self.strategies,
            preferred,
            self.rng,
            affinity_sources=self.affinity_sources,
            windows=windows,
        )

    def _apply(self, plan: Plan, now: int) -> set[int]:
        """Store what the plan decided, in the order the database does: the smooth state
        first, then the claims (an operator who fills keeps start - clock)."""
        self.starts.update(plan.starts)
        self.clock.update(plan.clocks)
        given: set[int] = set()
        # Whose candidates change: those who took a contact (their load, last assignment,
        # their smooth starts: a smooth start changes only with a contact taken). A
        # weighted_random turn drawn afresh changes a start too, but the next decision
        # draws afresh again (no window): it never reads it.
        touched: set[int] = set()
        at = EPOCH + timedelta(microseconds=now)
        records, counted, report = self.records, self.counted, self.report
        for a in plan.assignments:
            r, operator_id = records[a.contact_id], a.operator_id
            self.last[operator_id] = at
            self._take(operator_id)
            touched.add(operator_id)
            self.holder[r.id] = operator_id
            given.add(r.id)
            self._dequeue(r)
            if self.affinity:
                self._had(r, operator_id)
            if r.id in counted:
                report.waits.append(now - r.created)
                report.given[r.id] = operator_id
            if r.closed is not None and r.assigned is not None:  # handled for this long
                self._push(now + r.closed - r.assigned, _CLOSE, r.id)
        for operator_id in touched:
            self._refresh(operator_id)
        return given


def simulate(
    routing: Routing, records: Sequence[Record], start: int, end: int, seed: int = 0
) -> Report:
    """Replay `records` (every contact that arrived in [start, end), and those before it
    that were still open at `start` or tell affinity who had a lead) through `routing`.
    `seed` seeds weighted_random's choices."""
    replay = _Replay(routing, records, start, end, seed)
    return replay.run(replay.seed(records))
