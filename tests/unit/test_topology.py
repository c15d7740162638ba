"""topology(): the AMQP topology of DESIGN.md as data."""

import aio_pika

from worker.settings import Settings
from worker.topology import topology


def defaults() -> Settings:
    return Settings(
        inbound_exchange="leads.inbound",
        inbound_queue="leadrouter.inbound",
        events_exchange="leads.events",
        dead_exchange="leads.dead",
        dead_queue="leadrouter.dead",
        delivery_limit=10,
    )


def test_exchanges_are_topic() -> None:
    spec = topology(defaults())
    assert [e.name for e in spec.exchanges] == ["leads.inbound", "leads.events", "leads.dead"]
    assert all(e.type == aio_pika.ExchangeType.TOPIC for e in spec.exchanges)


def test_inbound_queue() -> None:
    config = defaults()
    spec = topology(config)
    queue = spec.inbound_queue
    assert queue.name == "leadrouter.inbound"
    assert queue.arguments["x-queue-type"] == "quorum"
    assert queue.arguments["x-dead-letter-exchange"] == config.dead_exchange == "leads.dead"
    assert queue.arguments["x-delivery-limit"] == config.delivery_limit == 10
    assert queue.bindings == (("leads.inbound", "#"),)


def test_dead_queue() -> None:
    spec = topology(defaults())
    queue = spec.dead_queue
    assert queue.name == "leadrouter.dead"
    # classic: inspecting it (dlq list) must keep its order; see worker/dlq.py
    assert queue.arguments["x-queue-type"] == "classic"
    assert "x-dead-letter-exchange" not in queue.arguments
    assert queue.bindings == (("leads.dead", "#"),)


def test_queues() -> None:
    spec = topology(defaults())
    assert spec.queues == (spec.inbound_queue, spec.dead_queue)


def test_events_exchange_has_no_queue() -> None:
    spec = topology(defaults())
    bound = {exchange for q in spec.queues for exchange, _ in q.bindings}
    assert "leads.events" not in bound


def test_every_binding_names_a_declared_exchange() -> None:
    spec = topology(defaults())
    names = {e.name for e in spec.exchanges}
    for queue in spec.queues:
        for exchange, key in queue.bindings:
            assert exchange in names
            assert key == "#"


def test_custom_names_flow_through() -> None:
    custom = Settings(
        inbound_exchange="t1.in",
        inbound_queue="t1.in.q",
        events_exchange="t1.ev",
        dead_exchange="t1.dlx",
        dead_queue="t1.dlq",
        delivery_limit=3,
    )
    spec = topology(custom)
    assert spec.inbound.name == "t1.in"
    assert spec.events.name == "t1.ev"
    assert spec.dead.name == "t1.dlx"
    assert spec.inbound_queue.name == "t1.in.q"
    assert spec.inbound_queue.arguments == {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": "t1.dlx",
        "x-delivery-limit": 3,
    }
    assert spec.inbound_queue.bindings == (("t1.in", "#"),)
    assert spec.dead_queue.name == "t1.dlq"
    assert spec.dead_queue.bindings == (("t1.dlx", "#"),)
    all_names = [e.name for e in spec.exchanges] + [q.name for q in spec.queues]
    assert not any(name.startswith(("leads.", "leadrouter.")) for name in all_names)
