"""Priority, queue order, overflow and waiting alerts through the `leadrouter` command:
the per-source settings on `sources add` and `sources update`, in a routing file, and in
`stats`; wrong input is one line and changes nothing."""

from pathlib import Path

import asyncpg

from tests.commands import as_json, fails_cleanly, leadrouter
from worker.settings import Settings

QUEUEING = ("queue_order", "overflow_to", "overflow_after", "alert_after")


def queueing(row: dict[str, object]) -> tuple[object, ...]:
    return tuple(row[k] for k in QUEUEING)


def test_sources_add_and_update_take_the_queueing_settings(settings: Settings) -> None:
    spare = as_json(settings, "sources", "add", "spare")
    assert queueing(spare) == ("fifo", None, None, None)
    hot = as_json(
        settings,
        "sources",
        "add",
        "hot",
        "--queue-order",
        "lifo",
        "--overflow-to",
        "spare",
        "--overflow-after",
        "30",
        "--alert-after",
        "60",
    )
    assert queueing(hot) == ("lifo", "spare", 30, 60)
    hot = as_json(settings, "sources", "update", "hot", "--alert-after", "0")
    assert queueing(hot) == ("lifo", "spare", 30, None)  # the others left alone
    hot = as_json(settings, "sources", "update", "hot", "--queue-order", "fifo")
    assert queueing(hot) == ("fifo", "spare", 30, None)
    listed = {s["key"]: queueing(s) for s in as_json(settings, "sources", "list")}
    assert listed == {"spare": ("fifo", None, None, None), "hot": ("fifo", "spare", 30, None)}

    fails_cleanly(
        settings,
        "sources",
        "update",
        "spare",
        "--overflow-to",
        "hot",
        "--overflow-after",
        "5",
        expect="overflow would go round: spare -> hot -> spare",
    )
    fails_cleanly(settings, "sources", "update", "spare", "--overflow-to", "hot", expect="both")
    fails_cleanly(settings, "sources", "update", "hot", "--overflow-to", "hot", expect="to itself")
    fails_cleanly(
        settings,
        "sources",
        "update",
        "hot",
        "--overflow-to",
        "nowhere",
        expect="no source with key 'nowhere'",
    )
    fails_cleanly(
        settings, "sources", "update", "hot", "--queue-order", "random", expect="queue-order"
    )
    fails_cleanly(settings, "sources", "update", "hot", "--alert-after", "-1", expect="alert-after")
    # Refused as a whole: the new source is not left behind half-made.
    fails_cleanly(
        settings,
        "sources",
        "add",
        "third",
        "--overflow-to",
        "nowhere",
        "--overflow-after",
        "5",
        expect="no source with key 'nowhere'",
    )
    assert [s["key"] for s in as_json(settings, "sources", "list")] == ["spare", "hot"]
    hot = as_json(settings, "sources", "update", "hot", "--overflow-after", "0")
    assert queueing(hot) == ("fifo", None, None, None)


def test_a_routing_file_sets_and_clears_them(settings: Settings, tmp_path: Path) -> None:
    routing = tmp_path / "routing.toml"
    routing.write_text(
        '[[sources]]\nkey = "hot"\nqueue_order = "lifo"\noverflow_to = "spare"\n'
        'overflow_after = 30\nalert_after = 60\n\n[[sources]]\nkey = "spare"\n'
        'overflow_to = "third"\noverflow_after = 10\n\n[[sources]]\nkey = "third"\n'
    )
    applied = leadrouter(settings, "apply", str(routing)).stdout
    assert "queue_order 'lifo'" in applied and "overflow_to 'spare'" in applied
    assert (
        leadrouter(settings, "apply", str(routing))
        .stdout.strip()
        .endswith("changed 0, 3 already as written")
    )
    listed = {s["key"]: queueing(s) for s in as_json(settings, "sources", "list")}
    assert listed["hot"] == ("lifo", "spare", 30, 60)
    assert listed["spare"] == ("fifo", "third", 10, None)
    # Reversing the chain in one file is no cycle: the file's final settings are checked.
    routing.write_text(
        '[[sources]]\nkey = "hot"\n\n[[sources]]\nkey = "spare"\noverflow_to = "hot"\n'
        'overflow_after = 10\n\n[[sources]]\nkey = "third"\noverflow_to = "spare"\n'
        "overflow_after = 10\n"
    )
    leadrouter(settings, "apply", str(routing))
    listed = {s["key"]: queueing(s) for s in as_json(settings, "sources", "list")}
    assert listed == {
        "hot": ("fifo", None, None, None),
        "spare": ("fifo", "hot", 10, None),
        "third": ("fifo", "spare", 10, None),
    }
    cycle = tmp_path / "cycle.toml"
    cycle.write_text('[[sources]]\nkey = "hot"\noverflow_to = "third"\noverflow_after = 5\n')
    fails_cleanly(settings, "apply", str(cycle), expect="overflow would go round")
    alone = tmp_path / "alone.toml"
    alone.write_text('[[sources]]\nkey = "hot"\noverflow_to = "spare"\n')
    fails_cleanly(settings, "apply", str(alone), expect="go together")
    assert as_json(settings, "sources", "list")[0]["overflow_to"] is None  # nothing applied


async def test_stats_show_the_backlog_and_its_alerts(
    settings: Settings, pool: asyncpg.Pool
) -> None:
    import asyncio

    from tests.helpers import route_new
    from worker import timers

    as_json(settings, "sources", "add", "hot", "--alert-after", "1", "--queue-order", "lifo")
    async with pool.acquire() as conn, conn.transaction():
        await route_new(conn, "hot", "tg:1")  # nobody to take it: queued
    await asyncio.sleep(1.1)
    assert (await timers.tick(pool)).alerted == 1  # what a worker's timers would do
    [stats] = as_json(settings, "stats")
    assert (stats["source"], stats["queue_order"], stats["queued_now"]) == ("hot", "lifo", 1)
    assert stats["oldest_queued_seconds"] >= 1.0
    assert stats["overflowed"] == 0 and stats["waiting_alerts"] == 1
    table = leadrouter(settings, "stats").stdout
    assert "lifo order" in table and "oldest waiting" in table
