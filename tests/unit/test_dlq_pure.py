"""The dead-letter ops' pure parts: reasons, sources, ages, ids, replay messages."""

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import pytest

from worker.consumer import ERROR_HEADER, REASON_HEADER
from worker.decode import message_id_of
from worker.dlq import (
    BODY_SHOWN,
    Entry,
    age_of,
    entry_id,
    error_of,
    make_entry,
    preview,
    reason_of,
    replay_headers,
    replay_message,
    selection,
    source_of,
)

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
BODY = json.dumps({"source": "tg", "lead": {"external_id": "e:1"}}).encode()


def death(reason: Any = "delivery_limit", **extra: Any) -> dict[str, Any]:
    return {
        "x-death": [
            {
                "reason": reason,
                "queue": "leadrouter.inbound",
                "count": 1,
                "time": NOW - timedelta(seconds=90),
                **extra,
            }
        ],
        "x-first-death-reason": reason,
        "x-first-death-queue": "leadrouter.inbound",
    }


def ours(reason: str = "unknown_source") -> dict[str, Any]:
    return {REASON_HEADER: reason, ERROR_HEADER: "no source 'web'", "trace": "t-1"}


def entry(headers: dict[str, Any], body: bytes = BODY, **properties: Any) -> Entry:
    return make_entry(
        routing_key="lead.contact",
        message_id="m-1",
        headers=headers,
        properties=properties,
        body=body,
        now=NOW,
    )


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        (ours("invalid_json"), "invalid_json"),
        (death(), "delivery_limit"),
        (death(b"delivery_limit"), "delivery_limit"),
        (death("rejected"), "rejected"),
        (death("expired"), "expired"),
        # A broker dead letter's reason is the broker's, whatever the publisher set (our
        # own dead copies never carry x-death: the consumer drops it).
        ({**death(), **ours("spoof")}, "delivery_limit"),
        ({**death("expired"), REASON_HEADER: "invalid_json"}, "expired"),
        ({}, "unknown"),
        ({"x-death": []}, "unknown"),
        ({"x-death": "junk"}, "unknown"),
    ],
)
def test_reason(headers: dict[str, Any], reason: str) -> None:
    assert reason_of(headers) == reason


def test_error() -> None:
    assert error_of(ours()) == "no source 'web'"
    assert error_of(death()) == (
        "dead-lettered by the broker (delivery_limit) from queue leadrouter.inbound"
    )
    assert error_of({}) == ""


@pytest.mark.parametrize(
    ("body", "source"),
    [
        (BODY, "tg"),
        (b'{"source": "' + b"s" * 500 + b'"}', "s" * 64),
        (b'{"source": 7}', None),
        (b'["source"]', None),
        (b"{not json", None),
        (b"\xff\xfe", None),
        (b"[" * 200_000, None),
        (b'{"contact_id": 1' + b"0" * 5000 + b"}", None),
        (b"", None),
    ],
)
def test_source(body: bytes, source: str | None) -> None:
    assert source_of(body) == source


def test_source_skips_bodies_over_the_limit() -> None:
    assert source_of(BODY, max_bytes=len(BODY) - 1) is None


def test_age() -> None:
    published = NOW - timedelta(seconds=30)
    assert age_of(death(), published, NOW) == 90  # the broker's time of death wins
    assert age_of(ours(), published, NOW) == 30
    assert age_of(ours(), published.replace(tzinfo=None), NOW) == 30
    assert age_of(ours(), None, NOW) is None
    assert age_of(ours(), NOW + timedelta(seconds=5), NOW) == 0  # clock skew


def test_entry() -> None:
    e = entry(ours(), timestamp=NOW - timedelta(seconds=3), content_type="application/json")
    assert (e.reason, e.error, e.source, e.age_seconds) == (
        "unknown_source",
        "no source 'web'",
        "tg",
        3,
    )
    assert (e.routing_key, e.message_id, e.body, e.body_size) == (
        "lead.contact",
        "m-1",
        BODY,
        len(BODY),
    )
    assert e.properties["content_type"] == "application/json"
    assert len(e.id) == 12 and int(e.id, 16) >= 0


def test_a_huge_body_is_cut_and_says_so() -> None:
    body = b"x" * (BODY_SHOWN + 10)
    e = entry(ours("too_large"), body)
    assert len(e.body) == BODY_SHOWN and e.body_size == len(body)
    assert e.text.endswith("… [10 more bytes not shown]")
    assert preview(b"\xff ok", 4) == "\ufffd ok"


def test_the_id_is_stable_and_tells_apart_what_differs() -> None:
    headers = ours()
    base = entry_id("lead.contact", "m-1", None, headers, BODY)
    # Same content, whatever the header order or a quorum queue's redelivery count.
    reordered = dict(reversed(list(headers.items())))
    assert entry_id("lead.contact", "m-1", None, reordered, BODY) == base
    redelivered = {**headers, "x-delivery-count": 3}
    assert entry_id("lead.contact", "m-1", None, redelivered, BODY) == base
    others = {
        entry_id("contact.close", "m-1", None, headers, BODY),
        entry_id("lead.contact", "m-2", None, headers, BODY),
        entry_id("lead.contact", None, None, headers, BODY),
        entry_id("lead.contact", "m-1", NOW, headers, BODY),
        entry_id("lead.contact", "m-1", None, ours("invalid_schema"), BODY),
        entry_id("lead.contact", "m-1", None, headers, BODY + b" "),
        entry_id("lead.contact", "m-1", None, {**headers, **death()}, BODY),
    }
    assert base not in others and len(others) == 7


def test_replay_headers_drop_dead_letter_bookkeeping_only() -> None:
    headers = {**ours(), **death(), "x-delivery-count": 2, "x-last-death-reason": "x"}
    assert replay_headers(headers) == {"trace": "t-1"}


def test_replay_message() -> None:
    e = entry(
        {**ours(), **death()},
        content_type="application/json",
        correlation_id="c-1",
        timestamp=NOW,
        expiration="1000",
        user_id="someone-else",
        delivery_mode=1,
    )
    message = replay_message(e, BODY + b"full")
    assert message.body == BODY + b"full"
    assert message.message_id == "m-1"
    assert message.headers == {"trace": "t-1"}
    assert message.content_type == "application/json"
    assert message.correlation_id == "c-1"
    assert message.timestamp == NOW
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.expiration is None and message.user_id is None


@pytest.mark.parametrize("message_id", [None, "", "leadrouter-no-id:0123abcd"])
def test_a_message_without_id_is_replayed_without_one(message_id: str | None) -> None:
    """aiormq stamps a random id on a publish without one, which would make each replay a
    message of its own; ours says "none", so the worker dead-letters it again."""
    e = make_entry(
        routing_key="lead.contact",
        message_id=message_id,
        headers={},
        properties={},
        body=BODY,
        now=NOW,
    )
    assert e.message_id is None
    first, second = replay_message(e, BODY).message_id, replay_message(e, BODY).message_id
    assert first and second and first != second  # unique, for aiormq to match returns
    assert message_id_of(first) is None and message_id_of(second) is None


def test_replay_drops_headers_that_cannot_be_published_again() -> None:
    e = entry({**ours(), "raw": b"\xff", "huge": 1e300, "x-leadrouter-spoof": "x"})
    assert replay_message(e, BODY).headers == {"trace": "t-1", "raw": bytearray(b"\xff")}


def test_a_broker_dead_letter_names_what_could_not_be_decoded() -> None:
    e = make_entry(
        routing_key="lead.contact",
        message_id=None,
        headers=death(),
        properties={},
        body=BODY,
        now=NOW,
        undecodable=("message_id", "headers"),
    )
    assert e.reason == "delivery_limit"
    assert e.undecodable == ("message_id", "headers")
    assert e.error.endswith("; could not decode the AMQP message_id, headers")


def test_selection() -> None:
    a, b = entry(ours("unknown_source")), entry(ours("invalid_json"))
    assert selection(all=True)(a) and selection(all=True)(b)
    assert [selection(reason="invalid_json")(x) for x in (a, b)] == [False, True]
    assert [selection(ids=[f" {a.id.upper()} "])(x) for x in (a, b)] == [True, False]
    for wrong in ({}, {"all": True, "reason": "x"}, {"reason": "x", "ids": ["y"]}):
        with pytest.raises(ValueError, match="exactly one"):
            selection(**wrong)
