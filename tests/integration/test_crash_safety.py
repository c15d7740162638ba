"""A message is acknowledged only after what it did was committed, and a message the
worker could not finish is left for the broker to redeliver: a worker killed while its
commit waits, a commit that fails, and a transient failure still retrying when the
worker stops, lose nothing."""

import asyncio
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import pytest

from tests.helpers import (
    EventCollector,
    Expected,
    assert_clean_end,
    inbound_left,
    lead,
    send,
    setup_source,
    wait_until,
)
from tests.worker_processes import logs_of, spawn, stop_gracefully, wait_ready, worker_processes
from worker import distribution
from worker.app import Worker
from worker.settings import Settings

# At COMMIT (a deferred constraint trigger), the first transaction that inserted a
# contact fails; a sequence counts, as it is not rolled back with the transaction.
FAIL_FIRST_COMMIT = """
    CREATE SEQUENCE commits_seen;
    CREATE FUNCTION fail_first_commit() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF nextval('commits_seen') = 1 THEN
            RAISE EXCEPTION 'this commit fails';
        END IF;
        RETURN NULL;
    END $$;
    CREATE CONSTRAINT TRIGGER fail_first_commit AFTER INSERT ON contacts
        DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION fail_first_commit();
"""


# At COMMIT (a deferred constraint trigger), a transaction that inserted a contact waits
# for a single-key advisory lock the test holds: the worker is caught between its routing
# and its commit, for as long as the test likes.
BLOCK_COMMITS = """
    CREATE FUNCTION block_commit() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_advisory_xact_lock(7301);
        RETURN NULL;
    END $$;
    CREATE CONSTRAINT TRIGGER block_commit AFTER INSERT ON contacts
        DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION block_commit();
"""
COMMIT_BLOCKED = """
    SELECT pid FROM pg_stat_activity
    WHERE datname = current_database() AND wait_event_type = 'Lock'
      AND wait_event = 'advisory'
"""


@pytest.mark.slow
async def test_a_worker_killed_while_its_commit_waits_leaves_the_message_to_be_redelivered(
    pool: asyncpg.Pool,
    broker: aio_pika.abc.AbstractChannel,
    settings: Settings,
    events: EventCollector,
    tmp_path: Path,
) -> None:
    """A worker process SIGKILLed between routing a message and committing: nothing was
    committed, so the message must still be the broker's, unacked, and go to the next
    worker. Acked before the commit (or before routing), it would be gone: no contact."""
    await setup_source(pool, "tg", [("a", 10, 1)])
    await pool.execute(BLOCK_COMMITS)
    holder = await asyncpg.connect(settings.database_url)
    try:
        await holder.execute("SELECT pg_advisory_lock(7301)")
        with worker_processes(settings, tmp_path) as procs:
            procs.append(spawn(settings, tmp_path, 0))
            await wait_ready(pool, settings, tmp_path, 0)
            await send(broker, settings, "lead.contact", lead("tg", "k:1"), "killed-1")
            [blocked] = await wait_until(
                lambda: pool.fetch(COMMIT_BLOCKED), timeout=15, what="the commit waiting"
            )
            procs[0].kill()
            await asyncio.to_thread(procs[0].wait, 10)
            # A backend waiting on a lock does not notice that its client is gone: ended
            # here, its transaction rolls back (it would commit once the lock is free).
            assert await pool.fetchval("SELECT pg_terminate_backend($1)", blocked["pid"])
            await wait_until(
                lambda: _gone(pool, blocked["pid"]), timeout=10, what="the backend ended"
            )
            assert await pool.fetchval("SELECT count(*) FROM contacts") == 0, "rolled back"
            assert await inbound_left(settings) == 1, "acked before its commit: lost"

            await holder.execute("SELECT pg_advisory_unlock(7301)")
            await pool.execute("DROP TRIGGER block_commit ON contacts")
            procs.append(spawn(settings, tmp_path, 1))
            [assigned] = await events.wait_for("contact.assigned", 1, timeout=15)
            assert assigned.data.inbound_message_id == "killed-1"
            await asyncio.to_thread(stop_gracefully, procs)
    finally:
        await holder.close()
    assert await pool.fetchval("SELECT count(*) FROM contacts") == 1
    await assert_clean_end(settings, logs_of(tmp_path))


async def _gone(pool: asyncpg.Pool, pid: int) -> bool:
    return bool(
        await pool.fetchval("SELECT count(*) = 0 FROM pg_stat_activity WHERE pid = $1", pid)
    )


async def test_a_failed_commit_leaves_the_message_to_be_redelivered(
    pool: asyncpg.Pool,
    broker: aio_pika.abc.AbstractChannel,
    settings: Settings,
    events: EventCollector,
    expected: Expected,
    worker: Worker,
) -> None:
    """Acknowledged before its transaction committed (or before it was routed at all),
    the message would be gone when the commit fails: no contact, ever."""
    await setup_source(pool, "tg", [("a", 10, 1)])
    await pool.execute(FAIL_FIRST_COMMIT)
    expected.errors = {"message_failed"}  # the failed commit, handed back as a bug
    await send(broker, settings, "lead.contact", lead("tg", "c:1"), "commit-1")
    [assigned] = await events.wait_for("contact.assigned", 1, timeout=15)
    assert assigned.data.inbound_message_id == "commit-1"
    assert await pool.fetchval("SELECT last_value FROM commits_seen") == 2  # failed, then not
    assert await pool.fetchval("SELECT count(*) FROM contacts") == 1
    await wait_until(lambda: _outcomes(worker, {"error": 1, "ok": 1}), what="both outcomes")


async def _outcomes(worker: Worker, wanted: dict[str, int]) -> bool:
    return dict(worker.outcomes) == wanted


@pytest.mark.settings(shutdown_grace_seconds=1, retry_max_seconds=0.2)
async def test_a_message_still_failing_transiently_at_shutdown_is_held_for_redelivery(
    pool: asyncpg.Pool,
    broker: aio_pika.abc.AbstractChannel,
    settings: Settings,
    events: EventCollector,
    worker_log: list[dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """PostgreSQL keeps failing (as far as routing can tell) until the worker stops: the
    message must be left unacknowledged, so that the next worker routes it."""
    await setup_source(pool, "tg", [("a", 10, 1)])

    async def unreachable(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionResetError("PostgreSQL went away")

    monkeypatch.setattr(distribution, "route", unreachable)
    first = Worker(settings)
    await first.start()
    try:
        await send(broker, settings, "lead.contact", lead("tg", "t:1"), "transient-1")

        async def retrying() -> bool:
            return any(e["event"] == "transient_failure" for e in worker_log)

        await wait_until(retrying, what="the transient failure retried")
    finally:
        await first.stop()
    assert first.outcomes == {"deferred": 1}
    assert await inbound_left(settings) == 1, "held: back in the queue"

    monkeypatch.undo()
    second = Worker(settings)
    await second.start()
    try:
        [assigned] = await events.wait_for("contact.assigned", 1)
    finally:
        await second.stop()
    assert assigned.data.inbound_message_id == "transient-1"
    assert second.outcomes == {"ok": 1}
    await assert_clean_end(settings, worker_log)
