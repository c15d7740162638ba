"""What routing records of each decision for the history (worker/decisions.py), filled by
assign() itself: bounded whatever the team, the chosen one always there, skips and
results named, and the plan the same with or without it."""

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from worker.assignment import Queued, Window, assign
from worker.decisions import SHOWN, Collector, expand
from worker.strategies import Candidate


def _plan(explain: Collector | None, strategy: str, team: list[Candidate], n: int) -> list[int]:
    queued = [Queued(-i, 1, f"l{i}") for i in range(1, n + 1)]
    total = sum(c.weight for c in team)
    plan = assign(
        queued,
        {1: team},
        {1: strategy},
        {},
        random.Random(3),
        windows={1: Window(0.0, total)},
        explain=explain,
    )
    return [a.operator_id for a in plan.assignments]


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(["smooth", "least_loaded", "weighted_random"]),
    st.lists(st.tuples(st.integers(1, 9), st.integers(0, 4)), min_size=1, max_size=40),
    st.integers(1, 30),
)
def test_the_plan_is_the_same_with_history_and_each_decision_is_bounded(
    strategy: str, team_spec: list[tuple[int, int]], n: int
) -> None:
    team = [Candidate(i + 1, w, 0, m) for i, (w, m) in enumerate(team_spec)]
    explain = Collector()
    with_history = _plan(explain, strategy, team, n)
    assert with_history == _plan(None, strategy, team, n)
    given_to = dict(zip(range(-1, -n - 1, -1), with_history, strict=False))
    for contact_id in range(-1, -n - 1, -1):
        d = explain.details.get(contact_id)
        if contact_id in given_to:
            assert d is not None and d["result"] == "chosen"
            assert given_to[contact_id] in [row[0] for row in d["candidates"]]
        if d is not None:
            assert len(d["candidates"]) <= SHOWN + 1 and len(d.get("skipped", [])) <= SHOWN
            assert d["read"] == len(team)


def test_a_large_smooth_window_shows_the_first_owed_in_the_smooth_order() -> None:
    team = [Candidate(i, 1 + i % 5, 0, 3) for i in range(1, 201)]
    explain = Collector()
    [chosen] = _plan(explain, "smooth", team, 1)
    shown = expand(explain.details[-1])
    assert len(shown["candidates"]) == SHOWN and shown["read"] == 200
    assert shown["candidates"][0]["operator_id"] == chosen
    finishes = [c["finish"] for c in shown["candidates"]]
    assert finishes == sorted(finishes) and finishes[0] == min(1 / c.weight for c in team)


def test_a_source_that_fills_queues_the_rest_behind_the_one_that_found_nobody() -> None:
    team = [Candidate(1, 2, 0, 1), Candidate(2, 1, 0, 1)]
    explain = Collector()
    assert _plan(explain, "least_loaded", team, 4) == [1, 2]
    nobody, behind = explain.details[-3], explain.details[-4]
    assert nobody["result"] == "nobody" and behind["result"] == "behind"
    assert sorted(nobody["skipped"]) == [[1, "full"], [2, "full"]]
    assert behind["skipped"] == nobody["skipped"]


def test_affinity_and_skips_are_named() -> None:
    team = [Candidate(1, 1, 0, 5), Candidate(2, 1, 0, 5), Candidate(3, 1, 0, 5)]
    queued = [Queued(7, 1, "a", skip=frozenset({3})), Queued(8, 1, "b")]
    explain = Collector()
    assign(queued, {1: team}, {1: "weighted_random"}, {8: 2}, random.Random(0), explain=explain)
    first = expand(explain.details[7])
    assert first["skipped"] == [{"operator_id": 3, "why": "skip"}]
    assert {c["operator_id"]: c["probability"] for c in first["candidates"]} == {1: 0.5, 2: 0.5}
    assert explain.details[8]["result"] == "affinity"


def test_a_weighted_random_window_gives_each_its_odds_in_the_whole_team() -> None:
    """A window read 10 operators of a team of weight 1,000: each candidate's probability
    is its weight over the team's available weight (less the contact's skips), not over
    the window's."""
    read = [Candidate(i, 2, 0, 5, start=i / 100) for i in range(1, 11)]
    window = Window(0.0, 1000, None, (1.0, -2, 10))
    explain = Collector()
    plan = assign(
        [Queued(7, 1, "a", skip=frozenset({1}))],
        {1: read},
        {1: "weighted_random"},
        {},
        random.Random(0),
        windows={1: window},
        explain=explain,
    )
    assert plan.assignments
    shown = expand(explain.details[7])
    assert {c["probability"] for c in shown["candidates"]} == {round(2 / 998, 4)}


def test_without_a_window_the_odds_are_over_those_free() -> None:
    """No window given (every candidate read, full ones too): the denominator is the
    weight of those who can take the contact."""
    team = [Candidate(1, 1, 5, 5), Candidate(2, 1, 0, 5)]
    explain = Collector()
    assign(
        [Queued(7, 1, "a")],
        {1: team},
        {1: "weighted_random"},
        {},
        random.Random(0),
        explain=explain,
    )
    [shown] = expand(explain.details[7])["candidates"]
    assert shown["operator_id"] == 2 and shown["probability"] == 1.0
