"""The smooth strategy as routing runs it: `assign` in virtual time over a window of
candidates read as `routing_state` reads them (the first few by the index's order, below
the batch's bound), with the database's trigger freezing what an operator is owed while
they are unavailable. The promises of tests/unit/test_smooth.py hold the same way, and
with teams in the thousands."""

import random
from collections.abc import Sequence
from fractions import Fraction

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.routed_source import BIG, RoutedSource
from worker.assignment import Queued, Window, assign
from worker.strategies import Candidate

WITHIN_ONE = 1 + Fraction(1, 10**9)


def smooth(weights: Sequence[int]) -> RoutedSource:
    return RoutedSource("smooth", weights, [0.0] * len(weights), random.Random(0))


def route(source: RoutedSource, k: int) -> list[int]:
    """Route k new contacts in one batch; returns who took them, in order."""
    chosen = source.route([Queued(-n, 1, f"l{n}") for n in range(1, k + 1)])
    assert len(chosen) == k
    return chosen


def run(weights: Sequence[int], availability: Sequence[Sequence[bool]]) -> list[list[Fraction]]:
    """One contact per step among the available operators; after each step every
    operator's exact share (counted while available) minus their count."""
    source = smooth(weights)
    share = [Fraction(0)] * len(weights)
    count = [0] * len(weights)
    history = []
    for available in availability:
        if not any(available):
            continue
        source.set_available(available)
        total = sum(w for w, ok in zip(weights, available, strict=True) if ok)
        [chosen] = route(source, 1)
        for i, ok in enumerate(available):
            if ok:
                share[i] += Fraction(weights[i], total)
        count[chosen] += 1
        history.append([share[i] - count[i] for i in range(len(weights))])
    return history


weights_st = st.lists(st.integers(min_value=1, max_value=100), min_size=1, max_size=8)


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
    weights, availability = case
    history = run(weights, availability)
    assert all(abs(lag) < 2 for lags in history for lag in lags)
    for lags in history:  # the lags always balance: nobody's debt is lost
        assert abs(sum(lags)) < Fraction(1, 10**9)


def _worst(weights: Sequence[int], picks: Sequence[int]) -> Fraction:
    """The largest |exact share - count| over every step of a fixed team. Between two of
    an operator's contacts what they are owed only grows, so its extremes are just before
    and just after each of their contacts, and at the end: O(1) per contact."""
    total = sum(weights)
    count = [0] * len(weights)
    worst = Fraction(0)
    for n, i in enumerate(picks, 1):
        before = Fraction(weights[i] * (n - 1), total) - count[i]  # owed, waiting
        count[i] += 1
        after = Fraction(weights[i] * n, total) - count[i]  # ahead, just served
        worst = max(worst, before, -after)
    n = len(picks)
    return max(
        worst, *(abs(Fraction(w * n, total) - c) for w, c in zip(weights, count, strict=True))
    )


def test_thousands_of_operators_in_batches_stay_within_one_at_every_step() -> None:
    rng = random.Random(14)
    for team, batch, steps in ((1000, 200, 4000), (5000, 50, 3000), (2000, 1, 600)):
        weights = [rng.randint(1, 100) for _ in range(team)]
        source = smooth(weights)
        picks = [p for _ in range(steps // batch) for p in route(source, batch)]
        assert _worst(weights, picks) <= WITHIN_ONE, team
        assert source.rereads <= steps // batch // 10, (team, source.rereads)


def test_thousands_of_operators_get_exact_whole_rounds() -> None:
    rng = random.Random(5000)
    weights = [rng.randint(1, 4) for _ in range(2000)]
    source = smooth(weights)
    picks = [p for _ in range(sum(weights) // 100 + 1) for p in route(source, 100)]
    total = sum(weights)
    counts = [0] * len(weights)
    for p in picks[:total]:
        counts[p] += 1
    assert counts == weights
    assert _worst(weights, picks) <= WITHIN_ONE


def test_a_window_that_misses_the_choice_is_read_again_whole() -> None:
    """Twenty heavy operators a little ahead (not eligible for the next contact, but
    within the window's bound) finish before the light one, who is the only one owed:
    the window of 2k + 8 = 10 holds only heavy ones, so routing reads the source whole
    and gives the light one the contact, as the rule says."""
    source = smooth([1] + [1000] * 20)
    total = 1 + 1000 * 20
    source.start = [0.0] + [1.5 / total] * 20
    [chosen] = route(source, 1)
    assert source.rereads == 1
    assert chosen == 0


def test_a_choice_past_the_last_candidate_read_is_not_vouched_for() -> None:
    """When the read stopped at its limit, an operator not read may come before any whose
    order key is past the last one read (one chosen earlier in the batch moves there):
    such a choice is left to a whole read."""
    [only] = [Candidate(1, 1, 0, BIG, start=0.0)]
    window = Window(0.0, 3, bound=10.0, last=(0.5, -1, 0))  # others finish by 0.5
    plan = assign(
        [Queued(-1, 1, "l")], {1: [only]}, {1: "smooth"}, {}, random.Random(0), windows={1: window}
    )
    assert plan.unread == {1} and plan.assignments == []
    plan = assign(
        [Queued(-1, 1, "l")],
        {1: [only]},
        {1: "smooth"},
        {},
        random.Random(0),
        windows={1: Window(0.0, 3)},
    )
    assert plan.unread == set() and [a.operator_id for a in plan.assignments] == [1]
