"""Who takes which queued contact: the routing decision of a whole batch, as a pure
function of what the transaction read. No I/O, so it is tested alone."""

import heapq
import random
from collections.abc import Callable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from worker.decisions import Collector
from worker.strategies import STRATEGIES, Candidate, finish_key, smooth_next


@dataclass(frozen=True, slots=True)
class Queued:
    """An open contact without an operator, in its source's order (queue_order.py)."""

    id: int  # below zero: a contact of this batch, not yet inserted
    source_id: int  # the source routing it (another than its own when it overflowed)
    lead: str  # its lead's external id
    # Operators its offers skip (they declined it or let it lapse): never chosen for it.
    skip: frozenset[int] = frozenset()
    priority: int = 0


@dataclass(frozen=True, slots=True)
class Assignment:
    contact_id: int
    source_id: int
    operator_id: int
    affinity: bool


@dataclass(frozen=True, slots=True)
class Window:
    """A smooth source's clock, the total weight of its available operators, and how its
    candidates were read: all of them (`bound` None), or only those whose start is below
    `bound`, and at most a limit of them in the smooth order, `last` being the order key
    of the last one read when the limit was reached (None when fewer were there)."""

    clock: float
    total: int
    bound: float | None = None
    last: tuple[float, int, int] | None = None


@dataclass
class Plan:
    assignments: list[Assignment]
    # The smooth strategy's state to store: (source id, operator id) -> start, and
    # source id -> clock.
    starts: dict[tuple[int, int], float] = field(default_factory=dict)
    clocks: dict[int, float] = field(default_factory=dict)
    # Smooth sources whose window did not hold the next choice for sure: read them
    # whole and decide again (their contacts from there on are left out of this plan).
    unread: set[int] = field(default_factory=set)


class _Smooth:
    """One smooth source's routing within a batch: its clock, its total available weight
    and its read candidates in two heaps, those not yet eligible by start and the eligible
    ones by the smooth order, so that a contact costs O(log n) in the candidates read."""

    def __init__(self, window: Window, candidates: Sequence[Candidate]) -> None:
        self.window = window
        self.room = sum(c.open_load < c.max_load for c in candidates)  # how many can take one
        self.clock = window.clock
        self.total = window.total
        self.start = {c.id: c.start for c in candidates}
        self.by_id = {c.id: c for c in candidates}
        self.version = dict.fromkeys(self.start, 0)
        self.waiting = [(c.start, c.id, 0) for c in candidates]
        heapq.heapify(self.waiting)
        self.ready: list[tuple[tuple[float, int, int], int, int]] = []
        self.passed: list[int] = []  # the full ones a choice popped, for the history

    def key(self, operator_id: int) -> tuple[float, int, int]:
        c = self.by_id[operator_id]
        return finish_key(Candidate(c.id, c.weight, 0, 0, start=self.start[operator_id]))

    def choose(self, available: Callable[[int], bool], skip: Set[int] = frozenset()) -> int | None:
        """The next operator by the smooth rule among those `available` and not in `skip`
        (or None when the window cannot tell for sure, or only skipped ones are there)."""
        set_aside: list[tuple[tuple[float, int, int], int, int]] = []
        try:
            return self._choose(available, skip, set_aside)
        finally:
            for item in set_aside:  # skipped for this contact only
                heapq.heappush(self.ready, item)

    def _choose(
        self,
        available: Callable[[int], bool],
        skip: Set[int],
        set_aside: list[tuple[tuple[float, int, int], int, int]],
    ) -> int | None:
        if self.total <= 0:  # an operator available since the total was read: read again
            return None
        after = self.clock + 1 / self.total
        if self.window.bound is not None and after > self.window.bound:
            return None
        while self.waiting and self.waiting[0][0] < after:
            _, operator_id, version = heapq.heappop(self.waiting)
            if version == self.version[operator_id]:
                heapq.heappush(self.ready, (self.key(operator_id), operator_id, version))
        while self.ready:
            key, operator_id, version = self.ready[0]
            if version == self.version[operator_id] and available(operator_id):
                if operator_id not in skip:
                    break
                set_aside.append(heapq.heappop(self.ready))
                continue
            if version == self.version[operator_id]:
                self.passed.append(operator_id)
            heapq.heappop(self.ready)
        if not self.ready:
            # Nobody available is owed anything (those who left are owed much): the
            # earliest finish of all, which only a whole read can tell.
            if self.window.bound is not None:
                return None
            here = [c for i, c in self.by_id.items() if available(i) and i not in skip]
            if not here:  # only operators the contact skips can take one
                return None
            return smooth_next(
                [Candidate(c.id, c.weight, 0, 0, start=self.start[c.id]) for c in here],
                self.clock,
                self.total,
            ).id
        key, operator_id, _ = self.ready[0]
        if self.window.last is not None and key > self.window.last:
            return None
        return operator_id

    def took(self, operator_id: int) -> None:
        """`operator_id` took a contact (by the rule or by affinity)."""
        self.start[operator_id] += 1 / self.by_id[operator_id].weight
        self.version[operator_id] += 1
        heapq.heappush(
            self.waiting, (self.start[operator_id], operator_id, self.version[operator_id])
        )
        if self.total > 0:
            self.clock += 1 / self.total


def assign(
    queued: Sequence[Queued],
    weights: Mapping[int, Sequence[Candidate]],
    strategies: Mapping[int, str],
    preferred: Mapping[int, int],
    rng: random.Random,
    affinity_sources: Set[int] = frozenset(),
    windows: Mapping[int, Window] | None = None,
    explain: Collector | None = None,
) -> Plan:
    """Walk the queues in the order given (each source's in its own order, see
    queue_order.py) and give each contact to an operator of that source who is active and
    below max_load, by the source's strategy (or to its `preferred` operator: affinity).
    Capacity is shared across sources: every assignment uses one unit of the operator's,
    whichever source it is for. A source stops at its first contact nobody can take, so
    the contacts before it in its order are never overtaken; a contact only the operators
    it skips could take (`Queued.skip`: they declined it or let its offer lapse) is passed
    over, and waits for someone else.

    `weights`: per source id, its available operators (for a smooth source, those read in
    its window), with their load; `strategies`: per source id; `preferred`: per contact id,
    the operator who had its lead lately (for `affinity_sources`, a lead's earlier contact
    in this same batch counts too); `windows`: per smooth source, its clock and how its
    candidates were read (without one, the candidates are all there are, owed nothing
    by a clock at 0); `explain`: filled with what each decision was made on (history)."""
    load: dict[int, int] = {}
    limit: dict[int, int] = {}
    for candidates in weights.values():
        for c in candidates:
            load[c.id], limit[c.id] = c.open_load, c.max_load
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
    smooth: dict[int, _Smooth] = {}
    for source, candidates in weights.items():
        if strategies.get(source) == "smooth":
            window = (windows or {}).get(source) or Window(0.0, sum(c.weight for c in candidates))
            smooth[source] = _Smooth(window, candidates)
    weighted_in: dict[int, list[int]] = {}  # operator -> the smooth sources they were read for
    for source, state in smooth.items():
        for operator_id in state.start:
            weighted_in.setdefault(operator_id, []).append(source)
    left_at: dict[tuple[int, int], float] = {}  # (source, operator) -> clock when they filled
    last: dict[int, datetime] = {}
    just_had: dict[tuple[str, int], int] = {}  # (lead, source) -> operator, this batch
    plan = Plan([])
    blocked: set[int] = set()
    done: set[int] = set()  # an overflowed contact is in two sources' queues
    for contact in queued:
        source = contact.source_id
        if source in blocked or contact.id in done:
            if explain is not None and contact.id not in done:
                explain.behind(contact.id, source)
            continue
        candidates = weights.get(source, ())
        wanted = preferred.get(contact.id)
        if source in affinity_sources:
            wanted = just_had.get((contact.lead, source), wanted)
        skip = contact.skip
        by_affinity = (
            wanted is not None
            and wanted not in skip
            and load.get(wanted, 0) < limit.get(wanted, 0)
            and any(c.id == wanted for c in candidates)
        )
        chosen_id: int | None
        if by_affinity:
            chosen_id = wanted
        elif source in smooth:
            state = smooth[source]
            if not state.room:
                chosen_id = None
            elif skip:
                chosen_id = state.choose(lambda i: load[i] < limit[i], skip)
                if chosen_id is None and state.window.bound is None:
                    if explain is not None:
                        explain.smooth(
                            contact.id, source, state, load, limit, skip, None, False, True
                        )
                    continue  # read whole: only operators it skips can take it
            else:
                chosen_id = state.choose(lambda i: load[i] < limit[i])
            if chosen_id is None and state.room:
                plan.unread.add(source)
        else:
            # Built directly: dataclasses.replace() would dominate a batch's routing time.
            available = [
                Candidate(
                    c.id, c.weight, load[c.id], c.max_load, last.get(c.id, c.last_assigned_at)
                )
                for c in candidates
                if load[c.id] < limit[c.id] and c.id not in skip
            ]
            if not available and skip and any(load[c.id] < limit[c.id] for c in candidates):
                if explain is not None:
                    explain.other(
                        contact.id, source, strategies[source], candidates, load, limit, skip,
                        None, False, True,
                    )  # fmt: skip
                continue  # only operators it skips can take it
            chosen_id = STRATEGIES[strategies[source]](available, rng).id if available else None
        if explain is not None:
            if source in smooth:
                explain.smooth(
                    contact.id, source, smooth[source], load, limit, skip, chosen_id, by_affinity
                )
            else:
                explain.other(
                    contact.id, source, strategies[source], candidates, load, limit, skip,
                    chosen_id, by_affinity,
                )  # fmt: skip
        if chosen_id is None:
            blocked.add(source)
            continue
        load[chosen_id] += 1
        last[chosen_id] = latest + timedelta(microseconds=len(plan.assignments) + 1)
        just_had[(contact.lead, source)] = chosen_id
        if source in smooth:  # affinity counts too, so shares stay fair
            state = smooth[source]
            state.took(chosen_id)
            plan.starts[(source, chosen_id)] = state.start[chosen_id]
            plan.clocks[source] = state.clock
        if load[chosen_id] >= limit[chosen_id]:
            # No longer available anywhere: the total of every smooth source they were
            # read for drops from here on, and their start there is stored as if they
            # left at the end of the batch (the database then keeps start - clock).
            for other in weighted_in.get(chosen_id, ()):
                state = smooth[other]
                state.total -= state.by_id[chosen_id].weight
                state.room -= 1
                left_at[(other, chosen_id)] = state.clock
        plan.assignments.append(Assignment(contact.id, source, chosen_id, by_affinity))
        done.add(contact.id)
    for (source, operator_id), clock in left_at.items():
        state = smooth[source]
        shifted = state.start[operator_id] + (state.clock - clock)
        if (source, operator_id) in plan.starts or shifted != state.by_id[operator_id].start:
            plan.starts[(source, operator_id)] = shifted
            plan.clocks[source] = state.clock
    return plan
