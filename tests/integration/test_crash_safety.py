"""A message is acknowledged only after what it did was committed, and a message the
worker could not finish is left for the broker to redeliver: a commit that fails, and a
transient failure still retrying when the worker stops, lose nothing."""

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
