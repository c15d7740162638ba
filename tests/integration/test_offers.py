"""Offers against real PostgreSQL and RabbitMQ: made, accepted, declined and rejected
through the routing transaction and through a worker's messages."""

import aio_pika
import asyncpg
import pytest

from tests.conftest import Expected
from tests.helpers import EventCollector, lead, send, wait_until
from tests.offering import CONTACT, LOADS, answer, keys, new, offering_source
from worker import admin, distribution, offers
from worker.app import Worker
from worker.settings import Settings
from worker.sql import Q


async def test_an_offer_counts_toward_load_and_an_accept_assigns(pool: asyncpg.Pool) -> None:
    [op] = await offering_source(pool, [("a", 1, 1)])
    first = await new(pool, "web", "w:1")
    assert keys(first) == ["contact.offered"]
    contact = first.contacts["m-w:1"]
    row = await pool.fetchrow(CONTACT, "m-w:1")
    assert (row["operator_id"], row["offered"], row["offer_attempt"]) == (op, True, 1)
    # The pending offer fills the operator: the next contact queues.
    assert keys(await new(pool, "web", "w:2")) == ["contact.queued"]
    assert await pool.fetch(LOADS) == [(op, 1)]

    accepted = await answer(pool, contact, op, True, "acc-1")
    assert keys(accepted) == ["contact.assigned"]
    row = await pool.fetchrow(CONTACT, "m-w:1")
    assert (row["operator_id"], row["offered"]) == (op, False)
    assert (
        await pool.fetchval(
            "SELECT outcome FROM offers WHERE contact_id = $1 AND attempt = 1", contact
        )
        == "accepted"
    )
    # The same accept again (redelivered): nothing new.
    assert keys(await answer(pool, contact, op, True, "acc-1")) == []


async def test_a_decline_moves_the_contact_on_and_skips_the_decliner(
    pool: asyncpg.Pool,
) -> None:
    a, b, c = await offering_source(pool, [("a", 5, 1), ("b", 5, 1), ("c", 5, 1)])
    contact = (await new(pool, "web", "w:1")).contacts["m-w:1"]
    tried = []
    for n in range(3):
        row = await pool.fetchrow(CONTACT, "m-w:1")
        tried.append(row["operator_id"])
        outcome = await answer(pool, contact, row["operator_id"], False, f"dec-{n}", "busy")
        assert keys(outcome) == ["contact.declined", "contact.offered"]
        declined = next(e for e in outcome.events if e.routing_key == "contact.declined")
        assert '"reason": "busy"' in declined.payload
    # Everyone was tried once; the skip list started over without the last one, so the
    # fourth offer goes to one of the first two.
    assert sorted(tried) == [a, b, c]
    row = await pool.fetchrow(CONTACT, "m-w:1")
    assert row["operator_id"] in tried[:2]
    assert row["offer_attempt"] == 4
    # Only the pending offer counts: the decliners' capacity was given back.
    assert dict(await pool.fetch(LOADS)) == {
        a: int(row["operator_id"] == a),
        b: int(row["operator_id"] == b),
        c: int(row["operator_id"] == c),
    }


async def test_a_declined_contact_queues_when_only_decliners_could_take_it(
    pool: asyncpg.Pool,
) -> None:
    a, b = await offering_source(pool, [("a", 5, 1), ("b", 1, 1)], strategy="least_loaded")
    await new(pool, "web", "w:1")  # to a (least loaded, ties by id... either way)
    first = await pool.fetchrow(CONTACT, "m-w:1")
    other = b if first["operator_id"] == a else a
    # Fill the other operator to the brim behind routing's back.
    await pool.execute("UPDATE operators SET is_active = false WHERE id = $1", other)
    contact = await pool.fetchval("SELECT id FROM contacts WHERE inbound_message_id = 'm-w:1'")
    outcome = await answer(pool, contact, first["operator_id"], False, "dec-1")
    # The decliner is available but skipped; nobody else can take it: queued.
    assert keys(outcome) == ["contact.declined", "contact.queued"]
    row = await pool.fetchrow(CONTACT, "m-w:1")
    assert (row["operator_id"], row["offer_skip"]) == (None, [first["operator_id"]])
    # Contacts behind it still go to the decliner: it does not block the source.
    assert keys(await new(pool, "web", "w:2")) == ["contact.offered"]
    assert (await pool.fetchrow(CONTACT, "m-w:2"))["operator_id"] == first["operator_id"]
    # Capacity appears for the other operator: the queued contact is offered to them.
    await admin.update_operator(pool, other, active=True)
    row = await pool.fetchrow(CONTACT, "m-w:1")
    assert (row["operator_id"], row["offered"], row["offer_attempt"]) == (other, True, 2)


async def test_wrong_late_and_closed_answers_are_rejected(pool: asyncpg.Pool) -> None:
    a, b = await offering_source(pool, [("a", 5, 1), ("b", 5, 1)])
    contact = (await new(pool, "web", "w:1")).contacts["m-w:1"]
    offered_to = (await pool.fetchrow(CONTACT, "m-w:1"))["operator_id"]
    wrong = b if offered_to == a else a

    def rejected(outcome: distribution.Outcome) -> list[str]:
        assert keys(outcome) == ["contact.answer_rejected"]
        return [
            r
            for r in ("expired", "not_offered", "closed")
            if f'"reason": "{r}"' in outcome.events[0].payload
        ]

    assert rejected(await answer(pool, contact, wrong, True, "x-1")) == ["not_offered"]
    # The deadline passed (the keeper has not run yet): too late.
    await pool.execute("UPDATE contacts SET offer_expires_at = now() - interval '1 s'")
    assert rejected(await answer(pool, contact, offered_to, True, "x-2")) == ["expired"]
    # Expired by the keeper and offered to the other: the first is still told "expired".
    source_id = await pool.fetchval("SELECT id FROM sources WHERE key = 'web'")
    assert await offers.expire_source(pool, source_id) == 1
    assert (await pool.fetchrow(CONTACT, "m-w:1"))["operator_id"] == wrong
    assert rejected(await answer(pool, contact, offered_to, False, "x-3")) == ["expired"]
    # The same rejected answer again writes no second event.
    assert keys(await answer(pool, contact, offered_to, False, "x-3")) == []
    await admin.close_contact(pool, contact)
    assert rejected(await answer(pool, contact, wrong, True, "x-4")) == ["closed"]
    assert await pool.fetch(LOADS) == [(a, 0), (b, 0)]
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM outbox WHERE routing_key = 'contact.answer_rejected'"
        )
        == 4
    )


async def test_a_declined_offer_does_not_use_up_the_smooth_share(pool: asyncpg.Pool) -> None:
    """Weights 1:1, smooth. `a` declines every offer it gets; `b` accepts. Shares count
    assignments: when `b` is full, `a` is owed the contacts it declined, not behind."""
    a, b = await offering_source(pool, [("a", 100, 1), ("b", 100, 1)])
    assigned = {a: 0, b: 0}
    for n in range(20):
        contact = (await new(pool, "web", f"w:{n}")).contacts[f"m-w:{n}"]
        op = (await pool.fetchrow(CONTACT, f"m-w:{n}"))["operator_id"]
        if op == a and n % 2 == 0:  # a declines every other contact it is offered
            await answer(pool, contact, a, False, f"d-{n}")
            op = (await pool.fetchrow(CONTACT, f"m-w:{n}"))["operator_id"]
        await answer(pool, contact, op, True, f"a-{n}")
        assigned[op] += 1
    # With the share given back, the split of accepted contacts stays within one of
    # even; without it, `a` would fall behind by every contact it declined.
    assert abs(assigned[a] - assigned[b]) <= 2, assigned


async def test_a_declined_weighted_random_offer_leaves_the_drawn_turn(pool: asyncpg.Pool) -> None:
    """weighted_random owes nobody anything: the turn the offer drew for `a` stays where
    it was drawn after `a` declines (moving it back, as smooth does, would favour
    decliners)."""
    a, _ = await offering_source(pool, [("a", 100, 1), ("b", 100, 1)], "weighted_random")
    turn = "SELECT smooth_start FROM source_weights WHERE operator_id = $1"
    for n in range(10):
        contact = (await new(pool, "web", f"w:{n}")).contacts[f"m-w:{n}"]
        op = (await pool.fetchrow(CONTACT, f"m-w:{n}"))["operator_id"]
        if op == a:
            break
    else:
        raise AssertionError("a was never offered a contact")
    drawn = await pool.fetchval(turn, a)
    outcome = await answer(pool, contact, a, False, "d")
    assert "contact.declined" in keys(outcome)
    assert await pool.fetchval(turn, a) == drawn


@pytest.mark.settings(backlog_sweep_seconds=3600)
async def test_worker_answers_through_messages(
    pool: asyncpg.Pool,
    settings: Settings,
    broker: aio_pika.abc.AbstractChannel,
    events: EventCollector,
    worker: Worker,
    expected: Expected,
) -> None:
    a, b = await offering_source(pool, [("a", 5, 1), ("b", 5, 1)])
    await send(broker, settings, "lead.contact", lead("web", "tg:1"), "lead-1")
    await send(broker, settings, "lead.contact", lead("web", "tg:2"), "lead-2")
    offered = await events.wait_for("contact.offered", 2)
    by_contact = {e.data.contact_id: e.data for e in offered}
    assert all(d.attempt == 1 and d.offer_expires_at is not None for d in by_contact.values())
    first, second = sorted(by_contact)
    op1, op2 = by_contact[first].operator_id, by_contact[second].operator_id
    assert op1 is not None and op2 is not None
    await send(
        broker, settings, "contact.accept", {"contact_id": first, "operator_id": op1}, "ans-1"
    )
    await send(
        broker,
        settings,
        "contact.decline",
        {"contact_id": second, "operator_id": op2, "reason": "on a call"},
        "ans-2",
    )
    other = a if op1 == b else b
    await send(
        broker, settings, "contact.accept", {"contact_id": first, "operator_id": other}, "ans-3"
    )
    # Malformed or unknown: dead letters with the usual reasons.
    await send(broker, settings, "contact.accept", {"contact_id": first}, "bad-1")
    await send(
        broker, settings, "contact.decline", {"contact_id": 10**9, "operator_id": a}, "bad-2"
    )
    expected.dead.update({"invalid_schema": 1, "unknown_contact": 1})

    [assigned] = await events.wait_for("contact.assigned", 1)
    assert (assigned.data.contact_id, assigned.data.operator_id) == (first, op1)
    [declined] = await events.wait_for("contact.declined", 1)
    assert (declined.data.operator_id, declined.data.reason) == (op2, "on a call")
    offered = await events.wait_for("contact.offered", 3)
    assert (offered[-1].data.contact_id, offered[-1].data.attempt) == (second, 2)
    assert offered[-1].data.operator_id != op2
    [rejected] = await events.wait_for("contact.answer_rejected", 1)
    assert (rejected.data.reason, rejected.data.answer) == ("not_offered", "accept")
    await wait_until(lambda: _settled(worker, 7), what="every message settled")


async def _settled(worker: Worker, n: int) -> bool:
    return sum(worker.outcomes.values()) >= n


async def test_offering_queued_contacts_claims_no_capacity_past_max_load(
    pool: asyncpg.Pool,
) -> None:
    [op] = await offering_source(pool, [("a", 1, 1)])
    outcome = await new(pool, "web", "first", "second")  # one offered, one queued
    [queued] = [c for c in outcome.contacts.values() if c not in outcome.assigned]
    source = await pool.fetchval("SELECT source_id FROM contacts WHERE id = $1", queued)
    async with pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        try:
            # The queued contact offered to the full operator: one unit over max_load.
            rows = await conn.fetch(
                Q.assign_contacts, [queued], [op], [op], [1], [], [], [], [], [], [30], [source]
            )
            assert rows == [], "a queued contact was offered past max_load"
            assert await conn.fetchval("SELECT open_load FROM operators WHERE id = $1", op) == 1
            assert await conn.fetchval("SELECT count(*) FROM offers") == 1
        finally:
            await tx.rollback()


async def test_recording_an_offer_claims_no_capacity_past_max_load(pool: asyncpg.Pool) -> None:
    """record_contacts' guards when it records offers: capacity, and one contact per
    message id."""
    [op] = await offering_source(pool, [("a", 1, 1)])
    source_id = await pool.fetchval("SELECT id FROM sources")
    await new(pool, "web", "first")  # offered: the operator's only unit

    async def record(conn: asyncpg.Connection, n: str) -> list[asyncpg.Record]:
        return await conn.fetch(
            Q.record_contacts,
            [n], [None], [None], [None], [n], [source_id], [op], ["hi"], [f"m-{n}"],
            [], [], [], [], [], [0], [30],
        )  # fmt: skip

    async with pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        try:
            [row] = await record(conn, "second")
            assert row["claimed"] is False, "the statement offered past max_load"
            assert await conn.fetchval("SELECT open_load FROM operators WHERE id = $1", op) == 1
        finally:
            await tx.rollback()
        await conn.execute("UPDATE operators SET max_load = 5")
        async with conn.transaction():
            # The same message id again, as a concurrent transaction would insert it
            # after our check: nothing inserted, nothing claimed, no error.
            assert await record(conn, "first") == []
    assert await pool.fetchval("SELECT count(*) FROM contacts") == 1
    assert await pool.fetchval("SELECT open_load FROM operators WHERE id = $1", op) == 1
