"""What routing decided each contact on, for its history (`contacts explain`). Pure: no
I/O. `assign()` fills a `Collector` only when history is on; the event writer stores
each entry with the contact's event (worker/outbox.py), and worker/history.py reads it.

An entry is small and bounded, whatever the team: the candidates routing read for the
source (at most `SHOWN` of them, the first in the strategy's order at that point of the
batch, and always the one chosen), each as a compact row, and who was skipped and why:

    {"strategy": "smooth", "routed_by": 3, "read": 4, "clock": 0.75,
     "candidates": [[2, 1, 5, 3, 0.5, 0.9]], "skipped": [[4, "full"]], "result": "chosen"}

A candidate row is [operator id, load, max load, weight, *numbers], the numbers being the
strategy's: smooth, lag (weight * (clock - start): what they are owed, in contacts) and
finish (start + 1 / weight: the earliest takes it); least_loaded, load / weight;
weighted_random, the probability weight / total weight available. The load is the one
at that point of the batch (earlier contacts of the batch counted). `read` is how many
operators routing read for the source: for smooth, its window (the first few in the
smooth order); for the others, every available one. `result`: chosen (by the strategy),
affinity, nobody (every candidate full: queued), passed_over (only operators the contact
skips could take it), behind (an earlier contact of the source found nobody)."""

import heapq
from collections.abc import Mapping, Sequence, Set
from typing import Any

from worker.strategies import Candidate

SHOWN = 8  # candidates kept per decision
Detail = dict[str, Any]


class Collector:
    """The routing details of one `assign()` call, by queued contact id."""

    def __init__(self) -> None:
        self.details: dict[int, Detail] = {}
        self._blocked: dict[int, Detail] = {}  # per source: the decision that blocked it

    def behind(self, contact_id: int, source: int) -> None:
        """The source stopped at an earlier contact that nobody could take."""
        blocked = self._blocked.get(source)
        if blocked is not None:
            self.details[contact_id] = {**blocked, "result": "behind"}

    def smooth(
        self,
        contact_id: int,
        source: int,
        state: Any,  # assignment._Smooth
        load: Mapping[int, int],
        limit: Mapping[int, int],
        skip: Set[int],
        chosen: int | None,
        affinity: bool,
        passed_over: bool = False,
    ) -> None:
        """A smooth source's decision, after `state.choose` and before `state.took`: the
        eligible operators by the smooth order (the top of its heap, found in O(SHOWN log
        SHOWN)), the full ones it passed over, and the contact's skip list."""
        seen: set[int] = set()
        rows: list[list[Any]] = []
        skipped: list[list[Any]] = [[i, "skip"] for i in sorted(skip)]
        seen.update(skip)
        for operator_id in state.passed:  # full ones the choice popped
            if operator_id not in seen:
                seen.add(operator_id)
                skipped.append([operator_id, "full"])
        state.passed.clear()
        ready = state.ready
        frontier = [(ready[0][0], 0)] if ready else []
        steps = 0
        while frontier and len(rows) < SHOWN and steps < 4 * SHOWN:
            steps += 1
            _, i = heapq.heappop(frontier)
            _, operator_id, version = ready[i]
            for j in (2 * i + 1, 2 * i + 2):
                if j < len(ready):
                    heapq.heappush(frontier, (ready[j][0], j))
            if version != state.version[operator_id] or operator_id in seen:
                continue
            seen.add(operator_id)
            if load[operator_id] >= limit[operator_id]:
                skipped.append([operator_id, "full"])
            else:
                rows.append(_smooth_row(state, operator_id, load, limit))
        if chosen is not None and all(r[0] != chosen for r in rows):
            rows.insert(0, _smooth_row(state, chosen, load, limit))
        detail = {
            "strategy": "smooth",
            "routed_by": source,
            "read": len(state.by_id),
            "clock": round(state.clock, 6),
            "candidates": rows,
            "skipped": skipped[:SHOWN],
            "result": _result(chosen, affinity, passed_over),
        }
        self._keep(contact_id, source, detail, chosen, passed_over)

    def other(
        self,
        contact_id: int,
        source: int,
        strategy: str,
        candidates: Sequence[Candidate],
        load: Mapping[int, int],
        limit: Mapping[int, int],
        skip: Set[int],
        chosen: int | None,
        affinity: bool,
        passed_over: bool = False,
    ) -> None:
        """A weighted_random or least_loaded decision: every candidate read (the strategy
        looked at each), the first SHOWN by its order when there are more."""
        free = [c for c in candidates if load[c.id] < limit[c.id] and c.id not in skip]
        skipped: list[list[Any]] = [[i, "skip"] for i in sorted(skip)]
        skipped += [[c.id, "full"] for c in candidates if load[c.id] >= limit[c.id]][:SHOWN]
        if strategy == "least_loaded":
            if len(free) > SHOWN:
                free = heapq.nsmallest(SHOWN, free, key=lambda c: load[c.id] / c.weight)
            rows = [_row(c, load, limit, round(load[c.id] / c.weight, 4)) for c in free]
        else:
            total = sum(c.weight for c in free)
            if len(free) > SHOWN:
                free = heapq.nlargest(SHOWN, free, key=lambda c: c.weight)
            rows = [_row(c, load, limit, round(c.weight / total, 4)) for c in free]
        if chosen is not None and all(r[0] != chosen for r in rows):
            [c] = [c for c in candidates if c.id == chosen]
            rows.insert(0, _row(c, load, limit, None))
        detail = {
            "strategy": strategy,
            "routed_by": source,
            "read": len(candidates),
            "candidates": rows,
            "skipped": skipped[:SHOWN],
            "result": _result(chosen, affinity, passed_over),
        }
        self._keep(contact_id, source, detail, chosen, passed_over)

    def _keep(
        self, contact_id: int, source: int, detail: Detail, chosen: int | None, passed: bool
    ) -> None:
        self.details[contact_id] = detail
        if chosen is None and not passed:
            self._blocked[source] = detail


def _result(chosen: int | None, affinity: bool, passed_over: bool) -> str:
    if passed_over:
        return "passed_over"
    if chosen is None:
        return "nobody"
    return "affinity" if affinity else "chosen"


def _smooth_row(
    state: Any, operator_id: int, load: Mapping[int, int], limit: Mapping[int, int]
) -> list[Any]:
    weight = state.by_id[operator_id].weight
    start = state.start[operator_id]
    return [
        operator_id,
        load[operator_id],
        limit[operator_id],
        weight,
        round(weight * (state.clock - start), 4),
        round(start + 1 / weight, 6),
    ]


def _row(
    c: Candidate, load: Mapping[int, int], limit: Mapping[int, int], number: float | None
) -> list[Any]:
    return [c.id, load[c.id], limit[c.id], c.weight, number]


# Queued without routing reaching it in this transaction (worker/distribution.py).
NO_OPERATOR: Detail = {"result": "no_operator"}  # nobody available for the source
BEHIND_BACKLOG: Detail = {"result": "behind_backlog"}  # older contacts it did not read wait


# How history shows the rows: the names of each strategy's numbers.
NUMBERS: dict[str, tuple[str, ...]] = {
    "smooth": ("lag", "finish"),
    "least_loaded": ("load_per_weight",),
    "weighted_random": ("probability",),
}
CANDIDATE_FIELDS = ("operator_id", "load", "max_load", "weight")


def expand(detail: Detail) -> Detail:
    """A stored detail with its candidate and skipped rows as named fields (for --json
    and the tables)."""
    out = dict(detail)
    names = CANDIDATE_FIELDS + NUMBERS.get(detail.get("strategy", ""), ())
    out["candidates"] = [
        dict(zip(names, row, strict=False)) for row in detail.get("candidates", [])
    ]
    out["skipped"] = [{"operator_id": i, "why": why} for i, why in detail.get("skipped", [])]
    return out
