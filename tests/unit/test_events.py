"""build_event: the CloudEvents 1.0 envelope of the outbound contract."""

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
from pydantic import ValidationError

from schemas.events import ROUTING_KEYS, ContactEvent, ContactEventData, build_event

TIME = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)


def data(**overrides: object) -> ContactEventData:
    fields: dict[str, object] = {
        "contact_id": 17,
        "status": "open",
        "lead_id": 5,
        "lead_external_id": "tg:42",
        "source": "telegram-bot",
        "operator_id": 3,
        "inbound_message_id": "msg-1",
    }
    fields.update(overrides)
    return ContactEventData.model_validate(fields)


def test_routing_keys() -> None:
    assert ROUTING_KEYS == (
        "contact.assigned",
        "contact.queued",
        "contact.closed",
        "contact.offered",
        "contact.declined",
        "contact.expired",
        "contact.answer_rejected",
        "contact.overflowed",
        "contact.waiting",
        "contact.requeued",
    )


@pytest.mark.parametrize("routing_key", ["contact.assigned", "contact.queued", "contact.closed"])
def test_envelope(routing_key: str) -> None:
    payload = data(operator_id=None) if routing_key == "contact.queued" else data()
    event = build_event("evt-1", routing_key, TIME, payload)
    assert event.specversion == "1.0"
    assert event.id == "evt-1"
    assert event.source == "/leadrouter/sources/telegram-bot"
    assert event.type == f"org.leadrouter.{routing_key}"
    assert event.subject == "contacts/17"
    assert event.datacontenttype == "application/json"
    assert event.time == TIME
    assert event.data == payload

    dumped = json.loads(event.model_dump_json())
    assert set(dumped) == {
        "specversion",
        "id",
        "source",
        "type",
        "time",
        "subject",
        "datacontenttype",
        "data",
    }
    assert dumped["specversion"] == "1.0"
    assert dumped["type"] == f"org.leadrouter.{routing_key}"
    assert dumped["data"]["contact_id"] == 17
    assert dumped["data"]["inbound_message_id"] == "msg-1"
    assert datetime.fromisoformat(dumped["time"]) == TIME


def test_queued_event_has_null_operator() -> None:
    event = build_event("e", "contact.queued", TIME, data(operator_id=None))
    assert json.loads(event.model_dump_json())["data"]["operator_id"] is None


def test_assigned_event_carries_queued_seconds() -> None:
    event = build_event("e", "contact.assigned", TIME, data(queued_seconds=1.5))
    assert json.loads(event.model_dump_json())["data"]["queued_seconds"] == 1.5


@pytest.mark.parametrize(
    "routing_key",
    ["contact.opened", "lead.contact", "", "org.leadrouter.contact.assigned", "Contact.Assigned"],
)
def test_unknown_routing_key_raises(routing_key: str) -> None:
    with pytest.raises(ValueError, match="routing key"):
        build_event("e", routing_key, TIME, data())


@pytest.mark.parametrize("routing_key", ["contact.assigned", "contact.queued", "contact.closed"])
def test_json_round_trip(routing_key: str) -> None:
    event = build_event(
        "evt-42",
        routing_key,
        TIME,
        data(status="closed" if routing_key == "contact.closed" else "open"),
    )
    again = ContactEvent.model_validate_json(event.model_dump_json())
    assert again == event
    assert again.time == TIME


def test_round_trip_keeps_the_time_zone() -> None:
    moscow = datetime(2024, 1, 1, 12, 0, tzinfo=timezone(timedelta(hours=3)))
    event = build_event("e", "contact.closed", moscow, data(status="closed"))
    again = ContactEvent.model_validate_json(event.model_dump_json())
    assert again.time == moscow
    assert again.time.utcoffset() == timedelta(hours=3)


def test_event_id_is_kept_verbatim() -> None:
    first = build_event("stable-id", "contact.assigned", TIME, data())
    second = build_event("stable-id", "contact.assigned", TIME, data())
    assert first.id == second.id == "stable-id"
    assert first.model_dump_json() == second.model_dump_json()


def test_envelope_rejects_extra_fields() -> None:
    dumped = json.loads(build_event("e", "contact.assigned", TIME, data()).model_dump_json())
    dumped["extra"] = 1
    with pytest.raises(ValidationError):
        ContactEvent.model_validate(dumped)
    dumped.pop("extra")
    dumped["data"]["extra"] = 1
    with pytest.raises(ValidationError):
        ContactEvent.model_validate(dumped)


def test_envelope_rejects_foreign_type_and_specversion() -> None:
    dumped = json.loads(build_event("e", "contact.assigned", TIME, data()).model_dump_json())
    with pytest.raises(ValidationError):
        ContactEvent.model_validate({**dumped, "type": "org.leadrouter.contact.opened"})
    with pytest.raises(ValidationError):
        ContactEvent.model_validate({**dumped, "specversion": "0.3"})


def test_data_status_is_open_or_closed() -> None:
    with pytest.raises(ValidationError):
        data(status="queued")
