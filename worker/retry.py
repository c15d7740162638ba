"""Which failures are transient (wait and retry, never dead-letter) and how long to wait."""

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import aiormq.exceptions
import asyncpg

from worker import log

logger = log.get(__name__)
T = TypeVar("T")

# SQLSTATE classes that a retry can outlive: connection exception, transaction rollback
# (serialization failure, deadlock), insufficient resources, operator intervention
# (admin shutdown, cannot connect now), invalid authorization (a rotated password).
_TRANSIENT_SQLSTATE_CLASSES = {"08", "28", "40", "53", "57"}
# States of the whole deployment rather than of one message, which ops fix while the
# messages wait: a read-only database (failover), missing privilege, a worker deployed
# before `leadrouter migrate` (undefined table or column), a lock timeout, a dropped
# database. Handing messages back would burn their delivery limit in milliseconds.
_TRANSIENT_SQLSTATES = {"25006", "42501", "42P01", "42703", "55P03", "3D000"}


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, asyncpg.PostgresError):
        state = exc.sqlstate or ""
        return state[:2] in _TRANSIENT_SQLSTATE_CLASSES or state in _TRANSIENT_SQLSTATES
    if isinstance(exc, asyncpg.exceptions.ConnectionDoesNotExistError):
        return True
    if isinstance(exc, asyncpg.exceptions.TargetServerAttributeNotMatched):
        # Every host of a multi-host URL answered, none as `target_session_attrs` asks
        # (read-write): a failover is under way, a standby about to be promoted.
        return True
    if isinstance(exc, asyncpg.exceptions.InternalClientError):
        # The server ended the session while it sat idle in the pool (a primary shutting
        # down sends "admin shutdown" to every session): asyncpg is still taking that
        # error in when the connection is used. A new connection outlives it.
        return str(exc).startswith("cannot switch to state")
    if isinstance(exc, asyncpg.InterfaceError):
        return "closed" in str(exc) or "closing" in str(exc)
    if isinstance(exc, aiormq.exceptions.AMQPError | aiormq.exceptions.ChannelInvalidStateError):
        # Connection and channel loss, and an unroutable dead-letter publish (someone
        # removed the dead-letter queue, which the consumer then declares again):
        # waiting loses nothing.
        return True
    return isinstance(exc, OSError | ConnectionError | TimeoutError)


def read_only(exc: BaseException) -> bool:
    """The server refused a write as read-only: the connection is to a standby (a
    primary that was demoted, or a URL naming a standby). Connections made before the
    failover stay with that server: the pool must make new ones, which
    `target_session_attrs=read-write` sends to the new primary."""
    return isinstance(exc, asyncpg.ReadOnlySQLTransactionError)


def backoff(attempt: int, cap: float) -> float:
    """Exponential backoff from 50 ms with full jitter, at most `cap` seconds."""
    return random.uniform(0, min(cap, 0.05 * 2 ** min(attempt, 32)))


async def stopped_within(stop: asyncio.Event, seconds: float) -> bool:
    """Wait this long, or less if `stop` is set; returns whether it is (side tasks'
    sleeps, cut short by shutdown)."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
    return stop.is_set()


async def connect_with_retry(
    what: str, connect: Callable[[], Awaitable[T]], attempts: int, cap: float
) -> T:
    """Call `connect` until it succeeds or `attempts` transient failures have passed."""
    for attempt in range(1, attempts + 1):
        try:
            return await connect()
        except Exception as exc:
            if not is_transient(exc) or attempt == attempts:
                raise
            delay = max(backoff(attempt, cap), cap / 4)
            logger.warning(
                "connect_failed",
                target=what,
                attempt=attempt,
                retry_in=round(delay, 2),
                error=type(exc).__name__,
            )
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")


DEADLOCK_ATTEMPTS = 5


async def in_transaction(
    pool: asyncpg.Pool, work: Callable[[asyncpg.Connection], Awaitable[T]], readonly: bool = False
) -> T:
    """Run `work` in a transaction of its own, again from the start when PostgreSQL broke a
    deadlock by aborting it (an admin action against the workers, in the rare lock cycle
    distribution.py describes) or a concurrent transaction took the capacity it chose
    (a serialization failure): the CLI then succeeds instead of failing on a retryable
    error."""
    for attempt in range(1, DEADLOCK_ATTEMPTS + 1):
        try:
            async with pool.acquire() as conn, conn.transaction(readonly=readonly):
                return await work(conn)
        except (asyncpg.DeadlockDetectedError, asyncpg.SerializationError):
            if attempt == DEADLOCK_ATTEMPTS:
                raise
            logger.warning("deadlock_retrying", attempt=attempt)
            await asyncio.sleep(backoff(attempt, 1.0))
    raise AssertionError("unreachable")
