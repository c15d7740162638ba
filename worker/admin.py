"""Admin actions behind the CLI. Those that change who can take work route the backlog
in the same transaction and leave their events in the outbox for the worker's relay."""

import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg
from pydantic import ValidationError

from schemas.inbound import ContactAccept, ContactDecline
from worker import distribution, offers
from worker.decode import describe
from worker.errors import UserError
from worker.retry import in_transaction
from worker.sql import Q
from worker.strategies import DEFAULT_STRATEGY, STRATEGIES

Row = dict[str, Any]
MAX_ACCEPT_TIMEOUT = 86_400  # seconds (the sources table's CHECK)
MAX_EXPIRE_TO_AWAY = 1000  # offers in a row (the sources table's CHECK)


async def add_operator(pool: asyncpg.Pool, name: str, max_load: int, active: bool) -> Row:
    _check_name(name)
    if max_load < 0:
        raise UserError(f"max-load must be 0 or more, not {max_load}")
    try:
        return dict(await pool.fetchrow(Q.insert_operator, name, active, max_load))
    except asyncpg.UniqueViolationError:
        raise UserError(_name_taken(name)) from None


async def list_operators(pool: asyncpg.Pool) -> list[Row]:
    """Every operator, with their presence, schedule and whether they take work now."""
    from worker.availability import describe

    now = datetime.now(UTC)
    return [dict(r) | describe(r, now) for r in await pool.fetch(Q.list_operators)]


async def update_operator(
    pool: asyncpg.Pool,
    operator_id: int,
    name: str | None = None,
    max_load: int | None = None,
    active: bool | None = None,
) -> tuple[Row, int]:
    """Change an operator; returns it and how many queued contacts it was given."""
    if name is not None:
        _check_name(name)
    if max_load is not None and max_load < 0:
        raise UserError(f"max-load must be 0 or more, not {max_load}")

    async def update(conn: asyncpg.Connection) -> tuple[Row, int, set[int]]:
        source_ids = {r["source_id"] for r in await conn.fetch(Q.operator_source_ids, operator_id)}
        await distribution.lock_sources(conn, source_ids)
        try:
            row = await conn.fetchrow(Q.update_operator, operator_id, name, max_load, active)
        except asyncpg.UniqueViolationError:
            raise UserError(_name_taken(name or "")) from None
        if row is None:
            raise UserError(f"no operator with id {operator_id}")
        drained = await distribution.drain_sources(conn, source_ids)
        if drained.total():  # its load as it is now, with the contacts it was just given
            row = await conn.fetchrow(Q.operator_by_id, operator_id)
        # Weighted for more sources since they were read before the locks: those are
        # routed right after commit.
        now = {r["source_id"] for r in await conn.fetch(Q.operator_source_ids, operator_id)}
        return dict(row), drained.total(), now - source_ids

    row, drained, undrained = await in_transaction(pool, update)
    late = await _drain_after_commit(pool, undrained)
    if late:  # its load after those too
        row = dict(await pool.fetchrow(Q.operator_by_id, operator_id))
    return row, drained + late


def max_load_warning(row: Row) -> str | None:
    """What to tell whoever set an operator's max-load below their open contacts: nothing
    is taken from them, and no new contact comes until they are below it again."""
    load, limit = row["load"], row["max_load"]
    if load <= limit:
        return None
    until = f"until fewer than {limit} are open" if limit else "while max-load is 0"
    return (
        f"operator {row['id']} ({row['name']}) keeps their {load} open contacts, over "
        f"max-load {limit}, and gets no new contact {until}"
    )


_INVALID_SOURCE = (
    "the key is lower-case letters, digits, '.', '_' or '-' (at most 128, starting with a "
    "letter or digit); name up to 256 characters, description up to 2000"
)


async def add_source(
    pool: asyncpg.Pool | asyncpg.Connection,
    key: str,
    name: str | None,
    description: str,
    strategy: str | None,
    affinity_hours: int | None = None,
    accept_timeout: int = 0,
    expire_to_away: int = 0,
) -> Row:
    strategy = strategy or DEFAULT_STRATEGY
    _check_strategy(strategy)
    _check_affinity(affinity_hours)
    _check_accept_timeout(accept_timeout)
    _check_expire_to_away(expire_to_away)
    try:
        row = await pool.fetchrow(
            Q.insert_source,
            key,
            name or key,
            description,
            strategy,
            affinity_hours or None,
            accept_timeout,
            expire_to_away,
        )
    except asyncpg.UniqueViolationError:
        raise UserError(f"a source with key {key!r} already exists") from None
    except asyncpg.CheckViolationError:
        raise UserError(f"invalid source {key!r}: {_INVALID_SOURCE}") from None
    return dict(row)


async def update_source(
    pool: asyncpg.Pool | asyncpg.Connection,
    key: str,
    name: str | None = None,
    description: str | None = None,
    strategy: str | None = None,
    affinity_hours: int | None = None,
    accept_timeout: int | None = None,
    expire_to_away: int | None = None,
) -> Row:
    """Change a source; affinity_hours 0 turns affinity off, accept_timeout 0 turns
    offers off, expire_to_away 0 never sets anyone away, None leaves each."""
    if strategy is not None:
        _check_strategy(strategy)
    _check_affinity(affinity_hours)
    _check_accept_timeout(accept_timeout)
    _check_expire_to_away(expire_to_away)
    try:
        row = await pool.fetchrow(
            Q.update_source,
            key,
            name,
            description,
            strategy,
            affinity_hours is not None,
            affinity_hours or None,
            accept_timeout,
            expire_to_away,
        )
    except asyncpg.CheckViolationError:
        raise UserError(f"invalid source {key!r}: {_INVALID_SOURCE}") from None
    if row is None:
        raise UserError(f"no source with key {key!r}")
    return dict(row)


def _check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise UserError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")


def _check_expire_to_away(offers: int | None) -> None:
    if offers is not None and not 0 <= offers <= MAX_EXPIRE_TO_AWAY:
        raise UserError(
            f"expire-to-away must be between 0 (off) and {MAX_EXPIRE_TO_AWAY} offers in a row"
        )


def _check_accept_timeout(seconds: int | None) -> None:
    if seconds is not None and not 0 <= seconds <= MAX_ACCEPT_TIMEOUT:
        raise UserError(
            f"accept timeout must be between 0 (offers off) and {MAX_ACCEPT_TIMEOUT} seconds"
        )


def _check_affinity(hours: int | None) -> None:
    if hours is not None and not 0 <= hours <= 24 * 365:
        raise UserError("affinity hours must be between 0 (off) and 8760")


async def list_sources(pool: asyncpg.Pool) -> list[Row]:
    return [dict(r) for r in await pool.fetch(Q.list_sources)]


async def set_source_history(pool: asyncpg.Pool, key: str, on: bool) -> Row:
    """Record the source's decisions (`contacts explain`) from now on, or not; what is
    recorded stays until pruned."""
    row = await pool.fetchrow(Q.set_source_history, key, on)
    if row is None:
        raise UserError(f"no source with key {key!r}")
    return dict(row)


async def set_weights(pool: asyncpg.Pool, source_key: str, weights: dict[int, int]) -> int:
    """Replace the source's weights; returns how many queued contacts were then assigned."""
    bad = {op: w for op, w in weights.items() if w <= 0}
    if bad:
        raise UserError(f"weights must be positive integers: {bad}")

    async def replace(conn: asyncpg.Connection) -> int:
        source = await _source(conn, source_key)
        await distribution.lock_sources(conn, {source["id"]})
        missing = [r["id"] for r in await conn.fetch(Q.missing_operators, list(weights))]
        if missing:
            raise UserError(f"no operator with id {', '.join(map(str, missing))}")
        await conn.execute(Q.delete_weights, source["id"])
        await conn.execute(Q.insert_weights, source["id"], list(weights), list(weights.values()))
        return (await distribution.drain_sources(conn, {source["id"]})).total()

    return await in_transaction(pool, replace)


async def show_weights(pool: asyncpg.Pool, source_key: str) -> list[Row]:
    async with pool.acquire() as conn:
        source = await _source(conn, source_key)
        return [dict(r) for r in await conn.fetch(Q.show_weights, source["id"])]


async def list_contacts(
    pool: asyncpg.Pool,
    source_key: str | None = None,
    operator_id: int | None = None,
    status: str | None = None,
    unassigned: bool = False,
    limit: int = 1000,
) -> list[Row]:
    rows = await pool.fetch(Q.list_contacts, source_key, operator_id, status, unassigned, limit)
    return [dict(r) for r in rows]


async def list_leads(pool: asyncpg.Pool, limit: int = 100) -> list[Row]:
    return [dict(r) for r in await pool.fetch(Q.list_leads, limit)]


async def show_lead(pool: asyncpg.Pool, external_id: str) -> Row:
    """A lead with all its contacts across sources."""
    lead = await pool.fetchrow(Q.lead_by_external_id, external_id)
    if lead is None:
        raise UserError(f"no lead with external id {external_id!r}")
    contacts = [dict(r) for r in await pool.fetch(Q.lead_contacts, lead["id"])]
    return {**dict(lead), "contacts": contacts}


async def close_contact(pool: asyncpg.Pool, contact_id: int) -> distribution.Outcome:
    """Close a contact as a `contact.close` message would; the outcome says whether it
    was already closed and how many queued contacts its freed capacity went to."""

    async def close(conn: asyncpg.Connection) -> distribution.Outcome:
        scope = await distribution.read_scope(conn, (), [contact_id])
        if scope.unknown_contacts:
            raise UserError(f"no contact with id {contact_id}")
        return await distribution.route(conn, scope, close_ids=[contact_id])

    outcome = await in_transaction(pool, close)
    await _drain_after_commit(pool, outcome.undrained)
    return outcome


async def answer_offer(
    pool: asyncpg.Pool,
    contact_id: int,
    operator_id: int,
    accept: bool,
    reason: str | None = None,
) -> distribution.Outcome:
    """Accept or decline an offer as a `contact.accept` / `contact.decline` message would
    (the same checks, the same events, a rejection included); `Outcome.answered` says
    what came of it."""
    body = {"contact_id": contact_id, "operator_id": operator_id}
    model = ContactAccept if accept else ContactDecline
    if not accept and reason is not None:
        body["reason"] = reason  # type: ignore[assignment]
    try:
        model.model_validate(body)
    except ValidationError as exc:
        raise UserError(describe(exc)) from None
    answer = offers.Answer(f"cli:{uuid.uuid4()}", contact_id, operator_id, accept, reason)

    async def run(conn: asyncpg.Connection) -> distribution.Outcome:
        scope = await distribution.read_scope(conn, (), [contact_id])
        if scope.unknown_contacts:
            raise UserError(f"no contact with id {contact_id}")
        return await distribution.route(conn, scope, answers=[answer])

    outcome = await in_transaction(pool, run)
    await _drain_after_commit(pool, outcome.undrained)
    return outcome


async def _drain_after_commit(pool: asyncpg.Pool, source_ids: set[int]) -> int:
    """Capacity an action freed for sources it did not hold the locks of: used now, not
    at the next backlog sweep (see distribution.Outcome.undrained)."""
    if not source_ids:
        return 0
    return (await distribution.drain_after_commit(pool, source_ids)).total()


async def _source(conn: asyncpg.Connection, key: str) -> asyncpg.Record:
    source = await conn.fetchrow(Q.source_by_key, key)
    if source is None:
        raise UserError(f"no source with key {key!r}")
    return source


def _name_taken(name: str) -> str:
    return f"an operator named {name!r} already exists (names are unique)"


def _check_name(name: str) -> None:
    if not 1 <= len(name) <= 256:
        raise UserError("name must be 1 to 256 characters")
