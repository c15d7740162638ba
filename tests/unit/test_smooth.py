"""The smooth strategy: exact shares for a fixed set of available operators, bounded lag
however availability changes, state that is a plain number per operator."""

from collections.abc import Sequence
from fractions import Fraction

from hypothesis import given, settings
from hypothesis import strategies as st

from worker.strategies import Candidate, smooth, smooth_lags

# The lags are floats in the database; allow for their rounding.
WITHIN_ONE = 1 + Fraction(1, 10**9)
weights_st = st.lists(st.integers(min_value=1, max_value=100), min_size=1, max_size=8)


def run(weights: Sequence[int], availability: Sequence[Sequence[bool]]) -> list[list[Fraction]]:
    """Route one contact per step among the available operators, as the worker does;
    returns after each step every operator's exact share minus their count."""
    lags = [0.0] * len(weights)
    share = [Fraction(0)] * len(weights)
    count = [0] * len(weights)
    history = []
    for available in availability:
        candidates = [
            Candidate(id=i, weight=w, open_load=0, max_load=1, lag=lags[i])
            for i, (w, ok) in enumerate(zip(weights, available, strict=True))
            if ok
        ]
        if not candidates:
            continue
        total = sum(c.weight for c in candidates)
        chosen = smooth(candidates, None)  # type: ignore[arg-type]  # deterministic
        for i, lag in smooth_lags(candidates, chosen.id).items():
            lags[i] = lag
        for c in candidates:
            share[c.id] += Fraction(c.weight, total)
        count[chosen.id] += 1
        history.append([share[i] - count[i] for i in range(len(weights))])
    return history


@settings(max_examples=300, deadline=None, derandomize=True)
@given(weights_st, st.integers(min_value=1, max_value=400))
def test_fixed_availability_is_within_one_of_the_exact_share_at_every_step(
    weights: list[int], steps: int
) -> None:
    history = run(weights, [[True] * len(weights)] * steps)
    assert all(abs(lag) <= WITHIN_ONE for lags in history for lag in lags)
    total = sum(weights)
    for n in range(total, steps + 1, total):  # whole rounds come out exact
        assert all(abs(lag) < Fraction(1, 10**9) for lag in history[n - 1])


def test_nginx_counterexample_stays_within_one() -> None:
    """nginx's smooth weighted round robin leaves the weight-20 operator 1.05 behind at
    the 76th contact here."""
    history = run([1, 1, 1, 1, 1, 20, 76], [[True] * 7] * 101)
    assert max(abs(lag) for lags in history for lag in lags) < 1
    assert all(abs(lag) < Fraction(1, 10**9) for lag in history[-1])


def test_one_three_six_over_one_hundred_is_exactly_ten_thirty_sixty() -> None:
    history = run([1, 3, 6], [[True] * 3] * 100)
    assert history[-1] == [0, 0, 0]


@settings(max_examples=500, deadline=None, derandomize=True)
@given(
    st.integers(min_value=2, max_value=8).flatmap(
        lambda n: st.tuples(
            st.lists(st.integers(min_value=1, max_value=100), min_size=n, max_size=n),
            st.lists(st.lists(st.booleans(), min_size=n, max_size=n), max_size=120),
        )
    )
)
def test_any_availability_changes_keep_every_operator_within_two_of_their_share(
    case: tuple[list[int], list[list[bool]]],
) -> None:
    """Share counted only while available. Within 1 cannot be promised here by any
    algorithm (see the next test); the worst lag found by search is about 1.63."""
    weights, availability = case
    history = run(weights, availability)
    assert all(abs(lag) < 2 for lags in history for lag in lags)
    for lags in history:  # the lags always balance: nobody's debt is lost
        assert abs(sum(lags)) < Fraction(1, 10**9)


def test_no_algorithm_keeps_within_one_when_availability_changes() -> None:
    """Five equal operators; two contacts go to two of them, then only those two are
    available. Whoever takes the third contact has 2 against a share of 0.9."""
    history = run([1] * 5, [[True] * 5, [True] * 5])
    picked = [i for i in range(5) if history[-1][i] < 0]
    only_them = [i in picked for i in range(5)]
    history = run([1] * 5, [[True] * 5, [True] * 5, only_them])
    assert max(abs(lag) for lag in history[-1]) == Fraction(11, 10)
