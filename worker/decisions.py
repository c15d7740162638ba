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
operators routing read for the source: its window (the first few in the strategy's
order). `result`: chosen (by the strategy),
affinity, nobody (every candidate full: queued), passed_over (only operators the contact
skips could take it), behind (an earlier contact of the source found nobody)."""

import heapq
from collections.abc import Iterator, Mapping, Sequence, Set
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
        eligible operators (its heap of those owed something; past SHOWN, the first by
        the smooth order, found in O(SHOWN log SHOWN)), the full ones the choice passed
        over, and the contact's skip list."""
        rows: list[list[Any]] = []
        skipped: list[list[Any]] = [[i, "skip"] for i in sorted(skip)] if skip else []
        seen = set(skip)
        if state.passed:  # full ones the choice popped
            for operator_id in state.passed:
                if operator_id not in seen:
                    seen.add(operator_id)
                    skipped.append([operator_id, "full"])
            state.passed.clear()
        by_id, start, version = state.by_id, state.start, state.version
        for operator_id, current in _first(state, version):
            if len(rows) == SHOWN:
                break
            if current != version[operator_id] or operator_id in seen:
                continue
            seen.add(operator_id)
            if load[operator_id] >= limit[operator_id]:
                skipped.append([operator_id, "full"])
            else:
                rows.append(
                    [
                        operator_id,
                        load[operator_id],
                        limit[operator_id],
                        by_id[operator_id].weight,
                        start[operator_id],
                    ]
                )
        if chosen is not None and chosen not in seen:
            w = by_id[chosen].weight
            rows.insert(0, [chosen, load[chosen], limit[chosen], w, start[chosen]])
        detail = {"strategy": "smooth", "routed_by": source, "read": len(by_id)}
        detail["clock"] = state.clock
        self._keep(contact_id, source, detail, rows, skipped, chosen, affinity, passed_over)

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
        available_weight: int | None = None,
    ) -> None:
        """A weighted_random or least_loaded decision: the candidates read (its window),
        the first SHOWN by its order when there are more. `available_weight`: the total
        weight of the source's available operators at that point, read or not
        (weighted_random's denominator, less those read whom the contact skips; those it
        skips that were not read stay in it); without it, that of the free candidates."""
        free = [c for c in candidates if load[c.id] < limit[c.id] and c.id not in skip]
        skipped: list[list[Any]] = [[i, "skip"] for i in sorted(skip)]
        skipped += [[c.id, "full"] for c in candidates if load[c.id] >= limit[c.id]][:SHOWN]
        total = sum(c.weight for c in free)
        if available_weight is not None:  # less those read whom the contact skips
            total = available_weight - sum(
                c.weight for c in candidates if c.id in skip and load[c.id] < limit[c.id]
            )
        shown = free
        if len(free) > SHOWN:
            if strategy == "least_loaded":
                shown = heapq.nsmallest(SHOWN, free, key=lambda c: load[c.id] / c.weight)
            else:
                shown = heapq.nlargest(SHOWN, free, key=lambda c: c.weight)
        if chosen is not None and all(c.id != chosen for c in shown):
            shown = [c for c in candidates if c.id == chosen] + shown
        rows = [[c.id, load[c.id], limit[c.id], c.weight] for c in shown]
        detail = {"strategy": strategy, "routed_by": source, "read": len(candidates)}
        detail["total_weight"] = total  # weighted_random's denominator
        self._keep(contact_id, source, detail, rows, skipped, chosen, affinity, passed_over)

    def _keep(
        self,
        contact_id: int,
        source: int,
        detail: Detail,
        rows: list[list[Any]],
        skipped: list[list[Any]],
        chosen: int | None,
        affinity: bool,
        passed_over: bool,
    ) -> None:
        """Complete the decision's `detail` (its candidate rows, the result, who was
        skipped) and keep it; one that found nobody is what the source's later contacts
        were behind."""
        detail["candidates"] = rows
        detail["result"] = _result(chosen, affinity, passed_over)
        if skipped:
            detail["skipped"] = skipped[:SHOWN]
        self.details[contact_id] = detail
        if chosen is None and not passed_over:
            self._blocked[source] = detail


def _first(state: Any, version: Mapping[int, int]) -> Iterator[tuple[int, int]]:
    """(operator id, version) of the operators to show of a smooth source: every one
    read when they are few (those not owed anything yet too: their lag says so), else
    the first of those owed something in the smooth order (a walk of the eligible heap
    from its root, at most 4 * SHOWN entries looked at, stale ones included)."""
    if len(state.by_id) <= SHOWN:
        for operator_id in state.by_id:
            yield operator_id, version[operator_id]
        return
    ready = state.ready
    if not ready:
        return
    frontier = [(ready[0][0], 0)]
    for _ in range(4 * SHOWN):
        if not frontier:
            return
        _, i = heapq.heappop(frontier)
        for j in (2 * i + 1, 2 * i + 2):
            if j < len(ready):
                heapq.heappush(frontier, (ready[j][0], j))
        yield ready[i][1], ready[i][2]


def _result(chosen: int | None, affinity: bool, passed_over: bool) -> str:
    if passed_over:
        return "passed_over"
    if chosen is None:
        return "nobody"
    return "affinity" if affinity else "chosen"


# Queued without routing reaching it in this transaction (worker/distribution.py).
NO_OPERATOR: Detail = {"result": "no_operator"}  # nobody available for the source
BEHIND_BACKLOG: Detail = {"result": "behind_backlog"}  # older contacts it did not read wait


CANDIDATE_FIELDS = ("operator_id", "load", "max_load", "weight")


def expand(detail: Detail) -> Detail:
    """A stored detail as `contacts explain` shows it: candidate and skipped rows as
    named fields, with the strategy's numbers worked out (smooth: lag and finish from
    the start stored; least_loaded: load per weight; weighted_random: probability),
    the candidates in the strategy's order."""
    out = dict(detail)
    out.pop("total_weight", None)
    strategy = detail.get("strategy")
    rows = []
    for row in detail.get("candidates", []):
        c = dict(zip(CANDIDATE_FIELDS, row, strict=False))
        if strategy == "smooth":
            start = row[4]
            c["lag"] = round(c["weight"] * (detail["clock"] - start), 4)
            c["finish"] = round(start + 1 / c["weight"], 6)
        elif strategy == "least_loaded":
            c["load_per_weight"] = round(c["load"] / c["weight"], 4)
        elif detail.get("total_weight"):
            c["probability"] = round(c["weight"] / detail["total_weight"], 4)
        rows.append(c)
    if strategy == "smooth":
        rows.sort(key=lambda c: (c["finish"], -c["weight"], c["operator_id"]))
    elif strategy == "least_loaded":
        rows.sort(key=lambda c: (c["load_per_weight"], -c["weight"]))
    out["candidates"] = rows
    if "clock" in out:
        out["clock"] = round(out["clock"], 6)
    out["skipped"] = [{"operator_id": i, "why": why} for i, why in detail.get("skipped", [])]
    return out
