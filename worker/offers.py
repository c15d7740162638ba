"""Offers: a source with an accept timeout offers each contact routing gives an operator
instead of assigning it, and the operator's app answers on leads.inbound.

An offer is an assignment awaiting its answer: the contact has its operator (so it counts
toward their load from the start, claimed by the routing statements like any assignment)
and a deadline. Accepting clears the deadline (`contact.assigned`); declining, or letting
the deadline pass, takes the operator away again (`contact.declined` / `contact.expired`),
gives back their capacity and their smooth share, and routes the contact at once to the
next operator, skipping those who declined or let it expire (`contact.offered`), or
queues it (`contact.queued`). Answers that come too late, from another operator or for a
closed contact change nothing: `contact.answer_rejected`.

Everything runs inside the routing transaction of distribution.py, under the locks it
holds; `DeadlineKeeper` is the workers' side task that expires lapsed offers."""

import contextlib
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import asyncpg

from worker import log
from worker.assignment import Assignment
from worker.retry import backoff, is_transient
from worker.sql import Q

if TYPE_CHECKING:
    from worker.distribution import Outcome
    from worker.outbox import EventWriter

logger = log.get(__name__)
# Lapsed offers one transaction expires per source; more wait for the next round.
EXPIRE_BATCH = 10_000
# The deadline keeper looks again at least this often (a new offer's deadline is at least
# a second ahead, so it is never missed by more than this).
DEADLINE_POLL_SECONDS = 0.25
# Names the event ids of rejected answers (uuid5 of the answer's message id), so that a
# redelivered answer writes no second event.
_REJECTED_NAMESPACE = uuid.UUID("6f1d7b3c-8a53-4c41-9d2e-3f0c0e6e4a11")


class Rejection:
    EXPIRED = "expired"
    NOT_OFFERED = "not_offered"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class Answer:
    """A valid `contact.accept` or `contact.decline` message of the batch."""

    message_id: str
    contact_id: int
    operator_id: int
    accept: bool
    reason: str | None = None


@dataclass
class Answered:
    """What the answers of a transaction did."""

    accepted: list[int] = field(default_factory=list)
    declined: list[int] = field(default_factory=list)
    rejected: Counter[str] = field(default_factory=Counter)  # by reason
    repeated: int = 0  # answers already applied (the message came again): nothing to do

    def counts(self) -> dict[str, int]:
        """For the batch's log line: nothing when the batch held no answer."""
        if not (self.accepted or self.declined or self.rejected or self.repeated):
            return {}
        return {
            "accepted": len(self.accepted),
            "declined": len(self.declined),
            "answers_rejected": sum(self.rejected.values()),
            "answers_repeated": self.repeated,
        }


def offered(
    events: "EventWriter",
    row: asyncpg.Record,
    lead_external_id: str,
    source_key: str,
    a: Assignment,
    attempt: int,
    expires_at: datetime,
) -> None:
    """`contact.offered` for a contact given to `a.operator_id` as an offer."""
    events.offer_event(
        "contact.offered",
        row,
        row["assigned_at"],
        lead_external_id,
        source_key,
        a.operator_id,
        attempt,
        offer_expires_at=expires_at.isoformat(),
        affinity=a.affinity,
    )


async def answer(
    conn: asyncpg.Connection,
    answers: Sequence[Answer],
    outcome: "Outcome",
    events: "EventWriter",
) -> Counter[int]:
    """Apply the batch's answers in order, under the locks of their contacts' sources.
    Returns the capacity declines gave back, per operator (already released)."""
    answered = outcome.answered
    if not answers:
        return Counter()
    rows = await conn.fetch(
        Q.answer_state, [a.contact_id for a in answers], [a.operator_id for a in answers]
    )
    # Each contact's state, and how each (contact, operator)'s latest offer ended, as the
    # answers before this one in the batch left them.
    state: dict[int, dict[str, Any]] = {}
    history: dict[tuple[int, int], str | None] = {}
    accepts: list[int] = []
    declines: dict[int, str | None] = {}
    for a, row in zip(answers, rows, strict=True):
        now = state.setdefault(a.contact_id, dict(row))
        pair = (a.contact_id, a.operator_id)
        last = history.setdefault(pair, row["last_outcome"])
        if now["status"] == "closed":
            _reject(events, a, row, Rejection.CLOSED, answered)
        elif now["offered"] and now["operator_id"] == a.operator_id:
            if now["lapsed"]:
                _reject(events, a, row, Rejection.EXPIRED, answered)
            elif a.accept:
                accepts.append(a.contact_id)
                now["offered"], history[pair] = False, "accepted"
            else:
                declines[a.contact_id] = a.reason
                now["offered"], now["operator_id"], history[pair] = False, None, "declined"
        elif (last == "accepted" and a.accept and now["operator_id"] == a.operator_id) or (
            last == "declined" and not a.accept
        ):
            answered.repeated += 1  # applied before: the message came again
        elif last == "expired":
            _reject(events, a, row, Rejection.EXPIRED, answered)
        else:
            _reject(events, a, row, Rejection.NOT_OFFERED, answered)
    if accepts:
        for r in await conn.fetch(Q.accept_offers, accepts):
            answered.accepted.append(r["id"])
            outcome.assigned[r["id"]] = r["operator_id"]
            events.assigned(
                r,
                r["lead_external_id"],
                r["source_key"],
                Assignment(r["id"], r["source_id"], r["operator_id"], False),
                attempt=r["attempt"],
            )
    if not declines:
        return Counter()
    ids = sorted(declines)
    withdrawn = await withdraw(conn, ids, "declined", [declines[i] for i in ids], outcome, events)
    answered.declined.extend(r["id"] for r in withdrawn)
    return Counter(r["operator_id"] for r in withdrawn)


def _reject(
    events: "EventWriter", a: Answer, row: asyncpg.Record, reason: str, answered: Answered
) -> None:
    """`contact.answer_rejected`, its event id derived from the answer's message id."""
    answered.rejected[reason] += 1
    events.offer_event(
        "contact.answer_rejected",
        row,
        row["at"],
        row["lead_external_id"],
        row["source_key"],
        a.operator_id,
        None,
        event_id=uuid.uuid5(_REJECTED_NAMESPACE, a.message_id),
        status=row["status"],
        answer="accept" if a.accept else "decline",
        reason=reason,
    )


async def withdraw(
    conn: asyncpg.Connection,
    contact_ids: Sequence[int],
    how: str,
    reasons: Sequence[str | None],
    outcome: "Outcome",
    events: "EventWriter | None",
) -> list[asyncpg.Record]:
    """Take these pending offers back (`how`: declined or expired): the contacts queue
    again for the caller to route, the operators' capacity and smooth shares go back.
    Their events are written to `events` (None: the caller does, `withdrawn_events`);
    `contact.queued` for those routing leaves queued is written by `queue_again`."""
    rows = await conn.fetch(Q.withdraw_offers, list(contact_ids), how, list(reasons))
    if not rows:
        return rows
    freed = Counter(r["operator_id"] for r in rows)
    ids = sorted(freed)
    await conn.execute(Q.release_operators, ids, [freed[i] for i in ids])
    shares = Counter((r["offered_by"], r["operator_id"]) for r in rows)
    keys = sorted(shares)
    await conn.execute(
        Q.give_back_shares, [k[0] for k in keys], [k[1] for k in keys], [shares[k] for k in keys]
    )
    outcome.withdrawn.update((r["id"], r) for r in rows)
    if events is not None:
        withdrawn_events(rows, how, events)
    return rows


def withdrawn_events(rows: Sequence[asyncpg.Record], how: str, events: "EventWriter") -> None:
    """`contact.declined` or `contact.expired` for offers `withdraw` took back. Pure
    (no I/O), so that a bulk expiry builds them in a thread while routing runs."""
    for r in rows:
        extra = {"reason": r["reason"]} if how == "declined" and r["reason"] else {}
        events.offer_event(
            "contact." + how,
            r,
            r["at"],
            r["lead_external_id"],
            r["source_key"],
            r["operator_id"],
            r["attempt"],
            **extra,
        )


def queue_again(outcome: "Outcome", events: "EventWriter") -> None:
    """`contact.queued` for the withdrawn contacts that routing could offer to nobody."""
    for contact_id, r in outcome.withdrawn.items():
        if contact_id not in outcome.assigned:
            events.offer_event(
                "contact.queued",
                r,
                r["at"],
                r["lead_external_id"],
                r["source_key"],
                None,
                r["attempt"],
            )


class DeadlineKeeper:
    """The workers' side task that expires lapsed offers: it sleeps until the soonest
    deadline (looking again at least every DEADLINE_POLL_SECONDS), then, per source with
    lapsed offers, expires them all in one transaction and routes them on with the same
    batched routing that new contacts take. Several workers share the work: a source is
    expired by one of them at a time (a try-lock; the others pass it by), and what a
    killed worker left is found again by the next look, its deadlines being in the
    database."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        stopped_within: Callable[[float], Awaitable[bool]],
        on_committed: Callable[[], None],
        retry_max_seconds: float,
        poll_seconds: float = DEADLINE_POLL_SECONDS,
    ) -> None:
        self._pool = pool
        self._stopped_within = stopped_within
        self._on_committed = on_committed  # events were written for the relays
        self._retry_max = retry_max_seconds
        self._poll = poll_seconds

    async def run(self) -> None:
        attempt = 0
        wait = 0.0
        while not await self._stopped_within(wait):
            try:
                wait = await self.once()
                attempt = 0
            except Exception as exc:
                attempt += 1
                if not is_transient(exc):
                    logger.exception("offer_deadlines_failed")
                wait = backoff(attempt, self._retry_max)

    async def once(self) -> float:
        """Expire what is due; returns how long to wait before looking again."""
        row = await self._pool.fetchrow(Q.offer_deadlines)
        expired = await expire_sources(self._pool, row["due"]) if row["due"] else 0
        if expired:
            self._on_committed()
            return 0.0  # at once: more may have lapsed meanwhile
        next_in = row["next_in"]
        return self._poll if next_in is None else max(min(next_in, self._poll), 0.0)


async def expire_sources(pool: asyncpg.Pool, source_ids: Sequence[int]) -> int:
    """Expire the lapsed offers of these sources (those no other worker is at) and route
    them on, all in one transaction: the sources usually share operators, whose row locks
    would make transactions of their own wait for each other anyway. Returns how many
    were expired."""
    from worker import distribution

    async with pool.acquire() as conn:
        async with conn.transaction():
            mine = await conn.fetch(Q.try_lock_offer_deadlines, sorted(source_ids))
            if not mine:
                return 0
            ids = {r["id"] for r in mine}
            await distribution.lock_sources(conn, ids)
            due = await conn.fetch(Q.due_offers, sorted(ids), EXPIRE_BATCH)
            if not due:
                return 0
            outcome = await distribution.take_back_offers(
                conn, {r["source_id"] for r in due}, [r["id"] for r in due]
            )
        logger.info(
            "offers_expired",
            sources=len({r["source_id"] for r in due}),
            expired=len(outcome.withdrawn),
            offered_again=len(outcome.assigned),
        )
    if outcome.undrained:
        with contextlib.suppress(Exception):  # the backlog sweep is the safety net
            await distribution.drain_after_commit(pool, outcome.undrained)
    await _set_away_after_lapses(pool, outcome.withdrawn.values())
    return len(outcome.withdrawn)


async def _set_away_after_lapses(pool: asyncpg.Pool, lapsed: Iterable[asyncpg.Record]) -> None:
    """After the expiry committed: an operator whose offers of a source with
    `expire_to_away` N lapsed N times in a row is set away (reason expired_offers), which
    also moves their other pending offers on. In a transaction of its own, as any
    presence change (it locks every source of theirs, in order); were the worker to stop
    first, the next lapse of theirs finds the row all the same."""
    from worker import availability

    by_source: dict[int, set[int]] = {}
    for r in lapsed:
        by_source.setdefault(r["offered_by"], set()).add(r["operator_id"])
    away: set[int] = set()
    for source_id, operators in sorted(by_source.items()):
        rows = await pool.fetch(Q.expired_in_a_row, sorted(operators - away), source_id)
        away |= {r["id"] for r in rows}
    for operator_id in sorted(away):
        await availability.set_presence(pool, operator_id, "away", "expired_offers")
        logger.info("operator_away_after_lapsed_offers", operator_id=operator_id)


async def expire_source(pool: asyncpg.Pool, source_id: int) -> int:
    """`expire_sources` for one source."""
    return await expire_sources(pool, [source_id])
