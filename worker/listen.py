"""A PostgreSQL LISTEN connection kept open for a side task: NOTIFY wakes the task at once
(the relays when events were committed, the schedule task when a shift or leave was
set); when the connection drops it is opened again, backing off while it keeps dropping
(a standby in recovery cannot LISTEN). The task's own timer covers any gap."""

import asyncio
import contextlib

import asyncpg

from worker import log
from worker.retry import backoff

logger = log.get(__name__)


async def keep_listening(
    database_url: str,
    channel: str,
    wake: asyncio.Event,
    stop: asyncio.Event,
    retry_max_seconds: float,
    name: str,
) -> None:
    """Set `wake` on every NOTIFY on `channel`, and once on each (re)connection, to catch
    up on what was committed while not listening; until `stop` is set. `name` prefixes
    the log events (`NAME_listen_failed`, `NAME_listen_lost`)."""
    attempt = 0
    while not stop.is_set():
        if attempt:
            await asyncio.sleep(max(backoff(attempt, retry_max_seconds), 0.5))
        attempt += 1
        try:
            conn = await asyncpg.connect(database_url)
        except Exception as exc:
            logger.warning(f"{name}_listen_failed", error=type(exc).__name__)
            continue
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _c, lost=lost: lost.set())
        try:
            await conn.add_listener(channel, lambda *_args: wake.set())
            wake.set()
            attempt = 0
            await lost.wait()
        except Exception as exc:
            logger.warning(f"{name}_listen_lost", error=type(exc).__name__)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(conn.close(timeout=2))
