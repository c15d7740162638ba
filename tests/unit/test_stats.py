from datetime import timedelta

import pytest

from worker.errors import UserError
from worker.stats import bar, parse_duration, shares


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90s", timedelta(seconds=90)),
        ("15m", timedelta(minutes=15)),
        ("24h", timedelta(hours=24)),
        ("7d", timedelta(days=7)),
        ("2w", timedelta(weeks=2)),
    ],
)
def test_durations(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "h", "24", "-1h", "1.5h", "1y", "99999999999d", "1h30m"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(UserError):
        parse_duration(text)


def row(source: str, operator_id: int, weight: int, assigned: int) -> dict[str, object]:
    return {
        "source": source,
        "operator_id": operator_id,
        "operator_name": f"op{operator_id}",
        "is_active": True,
        "weight": weight,
        "assigned": assigned,
        "open_now": 0,
        "load": 0,
        "max_load": 5,
        "presence": "online",
        "shift": None,
        "time_zone": None,
        "scheduled": True,
        "available": True,
    }


def test_shares_put_observed_next_to_configured() -> None:
    sources = [
        {"source": "tg", "strategy": "smooth", "queued_now": 2},
        {"source": "empty", "strategy": "smooth", "queued_now": 0},
    ]
    rows = [row("tg", 1, 1, 10), row("tg", 2, 3, 30), row("tg", 3, 0, 0)]  # 3: weight removed
    [tg, empty] = shares(sources, rows)
    assert tg.assigned == 40 and tg.queued_now == 2
    assert [(o.weight_share, o.observed_share) for o in tg.operators] == [
        (0.25, 0.25),
        (0.75, 0.75),
        (0.0, 0.0),
    ]
    assert empty.assigned == 0 and empty.operators == []


def test_bar_marks_the_configured_share() -> None:
    assert bar(0.5, 0.5, width=10) == "█████|    "
    assert bar(0.0, 0.0, width=4) == "    "
    assert bar(1.0, 1.0, width=4) == "███▌"
    assert len(bar(0.33, 0.9)) == 24
