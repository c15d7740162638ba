"""The replay in memory (worker/simulator.py) and the routing a file makes of the
database's (simulate.changed_by), without a database."""

import pytest

from worker import routing_file
from worker.errors import UserError
from worker.simulate import changed_by
from worker.simulator import SECOND, Operator, Record, Routing, Source, simulate

T0 = 1_800_000_000 * SECOND  # some instant, in microseconds


def _routing(max_load: int = 1, strategy: str = "smooth", lifo: bool = False) -> Routing:
    return Routing(
        {1: Operator(1, "a", max_load, True)},
        {10: Source(10, "web", strategy, {1: 1}, lifo=lifo)},
    )


def _contact(
    n: int, at: float, handled: float | None = None, closed: float | None = None, lead: str = ""
) -> Record:
    """Contact `n` came at T0 + `at` s, and its operator had it for `handled` s (or it
    went away unassigned at `closed` s)."""
    created = T0 + int(at * SECOND)
    if handled is not None:
        return Record(
            n, 10, lead or f"l{n}", 0, created, created, created + int(handled * SECOND), 1
        )
    close = None if closed is None else T0 + int(closed * SECOND)
    return Record(n, 10, lead or f"l{n}", 0, created, None, close, None)


def test_a_full_operator_makes_contacts_wait_for_the_handling_time_recorded() -> None:
    records = [_contact(1, 0, handled=5), _contact(2, 1, handled=5), _contact(3, 2, handled=5)]
    report = simulate(_routing(), records, T0, T0 + 60 * SECOND)
    # 1 at 0 until 5; 2 from 5 until 10 (waited 4 s); 3 from 10 (waited 8 s).
    assert report.given == {1: 1, 2: 1, 3: 1}
    assert sorted(report.waits) == [0, 4 * SECOND, 8 * SECOND]
    assert report.as_dict()["wait_seconds"] == {"p50": 4.0, "p95": 8.0, "max": 8.0}
    assert report.queued == 2
    # Twice the room: nobody waits.
    assert simulate(_routing(max_load=2), records, T0, T0 + 60 * SECOND).queued == 1
    assert simulate(_routing(max_load=3), records, T0, T0 + 60 * SECOND).queued == 0


def test_a_contact_that_went_away_queued_leaves_the_backlog_at_its_close() -> None:
    records = [_contact(1, 0, handled=5), _contact(2, 1, closed=3), _contact(3, 2, handled=1)]
    report = simulate(_routing(), records, T0, T0 + 60 * SECOND)
    assert report.given == {1: 1, 3: 1}
    assert report.waits == [0, 3 * SECOND]
    assert report.queued == 2


def test_the_period_end_stops_the_replay() -> None:
    records = [_contact(1, 0, handled=50), _contact(2, 1, handled=5)]
    report = simulate(_routing(), records, T0, T0 + 30 * SECOND)
    assert report.given == {1: 1}  # 2 would have its turn at 50 s, after the end
    assert report.as_dict()["assigned"] == [{"source": "web", "operator_id": 1, "count": 1}]


def test_a_contact_open_at_the_start_holds_its_operator_until_its_close() -> None:
    before = _contact(1, -10, handled=12)  # open from -10 s until 2 s
    report = simulate(_routing(), [before, _contact(2, 1, handled=1)], T0, T0 + 60 * SECOND)
    assert report.given == {2: 1}  # the earlier one is not counted
    assert report.waits == [1 * SECOND]
    # Queued at the start: served first, from the start, and not counted either.
    queued = Record(3, 10, "l3", 0, T0 - 5 * SECOND, T0 + 20 * SECOND, T0 + 21 * SECOND, 1)
    report = simulate(_routing(), [queued, _contact(2, 0.5, handled=1)], T0, T0 + 60 * SECOND)
    assert report.given == {2: 1}
    assert report.waits == [int(0.5 * SECOND)]  # 3 (handled 1 s) is done at 1 s


def test_a_lifo_queue_serves_the_newest_first() -> None:
    records = [
        _contact(1, 0, handled=5),
        _contact(2, 1, handled=5),
        _contact(3, 2, handled=5),
    ]
    report = simulate(_routing(lifo=True), records, T0, T0 + 60 * SECOND)
    assert sorted(report.waits) == [0, 3 * SECOND, 9 * SECOND]  # 3 at 5, 2 at 10


def test_the_file_changes_the_database_routing_as_apply_would() -> None:
    current = Routing(
        {1: Operator(1, "a", 2, True), 2: Operator(2, "b", 2, True)},
        {
            10: Source(10, "web", "smooth", {1: 1, 2: 1}),
            11: Source(11, "tg", "least_loaded", {2: 1}),
        },
    )
    text = """
[[operators]]
name = "carol"
max_load = 4
[[operators]]
name = "b"
max_load = 9
active = false
[[sources]]
key = "web"
strategy = "weighted_random"
overflow_to = "tg"
overflow_after = 30
weights = { a = 2, carol = 3 }
"""
    routing = changed_by(current, routing_file.parse(text, "toml"))
    assert routing.operators[-1] == Operator(-1, "carol", 4, True)
    assert routing.operators[2] == Operator(2, "b", 9, False)
    assert routing.operators[1] == current.operators[1]  # not in the file: as it is
    web = routing.sources[10]
    assert (web.strategy, dict(web.weights), web.overflow_to, web.overflow_after) == (
        "weighted_random",
        {1: 2, -1: 3},
        11,
        30,
    )
    assert routing.sources[11] == current.sources[11]


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ('[[sources]]\nkey = "mail"\n', "no source 'mail' in the database"),
        ('[[sources]]\nkey = "web"\nweights = { zed = 1 }\n', "no operator named 'zed'"),
        (
            '[[sources]]\nkey = "web"\noverflow_to = "mail"\noverflow_after = 5\n',
            "sources[0].overflow_to: no source 'mail'",
        ),
    ],
)
def test_what_the_database_lacks_is_refused(text: str, expect: str) -> None:
    current = Routing({1: Operator(1, "a", 2, True)}, {10: Source(10, "web", "smooth", {1: 1})})
    with pytest.raises(UserError, match=expect.replace("[", r"\[").replace("]", r"\]")):
        changed_by(current, routing_file.parse(text, "toml"))
