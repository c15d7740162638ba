"""A source's queueing settings, each off by default: the order of its backlog (`fifo`,
or `lifo`: newest first within a priority), overflow to another source's operators after
a contact has waited some seconds, and a waiting alert after some seconds. Checked and
stored here for the CLI and `leadrouter apply`, in the caller's transaction: overflow
settings change one at a time (an advisory lock), so that no two changes make a cycle
(A -> B -> A) together. The timers that act on them live in timers.py."""

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg

from worker import admin
from worker.admin import Row
from worker.errors import UserError
from worker.sql import Q

QUEUE_ORDERS = ("fifo", "lifo")
MAX_SECONDS = 30 * 24 * 3600  # a month: longer waits are not what these are for


@dataclass(frozen=True, slots=True)
class QueueingChange:
    """What to change; None leaves a setting as it is. `overflow_after` 0 and
    `alert_after` 0 turn those off."""

    queue_order: str | None = None
    overflow_to: str | None = None  # a source key
    overflow_after: int | None = None
    alert_after: int | None = None

    def is_empty(self) -> bool:
        return self == QueueingChange()

    def check(self) -> None:
        """What can be refused without the database."""
        if self.queue_order is not None and self.queue_order not in QUEUE_ORDERS:
            raise UserError(f"queue order must be one of {', '.join(QUEUE_ORDERS)}")
        for name, value in (("overflow", self.overflow_after), ("alert", self.alert_after)):
            if value is not None and not 0 <= value <= MAX_SECONDS:
                raise UserError(f"{name} seconds must be between 0 (off) and {MAX_SECONDS}")
        if self.overflow_after == 0 and self.overflow_to is not None:
            raise UserError("overflow after 0 seconds turns overflow off: give no target with it")


async def store(conn: asyncpg.Connection, source_id: int, change: QueueingChange) -> None:
    """Apply `change` to the source, in the caller's transaction; refuses (UserError) an
    unknown target, the source itself, a target without a time, and a cycle."""
    change.check()
    if change.is_empty():
        return
    await conn.execute(Q.lock_overflow_settings)
    row = await conn.fetchrow(Q.source_queueing, source_id)
    order = change.queue_order or row["queue_order"]
    target, after = row["overflow_to"], row["overflow_after"]
    if change.overflow_after == 0:
        target, after = None, None
    elif change.overflow_after is not None:
        after = change.overflow_after
    if change.overflow_to is not None:
        found = await conn.fetchrow(Q.source_by_key, change.overflow_to)
        if found is None:
            raise UserError(f"no source with key {change.overflow_to!r} to overflow to")
        target = int(found["id"])
        if target == source_id:
            raise UserError(f"source {row['key']!r} cannot overflow to itself")
    if (target is None) != (after is None):
        raise UserError("overflow needs both a target source and the seconds after which")
    if target is not None:
        await _refuse_cycle(conn, row["key"], source_id, target)
    alert = row["alert_after"]
    if change.alert_after is not None:
        alert = change.alert_after or None
    changed = (target, after) != (row["overflow_to"], row["overflow_after"])
    await conn.execute(Q.store_queueing, source_id, order, target, after, alert, changed)
    if changed:
        await conn.execute(Q.mark_receiving_sources)


async def _refuse_cycle(conn: asyncpg.Connection, key: str, source_id: int, target: int) -> None:
    following: dict[int, int | None] = {
        r["id"]: r["overflow_to"] for r in await conn.fetch(Q.overflow_targets)
    }
    following[source_id] = target
    keys = {r["id"]: r["key"] for r in await conn.fetch(Q.list_sources)}
    path: list[str] = [key]
    at: int | None = target
    while at is not None and at != source_id and len(path) <= len(following):
        path.append(keys[at])
        at = following.get(at)
    if at == source_id:
        raise UserError(f"overflow would go round: {' -> '.join([*path, key])}")


async def add_source(pool: asyncpg.Pool, change: QueueingChange, **fields: Any) -> Row:
    """`sources add` with queueing settings, all or nothing (`fields`: admin.add_source's)."""
    return await _stored(pool, change, lambda conn: admin.add_source(conn, **fields))


async def update_source(pool: asyncpg.Pool, change: QueueingChange, **fields: Any) -> Row:
    """`sources update` with queueing settings, all or nothing (`fields`:
    admin.update_source's)."""
    return await _stored(pool, change, lambda conn: admin.update_source(conn, **fields))


async def _stored(
    pool: asyncpg.Pool,
    change: QueueingChange,
    write: Callable[[asyncpg.Connection], Awaitable[Row]],
) -> Row:
    change.check()
    async with pool.acquire() as conn, conn.transaction():
        row = await write(conn)
        await store(conn, row["id"], change)
        return await _with_queueing(conn, row)


async def _with_queueing(conn: asyncpg.Connection, row: dict[str, object]) -> dict[str, object]:
    q = await conn.fetchrow(Q.queueing_shown, row["id"])
    return {**row, **dict(q)}
