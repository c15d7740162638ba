"""The order a backlog is served in: by priority (higher first), then by age (oldest
first, or newest first for a `lifo` source), and across the sources that share
operators, whichever head comes first by priority, then age. Pure, so it is tested
alone; distribution.py reads the heads and hands the merged order to `assign`."""

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from worker.assignment import Queued

# The batch's new contacts have ids below zero until inserted: they are newer than any
# stored contact, in batch order (-1 first).
_NEWCOMER = 1 << 62

Rank = tuple[int, int]


def age(q: Queued) -> int:
    """Lower is older: stored contacts by id, then the batch's new ones in batch order."""
    return q.id if q.id > 0 else _NEWCOMER - q.id


def rank(q: Queued, lifo: bool) -> Rank:
    """Where `q` stands in its source's queue: priority first, then age (or youth)."""
    return (-q.priority, -age(q) if lifo else age(q))


@dataclass
class Heads:
    """What routing read of one source's queue (its own contacts, and those overflowing to
    it): the first ones in its order, and, when a read stopped at its limit, the rank of
    the last one it read (anything not read comes after it)."""

    lifo: bool
    contacts: list[Queued]
    boundary: Rank | None = None

    def add(self, read: Sequence[Queued], full: bool) -> None:
        """Add what one read returned (in the source's order); `full`: it stopped at its
        limit, so more may wait after it."""
        self.contacts.extend(read)
        if full and read:
            last = rank(read[-1], self.lifo)
            self.boundary = last if self.boundary is None else min(self.boundary, last)

    def placeable(self, newcomer: Queued) -> bool:
        """Whether a new contact comes before everything this source did not read, so
        that it may be assigned now without overtaking a waiting one."""
        return self.boundary is None or rank(newcomer, self.lifo) < self.boundary

    def ordered(self) -> list[Queued]:
        """Its contacts in its order, each once (an overflowed contact may be read twice
        when its own source is routed too)."""
        seen: set[int] = set()
        out = []
        for q in sorted(self.contacts, key=lambda q: rank(q, self.lifo)):
            if q.id not in seen:
                seen.add(q.id)
                out.append(q)
        return out


def serving_order(queues: Mapping[int, Sequence[Queued]]) -> list[Queued]:
    """Merge the sources' queues (each in its own order) into the order capacity is
    handed out in: at each step the head that comes first by priority, then age, ties
    to the lower source id. A source's own order is never broken (a `lifo` source's
    head is its newest), so each source still stops at its first contact nobody can
    take."""
    heap = [(_merge_key(qs[0], source), source, 0) for source, qs in queues.items() if qs]
    heapq.heapify(heap)
    out: list[Queued] = []
    while heap:
        _, source, i = heapq.heappop(heap)
        qs = queues[source]
        out.append(qs[i])
        if i + 1 < len(qs):
            heapq.heappush(heap, (_merge_key(qs[i + 1], source), source, i + 1))
    return out


def _merge_key(head: Queued, source: int) -> tuple[int, int, int]:
    return (-head.priority, age(head), source)
