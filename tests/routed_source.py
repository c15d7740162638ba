"""One source routed as the worker routes it, for the property tests of the strategies
that keep a clock (tests/unit/test_smooth_routed.py, test_bounded_routing.py): `assign`
over a window of candidates read as `routing_state` reads them, read again whole when the
window cannot vouch for a choice, with the state the database keeps: the source's clock
and per operator a start (available) or start - clock (unavailable, as the trigger of
migration 0013 keeps it)."""

import heapq
import random
from collections.abc import Sequence

from worker.assignment import Queued, Window, assign
from worker.strategies import Candidate, finish_key

BIG = 10**9  # max_load: nobody fills up


class RoutedSource:
    def __init__(
        self, strategy: str, weights: Sequence[int], start: list[float], rng: random.Random
    ) -> None:
        self.strategy = strategy
        self.weights = list(weights)
        self.rng = rng
        self.clock = 0.0
        self.start = start
        self.available = [True] * len(weights)
        self.rereads = 0  # batches whose window did not hold a choice

    def set_available(self, available: Sequence[bool]) -> None:
        """What the trigger of migration 0013 does when availability flips."""
        for i, ok in enumerate(available):
            if ok and not self.available[i]:
                self.start[i] += self.clock
            elif not ok and self.available[i]:
                self.start[i] -= self.clock
            self.available[i] = ok

    def read(self, k: int, whole: bool) -> tuple[list[Candidate], Window]:
        """routing_state's window for k contacts: at most 2k + 8 in the index's order, and
        for smooth only those below the batch's bound."""
        total = sum(w for w, ok in zip(self.weights, self.available, strict=True) if ok)
        everyone = [
            Candidate(i, w, 0, BIG, start=self.start[i])
            for i, w in enumerate(self.weights)
            if self.available[i]
        ]
        if whole:
            return sorted(everyone, key=finish_key), Window(self.clock, total)
        bound = self.clock + (k + 1) / total if self.strategy == "smooth" else None
        limit = 2 * k + 8
        below = (c for c in everyone if bound is None or c.start < bound)
        read = heapq.nsmallest(limit, below, key=finish_key)
        last = finish_key(read[-1]) if len(read) >= limit else None
        return read, Window(self.clock, total, bound, last)

    def route(self, contacts: Sequence[Queued]) -> list[int]:
        """Route a batch as distribution._drain does; returns who took them, in order."""
        whole = False
        while True:
            candidates, window = self.read(len(contacts), whole)
            plan = assign(
                contacts,
                {1: candidates},
                {1: self.strategy},
                {},
                self.rng,
                windows={1: window},
            )
            if not plan.unread:
                break
            whole = True
            self.rereads += 1
        for (_, operator_id), start in plan.starts.items():
            self.start[operator_id] = start
        self.clock = plan.clocks.get(1, self.clock)
        return [a.operator_id for a in plan.assignments]
