"""Each contact's history against real PostgreSQL (and RabbitMQ through a worker): every
decision recorded in its own transaction with what routing decided on, told back by
`contacts explain` (text and --json), pruned by age, and nothing at all when off."""

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import asyncpg
import pytest

from tests.commands import as_json, fails_cleanly, leadrouter
from tests.helpers import EventCollector, lead, route_new, send, setup_source
from tests.offering import answer, new, offering_source
from worker import admin, availability, history, offers, source_queueing, timers
from worker.app import Worker
from worker.errors import UserError
from worker.settings import Settings
from worker.source_queueing import QueueingChange


async def story(pool: asyncpg.Pool, message_id: str) -> dict[str, Any]:
    contact = await pool.fetchval(
        "SELECT id FROM contacts WHERE inbound_message_id = $1", message_id
    )
    async with pool.acquire() as conn:
        return await history.explain(conn, contact)


def kinds(s: dict[str, Any]) -> list[str]:
    return [d["kind"] for d in s["decisions"]]


def candidate_ids(d: dict[str, Any]) -> list[int]:
    return [c["operator_id"] for c in d["candidates"]]


@pytest.fixture
def history_off() -> Iterator[None]:
    history.configure(False)
    yield
    history.configure(True)


async def test_smooth_records_the_candidates_with_lag_and_finish(pool: asyncpg.Pool) -> None:
    _a, b, c = await setup_source(pool, "web", [("a", 5, 1), ("b", 5, 2), ("c", 5, 3)])
    await new(pool, "web", "w:1", "w:2")
    first = await story(pool, "m-w:1")
    [d] = first["decisions"]
    assert (d["kind"], d["strategy"], d["result"], d["routed_by"]) == (
        "assigned",
        "smooth",
        "chosen",
        "web",
    )
    # Weights 1/2/3 from one start: the heaviest finishes first and takes it.
    assert d["operator_id"] == c and candidate_ids(d)[0] == c
    by_id = {x["operator_id"]: x for x in d["candidates"]}
    assert by_id[c] == {
        "operator_id": c,
        "load": 0,
        "max_load": 5,
        "weight": 3,
        "lag": 0.0,
        "finish": pytest.approx(1 / 3, abs=1e-6),
    }
    assert d["read"] == 3 and d["skipped"] == []
    # The second contact of the batch sees the clock moved on and c's load counted.
    [second] = (await story(pool, "m-w:2"))["decisions"]
    assert second["operator_id"] == b and second["clock"] == pytest.approx(1 / 6, abs=1e-6)
    assert {x["operator_id"]: x["lag"] for x in second["candidates"]}[b] == pytest.approx(
        2 / 6, abs=1e-4
    )


async def test_least_loaded_shows_ratios_and_an_operator_full_within_the_batch(
    pool: asyncpg.Pool,
) -> None:
    a, b = await setup_source(pool, "web", [("a", 1, 2), ("b", 5, 1)], strategy="least_loaded")
    await new(pool, "web", "w:1", "w:2")
    [d1] = (await story(pool, "m-w:1"))["decisions"]
    assert d1["operator_id"] == a
    assert [(c["operator_id"], c["load_per_weight"]) for c in d1["candidates"]] == [
        (a, 0.0),
        (b, 0.0),
    ]
    [d2] = (await story(pool, "m-w:2"))["decisions"]
    # a filled with the batch's first contact: read, but full at that point.
    assert d2["operator_id"] == b and candidate_ids(d2) == [b]
    assert d2["skipped"] == [{"operator_id": a, "why": "full"}]


async def test_weighted_random_shows_each_candidates_probability(pool: asyncpg.Pool) -> None:
    a, b = await setup_source(pool, "web", [("a", 5, 1), ("b", 5, 3)], strategy="weighted_random")
    await new(pool, "web", "w:1")
    [d] = (await story(pool, "m-w:1"))["decisions"]
    assert {c["operator_id"]: c["probability"] for c in d["candidates"]} == {a: 0.25, b: 0.75}


async def test_queued_then_assigned_when_a_close_frees_the_operator(pool: asyncpg.Pool) -> None:
    [op] = await setup_source(pool, "web", [("a", 1, 1)])
    await new(pool, "web", "w:1")
    await new(pool, "web", "w:2")
    queued = await story(pool, "m-w:2")
    assert kinds(queued) == ["queued"]
    assert queued["decisions"][0]["result"] == "no_operator"  # the only one was full
    first = (await story(pool, "m-w:1"))["decisions"][0]
    await admin.close_contact(pool, await _id(pool, "m-w:1"))
    assert kinds(await story(pool, "m-w:1")) == ["assigned", "closed"]
    later = await story(pool, "m-w:2")
    assert kinds(later) == ["queued", "assigned"]
    assigned = later["decisions"][1]
    assert assigned["operator_id"] == op and assigned["result"] == "chosen"
    assert [(c["operator_id"], c["load"], c["max_load"]) for c in assigned["candidates"]] == [
        (op, 0, 1)
    ]
    assert first["at"] <= assigned["at"]


async def test_an_offer_story_declined_expired_rejected_accepted_requeued(
    pool: asyncpg.Pool,
) -> None:
    ops = await offering_source(pool, [("a", 5, 1), ("b", 5, 1), ("c", 5, 1)])
    contact = (await new(pool, "web", "w:1")).contacts["m-w:1"]
    x = await _operator(pool, contact)
    await answer(pool, contact, x, False, "dec-1", "busy")
    y = await _operator(pool, contact)
    await pool.execute(
        "UPDATE contacts SET offer_expires_at = now() - interval '1 second' WHERE id = $1", contact
    )
    await offers.expire_source(pool, await pool.fetchval("SELECT id FROM sources"))
    z = await _operator(pool, contact)
    await answer(pool, contact, y, True, "late-1")  # its offer lapsed: rejected
    await answer(pool, contact, z, True, "acc-1")
    await availability.set_presence(pool, z, "away", "cli", requeue_open=True)
    s = await story(pool, "m-w:1")
    assert kinds(s) == [
        "offered",
        "declined",
        "offered",
        "expired",
        "offered",
        "answer_rejected",
        "assigned",
        "requeued",
        "offered",
    ]
    d = s["decisions"]
    assert sorted([x, y, z]) == sorted(ops)
    assert d[1]["operator_id"] == x and d[1]["reason"] == "busy"
    assert d[2]["operator_id"] == y and d[2]["skipped"] == [{"operator_id": x, "why": "declined"}]
    assert d[3]["operator_id"] == y
    assert d[4]["operator_id"] == z
    assert sorted(d[4]["skipped"], key=lambda k: k["why"]) == [
        {"operator_id": x, "why": "declined"},
        {"operator_id": y, "why": "expired"},
    ]
    assert d[5]["operator_id"] == y and d[5]["reason"] == "expired"
    assert d[6]["operator_id"] == z and d[6]["attempt"] == 3
    assert d[7]["requeued_from"] == z
    # Requeued as if new: nobody skipped, z unavailable now.
    assert d[8]["operator_id"] in (x, y) and d[8]["skipped"] == []
    assert z not in candidate_ids(d[8])


async def test_an_operator_going_away_is_skipped_as_away(pool: asyncpg.Pool) -> None:
    await offering_source(pool, [("a", 5, 1), ("b", 5, 1)])
    contact = (await new(pool, "web", "w:1")).contacts["m-w:1"]
    x = await _operator(pool, contact)
    await availability.set_presence(pool, x, "away", "cli")
    d = (await story(pool, "m-w:1"))["decisions"]
    assert [k["kind"] for k in d] == ["offered", "declined", "offered"]
    assert d[1]["reason"] == "operator away"
    assert d[2]["skipped"] == [{"operator_id": x, "why": "away"}]


async def test_a_rolled_back_routing_leaves_no_decision(pool: asyncpg.Pool) -> None:
    await setup_source(pool, "web", [("a", 5, 1)])

    class Undo(Exception):
        pass

    with pytest.raises(Undo):
        async with pool.acquire() as conn, conn.transaction():
            outcome = await route_new(conn, "web", "w:1")
            assert await conn.fetchval("SELECT count(*) FROM contact_decisions") == 1
            assert outcome.assigned
            raise Undo
    assert await pool.fetchval("SELECT count(*) FROM contact_decisions") == 0
    assert await pool.fetchval("SELECT count(*) FROM contacts") == 0


async def test_history_off_records_nothing(pool: asyncpg.Pool, history_off: None) -> None:
    await offering_source(pool, [("a", 5, 1), ("b", 5, 1)])
    contact = (await new(pool, "web", "w:1")).contacts["m-w:1"]
    await answer(pool, contact, await _operator(pool, contact), False, "dec-1")
    await admin.close_contact(pool, contact)
    assert await pool.fetchval("SELECT count(*) FROM outbox") == 4  # the events as ever
    assert await pool.fetchval("SELECT count(*) FROM contact_decisions") == 0
    s = await story(pool, "m-w:1")
    assert s["decisions"] == []


async def test_a_source_with_history_off_records_nothing_the_others_do(
    pool: asyncpg.Pool, settings: Settings
) -> None:
    """`sources history KEY off`: that source's decisions, from routing, closes, the
    timers and the bulk expiry, are not recorded; another source's still are."""
    await setup_source(pool, "tg", [("t", 5, 1)])
    [a] = await offering_source(pool, [("a", 1200, 1)])
    await source_queueing.update_source(
        pool, QueueingChange(alert_after=1), key="web", strategy=None
    )
    assert as_json(settings, "sources", "history", "web", "off", "--json") == {
        "key": "web",
        "history": False,
    }
    listed = leadrouter(settings, "sources", "list").stdout
    assert "history" in listed and "False" in listed
    await new(pool, "tg", "t:1")
    ids = [f"w:{n}" for n in range(1100)]  # from 1,000 expired, the outbox is COPY'd
    await new(pool, "web", *ids)
    await pool.execute("UPDATE contacts SET offer_expires_at = now() - interval '1 second'")
    web = await pool.fetchval("SELECT id FROM sources WHERE key = 'web'")
    assert await offers.expire_source(pool, web) == 1100
    await admin.close_contact(pool, await _id(pool, "m-w:1"))
    await admin.update_operator(pool, a, max_load=0)
    await new(pool, "web", "w:queued")
    await pool.execute(
        "UPDATE contacts SET created_at = now() - interval '2 seconds'"
        " WHERE inbound_message_id = 'm-w:queued'"
    )
    await timers.tick(pool)
    waiting = "SELECT count(*) FROM outbox WHERE routing_key = 'contact.waiting'"
    assert await pool.fetchval(waiting) == 1  # the timers' event, without its decision
    assert kinds(await story(pool, "m-t:1")) == ["assigned"]
    assert await pool.fetchval("SELECT count(*) FROM contact_decisions") == 1
    fails_cleanly(settings, "sources", "history", "nope", "off", expect="no source with key")
    await admin.set_source_history(pool, "web", True)
    await new(pool, "web", "w:again")
    assert kinds(await story(pool, "m-w:again")) == ["queued"]


async def test_retention_prunes_old_decisions_only(pool: asyncpg.Pool) -> None:
    await setup_source(pool, "web", [("a", 5, 1)])
    old = datetime.now(UTC) - timedelta(hours=3)
    await pool.execute(
        "INSERT INTO contact_decisions (contact_id, kind, at, detail)"
        " SELECT n, 'queued', $1, '{}' FROM generate_series(1, 7) AS n",
        old,
    )
    await new(pool, "web", "w:1")
    assert await history.prune_history(pool, 2) == 7
    assert kinds(await story(pool, "m-w:1")) == ["assigned"]
    assert await history.prune_history(pool, 2) == 0


async def test_an_unknown_contact_is_a_clear_error(pool: asyncpg.Pool, settings: Settings) -> None:
    async with pool.acquire() as conn:
        with pytest.raises(UserError, match="no contact 99"):
            await history.explain(conn, 99)
    fails_cleanly(settings, "contacts", "explain", "99", expect="no contact 99")
    assert leadrouter(settings, "contacts", "explain", "99", check=False).returncode == 1


async def test_worker_overflow_story_through_rabbitmq_and_the_cli(
    pool: asyncpg.Pool,
    broker: aio_pika.abc.AbstractChannel,
    settings: Settings,
    events: EventCollector,
    worker: Worker,
) -> None:
    await source_queueing.add_source(
        pool, QueueingChange(), key="spare", name=None, description="", strategy=None
    )
    spare = (await admin.add_operator(pool, "spare-0", 5, True))["id"]
    await admin.set_weights(pool, "spare", {spare: 2})
    await source_queueing.add_source(
        pool,
        QueueingChange(overflow_to="spare", overflow_after=1, alert_after=1),
        key="hot",
        name=None,
        description="",
        strategy="least_loaded",
    )
    await send(broker, settings, "lead.contact", lead("hot", "o:1"), "o-1")
    [assigned] = await events.wait_for("contact.assigned", 1, timeout=5)
    contact = assigned.data.contact_id
    s = as_json(settings, "contacts", "explain", str(contact))
    assert s["contact_id"] == contact and s["source"] == "hot"
    assert [d["kind"] for d in s["decisions"]][:1] == ["queued"]
    assert set(kinds(s)) >= {"queued", "overflowed", "assigned"}
    overflowed = next(d for d in s["decisions"] if d["kind"] == "overflowed")
    assert overflowed["overflow_to"] == "spare"
    last = s["decisions"][-1]
    assert (last["kind"], last["operator_id"], last["source"], last["routed_by"]) == (
        "assigned",
        spare,
        "hot",
        "spare",
    )
    assert last["candidates"] == [
        {"operator_id": spare, "load": 0, "max_load": 5, "weight": 2, "lag": 0.0, "finish": 0.5}
    ]
    text = leadrouter(settings, "contacts", "explain", str(contact)).stdout
    assert f"contact {contact} (hot, open)" in text
    assert "overflowed" in text and "overflow to spare" in text
    assert f"operator {spare}, source hot, routed by spare" in text
    assert "candidates (smooth, 1 read)" in text and "finish" in text
    assert "nobody available for the source: queued" in text


async def _id(pool: asyncpg.Pool, message_id: str) -> int:
    return int(
        await pool.fetchval("SELECT id FROM contacts WHERE inbound_message_id = $1", message_id)
    )


async def _operator(pool: asyncpg.Pool, contact: int) -> int:
    return int(await pool.fetchval("SELECT operator_id FROM contacts WHERE id = $1", contact))


async def test_an_answer_that_comes_again_is_one_decision(pool: asyncpg.Pool) -> None:
    [op] = await offering_source(pool, [("a", 5, 1)])
    contact = (await new(pool, "web", "w:1")).contacts["m-w:1"]
    await admin.close_contact(pool, contact)
    for _ in range(2):  # the same message twice: its event is written once, so is this
        await answer(pool, contact, op, True, "acc-1")
    d = (await story(pool, "m-w:1"))["decisions"]
    assert [k["kind"] for k in d] == ["offered", "closed", "answer_rejected"]
    assert (d[2]["answer"], d[2]["reason"]) == ("accept", "closed")


async def test_offers_expired_in_bulk_are_recorded_too(pool: asyncpg.Pool) -> None:
    """From 1,000 events for the relays the outbox is written by COPY: the decisions
    follow in a statement of their own, in the same transaction."""
    await offering_source(pool, [("a", 1200, 1)])
    ids = [f"w:{n}" for n in range(1100)]
    await new(pool, "web", *ids)
    await pool.execute("UPDATE contacts SET offer_expires_at = now() - interval '1 second'")
    assert await offers.expire_source(pool, await pool.fetchval("SELECT id FROM sources")) == 1100
    counts = dict(await pool.fetch("SELECT kind, count(*) FROM contact_decisions GROUP BY kind"))
    # Offered again at once: with nobody else weighted, the skip list starts over.
    assert counts == {"offered": 2200, "expired": 1100}
    d = (await story(pool, "m-w:7"))["decisions"]
    assert [k["kind"] for k in d] == ["offered", "expired", "offered"]
    assert d[1]["at"] == d[2]["at"] and d[2]["attempt"] == 2


async def test_no_personal_data_in_the_history(pool: asyncpg.Pool) -> None:
    from schemas.inbound import LeadContact
    from worker import distribution

    await setup_source(pool, "web", [("a", 5, 1)])
    body = {
        "source": "web",
        "lead": {"external_id": "tg:secret-id", "name": "Ann Secret", "email": "ann@x.example"},
        "message": "call me on +1 555 0100",
    }
    async with pool.acquire() as conn, conn.transaction():
        scope = await distribution.read_scope(conn, {"web"}, ())
        new_contact = distribution.NewContact("m-1", LeadContact.model_validate(body))
        await distribution.route(conn, scope, [new_contact])
    stored = await pool.fetchval("SELECT string_agg(detail::text, ' ') FROM contact_decisions")
    assert stored and '"operator_id"' in stored
    for personal in ("secret", "Ann", "ann@", "555"):
        assert personal not in stored
