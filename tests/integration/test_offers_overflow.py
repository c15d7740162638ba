"""Where offers, overflow and availability meet: skip lists and smooth shares through an
overflow target, timers for contacts that were on offer, hand-backs routed as if new,
and presence messages in order within a batch. Each test's docstring says what the
contract asks and how an earlier version of the merged code broke it."""

import asyncio

import aio_pika
import asyncpg
import pytest

from tests.helpers import EventCollector, send, settled, wait_until
from tests.offering import answer, new
from worker import admin, offers, source_queueing, timers
from worker.app import Worker
from worker.settings import Settings
from worker.source_queueing import QueueingChange

CONTACT = """
    SELECT id, source_id, operator_id, offer_expires_at IS NOT NULL AS offered, offer_attempt,
           offer_skip, status
    FROM contacts WHERE inbound_message_id = $1
"""


async def _overflow_pair(
    pool: asyncpg.Pool, team_timeout: int = 30, weights: tuple[int, int] = (1, 1)
) -> tuple[int, list[int]]:
    """`home` (nobody can take its contacts) overflows after 1 s to `team` (two free
    operators, weight 1, offers with a 30 s timeout). Returns home's id and team's
    operator ids."""
    await source_queueing.add_source(
        pool,
        QueueingChange(),
        key="team",
        name=None,
        description="",
        strategy=None,
        accept_timeout=team_timeout,
    )
    team = [(await admin.add_operator(pool, f"t{n}", 1, True))["id"] for n in range(2)]
    await admin.set_weights(pool, "team", dict(zip(team, weights, strict=True)))
    await source_queueing.add_source(
        pool,
        QueueingChange(overflow_to="team", overflow_after=1),
        key="home",
        name=None,
        description="",
        strategy=None,
    )
    busy = (await admin.add_operator(pool, "h0", 0, True))["id"]
    await admin.set_weights(pool, "home", {busy: 1})
    return int(await pool.fetchval("SELECT id FROM sources WHERE key = $1", "home")), team


async def _overflowed_and_offered(
    pool: asyncpg.Pool, weights: tuple[int, int] = (1, 1)
) -> tuple[int, list[int], asyncpg.Record]:
    home, team = await _overflow_pair(pool, weights=weights)
    await new(pool, "home", "L1")
    await asyncio.sleep(1.1)
    await timers.tick(pool)  # overflows to team, and team's drain offers it
    c = await pool.fetchrow(CONTACT, "m-L1")
    assert c["offered"] and c["operator_id"] in team, dict(c)
    return home, team, c


async def test_a_declined_overflow_offer_skips_the_operator_who_declined(
    pool: asyncpg.Pool,
) -> None:
    """Contract: a decline offers the contact at once to the next operator, skipping
    whoever declined it. Through an overflow target the skip list is not read
    (`_read_overflowed` builds Queued without `skip`), so the one who just declined gets
    the same contact offered again while the other team member is free."""
    _home, team, c = await _overflowed_and_offered(pool, weights=(5, 1))
    first = c["operator_id"]
    await answer(pool, c["id"], first, False, "d-1", "busy")
    after = await pool.fetchrow(CONTACT, "m-L1")
    assert after["offered"], dict(after)
    other = next(i for i in team if i != first)
    assert after["operator_id"] == other, (
        f"declined by {first}, offered again to {after['operator_id']} "
        f"though {other} was free; skip list {after['offer_skip']}"
    )


async def test_an_overflowed_contact_offered_then_declined_may_still_go_to_the_target(
    pool: asyncpg.Pool,
) -> None:
    """Contract: a contact queued longer than overflow_after may also go to the target's
    operators. While it is offered, the target's timer (`forget_overflows`) deletes its
    overflow row; when the offer is declined the contact is queued again at home with
    no overflow row, and home's watermark is past it: it never overflows again, though
    the target has a free operator."""
    _home, team, c = await _overflowed_and_offered(pool)
    first = c["operator_id"]
    await timers.tick(pool)  # a tick while the offer is pending (every 0.5 s in a worker)
    other = next(i for i in team if i != first)
    await answer(pool, c["id"], first, False, "d-1", "busy")
    await asyncio.sleep(1.1)
    await timers.tick(pool)
    after = await pool.fetchrow(CONTACT, "m-L1")
    overflow_rows = await pool.fetchval(
        "SELECT count(*) FROM contact_overflows WHERE contact_id = $1", c["id"]
    )
    assert after["operator_id"] is not None, (
        f"stranded in home's queue: overflow rows {overflow_rows}, {other} free on team"
    )


async def test_an_expired_overflow_offer_moves_on_within_the_target_team(
    pool: asyncpg.Pool,
) -> None:
    """The same through a lapsed deadline: the expiry runs for the contact's own source
    (home, whose lock it takes) and must offer it on to team's other operator."""
    home, team, c = await _overflowed_and_offered(pool, weights=(5, 1))
    first = c["operator_id"]
    await pool.execute(
        "UPDATE contacts SET offer_expires_at = now() - interval '1 second' WHERE id = $1",
        c["id"],
    )
    expired = await offers.expire_source(pool, home)
    assert expired == 1
    after = await pool.fetchrow(CONTACT, "m-L1")
    other = next(i for i in team if i != first)
    assert after["operator_id"] == other, dict(after)


async def test_a_contact_offered_when_its_overflow_fell_due_still_overflows_later(
    pool: asyncpg.Pool,
) -> None:
    """Contract: a contact queued longer than overflow_after may also go to the target's
    operators. The timers' watermark moves past every contact id below the last due one
    that was queued at the tick; a contact that was on offer at that moment (not queued)
    is passed over for good: once its offer is declined it waits at home for ever, though
    the target has a free operator. (The same holds for waiting alerts, and for contacts
    handed back by `--requeue-open`, which keep their old id.)"""
    await source_queueing.add_source(
        pool, QueueingChange(), key="team", name=None, description="", strategy=None
    )
    helper = (await admin.add_operator(pool, "t0", 5, True))["id"]
    await admin.set_weights(pool, "team", {helper: 1})
    await source_queueing.add_source(
        pool,
        QueueingChange(overflow_to="team", overflow_after=1),
        key="home",
        name=None,
        description="",
        strategy=None,
        accept_timeout=30,
    )
    h1 = (await admin.add_operator(pool, "h1", 1, True))["id"]
    h2 = (await admin.add_operator(pool, "h2", 0, True))["id"]  # weighted, never free
    await admin.set_weights(pool, "home", {h1: 1, h2: 1})
    await new(pool, "home", "L1")  # offered to h1 (their one unit)
    await new(pool, "home", "L2")  # queued
    c1 = await pool.fetchrow(CONTACT, "m-L1")
    assert c1["offered"] and c1["operator_id"] == h1
    await asyncio.sleep(1.1)
    await timers.tick(pool)  # L2 overflows (and goes to t0); L1 is on offer
    assert (await pool.fetchrow(CONTACT, "m-L2"))["operator_id"] == helper
    await answer(pool, c1["id"], h1, False, "d-1", "busy")  # queued at home: h2 is full
    assert (await pool.fetchrow(CONTACT, "m-L1"))["operator_id"] is None
    await asyncio.sleep(0.2)
    await timers.tick(pool)
    await timers.tick(pool)
    after = await pool.fetchrow(CONTACT, "m-L1")
    mark = await pool.fetchval("SELECT overflowed_through FROM sources WHERE key = 'home'")
    assert after["operator_id"] == helper, (
        f"L1 queued {after}, never overflowed though t0 has room (home overflowed_through = {mark})"
    )


SHARE = """
    SELECT w.smooth_start, s.smooth_clock FROM source_weights w JOIN sources s ON s.id = w.source_id
    WHERE s.key = $1 AND w.operator_id = $2
"""


async def _share_given_back(pool: asyncpg.Pool, via_overflow: bool) -> None:
    """An offer of `team` (smooth) to x (weight 5; y weight 1 is never free), taken back
    because x goes away: x's smooth share on team must be given back, as for any offer
    (contract: a declined offer does not use up the operator's share)."""
    from worker import availability

    await source_queueing.add_source(
        pool,
        QueueingChange(),
        key="team",
        name=None,
        description="",
        strategy="smooth",
        accept_timeout=30,
    )
    x = (await admin.add_operator(pool, "x", 2, True))["id"]
    y = (await admin.add_operator(pool, "y", 0, True))["id"]
    await admin.set_weights(pool, "team", {x: 5, y: 1})
    if via_overflow:
        await source_queueing.add_source(
            pool,
            QueueingChange(overflow_to="team", overflow_after=1),
            key="home",
            name=None,
            description="",
            strategy=None,
        )
        h = (await admin.add_operator(pool, "h", 0, True))["id"]
        await admin.set_weights(pool, "home", {h: 1})
    before = await pool.fetchrow(SHARE, "team", x)
    if via_overflow:
        await new(pool, "home", "L1")
        await asyncio.sleep(1.1)
        await timers.tick(pool)
    else:
        await new(pool, "team", "L1")
    c = await pool.fetchrow(CONTACT, "m-L1")
    assert c["offered"] and c["operator_id"] == x, dict(c)
    await availability.set_presence(pool, x, "away", "cli")  # declines the offer for them
    assert (await pool.fetchrow(CONTACT, "m-L1"))["operator_id"] is None
    after = await pool.fetchrow(SHARE, "team", x)
    # Unavailable, x's row holds start - clock (what they are owed, frozen): given back,
    # they are owed the one contact (1/5) the lapsed offer took.
    owed_before = before["smooth_start"] - before["smooth_clock"]
    assert after["smooth_start"] == owed_before - 1 / 5, (
        f"x's team share not given back: stored {after['smooth_start']}, "
        f"expected {owed_before - 1 / 5}"
    )


async def test_a_taken_back_offer_gives_the_share_back(pool: asyncpg.Pool) -> None:
    """The control: an offer of team's own contact."""
    await _share_given_back(pool, via_overflow=False)


async def test_a_taken_back_overflow_offer_gives_the_share_back_on_the_target(
    pool: asyncpg.Pool,
) -> None:
    """The same offer made through overflow: withdraw_offers returns the contact's own
    source (home), so give_back_shares updates (home, x), a row that does not exist (or,
    were x weighted on home too, moves home's share back though it never advanced there),
    and x's share on team stays used up."""
    await _share_given_back(pool, via_overflow=True)


async def test_a_requeued_contact_is_routed_as_if_new_not_skipping_old_decliners(
    pool: asyncpg.Pool,
) -> None:
    """Contract: `--requeue-open` hands open contacts back, "routed again as if new". A
    contact that b declined and a then accepted keeps offer_skip [b] through the requeue
    (requeue_open_contacts leaves it), so when a goes away with --requeue-open the
    contact is passed over while b sits idle, until a comes back."""
    from tests.offering import offering_source
    from worker import availability

    a, b = await offering_source(pool, [("a", 1, 5), ("b", 1, 1)])
    await new(pool, "web", "L1")
    c = await pool.fetchrow(CONTACT, "m-L1")
    first = c["operator_id"]
    second = b if first == a else a
    await answer(pool, c["id"], first, False, "d-1", "busy")
    c = await pool.fetchrow(CONTACT, "m-L1")
    assert c["operator_id"] == second and c["offered"], dict(c)
    await answer(pool, c["id"], second, True, "a-1")
    await availability.set_presence(pool, second, "away", "cli", requeue_open=True)
    after = await pool.fetchrow(CONTACT, "m-L1")
    loads = dict(await pool.fetch("SELECT id, open_load FROM operators"))
    assert after["operator_id"] == first, (
        f"requeued contact left queued (skip {after['offer_skip']}) though operator "
        f"{first} is online and free; loads {loads}"
    )


@pytest.mark.settings(batch_linger_seconds=0.5)
async def test_an_accept_then_going_away_in_one_batch_keeps_the_accept(
    pool: asyncpg.Pool,
    settings: Settings,
    broker: aio_pika.abc.AbstractChannel,
    events: EventCollector,
    worker: Worker,
) -> None:
    """The operator's app accepts an offer, then the operator goes away: in that order,
    the contact is theirs (the accept came first). `Consumer._route` applies every
    operator.presence message of a delivery batch before the batch's other messages, so
    when both land in one batch the away declines the offer first (reason "operator
    away") and the accept is rejected: the outcome depends on batching."""
    from tests.offering import offering_source

    [a, _b] = await offering_source(pool, [("a", 1, 1), ("b", 0, 1)])
    await new(pool, "web", "L1")
    c = await pool.fetchrow(CONTACT, "m-L1")
    assert c["operator_id"] == a and c["offered"]
    body = {"contact_id": c["id"], "operator_id": a}
    await send(broker, settings, "contact.accept", body, "acc-1")
    await send(broker, settings, "operator.presence", {"operator_id": a, "status": "away"}, "p-1")
    await wait_until(lambda: settled(worker, 2), what="both messages")
    after = await pool.fetchrow(CONTACT, "m-L1")
    rejected = await pool.fetchval(
        "SELECT count(*) FROM outbox WHERE routing_key = 'contact.answer_rejected'"
    )
    assert after["operator_id"] == a and not after["offered"], (
        f"accept sent before going away was lost: contact {dict(after)}, "
        f"answer_rejected events {rejected}"
    )


@pytest.mark.settings(batch_linger_seconds=0)
async def test_control_an_accept_then_going_away_in_two_batches_keeps_the_accept(
    pool: asyncpg.Pool,
    settings: Settings,
    broker: aio_pika.abc.AbstractChannel,
    events: EventCollector,
    worker: Worker,
) -> None:
    """Control (passes): the same in two batches. The operator's app accepts an offer,
    then the operator goes away: in that order,
    the contact is theirs (the accept came first). `Consumer._route` applies every
    operator.presence message of a delivery batch before the batch's other messages, so
    when both land in one batch the away declines the offer first (reason "operator
    away") and the accept is rejected: the outcome depends on batching."""
    from tests.offering import offering_source

    [a, _b] = await offering_source(pool, [("a", 1, 1), ("b", 0, 1)])
    await new(pool, "web", "L1")
    c = await pool.fetchrow(CONTACT, "m-L1")
    assert c["operator_id"] == a and c["offered"]
    body = {"contact_id": c["id"], "operator_id": a}
    await send(broker, settings, "contact.accept", body, "acc-1")
    await wait_until(lambda: settled(worker, 1), what="the accept alone")
    await send(broker, settings, "operator.presence", {"operator_id": a, "status": "away"}, "p-1")
    await wait_until(lambda: settled(worker, 2), what="both messages")
    after = await pool.fetchrow(CONTACT, "m-L1")
    rejected = await pool.fetchval(
        "SELECT count(*) FROM outbox WHERE routing_key = 'contact.answer_rejected'"
    )
    assert after["operator_id"] == a and not after["offered"], (
        f"accept sent before going away was lost: contact {dict(after)}, "
        f"answer_rejected events {rejected}"
    )


LOAD_MISMATCH = """
    SELECT o.id, o.open_load,
           (SELECT count(*) FROM contacts c
            WHERE c.operator_id = o.id AND c.status = 'open') AS held
    FROM operators o
    WHERE o.open_load <> (SELECT count(*) FROM contacts c
                          WHERE c.operator_id = o.id AND c.status = 'open')
       OR o.open_load > o.max_load
"""


async def test_load_matches_what_operators_hold_through_offers_presence_and_requeues(
    pool: asyncpg.Pool,
) -> None:
    """(Passes) open_load = open + offered contacts, never above max_load, after offers,
    declines, accepts, a presence change with offers pending, a requeue, closes and an
    expiry."""
    from tests.offering import offering_source
    from worker import availability

    a, b, c = await offering_source(pool, [("a", 2, 1), ("b", 2, 1), ("c", 1, 1)])
    for n in range(6):
        await new(pool, "web", f"L{n}")
    assert await pool.fetch(LOAD_MISMATCH) == []
    rows = await pool.fetch(
        "SELECT id, operator_id FROM contacts WHERE offer_expires_at IS NOT NULL"
    )
    for n, r in enumerate(rows[:2]):
        await answer(pool, r["id"], r["operator_id"], True, f"acc-{n}")
    r = rows[2]
    await answer(pool, r["id"], r["operator_id"], False, "dec-1", "no")
    assert await pool.fetch(LOAD_MISMATCH) == []
    await availability.set_presence(pool, a, "away", "cli", requeue_open=True)
    assert await pool.fetch(LOAD_MISMATCH) == []
    await pool.execute(
        "UPDATE contacts SET offer_expires_at = now() WHERE offer_expires_at IS NOT NULL"
    )
    await offers.expire_source(pool, await pool.fetchval("SELECT id FROM sources"))
    assert await pool.fetch(LOAD_MISMATCH) == []
    await availability.set_presence(pool, a, "online", "cli")
    for cid in await pool.fetch("SELECT id FROM contacts WHERE operator_id IS NOT NULL"):
        await admin.close_contact(pool, cid["id"])
    assert await pool.fetch(LOAD_MISMATCH) == []
    assert [b, c]  # all three took part
