"""The generated contract under schemas/: in sync with the models, and saying what they do."""

import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from schemas.events import (
    EVENT_TYPE_PREFIX,
    OPERATOR_ROUTING_KEYS,
    ContactEvent,
    ContactEventData,
    OperatorEvent,
    build_event,
)
from schemas.events import ROUTING_KEYS as CONTACT_EVENT_KEYS
from schemas.inbound import MESSAGE_TEXT, SHORT
from schemas.inbound import ROUTING_KEYS as INBOUND_KEYS
from worker.consumer import ERROR_HEADER, REASON_HEADER
from worker.errors import Reason
from worker.settings import Settings
from worker.tools import contract

# The repository's copy, not wherever `schemas` happens to be installed.
COMMITTED = Path(__file__).resolve().parents[2] / "schemas"
EVENT_KEYS = (*CONTACT_EVENT_KEYS, *OPERATOR_ROUTING_KEYS)
FILES = [f"{key}.schema.json" for key in INBOUND_KEYS] + [
    "contact.event.schema.json",
    "operator.event.schema.json",
    "asyncapi.yaml",
]
DEFAULTS = Settings.model_construct()


@pytest.fixture(scope="module")
def docs() -> dict[str, str]:
    return contract.documents()


@pytest.fixture(scope="module")
def asyncapi(docs: dict[str, str]) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(docs[contract.ASYNCAPI_FILE])
    return loaded


def load(docs: dict[str, str], name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(docs[name])
    return loaded


def walk(node: Any) -> Iterator[dict[str, Any]]:
    """Every mapping in a JSON/YAML tree."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def resolve(doc: dict[str, Any], ref: str) -> Any:
    """A local JSON pointer reference ("#/a/b"); KeyError if it points nowhere."""
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def string_branch(prop: dict[str, Any]) -> dict[str, Any]:
    """The string alternative of an optional (`str | None`) property."""
    if "anyOf" not in prop:
        return prop
    [branch] = [b for b in prop["anyOf"] if b.get("type") == "string"]
    return branch


# --- (a) in sync ------------------------------------------------------------------------


def test_committed_files_are_up_to_date() -> None:
    stale = contract.stale(COMMITTED)
    assert not stale, (
        f"schemas/ is out of date ({', '.join(stale)}): run `leadrouter contract` "
        "and commit the result"
    )


def test_the_expected_files_are_generated(docs: dict[str, str]) -> None:
    assert sorted(docs) == sorted(FILES)


def test_generation_is_deterministic_and_formatted(docs: dict[str, str]) -> None:
    assert contract.documents() == docs
    for name in FILES[:-1]:
        text = docs[name]
        assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n", name


def test_generation_ignores_the_environment(
    docs: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LEADROUTER_EVENTS_EXCHANGE", "elsewhere.events")
    monkeypatch.setenv("LEADROUTER_DELIVERY_LIMIT", "99")
    assert Settings().events_exchange == "elsewhere.events"  # the variable is in effect
    assert contract.documents() == docs


def test_names_come_from_the_settings() -> None:
    doc = contract.documents(Settings.model_construct(events_exchange="other.events"))
    assert "name: other.events" in doc[contract.ASYNCAPI_FILE]
    assert "name: leads.events" not in doc[contract.ASYNCAPI_FILE]


def test_write_rewrites_only_what_changed(tmp_path: Path, docs: dict[str, str]) -> None:
    assert sorted(contract.stale(tmp_path)) == sorted(FILES)
    assert sorted(contract.write(tmp_path)) == sorted(tmp_path / name for name in FILES)
    assert contract.stale(tmp_path) == []
    assert contract.write(tmp_path) == []

    (tmp_path / "asyncapi.yaml").write_text("asyncapi: 2.6.0\n")
    assert contract.stale(tmp_path) == ["asyncapi.yaml"]
    assert contract.write(tmp_path) == [tmp_path / "asyncapi.yaml"]
    assert (tmp_path / "asyncapi.yaml").read_text() == docs["asyncapi.yaml"]


# --- (b) the JSON Schemas say what the models do --------------------------------------


@pytest.mark.parametrize("key", list(INBOUND_KEYS))
def test_inbound_schema_matches_its_model(docs: dict[str, str], key: str) -> None:
    model: type[BaseModel] = INBOUND_KEYS[key]
    schema = load(docs, f"{key}.schema.json")
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] == f"https://leadrouter.invalid/schemas/{key}.schema.json"
    assert schema["title"] == model.__name__
    assert set(schema["properties"]) == set(model.model_fields)
    assert set(schema["required"]) == {
        name for name, field in model.model_fields.items() if field.is_required()
    }
    # Unknown fields are refused, at every level.
    objects = [node for node in walk(schema) if node.get("type") == "object"]
    assert objects
    assert all(node.get("additionalProperties") is False for node in objects)
    # The id: optional in the body (the AMQP property may carry it), bounded when there.
    assert "message_id" not in schema["required"]
    assert string_branch(schema["properties"]["message_id"])["maxLength"] == SHORT


def test_lead_contact_limits(docs: dict[str, str]) -> None:
    schema = load(docs, "lead.contact.schema.json")
    lead = schema["$defs"]["Lead"]
    assert schema["required"] == ["source", "lead"]
    assert schema["properties"]["lead"] == {"$ref": "#/$defs/Lead"}
    assert lead["required"] == ["external_id"]
    assert SHORT == 256 and MESSAGE_TEXT == 10_000
    for name in ("external_id", "name", "email", "phone"):
        text = string_branch(lead["properties"][name])
        assert (text["minLength"], text["maxLength"]) == (1, SHORT), name
    assert schema["properties"]["message"]["maxLength"] == MESSAGE_TEXT

    source = re.compile(schema["properties"]["source"]["pattern"])
    assert source.search("telegram-bot")
    assert not source.search("Telegram Bot")
    assert not source.search("a" * 129)


def test_contact_close_limits(docs: dict[str, str]) -> None:
    schema = load(docs, "contact.close.schema.json")
    assert schema["required"] == ["contact_id"]
    contact_id = schema["properties"]["contact_id"]
    assert contact_id["type"] == "integer"
    assert (contact_id["exclusiveMinimum"], contact_id["exclusiveMaximum"]) == (0, 2**63)


def test_event_schema_documents_every_type(docs: dict[str, str]) -> None:
    schema = load(docs, "contact.event.schema.json")
    assert schema["$id"] == "https://leadrouter.invalid/schemas/contact.event.schema.json"
    kind = schema["properties"]["type"]
    assert kind["enum"] == [EVENT_TYPE_PREFIX + key for key in CONTACT_EVENT_KEYS]
    assert all(key in kind["description"] for key in CONTACT_EVENT_KEYS)
    # As written on the wire every field is present, defaults included.
    assert set(schema["required"]) == set(schema["properties"])
    data = schema["$defs"]["ContactEventData"]
    assert set(data["required"]) == set(data["properties"])
    assert schema["additionalProperties"] is False and data["additionalProperties"] is False


# --- (c) a real event has what the schema requires -------------------------------------


@pytest.mark.parametrize("routing_key", CONTACT_EVENT_KEYS)
def test_built_event_has_every_required_field(docs: dict[str, str], routing_key: str) -> None:
    schema = load(docs, "contact.event.schema.json")
    data = ContactEventData(
        contact_id=1,
        status="closed" if routing_key == "contact.closed" else "open",
        lead_id=2,
        lead_external_id="tg:42",
        source="telegram-bot",
        operator_id=None if routing_key == "contact.queued" else 3,
        inbound_message_id="m-1",
    )
    time = datetime(2024, 5, 6, tzinfo=UTC)
    event = json.loads(build_event("evt-1", routing_key, time, data).model_dump_json())

    data_schema = schema["$defs"]["ContactEventData"]
    assert set(schema["required"]) <= set(event)
    assert set(data_schema["required"]) <= set(event["data"])
    assert set(event) <= set(schema["properties"])
    assert set(event["data"]) <= set(data_schema["properties"])
    assert event["type"] in schema["properties"]["type"]["enum"]
    assert event["specversion"] == schema["properties"]["specversion"]["const"]


# --- (d) the AsyncAPI document ----------------------------------------------------------


def channel_of(asyncapi: dict[str, Any], address: str) -> dict[str, Any]:
    [channel] = [c for c in asyncapi["channels"].values() if c["address"] == address]
    return channel


def test_asyncapi_header(asyncapi: dict[str, Any]) -> None:
    assert asyncapi["asyncapi"] == "3.0.0"
    assert asyncapi["info"] == {**asyncapi["info"], "title": "leadrouter", "version": "1.0.0"}
    server = asyncapi["servers"]["production"]
    assert (server["protocol"], server["host"]) == ("amqp", "localhost:5672")


def test_asyncapi_has_every_routing_key_on_its_exchange(asyncapi: dict[str, Any]) -> None:
    addresses = {channel["address"] for channel in asyncapi["channels"].values()}
    assert addresses == {*INBOUND_KEYS, *EVENT_KEYS, "{routingKey}"}
    exchanges = {
        **dict.fromkeys(INBOUND_KEYS, DEFAULTS.inbound_exchange),
        **dict.fromkeys(EVENT_KEYS, DEFAULTS.events_exchange),
        "{routingKey}": DEFAULTS.dead_exchange,
    }
    for address, exchange in exchanges.items():
        amqp = channel_of(asyncapi, address)["bindings"]["amqp"]
        assert amqp["is"] == "routingKey"
        assert amqp["exchange"] == {"name": exchange, "type": "topic", "durable": True}


def test_asyncapi_operations_from_leadrouters_side(asyncapi: dict[str, Any]) -> None:
    by_action: dict[str, set[str]] = {"receive": set(), "send": set()}
    for operation in asyncapi["operations"].values():
        channel = resolve(asyncapi, operation["channel"]["$ref"])
        by_action[operation["action"]].add(channel["address"])
        # AsyncAPI 3: an operation may only carry messages of its own channel.
        for message in operation["messages"]:
            assert message["$ref"].startswith(operation["channel"]["$ref"] + "/messages/")
        assert operation["bindings"]["amqp"]["deliveryMode"] == 2
    assert by_action == {"receive": set(INBOUND_KEYS), "send": {*EVENT_KEYS, "{routingKey}"}}


def test_asyncapi_messages(asyncapi: dict[str, Any]) -> None:
    for key, model in INBOUND_KEYS.items():
        [message] = channel_of(asyncapi, key)["messages"].values()
        message = resolve(asyncapi, message["$ref"])
        assert message["contentType"] == "application/json"
        assert "message_id" in message["description"]
        assert message["payload"] == {"$ref": f"#/components/schemas/{model.__name__}"}
        for example in message["examples"]:
            model.model_validate(example["payload"], strict=True)
    for key in EVENT_KEYS:
        [message] = channel_of(asyncapi, key)["messages"].values()
        message = resolve(asyncapi, message["$ref"])
        assert message["contentType"] == "application/cloudevents+json"
        assert message["bindings"]["amqp"]["messageType"] == key
        assert "CloudEvents `id`" in message["description"]
        model = OperatorEvent if key in OPERATOR_ROUTING_KEYS else ContactEvent
        for example in message["examples"]:
            event = model.model_validate_json(json.dumps(example["payload"]))
            assert event.type == EVENT_TYPE_PREFIX + key


def test_asyncapi_names_each_queue_as_declared(asyncapi: dict[str, Any]) -> None:
    """The inbound queue is a quorum queue; the dead letters' is classic and lazy."""
    dead = channel_of(asyncapi, "{routingKey}")["description"]
    assert f"classic (lazy) queue `{DEFAULTS.dead_queue}`" in dead and "quorum" not in dead
    for key in INBOUND_KEYS:
        assert (
            f"quorum queue `{DEFAULTS.inbound_queue}`" in channel_of(asyncapi, key)["description"]
        )


def test_asyncapi_warns_of_clients_that_invent_message_ids(asyncapi: dict[str, Any]) -> None:
    """aiormq gives a message published without a message_id a random one: the contract
    must not promise such a message is dead-lettered, and must say what to do."""
    for key in INBOUND_KEYS:
        [message] = channel_of(asyncapi, key)["messages"].values()
        text = " ".join(resolve(asyncapi, message["$ref"])["description"].split())
        assert "aio-pika" in text and "new random one" in text
        assert "makes a new contact on every retry" in text


@pytest.mark.parametrize("field", ["id", "source", "subject"])
def test_event_refuses_an_empty_id_source_or_subject(docs: dict[str, str], field: str) -> None:
    """CloudEvents: id and source are non-empty strings, subject too when present."""
    schema = load(docs, "contact.event.schema.json")
    assert schema["properties"][field]["minLength"] == 1
    event = build_event(
        "e-1",
        "contact.closed",
        datetime(2026, 1, 1, tzinfo=UTC),
        ContactEventData(
            contact_id=1,
            status="closed",
            lead_id=1,
            lead_external_id="x",
            source="tg",
            operator_id=None,
            inbound_message_id="m",
        ),
    )
    with pytest.raises(ValueError, match="at least 1 character"):
        ContactEvent.model_validate({**event.model_dump(), field: ""})


def test_dead_letter_headers(asyncapi: dict[str, Any]) -> None:
    [message] = channel_of(asyncapi, "{routingKey}")["messages"].values()
    headers = resolve(asyncapi, resolve(asyncapi, message["$ref"])["headers"]["$ref"])
    assert headers["properties"][REASON_HEADER]["enum"] == [str(reason) for reason in Reason]
    assert {"invalid_properties", "expired"} <= set(headers["properties"][REASON_HEADER]["enum"])
    assert headers["properties"][ERROR_HEADER]["type"] == "string"
    assert headers["properties"]["x-death"]["type"] == "array"
    assert headers["anyOf"] == [
        {"required": [REASON_HEADER, ERROR_HEADER]},
        {"required": ["x-death"]},
    ]


def test_asyncapi_inlines_every_schema(docs: dict[str, str], asyncapi: dict[str, Any]) -> None:
    components = asyncapi["components"]["schemas"]
    for name in FILES[:-1]:
        schema = load(docs, name)
        assert {schema["title"], *schema.get("$defs", {})} <= set(components), name
    assert not any("$defs" in node for node in walk(asyncapi))


def test_every_asyncapi_ref_resolves(asyncapi: dict[str, Any]) -> None:
    refs = [node["$ref"] for node in walk(asyncapi) if "$ref" in node]
    assert len(refs) > 20
    unresolved = []
    for ref in refs:
        try:
            resolve(asyncapi, ref)
        except (KeyError, TypeError, AssertionError):
            unresolved.append(ref)
    assert not unresolved
