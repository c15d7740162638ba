"""The routing strategies: weighted_random's distribution and least_loaded's order."""

import random
from collections import Counter
from datetime import UTC, datetime, timedelta, timezone
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.strategies import (
    DEFAULT_STRATEGY,
    STRATEGIES,
    Candidate,
    Strategy,
    least_loaded,
    weighted_random,
)

DRAWS = 60_000
# Chi-square critical values at p = 0.001 by degrees of freedom.
CRITICAL = {1: 10.83, 2: 13.82}
T0 = datetime(2024, 1, 1, 12, 0, tzinfo=UTC)


def candidate(
    id: int, weight: int = 1, load: int = 0, max_load: int = 10, last: datetime | None = None
) -> Candidate:
    return Candidate(id=id, weight=weight, open_load=load, max_load=max_load, last_assigned_at=last)


def chi_square(observed: Counter[int], candidates: list[Candidate], draws: int) -> float:
    total = sum(c.weight for c in candidates)
    statistic = 0.0
    for c in candidates:
        expected = draws * c.weight / total
        statistic += (observed[c.id] - expected) ** 2 / expected
    return statistic


def test_registry() -> None:
    assert STRATEGIES["weighted_random"] is weighted_random
    assert STRATEGIES["least_loaded"] is least_loaded
    assert DEFAULT_STRATEGY in STRATEGIES


@pytest.mark.parametrize(
    ("weights", "seed"),
    [((1, 3, 6), 1), ((1, 3, 6), 20240506), ((5, 5), 7), ((5, 5), 99)],
)
def test_weighted_random_matches_weights(weights: tuple[int, ...], seed: int) -> None:
    candidates = [candidate(i + 1, weight=w) for i, w in enumerate(weights)]
    rng = random.Random(seed)
    counts = Counter(weighted_random(candidates, rng).id for _ in range(DRAWS))
    assert set(counts) == {c.id for c in candidates}
    statistic = chi_square(counts, candidates, DRAWS)
    assert statistic < CRITICAL[len(weights) - 1], (statistic, counts)


def test_chi_square_detects_wrong_weights() -> None:
    """The test above can fail: uniform picks are far from 1/3/6."""
    candidates = [candidate(1, weight=1), candidate(2, weight=3), candidate(3, weight=6)]
    rng = random.Random(3)
    counts = Counter(rng.choice(candidates).id for _ in range(DRAWS))
    assert chi_square(counts, candidates, DRAWS) > CRITICAL[2]


def test_weighted_random_is_reproducible_with_a_seed() -> None:
    candidates = [candidate(1, weight=2), candidate(2, weight=7), candidate(3, weight=1)]
    a, b = random.Random(11), random.Random(11)
    assert [weighted_random(candidates, a).id for _ in range(100)] == [
        weighted_random(candidates, b).id for _ in range(100)
    ]


def test_weighted_random_single_candidate() -> None:
    only = candidate(9, weight=4)
    rng = random.Random(0)
    assert all(weighted_random([only], rng) is only for _ in range(100))


def test_weighted_random_ignores_load() -> None:
    """weighted_random picks by weight only; the candidate list already excludes full ones."""
    candidates = [candidate(1, weight=1, load=9), candidate(2, weight=1, load=0)]
    rng = random.Random(1)
    counts = Counter(weighted_random(candidates, rng).id for _ in range(DRAWS))
    assert chi_square(counts, candidates, DRAWS) < CRITICAL[1]


@pytest.mark.parametrize("strategy", [weighted_random, least_loaded])
def test_no_candidates(strategy: Strategy) -> None:
    with pytest.raises(ValueError, match="no candidates"):
        strategy([], random.Random(0))
    with pytest.raises(ValueError, match="no candidates"):
        strategy((), random.Random(0))


# --- least_loaded ------------------------------------------------------------------


def ratio(c: Candidate) -> Fraction:
    return Fraction(c.open_load, c.weight)


LAST = st.none() | st.integers(min_value=0, max_value=10_000).map(
    lambda s: T0 + timedelta(seconds=s)
)
CANDIDATES = st.lists(
    st.builds(
        candidate,
        id=st.integers(min_value=1, max_value=10**6),
        weight=st.integers(min_value=1, max_value=1000),
        load=st.integers(min_value=0, max_value=1000),
        max_load=st.just(1001),
        last=LAST,
    ),
    min_size=1,
    max_size=12,
    unique_by=lambda c: c.id,
)


@settings(max_examples=200, deadline=None)
@given(candidates=CANDIDATES, seed=st.integers())
def test_least_loaded_picks_lowest_load_per_weight(candidates: list[Candidate], seed: int) -> None:
    chosen = least_loaded(candidates, random.Random(seed))
    assert chosen in candidates
    for other in candidates:
        assert ratio(chosen) <= ratio(other), (chosen, other)
        if ratio(chosen) == ratio(other):
            assert chosen.weight >= other.weight, (chosen, other)


@settings(max_examples=200, deadline=None)
@given(candidates=CANDIDATES, seed=st.integers(), other_seed=st.integers())
def test_least_loaded_is_deterministic(
    candidates: list[Candidate], seed: int, other_seed: int
) -> None:
    chosen = least_loaded(candidates, random.Random(seed))
    assert least_loaded(list(reversed(candidates)), random.Random(other_seed)) == chosen


def test_least_loaded_lowest_ratio_wins() -> None:
    a = candidate(1, weight=1, load=1)  # 1.0
    b = candidate(2, weight=4, load=2)  # 0.5
    c = candidate(3, weight=2, load=3)  # 1.5
    assert least_loaded([a, b, c], random.Random(0)) is b


def test_least_loaded_uses_weight_not_raw_load() -> None:
    heavy = candidate(1, weight=10, load=5)  # 0.5
    light = candidate(2, weight=1, load=1)  # 1.0
    assert least_loaded([light, heavy], random.Random(0)) is heavy


def test_least_loaded_tie_goes_to_larger_weight() -> None:
    small = candidate(1, weight=1, load=1, last=None)
    large = candidate(2, weight=3, load=3, last=T0)
    assert least_loaded([small, large], random.Random(0)) is large
    assert least_loaded([large, small], random.Random(0)) is large


def test_least_loaded_tie_with_zero_load_goes_to_larger_weight() -> None:
    small = candidate(1, weight=2, load=0)
    large = candidate(2, weight=5, load=0, last=T0)
    assert least_loaded([small, large], random.Random(0)) is large


def test_least_loaded_never_assigned_beats_assigned() -> None:
    assigned = candidate(1, weight=2, load=1, last=T0 - timedelta(days=365))
    never = candidate(2, weight=2, load=1, last=None)
    assert least_loaded([assigned, never], random.Random(0)) is never
    assert least_loaded([never, assigned], random.Random(0)) is never


def test_least_loaded_oldest_assignment_wins() -> None:
    recent = candidate(1, weight=2, load=1, last=T0)
    oldest = candidate(2, weight=2, load=1, last=T0 - timedelta(minutes=5))
    middle = candidate(3, weight=2, load=1, last=T0 - timedelta(minutes=1))
    assert least_loaded([recent, middle, oldest], random.Random(0)) is oldest


def test_least_loaded_compares_instants_across_time_zones() -> None:
    # 12:00+03:00 is 09:00 UTC: earlier than 10:00 UTC despite the larger wall clock.
    plus3 = candidate(
        1, weight=1, load=0, last=datetime(2024, 1, 1, 12, 0, tzinfo=timezone(timedelta(hours=3)))
    )
    utc = candidate(2, weight=1, load=0, last=datetime(2024, 1, 1, 10, 0, tzinfo=UTC))
    assert least_loaded([utc, plus3], random.Random(0)) is plus3


def test_least_loaded_ratio_beats_tie_breaks() -> None:
    never_but_busier = candidate(1, weight=9, load=5, last=None)
    recent_but_idle = candidate(2, weight=1, load=0, last=T0)
    assert least_loaded([never_but_busier, recent_but_idle], random.Random(0)) is recent_but_idle


def test_least_loaded_weight_beats_last_assigned() -> None:
    never_small = candidate(1, weight=1, load=0, last=None)
    recent_large = candidate(2, weight=2, load=0, last=T0)
    assert least_loaded([never_small, recent_large], random.Random(0)) is recent_large


def test_least_loaded_full_tie_is_stable_by_id() -> None:
    a = candidate(5, weight=1, load=0, last=T0)
    b = candidate(3, weight=1, load=0, last=T0)
    assert least_loaded([a, b], random.Random(0)).id == least_loaded([b, a], random.Random(1)).id
