"""The routing decision of a batch, with contacts already queued and new ones (ids below
zero) of the same lead."""

import random

from worker.assignment import Queued, assign
from worker.strategies import Candidate


def test_a_new_contact_follows_its_lead_queued_in_the_same_batch() -> None:
    weights = {1: [Candidate(10, 1, 0, 5, None, 0.0), Candidate(11, 1, 0, 5, None, 0.0)]}
    queued = [Queued(7, 1, "tg:1"), Queued(-1, 1, "tg:2"), Queued(-2, 1, "tg:1")]
    for seed in range(20):  # whoever weighted_random picks for tg:1 first
        plan = assign(queued, weights, {1: "weighted_random"}, {}, random.Random(seed), {1})
        by_contact = {a.contact_id: a for a in plan.assignments}
        assert by_contact[-2].operator_id == by_contact[7].operator_id
        assert by_contact[-2].affinity and not by_contact[7].affinity


def test_new_contacts_stop_where_capacity_ends() -> None:
    weights = {1: [Candidate(10, 1, 3, 5, None, 0.0)]}
    queued = [Queued(7, 1, "a"), Queued(-1, 1, "b"), Queued(-2, 1, "c")]
    plan = assign(queued, weights, {1: "smooth"}, {}, random.Random(0))
    assert [a.contact_id for a in plan.assignments] == [7, -1]  # oldest first, then full


def test_an_operator_filled_in_the_batch_is_not_offered_again() -> None:
    """a is far ahead in the smooth order but can take one contact only: the others go
    to b, who has room (the database would refuse a second claim of a)."""
    weights = {1: [Candidate(10, 10, 0, 1, None, 0.0), Candidate(11, 1, 0, 10, None, 0.0)]}
    queued = [Queued(-1, 1, "a"), Queued(-2, 1, "b"), Queued(-3, 1, "c")]
    plan = assign(queued, weights, {1: "smooth"}, {}, random.Random(0))
    assert [a.operator_id for a in plan.assignments] == [10, 11, 11]


# --- offers: operators a contact skips (they declined it or let it lapse) ---------------


def _team() -> list[Candidate]:
    return [Candidate(10, 1, 0, 5, None, 0.0), Candidate(11, 1, 0, 5, None, 0.0)]


def test_a_contact_never_goes_to_an_operator_it_skips() -> None:
    for strategy in ("smooth", "weighted_random", "least_loaded"):
        for seed in range(10):
            queued = [Queued(7, 1, "a", frozenset({10})), Queued(8, 1, "b", frozenset({11}))]
            plan = assign(queued, {1: _team()}, {1: strategy}, {}, random.Random(seed))
            assert [(a.contact_id, a.operator_id) for a in plan.assignments] == [
                (7, 11),
                (8, 10),
            ], strategy


def test_a_contact_only_skipped_operators_could_take_waits_without_blocking() -> None:
    """7 skips the only operator with room; 8 behind it is not held up, and the operator
    stays available to the contacts after 7 (smooth: set aside for 7 only)."""
    weights = {1: [Candidate(10, 1, 0, 5, None, 0.0), Candidate(11, 1, 5, 5, None, 0.0)]}
    for strategy in ("smooth", "weighted_random", "least_loaded"):
        queued = [Queued(7, 1, "a", frozenset({10})), Queued(8, 1, "b"), Queued(-1, 1, "c")]
        plan = assign(queued, weights, {1: strategy}, {}, random.Random(0))
        assert [(a.contact_id, a.operator_id) for a in plan.assignments] == [
            (8, 10),
            (-1, 10),
        ], strategy
        assert not plan.unread


def test_a_lead_is_not_sent_back_by_affinity_to_an_operator_it_skips() -> None:
    queued = [Queued(7, 1, "tg:1", frozenset({10}))]
    plan = assign(queued, {1: _team()}, {1: "least_loaded"}, {7: 10}, random.Random(0), {1})
    [a] = plan.assignments
    assert (a.operator_id, a.affinity) == (11, False)


def test_least_loaded_orders_by_the_weights_of_the_source_it_routes() -> None:
    """Operator 1 is weighted 1 on the least_loaded source and 3 on another source of the
    same batch: for the first, their load per weight is 2 / 1, above operator 2's 3 / 2,
    whichever order the sources come in."""
    for_least = [Candidate(1, 1, 2, 10), Candidate(2, 2, 3, 10)]
    for_smooth = [Candidate(1, 3, 2, 10)]
    strategies = {1: "least_loaded", 2: "smooth"}
    for weights in ({1: for_least, 2: for_smooth}, {2: for_smooth, 1: for_least}):
        plan = assign([Queued(-1, 1, "l")], weights, strategies, {}, random.Random(0))
        assert [a.operator_id for a in plan.assignments] == [2]
