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


Strategy = Callable[[Sequence[Candidate], random.Random], Candidate]


def weighted_random(candidates: Sequence[Candidate], rng: random.Random) -> Candidate:
    """Probability weight / sum of the candidates' weights."""
    if not candidates:
        raise ValueError("no candidates")
    return rng.choices(candidates, weights=[c.weight for c in candidates], k=1)[0]


def least_loaded(candidates: Sequence[Candidate], rng: random.Random) -> Candidate:
    """Lowest open load per unit of weight; ties to the larger weight, then to whoever
    waited longest since their last assignment (never assigned counts as longest)."""
    if not candidates:
        raise ValueError("no candidates")
    return min(
        candidates,
        key=lambda c: (
            c.open_load / c.weight,
            -c.weight,
            c.last_assigned_at is not None,
            c.last_assigned_at or datetime.min,
            c.id,
        ),
    )


STRATEGIES: dict[str, Strategy] = {
    "weighted_random": weighted_random,
    "least_loaded": least_loaded,
}
DEFAULT_STRATEGY = "weighted_random"
