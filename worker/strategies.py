"""How to choose an operator among the available candidates. Pure: no I/O."""

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True, slots=True)
class Candidate:
    """An operator who may take a contact of the source right now."""

    id: int
    weight: int
    open_load: int
    max_load: int
    last_assigned_at: datetime | None = None
    lag: float = 0.0  # smooth: contacts owed (+) or ahead (-) relative to the exact share
    start: float = 0.0  # smooth, as virtual time: where their next contact starts


Strategy = Callable[[Sequence[Candidate], random.Random], Candidate]


def weighted_random(candidates: Sequence[Candidate], rng: random.Random) -> Candidate:
    """Probability weight / sum of the candidates' weights. (Routing runs it as a race of
    exponential clocks over a window of candidates, see assignment.py: the same law.)"""
    if not candidates:
        raise ValueError("no candidates")
    return rng.choices(candidates, weights=[c.weight for c in candidates], k=1)[0]


def smooth(candidates: Sequence[Candidate], rng: random.Random) -> Candidate:
    """Smooth weighted round robin that keeps every operator within one contact of their
    exact share. Each available operator is owed weight / (total weight of the available
    ones) per contact; `lag` is what they are owed so far. Among those still owed
    something after this contact (so nobody gets ahead of their share by a whole contact),
    the one who would otherwise fall a whole contact behind soonest takes it (ties: larger
    weight, then lower id). nginx's algorithm (the one owed most takes it) can leave an
    operator more than one contact behind (weights 1,1,1,1,1,20,76 at the 76th contact);
    this earliest-deadline variant cannot while availability holds. Deterministic."""
    if not candidates:
        raise ValueError("no candidates")
    total = sum(c.weight for c in candidates)

    def owed(c: Candidate) -> float:
        return c.lag + c.weight / total

    # Nobody is owed anything only when operators who left are owed a lot: take the
    # one owed most.
    eligible = [c for c in candidates if owed(c) > 0] or candidates
    return min(eligible, key=lambda c: ((1 - owed(c)) * total / c.weight, -c.weight, c.id))


def smooth_lags(candidates: Sequence[Candidate], chosen_id: int) -> dict[int, float]:
    """The candidates' lags after `chosen_id` took a contact: everyone available is owed
    their share of it, and the one who took it has been paid one contact."""
    total = sum(c.weight for c in candidates)
    return {
        c.id: c.lag + c.weight / total - (1.0 if c.id == chosen_id else 0.0) for c in candidates
    }


def smooth_next(candidates: Sequence[Candidate], clock: float, total: int) -> Candidate:
    """`smooth` in virtual time, which is how routing runs it: the state is a clock per
    source, `clock`, that advances by 1 / `total` (the available operators' total weight)
    per contact, and a start per operator that advances by 1 / weight when they take one.
    What `smooth` calls lag is weight * (clock - start); owed after this contact > 0 is
    start < clock + 1 / total, and the deadline (1 - owed) * total / weight is
    total * (start + 1 / weight - clock - 1 / total): the earliest virtual finish
    start + 1 / weight wins, with the same ties. So both choose alike (the property tests
    compare them), but a contact changes only the clock and the chosen one's start, and
    the candidates can be read from an index in finish order: the choice needs no sum
    over the team but `total`."""
    if not candidates:
        raise ValueError("no candidates")
    after = clock + 1 / total
    eligible = [c for c in candidates if c.start < after] or candidates
    return min(eligible, key=finish_key)


def finish_key(c: Candidate) -> tuple[float, int, int]:
    """The smooth order: earliest virtual finish, then the larger weight, then the lower id
    (the order of the available-weights index)."""
    return finish_key_of(c.start, c.weight, c.id)


def finish_key_of(start: float, weight: int, operator_id: int) -> tuple[float, int, int]:
    """`finish_key` of plain values, for routing's heaps (no Candidate built per key)."""
    return (start + 1 / weight, -weight, operator_id)


def least_loaded(candidates: Sequence[Candidate], rng: random.Random) -> Candidate:
    """Lowest open load per unit of weight; ties to the larger weight, then to whoever
    waited longest since their last assignment (never assigned counts as longest)."""
    if not candidates:
        raise ValueError("no candidates")
    return min(candidates, key=load_key)


LoadKey = tuple[float, int, bool, datetime, int]


def load_key(c: Candidate) -> LoadKey:
    """The least_loaded order (that of the least_loaded weights index, migration 0021)."""
    return load_key_of(c.open_load, c.weight, c.last_assigned_at, c.id)


def load_key_of(load: int, weight: int, at: datetime | None, operator_id: int) -> LoadKey:
    """`load_key` of plain values, for routing's heap (no Candidate built per key)."""
    return (load / weight, -weight, at is not None, at or datetime.min, operator_id)


STRATEGIES: dict[str, Strategy] = {
    "smooth": smooth,
    "weighted_random": weighted_random,
    "least_loaded": least_loaded,
}
DEFAULT_STRATEGY = "smooth"
