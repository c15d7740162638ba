"""Who takes which queued contact: the routing decision of a whole batch, as a pure
function of what the transaction read. No I/O, so it is tested alone."""

import heapq
import random
from collections.abc import Callable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from worker.decisions import Collector
from worker.strategies import Candidate, LoadKey, finish_key_of, load_key_of, smooth_next


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
    """A source's clock (smooth, weighted_random), the total weight of its available
    operators, and how its candidates were read: all of them (`bound` and `last` None), or
    at most a limit of them in the strategy's order, `last` being the order key of the
    last one read when the limit was reached (None when fewer were there), and for smooth
    only those whose start is below `bound`."""

    clock: float
    total: int
    bound: float | None = None
    last: tuple[Any, ...] | None = None

    @property
    def whole(self) -> bool:
        """Whether every available operator of the source was read."""
        return self.bound is None and self.last is None


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
        self._read(window, candidates)
        self.waiting = [(c.start, c.id, 0) for c in candidates]
        heapq.heapify(self.waiting)
        self.ready: list[tuple[tuple[float, int, int], int, int]] = []

    def _read(self, window: Window, candidates: Sequence[Candidate]) -> None:
        """What a smooth source and a race keep alike: all but their heaps."""
        self.window = window
        self.room = sum(c.open_load < c.max_load for c in candidates)  # how many can take one
        self.clock = window.clock
        self.total = window.total
        self.start = {c.id: c.start for c in candidates}
        self.by_id = {c.id: c for c in candidates}
        self.version = dict.fromkeys(self.start, 0)
        # The full ones a choice popped, for the history (None: not recording it).
        self.passed: list[int] | None = None

    def key(self, operator_id: int) -> tuple[float, int, int]:
        return finish_key_of(self.start[operator_id], self.by_id[operator_id].weight, operator_id)

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
            if self.passed is not None and version == self.version[operator_id]:
                self.passed.append(operator_id)
            heapq.heappop(self.ready)
        if not self.ready:
            # Nobody available is owed anything (those who left are owed much): the
            # earliest finish of all, which only a whole read can tell.
            if not self.window.whole:
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

    def took(self, operator_id: int, by_affinity: bool) -> bool:
        """`operator_id` took a contact (by the rule or by affinity: both count, so that
        shares stay fair). Returns whether the source's state changed."""
        self.start[operator_id] += 1 / self.by_id[operator_id].weight
        self._moved(self.waiting, operator_id, self.start[operator_id])
        if self.total > 0:
            self.clock += 1 / self.total
        return True

    def _moved(self, heap: list[tuple[Any, int, int]], operator_id: int, key: Any) -> None:
        """Their start moved: the entries of theirs in the heaps are stale from now on, and
        one with the new `key` goes into `heap`."""
        self.version[operator_id] += 1
        heapq.heappush(heap, (key, operator_id, self.version[operator_id]))

    def left(self, operator_id: int) -> bool:
        """`operator_id` filled up. Returns whether their start is stored as of leaving."""
        self.total -= self.by_id[operator_id].weight
        self.room -= 1
        return True


class _Race(_Smooth):
    """A weighted_random source's routing within a batch, as a race of exponential clocks
    (migration 0021): each operator's next turn is start + 1 / weight; the earliest turn
    among the available operators wins, the clock moves to it, and the winner's next turn
    is drawn an exponential wait (of rate their weight) later. Each contact thus goes to an
    operator with probability weight / (total available weight), whatever came before. A
    turn found behind the clock (its operator was skipped by a contact, or never drawn:
    `fresh`) is drawn again from the clock, which the memoryless wait allows."""

    def __init__(
        self, window: Window, candidates: Sequence[Candidate], rng: random.Random, fresh: bool
    ) -> None:
        self._read(window, candidates)
        self.rng = rng
        self.fresh = fresh  # no window given: `total` is every candidate's, full ones too
        self.drawn: set[int] = set()  # operators whose turn was drawn here, to be stored
        for c in candidates:
            if fresh or c.start + 1 / c.weight <= self.clock:
                self._draw(c.id)
        self.waiting = []  # no eligibility: every available operator is in the race
        self.ready = [(self.key(i), i, self.version[i]) for i in self.start]
        heapq.heapify(self.ready)

    def _draw(self, operator_id: int) -> None:
        """A turn drawn afresh from the clock (its heap entry is the caller's)."""
        weight = self.by_id[operator_id].weight
        self.start[operator_id] = self.clock + self.rng.expovariate(weight) - 1 / weight
        self.drawn.add(operator_id)

    def _choose(
        self,
        available: Callable[[int], bool],
        skip: Set[int],
        set_aside: list[tuple[tuple[float, int, int], int, int]],
    ) -> int | None:
        last = self.window.last
        if last is not None and last[0] <= self.clock:
            return None  # unread turns may be behind the clock too: only a whole read can tell
        while self.ready:
            key, operator_id, version = self.ready[0]
            if version != self.version[operator_id] or not available(operator_id):
                heapq.heappop(self.ready)
            elif key[0] <= self.clock:
                heapq.heappop(self.ready)
                self._draw(operator_id)
                self._moved(self.ready, operator_id, self.key(operator_id))
            elif operator_id in skip:
                set_aside.append(heapq.heappop(self.ready))
            elif last is not None and key > last:
                return None
            else:
                return operator_id
        return None

    def took(self, operator_id: int, by_affinity: bool) -> bool:
        """A contact given by affinity is not a turn of the race: nothing changes."""
        if by_affinity:
            return False
        self.clock = self.start[operator_id] + 1 / self.by_id[operator_id].weight
        self.start[operator_id] += self.rng.expovariate(self.by_id[operator_id].weight)
        self._moved(self.ready, operator_id, self.key(operator_id))
        return True


class _LoadOrder:
    """The least_loaded order of the operators at this point of the batch (their load in
    `load`, which `assign` counts), shared by the least_loaded sources of a batch. Kept
    only when one is in it: no other strategy reads a last assignment."""

    def __init__(self, weights: Mapping[int, Sequence[Candidate]], load: Mapping[int, int]) -> None:
        self.assigned_at = {c.id: c.last_assigned_at for cs in weights.values() for c in cs}
        self.load = load
        # Assigned in this batch: later than anything in the database, in batch order.
        self.latest = max(
            (at for at in self.assigned_at.values() if at is not None), default=datetime.now(UTC)
        )
        self.last: dict[int, datetime] = {}

    def key(self, operator_id: int, weight: int) -> LoadKey:
        """Their place in the order of a source that weights them `weight` (their load
        and last assignment are theirs, whatever the source)."""
        at = self.last.get(operator_id, self.assigned_at[operator_id])
        return load_key_of(self.load[operator_id], weight, at, operator_id)

    def took(self, operator_id: int, assignments: int) -> None:
        """`operator_id` took the batch's `assignments`-th contact."""
        self.last[operator_id] = self.latest + timedelta(microseconds=assignments)


class _Loaded:
    """A least_loaded source's routing within a batch: its read candidates in a heap in
    the strategy's order. Keys only grow within a batch (loads and last assignments rise),
    so an entry whose key is no longer its operator's (they took a contact, here or for
    another source) is pushed back with the new one when it comes up."""

    def __init__(self, window: Window, candidates: Sequence[Candidate], order: _LoadOrder) -> None:
        self.window = window
        self.room = sum(c.open_load < c.max_load for c in candidates)
        self.order = order
        self.weight = {c.id: c.weight for c in candidates}  # this source's
        self.heap = [(self.key(c.id), c.id) for c in candidates]
        heapq.heapify(self.heap)

    def key(self, operator_id: int) -> LoadKey:
        return self.order.key(operator_id, self.weight[operator_id])

    def choose(self, available: Callable[[int], bool], skip: Set[int] = frozenset()) -> int | None:
        """The first operator in the order among those `available` and not in `skip` (or
        None when the window cannot tell for sure, or only skipped ones are there)."""
        set_aside: list[tuple[LoadKey, int]] = []
        try:
            while self.heap:
                key, operator_id = self.heap[0]
                now = self.key(operator_id)
                if not available(operator_id):
                    heapq.heappop(self.heap)
                elif now != key:
                    heapq.heapreplace(self.heap, (now, operator_id))
                elif operator_id in skip:
                    set_aside.append(heapq.heappop(self.heap))
                elif self.window.last is not None and key > self.window.last:
                    return None
                else:
                    return operator_id
            return None
        finally:
            for item in set_aside:
                heapq.heappush(self.heap, item)

    def took(self, operator_id: int, by_affinity: bool) -> bool:
        return False  # the load it orders by is counted by `assign`

    def left(self, operator_id: int) -> bool:
        self.room -= 1
        return False


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

    `weights`: per source id, its available operators (those read in its window), with
    their load; `strategies`: per source id; `preferred`: per contact id, the operator who
    had its lead lately (for `affinity_sources`, a lead's earlier contact in this same
    batch counts too); `windows`: per source, its clock and how its candidates were read
    (without one, the candidates are all there are, owed nothing by a clock at 0, and
    weighted_random draws everyone's turn afresh); `explain`: filled with what each
    decision was made on (history)."""
    load = {c.id: c.open_load for candidates in weights.values() for c in candidates}
    limit = {c.id: c.max_load for candidates in weights.values() for c in candidates}

    def free(operator_id: int) -> bool:
        return load[operator_id] < limit[operator_id]

    order: _LoadOrder | None = None
    if any(strategies.get(source) == "least_loaded" for source in weights):
        order = _LoadOrder(weights, load)
    states: dict[int, _Smooth | _Loaded] = {}
    for source, candidates in weights.items():
        given = windows.get(source) if windows else None
        window = given or Window(0.0, sum(c.weight for c in candidates))
        strategy = strategies.get(source)
        if strategy == "weighted_random":
            states[source] = _Race(window, candidates, rng, fresh=given is None)
        elif strategy == "least_loaded":
            assert order is not None
            states[source] = _Loaded(window, candidates, order)
        else:
            states[source] = smooth = _Smooth(window, candidates)
            if explain is not None:
                smooth.passed = []
    # operator -> the sources they were read for: built when someone first fills up
    weighted_in: dict[int, list[int]] | None = None
    left_at: dict[tuple[int, int], float] = {}  # (source, operator) -> clock when they filled
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
        state = states.get(source)
        chosen_id: int | None
        if by_affinity:
            chosen_id = wanted
        elif state is None or not state.room:
            chosen_id = None
        elif skip:
            chosen_id = state.choose(free, skip)
            if chosen_id is None and state.window.whole:
                if explain is not None:
                    _explain(
                        explain, contact, state, candidates, strategies[source], load, limit,
                        None, False, passed_over=True,
                    )  # fmt: skip
                continue  # read whole: only operators it skips can take it
        else:
            chosen_id = state.choose(free)
        if explain is not None:
            _explain(
                explain, contact, state, candidates, strategies[source], load, limit,
                chosen_id, by_affinity,
            )  # fmt: skip
        if chosen_id is None:
            if state is not None and state.room:
                plan.unread.add(source)
            blocked.add(source)
            continue
        load[chosen_id] += 1
        if order is not None:
            order.took(chosen_id, len(plan.assignments) + 1)
        just_had[(contact.lead, source)] = chosen_id
        if state is not None and state.took(chosen_id, by_affinity):
            assert isinstance(state, _Smooth)
            plan.starts[(source, chosen_id)] = state.start[chosen_id]
            plan.clocks[source] = state.clock
        if load[chosen_id] >= limit[chosen_id]:
            # No longer available anywhere: the total of every source they were read for
            # drops from here on, and their start there (smooth, weighted_random) is
            # stored as if they left at the end of the batch (the database then keeps
            # start - clock).
            if weighted_in is None:
                weighted_in = {}
                for other, cs in weights.items():
                    for c in cs:
                        weighted_in.setdefault(c.id, []).append(other)
            for other in weighted_in.get(chosen_id, ()):
                there = states[other]
                if there.left(chosen_id):
                    assert isinstance(there, _Smooth)
                    left_at[(other, chosen_id)] = there.clock
        plan.assignments.append(Assignment(contact.id, source, chosen_id, by_affinity))
        done.add(contact.id)
    for source, state in states.items():
        if isinstance(state, _Race):
            for operator_id in state.drawn:
                plan.starts[(source, operator_id)] = state.start[operator_id]
            if state.drawn:
                plan.clocks[source] = state.clock
    for (source, operator_id), clock in left_at.items():
        there = states[source]
        assert isinstance(there, _Smooth)
        shifted = there.start[operator_id] + (there.clock - clock)
        if (source, operator_id) in plan.starts or shifted != there.by_id[operator_id].start:
            plan.starts[(source, operator_id)] = shifted
            plan.clocks[source] = there.clock
    return plan


def _explain(
    explain: Collector,
    contact: Queued,
    state: "_Smooth | _Loaded | None",
    candidates: Sequence[Candidate],
    strategy: str,
    load: Mapping[int, int],
    limit: Mapping[int, int],
    chosen: int | None,
    affinity: bool,
    passed_over: bool = False,
) -> None:
    """Hand the history's collector what this contact's decision was made on: a smooth
    source's heap of those owed something, or the candidates read (weighted_random,
    least_loaded: their window)."""
    if type(state) is _Smooth:
        explain.smooth(
            contact.id, contact.source_id, state, load, limit, contact.skip, chosen, affinity,
            passed_over,
        )  # fmt: skip
    else:
        explain.other(
            contact.id, contact.source_id, strategy, candidates, load, limit, contact.skip,
            chosen, affinity, passed_over,
            available_weight=state.total if isinstance(state, _Race) and not state.fresh else None,
        )  # fmt: skip
