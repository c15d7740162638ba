"""weighted_random and least_loaded as routing runs them: `assign` over a window of
candidates read as `routing_state` reads them (the first 2k + 8 available operators in the
strategy's index order), read again whole when the window cannot vouch for a choice, with
the database's trigger keeping a weighted_random turn as start - clock while its operator
is unavailable. They keep the promises of the plain strategies (tests/unit/
test_strategies.py) with teams in the thousands."""

import heapq
import random
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.routed_source import BIG, RoutedSource
from worker.assignment import Queued, Window, assign
from worker.strategies import Candidate, least_loaded, load_key

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
# Chi-square critical values at p = 0.001 by degrees of freedom.
CRITICAL = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47}


def drawn_race(weights: Sequence[int], seed: int) -> RoutedSource:
    """A weighted_random source whose turns were drawn at first as the migration and the
    weight rows' trigger draw them."""
    rng = random.Random(seed)
    return RoutedSource(
        "weighted_random", weights, [rng.expovariate(w) - 1 / w for w in weights], rng
    )


def batch(k: int, skip: frozenset[int] = frozenset()) -> list[Queued]:
    return [Queued(n, 1, f"lead-{n}", skip) for n in range(1, k + 1)]


def chi_square_by_weight(counts: Counter[int], weights: Sequence[int], ids: set[int]) -> float:
    """Chi-square of the picks per weight class (operators of one weight pooled) against
    weight / total over the operators in `ids`."""
    total = sum(weights[i] for i in ids)
    draws = sum(counts.values())
    statistic = 0.0
    for w in {weights[i] for i in ids}:
        members = [i for i in ids if weights[i] == w]
        expected = draws * w * len(members) / total
        observed = sum(counts[i] for i in members)
        statistic += (observed - expected) ** 2 / expected
    return statistic


def test_thousands_of_operators_are_drawn_by_weight_from_a_bounded_window() -> None:
    weights = [1 + n % 5 for n in range(3000)]
    race = drawn_race(weights, seed=14)
    counts: Counter[int] = Counter()
    for _ in range(300):
        counts.update(race.route(batch(200)))
    assert sum(counts.values()) == 60_000
    statistic = chi_square_by_weight(counts, weights, set(range(3000)))
    assert statistic < CRITICAL[4], statistic
    assert race.rereads == 0  # the window always held the draw
    # Within one weight class nobody is favoured: the spread of counts is Poisson-like
    # (the index's tie-break by id would show as the lowest ids taking far more).
    ones = [counts[i] for i in range(0, 3000, 5)]
    mean = sum(ones) / len(ones)
    variance = sum((c - mean) ** 2 for c in ones) / len(ones)
    assert 0.6 * mean < variance < 1.6 * mean, (mean, variance)
    assert abs(sum(ones[:60]) / 60 - mean) < 4 * (mean / 60) ** 0.5


@pytest.mark.parametrize(
    ("weights", "seed"),
    [([1, 2], 1), ([2, 2, 3, 4, 2, 3], 7), ([1, 1, 1, 4], 20261203), ([3, 1, 4, 1, 2], 5)],
)
def test_each_contact_is_a_fresh_draw_among_those_available(weights: list[int], seed: int) -> None:
    """Operators leave and come back between batches (their turns kept as start - clock);
    in each phase the picks follow the weights of those available then."""
    race = drawn_race(weights, seed)
    phases = [
        [True] * len(weights),
        [i % 2 == 0 for i in range(len(weights))],
        [i != 0 for i in range(len(weights))],
        [True] * len(weights),
    ]
    for available in phases:
        race.set_available(available)
        counts: Counter[int] = Counter()
        for _ in range(60):
            counts.update(race.route(batch(50)))
        ids = {i for i, ok in enumerate(available) if ok}
        assert set(counts) <= ids
        if len({weights[i] for i in ids}) > 1:
            dof = len({weights[i] for i in ids}) - 1
            assert chi_square_by_weight(counts, weights, ids) < CRITICAL[dof]


def test_a_skipped_operator_is_never_drawn_and_the_others_keep_their_law() -> None:
    weights = [1 + n % 3 for n in range(900)]
    race = drawn_race(weights, seed=3)
    skipped = frozenset(range(0, 900, 4))
    counts: Counter[int] = Counter()
    for _ in range(150):
        counts.update(race.route(batch(100, skipped)))
    assert not set(counts) & skipped
    rest = set(range(900)) - skipped
    assert chi_square_by_weight(counts, weights, rest) < CRITICAL[2]
    # And once the skip ends, the skipped operators are drawn as often as their weight
    # says, from the first contact on: their turns, passed while they were skipped, are
    # drawn again, not served first.
    expected = sum(weights[i] for i in skipped) / sum(weights)
    first = race.route(batch(100))
    assert sum(i in skipped for i in first) < 2 * expected * 100, first
    after: Counter[int] = Counter(first)
    for _ in range(149):
        after.update(race.route(batch(100)))
    share = sum(after[i] for i in skipped) / 15_000
    assert abs(share - expected) < 0.02, (share, expected)


def test_a_turn_passed_while_skipped_is_drawn_again_within_the_batch() -> None:
    """The first 300 contacts of a batch skip a quarter of the team, the last 100 skip
    nobody: the skipped operators whose turns the clock passed meanwhile take no more of
    those 100 than their weight says (served first, they would take most of them)."""
    weights = [1 + n % 3 for n in range(900)]
    race = drawn_race(weights, seed=11)
    skipped = frozenset(range(0, 900, 4))
    contacts = [
        Queued(n, 1, f"lead-{n}", skipped if n <= 300 else frozenset()) for n in range(1, 401)
    ]
    chosen = race.route(contacts)
    expected = sum(weights[i] for i in skipped) / sum(weights)
    assert not set(chosen[:300]) & skipped
    assert sum(i in skipped for i in chosen[300:]) < 2 * expected * 100, chosen[300:]


def test_operators_who_fill_up_are_left_out_and_their_turn_kept() -> None:
    """Capacity 2 each: a batch larger than the window's room fills them, and nobody
    takes more than their max_load."""
    weights = [1 + n % 2 for n in range(40)]
    rng = random.Random(5)
    candidates = [
        Candidate(i, w, 0, 2, start=rng.expovariate(w) - 1 / w) for i, w in enumerate(weights)
    ]
    plan = assign(batch(100), {1: candidates}, {1: "weighted_random"}, {}, rng)
    taken = Counter(a.operator_id for a in plan.assignments)
    assert len(plan.assignments) == 80
    assert set(taken.values()) == {2}


class Team:
    """Operators weighted on one least_loaded source: loads, weights and last assignments
    as the database keeps them, read as routing_state reads them."""

    def __init__(self, rng: random.Random, size: int, busy: bool) -> None:
        self.weights = [rng.randint(1, 5) for _ in range(size)]
        self.max_load = [rng.randint(1, 8) for _ in range(size)]
        self.load = [rng.randint(0, m - 1) if busy else 0 for m in self.max_load]
        self.last: list[datetime | None] = [
            T0 + timedelta(seconds=rng.randint(0, 50)) if rng.random() < 0.8 else None
            for _ in range(size)
        ]
        self.now = T0 + timedelta(minutes=1)
        self.rereads = 0

    def everyone(self) -> list[Candidate]:
        return [
            Candidate(i, self.weights[i], self.load[i], self.max_load[i], self.last[i])
            for i in range(len(self.weights))
            if self.load[i] < self.max_load[i]
        ]

    def route(self, k: int, rng: random.Random) -> list[int]:
        whole = False
        while True:
            everyone = self.everyone()
            total = sum(c.weight for c in everyone)
            if whole:
                read, window = sorted(everyone, key=load_key), Window(0.0, total)
            else:
                limit = 2 * k + 8
                read = heapq.nsmallest(limit, everyone, key=load_key)
                last = load_key(read[-1]) if len(read) >= limit else None
                window = Window(0.0, total, None, last)
            plan = assign(batch(k), {1: read}, {1: "least_loaded"}, {}, rng, windows={1: window})
            if not plan.unread:
                break
            whole = True
            self.rereads += 1
        chosen = [a.operator_id for a in plan.assignments]
        self.now += timedelta(seconds=1)
        for n, operator_id in enumerate(chosen):
            self.load[operator_id] += 1
            self.last[operator_id] = self.now + timedelta(microseconds=n)
        return chosen

    def expected(self, k: int) -> list[int]:
        """least_loaded over the whole team, contact by contact (its order, `load_key`,
        kept per operator and updated for the one who took the contact)."""
        load = list(self.load)
        keys = {c.id: load_key(c) for c in self.everyone()}
        out = []
        for n in range(k):
            if not keys:
                break
            chosen = min(keys.values())[-1]
            if n == 0:  # the strategy itself, over everyone
                assert chosen == least_loaded(self.everyone(), random.Random(0)).id
            out.append(chosen)
            load[chosen] += 1
            at = self.now + timedelta(seconds=1, microseconds=n)
            c = Candidate(chosen, self.weights[chosen], load[chosen], self.max_load[chosen], at)
            if load[chosen] < self.max_load[chosen]:
                keys[chosen] = load_key(c)
            else:
                del keys[chosen]
        return out


@settings(max_examples=25, deadline=None)
@given(
    size=st.sampled_from([3, 40, 1000, 4000]),
    busy=st.booleans(),
    sizes=st.lists(st.integers(1, 200), min_size=1, max_size=6),
    seed=st.integers(0, 2**32 - 1),
)
def test_least_loaded_from_a_window_chooses_as_over_the_whole_team(
    size: int, busy: bool, sizes: list[int], seed: int
) -> None:
    rng = random.Random(seed)
    team = Team(rng, size, busy)
    for k in sizes:
        expected = team.expected(k)
        assert team.route(k, rng) == expected


def test_a_least_loaded_choice_past_the_last_candidate_read_is_not_vouched_for() -> None:
    """Two contacts, a window of 12 of 20 idle operators: the first takes operator 0 (one
    contact ahead now); the second skips the other 11 read, so the window holds only
    operator 0, now behind everyone unread: it is read again whole and operator 12 (first
    unread) takes it."""
    team = [Candidate(i, 1, 0, BIG, T0 + timedelta(seconds=i)) for i in range(20)]
    window = Window(0.0, 20, None, load_key(team[11]))
    contacts = [Queued(1, 1, "a"), Queued(2, 1, "b", frozenset(range(1, 12)))]
    rng = random.Random(0)
    plan = assign(contacts, {1: team[:12]}, {1: "least_loaded"}, {}, rng, windows={1: window})
    assert plan.unread == {1}
    plan = assign(contacts, {1: team}, {1: "least_loaded"}, {}, rng)
    assert [a.operator_id for a in plan.assignments] == [0, 12]


def test_least_loaded_at_five_thousand_rarely_reads_the_team_whole() -> None:
    rng = random.Random(1)
    team = Team(rng, 5000, busy=False)
    team.max_load = [BIG] * 5000
    for _ in range(50):
        team.route(200, rng)
    assert team.rereads == 0
