"""The message contract for other languages: a JSON Schema per message body and an
AsyncAPI 3.0.0 document, generated from the pydantic models and the AMQP topology.
`leadrouter contract` writes them to schemas/; a unit test fails when they are stale."""

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaMode
from pydantic_core import core_schema

import schemas
from schemas import events, inbound
from worker.errors import BROKER_REASONS, ERROR_HEADER, REASON_HEADER, Reason
from worker.settings import Settings
from worker.topology import ExchangeSpec, Topology, topology

# The contract's own version, for other teams to pin: bump it when the wire format
# changes. Not the package version, which differs between dev installs.
CONTRACT_VERSION = "1.0.0"
DIALECT = "https://json-schema.org/draft/2020-12/schema"
ID_BASE = "https://leadrouter.invalid/schemas/"  # .invalid: an identifier, not a URL to fetch
ASYNCAPI_FILE = "asyncapi.yaml"
EVENT_FILE = "contact.event.schema.json"
OPERATOR_EVENT_FILE = "operator.event.schema.json"
AMQP_BINDING = "0.3.0"
DEFAULT_DIRECTORY = Path(schemas.__file__).resolve().parent

EVENT_MEANINGS = {
    "contact.assigned": "An operator took the contact, on arrival or later from the queue.",
    "contact.queued": "Nobody could take the contact on arrival: it waits, open, without "
    "an operator, and is assigned (contact.assigned) as soon as someone can take it.",
    "contact.closed": "The contact was closed and its operator freed.",
    "contact.offered": "A source with offers on (an accept timeout) offered the contact to "
    "the operator: it counts toward their load until they accept (contact.assigned), "
    "decline (contact.declined) or let it lapse at offer_expires_at (contact.expired). "
    "attempt counts the contact's offers, from 1.",
    "contact.declined": "The operator declined the offer (reason: theirs, if given); the "
    "contact is offered at once to the next operator (contact.offered), skipping those who "
    "declined it or let it lapse, or queued (contact.queued) when nobody else can take it.",
    "contact.expired": "The offer lapsed unanswered; the contact moves on as after a decline.",
    "contact.answer_rejected": "An answer to an offer changed nothing: reason expired (too "
    "late), not_offered (the contact is not offered to that operator) or closed. Tell the "
    "person; the message was not dead-lettered.",
    "contact.overflowed": "The contact has waited its source's overflow time: from now on "
    "the operators of the source named in `overflow_to` may take it too (by that source's "
    "weights and strategy); it keeps its own source. Once per contact.",
    "contact.waiting": "The contact is still queued after its source's alert time "
    "(`queued_seconds`: how long it has waited). Once per contact.",
    "contact.requeued": "The operator went away or offline and handed the contact back "
    "(requeue_open): it waits again, open, without an operator, in its old place in the "
    "queue, and is routed again at once (contact.assigned or stays queued).",
}
OPERATOR_EVENT_MEANINGS = {
    "operator.presence_changed": "An operator's presence, shift or leave changed whether "
    "they take work: data says their presence (status), whether they are available now, on "
    "shift, on leave, and what changed it (reason: message, cli, shift, leave, "
    "expired_offers).",
}
if set(OPERATOR_EVENT_MEANINGS) != set(events.OPERATOR_ROUTING_KEYS):
    raise RuntimeError("OPERATOR_EVENT_MEANINGS does not match schemas.events")
if set(EVENT_MEANINGS) != set(events.ROUTING_KEYS):  # a new event must be documented
    raise RuntimeError("EVENT_MEANINGS does not match schemas.events.ROUTING_KEYS")

MESSAGE_ID = (
    "Every message needs an id: the body field `message_id` or else the AMQP `message_id` "
    "property; the body field wins. Redelivery and retries are harmless as long as the id "
    "stays the same: the same id never makes a second contact, and closing a closed contact "
    "changes nothing. Without either the message is dead-lettered as missing_message_id, "
    "unless the client library fills the property in itself: aio-pika (through aiormq) "
    "gives every message published without a `message_id` a new random one, so a Python "
    "bot that retries a publish without a body `message_id` makes a new contact on every "
    "retry. Derive the id from something the retry repeats (the bot's own update or "
    "message id), and set it in the body (or as the property) on every attempt."
)
STRICTER = (
    "The worker may refuse a body that this schema allows (text with a NUL character, "
    "an integer written as 1.0, a malformed e-mail address or "
    "phone number); it is then dead-lettered with reason invalid_schema."
)


class _AsWritten(GenerateJsonSchema):
    """Serialization schemas mark defaulted fields required too: events are written with
    model_dump_json() and no exclusions, so every field is always present."""

    def field_is_required(
        self,
        field: core_schema.ModelField | core_schema.DataclassField | core_schema.TypedDictField,
        total: bool,
    ) -> bool:
        if self.mode == "serialization":
            return not field.get("serialization_exclude")
        return super().field_is_required(field, total)


def json_schema(name: str, model: type[BaseModel], mode: JsonSchemaMode) -> dict[str, Any]:
    schema = model.model_json_schema(mode=mode, schema_generator=_AsWritten)
    return {"$schema": DIALECT, "$id": ID_BASE + name, **schema, "title": model.__name__}


def json_schemas() -> dict[str, dict[str, Any]]:
    """File name → JSON Schema: inbound bodies as accepted, the event as written."""
    files = {}
    for key, model in inbound.ROUTING_KEYS.items():
        files[f"{key}.schema.json"] = {
            **json_schema(f"{key}.schema.json", model, "validation"),
            "$comment": STRICTER,
        }
    event = json_schema(EVENT_FILE, events.ContactEvent, "serialization")
    event["properties"]["type"]["description"] = (
        f"{events.EVENT_TYPE_PREFIX} + the routing key. "
        + " ".join(f"{key}: {meaning}" for key, meaning in EVENT_MEANINGS.items())
    )
    files[EVENT_FILE] = event
    operator = json_schema(OPERATOR_EVENT_FILE, events.OperatorEvent, "serialization")
    operator["properties"]["type"]["description"] = (
        f"{events.EVENT_TYPE_PREFIX} + the routing key. "
        + " ".join(f"{key}: {meaning}" for key, meaning in OPERATOR_EVENT_MEANINGS.items())
    )
    files[OPERATOR_EVENT_FILE] = operator
    return files


def documents(settings: Settings | None = None) -> dict[str, str]:
    """File name → file text, the same on every run and in every environment."""
    # model_construct: the defaults, without reading LEADROUTER_* from the environment.
    if settings is None:
        settings = Settings.model_construct()
    files = json_schemas()
    texts = {
        name: json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        for name, schema in files.items()
    }
    doc = asyncapi(settings, files)
    texts[ASYNCAPI_FILE] = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)
    return texts


def write(directory: Path) -> list[Path]:
    """Write the files that are missing or differ; returns the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in documents().items():
        path = directory / name
        if not path.is_file() or path.read_bytes() != text.encode():
            path.write_bytes(text.encode())  # bytes: no newline translation
            written.append(path)
    return written


def stale(directory: Path) -> list[str]:
    """Names of the files that are missing from directory or differ from documents()."""
    return [
        name
        for name, text in documents().items()
        if not (directory / name).is_file() or (directory / name).read_bytes() != text.encode()
    ]


# --- AsyncAPI -------------------------------------------------------------------------


def asyncapi(settings: Settings, files: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The AsyncAPI document, from leadrouter's point of view (it receives the inbound
    messages and sends the events and dead letters)."""
    spec = topology(settings)
    # name → (channel, message, operation); the channel, message and operation share it.
    parts = {
        **{
            _camel(key): _inbound(key, model, spec, settings)
            for key, model in inbound.ROUTING_KEYS.items()
        },
        **{
            _camel(key): _event(key, spec)
            for key in (*events.ROUTING_KEYS, *events.OPERATOR_ROUTING_KEYS)
        },
        "deadLetter": _dead_letter(spec),
    }
    env = ", ".join(
        f"LEADROUTER_{name.upper()}"
        for name in ("inbound_exchange", "inbound_queue", "events_exchange", "dead_exchange")
    )
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "leadrouter",
            "version": CONTRACT_VERSION,
            "description": "Distributes inbound leads among operators. Bots publish "
            f"lead.contact and contact.close to `{spec.inbound.name}`; leadrouter publishes "
            f"CloudEvents to `{spec.events.name}` and dead letters to `{spec.dead.name}`. "
            f"The names shown are the defaults, set by {env} and LEADROUTER_DEAD_QUEUE. "
            "The message bodies are also JSON Schema files next to this document.",
        },
        "servers": {
            "production": {
                "host": "localhost:5672",
                "protocol": "amqp",
                "protocolVersion": "0.9.1",
                "description": "An example; leadrouter connects to LEADROUTER_AMQP_URL.",
                "security": [{"$ref": "#/components/securitySchemes/userPassword"}],
            }
        },
        "defaultContentType": "application/json",
        "channels": {name: channel for name, (channel, _, _) in parts.items()},
        "operations": {_verb(op, name): op for name, (_, _, op) in parts.items()},
        "components": {
            "schemas": _components(files),
            "messages": {name: message for name, (_, message, _) in parts.items()},
            "securitySchemes": {
                "userPassword": {
                    "type": "userPassword",
                    "description": "A RabbitMQ user, from the AMQP URL.",
                }
            },
        },
    }


Part = tuple[dict[str, Any], dict[str, Any], dict[str, Any]]


def _inbound(key: str, model: type[BaseModel], spec: Topology, settings: Settings) -> Part:
    name = _camel(key)
    queue = spec.inbound_queue
    channel = _channel(
        key,
        spec.inbound,
        name,
        f"Routing key `{key}` on exchange `{spec.inbound.name}`, consumed from "
        f"{_queue_kind(queue.arguments)} queue "
        f"`{queue.name}` (bound with `#`, delivery limit {queue.arguments['x-delivery-limit']}, "
        f"dead-letter exchange `{queue.arguments['x-dead-letter-exchange']}`).",
    )
    message = {
        "name": name,
        "title": key,
        "summary": _first_line(model.__doc__),
        "description": f"{MESSAGE_ID} A body larger than {settings.max_message_bytes} bytes "
        "is dead-lettered as too_large. Publish persistent, with publisher confirms.",
        "contentType": "application/json",
        "payload": {"$ref": f"#/components/schemas/{model.__name__}"},
        "examples": [{"name": name, "payload": _INBOUND_EXAMPLES[key]}],
    }
    operation = _operation(
        "receive",
        name,
        "leadrouter handles the message and acknowledges it once the result is committed; "
        "a message that can never succeed goes to the dead letters.",
        {"ack": True, "deliveryMode": 2},
    )
    return channel, message, operation


def _event(key: str, spec: Topology) -> Part:
    name = _camel(key)
    operator = key in events.OPERATOR_ROUTING_KEYS
    model = events.OperatorEvent if operator else events.ContactEvent
    channel = _channel(
        key, spec.events, name, f"Routing key `{key}` on exchange `{spec.events.name}`."
    )
    message = {
        "name": name,
        "title": key,
        "summary": {**EVENT_MEANINGS, **OPERATOR_EVENT_MEANINGS}[key],
        "description": "A CloudEvents 1.0 structured JSON envelope. The AMQP `message_id` "
        "equals the CloudEvents `id`, which is stable across re-publishes: delivery is at "
        "least once, so de-duplicate on it. The AMQP `type` property is the routing key. "
        "Order is not guaranteed.",
        "contentType": "application/cloudevents+json",
        "payload": {
            "allOf": [
                {"$ref": f"#/components/schemas/{model.__name__}"},
                {"properties": {"type": {"const": events.EVENT_TYPE_PREFIX + key}}},
            ]
        },
        "bindings": {"amqp": {"messageType": key, "bindingVersion": AMQP_BINDING}},
        "examples": [
            {
                "name": name,
                "payload": _operator_event_example(key) if operator else _event_example(key),
            }
        ],
    }
    operation = _operation(
        "send",
        name,
        "Published by the outbox relay once the change is committed, with publisher "
        "confirms; published again, with the same id, if the relay crashed before marking it.",
        {"deliveryMode": 2},
    )
    return channel, message, operation


def _queue_kind(arguments: dict[str, Any]) -> str:
    """What the topology declares: "quorum", or "classic (lazy)" for the dead letters."""
    kind = str(arguments.get("x-queue-type", "classic"))
    mode = arguments.get("x-queue-mode")
    return f"{kind} ({mode})" if mode else kind


def _dead_letter(spec: Topology) -> Part:
    channel = {
        **_channel(
            "{routingKey}",
            spec.dead,
            "deadLetter",
            f"Exchange `{spec.dead.name}`, bound with `#` to "
            f"{_queue_kind(spec.dead_queue.arguments)} queue "
            f"`{spec.dead_queue.name}`: inbound messages that can never succeed, with their "
            "original routing key, body, message_id, content type and headers.",
        ),
        "parameters": {
            "routingKey": {
                "description": "The routing key the message was published with.",
                "examples": list(inbound.ROUTING_KEYS),
            }
        },
    }
    message = {
        "name": "deadLetter",
        "title": "Dead letter",
        "summary": "An inbound message that can never succeed, kept for people to inspect.",
        "description": "leadrouter dead-letters such a message once, at once, adding the "
        f"headers `{REASON_HEADER}` and `{ERROR_HEADER}`; a transient failure (PostgreSQL "
        "or RabbitMQ unreachable) is retried, never dead-lettered. A message that keeps "
        "crashing the handler is dead-lettered by the broker at the queue's delivery limit, "
        "and one whose `expiration` passed while it waited is dead-lettered by the broker "
        "too; those carry `x-death` instead, and the ops tools report their reason from it "
        "(delivery_limit, expired) whatever other headers they carry. The message's own "
        "`x-leadrouter-*` headers are never kept.",
        "headers": {"$ref": "#/components/schemas/DeadLetterHeaders"},
        "payload": {"description": "The original body, byte for byte; it may not be JSON."},
        "examples": [
            {
                "name": "invalidSchema",
                "headers": {
                    REASON_HEADER: str(Reason.INVALID_SCHEMA),
                    ERROR_HEADER: "lead.external_id: Field required",
                },
                "payload": {"source": "telegram-bot", "lead": {"name": "Ann"}},
            }
        ],
    }
    operation = _operation(
        "send",
        "deadLetter",
        "leadrouter dead-letters an inbound message that can never succeed.",
        {"deliveryMode": 2},
    )
    return channel, message, operation


def _channel(address: str, exchange: ExchangeSpec, message: str, description: str) -> Any:
    return {
        "address": address,
        "description": description,
        "messages": {message: {"$ref": f"#/components/messages/{message}"}},
        "bindings": {
            "amqp": {
                "is": "routingKey",
                # topology.declare declares every exchange durable.
                "exchange": {"name": exchange.name, "type": exchange.type.value, "durable": True},
                "bindingVersion": AMQP_BINDING,
            }
        },
    }


def _operation(action: str, name: str, summary: str, amqp: dict[str, Any]) -> dict[str, Any]:
    return {
        "action": action,
        "channel": {"$ref": f"#/channels/{name}"},
        "summary": summary,
        # AsyncAPI 3: an operation's messages are those of its channel.
        "messages": [{"$ref": f"#/channels/{name}/messages/{name}"}],
        "bindings": {"amqp": {**amqp, "bindingVersion": AMQP_BINDING}},
    }


def _verb(operation: dict[str, Any], name: str) -> str:
    return operation["action"] + name[0].upper() + name[1:]


def _components(files: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The JSON Schemas inlined, with pydantic's $defs hoisted beside them."""
    found: dict[str, Any] = {"DeadLetterHeaders": _dead_letter_headers()}
    for schema in files.values():
        schema = {k: v for k, v in schema.items() if k not in ("$schema", "$id")}
        named = {**schema.pop("$defs", {}), schema["title"]: schema}
        for name, sub in named.items():
            if found.setdefault(name, sub) != sub:
                raise ValueError(f"two different schemas named {name}")
    return _rewrite_refs(dict(sorted(found.items())))


def _rewrite_refs(node: Any) -> Any:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str):
            if not ref.startswith("#/$defs/"):
                raise ValueError(f"unexpected $ref {ref!r}")
            node = {**node, "$ref": "#/components/schemas/" + ref.removeprefix("#/$defs/")}
        return {k: v if k == "$ref" else _rewrite_refs(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_rewrite_refs(v) for v in node]
    return node


def _dead_letter_headers() -> dict[str, Any]:
    return {
        "title": "DeadLetterHeaders",
        "description": "The original message's headers plus either leadrouter's (it "
        "dead-lettered the message) or the broker's x-death (the delivery limit was hit).",
        "type": "object",
        "properties": {
            REASON_HEADER: {
                "type": "string",
                "enum": [str(reason) for reason in Reason],
                "description": "Why the message was dead-lettered. The broker's dead letters "
                "have no such header (and any the message came with is ignored): the ops "
                f"tools report their x-death reason ({', '.join(sorted(BROKER_REASONS))}).",
            },
            ERROR_HEADER: {
                "type": "string",
                "description": "A readable detail of the failure.",
            },
            "x-death": {
                "type": "array",
                "description": "Set by RabbitMQ when it dead-lettered the message itself, "
                "with reason delivery_limit once the quorum queue's delivery limit was reached, "
                "expired when the message's expiration passed in the queue.",
                "items": {
                    "type": "object",
                    "properties": {
                        "reason": {"type": "string"},
                        "queue": {"type": "string"},
                        "exchange": {"type": "string"},
                        "routing-keys": {"type": "array", "items": {"type": "string"}},
                        "count": {"type": "integer"},
                        "time": {"description": "An AMQP timestamp."},
                    },
                },
            },
        },
        "anyOf": [{"required": [REASON_HEADER, ERROR_HEADER]}, {"required": ["x-death"]}],
    }


# --- examples, built through the models so that they are valid --------------------------

_INBOUND_EXAMPLES: dict[str, Any] = {
    "lead.contact": inbound.LeadContact(
        source="telegram-bot",
        lead=inbound.Lead(
            external_id="tg:42", name="Ann", email="ann@example.com", phone="+1 555 0100"
        ),
        message="Hello! Is the blue one still available?",
        message_id="tg:42:1001",
    ).model_dump(mode="json", exclude_none=True),
    "contact.close": inbound.ContactClose(contact_id=123).model_dump(
        mode="json", exclude_none=True
    ),
    "contact.accept": inbound.ContactAccept(contact_id=123, operator_id=3).model_dump(
        mode="json", exclude_none=True
    ),
    "contact.decline": inbound.ContactDecline(
        contact_id=123, operator_id=3, reason="busy"
    ).model_dump(mode="json", exclude_none=True),
    "operator.presence": inbound.OperatorPresence(
        operator_id=3, status="away", requeue_open=True, message_id="app:3:77"
    ).model_dump(mode="json", exclude_none=True),
}
if set(_INBOUND_EXAMPLES) != set(inbound.ROUTING_KEYS):
    raise RuntimeError("_INBOUND_EXAMPLES does not match schemas.inbound.ROUTING_KEYS")


_OFFER_EVENTS = ("contact.offered", "contact.declined", "contact.expired")


def _event_example(routing_key: str) -> Any:
    data = events.ContactEventData(
        contact_id=157,
        status="closed" if routing_key == "contact.closed" else "open",
        lead_id=88,
        lead_external_id="tg:42",
        source="telegram-bot",
        operator_id=None if routing_key in ("contact.queued", "contact.requeued") else 3,
        inbound_message_id="tg:42:1001",
        queued_seconds=0.0 if routing_key == "contact.assigned" else None,
        offer_expires_at=(
            datetime(2024, 5, 6, 7, 8, 39, 123000, tzinfo=UTC)
            if routing_key == "contact.offered"
            else None
        ),
        attempt=1 if routing_key in _OFFER_EVENTS else None,
        reason={"contact.declined": "busy", "contact.answer_rejected": "expired"}.get(routing_key),
        answer="accept" if routing_key == "contact.answer_rejected" else None,
        requeued_from=3 if routing_key == "contact.requeued" else None,
    )
    time = datetime(2024, 5, 6, 7, 8, 9, 123000, tzinfo=UTC)
    event_id = "6f1c2b9e-7d3a-4f8e-9b21-0c5d4e3f2a10"
    return json.loads(events.build_event(event_id, routing_key, time, data).model_dump_json())


def _operator_event_example(routing_key: str) -> Any:
    data = events.OperatorPresenceData(
        operator_id=3,
        status="online",
        available=True,
        on_shift=True,
        on_leave=False,
        reason="shift",
    )
    event = events.OperatorEvent.model_validate(
        events.operator_envelope(
            "0b7e2d4c-1a9f-4c3e-8d65-2f4a9b1c7e30",
            routing_key,
            datetime(2024, 5, 6, 9, 0, 0, 412000, tzinfo=UTC),
            data.model_dump(),
        )
    )
    return json.loads(event.model_dump_json())


def _camel(routing_key: str) -> str:
    first, *rest = routing_key.split(".")
    return first + "".join(part.capitalize() for part in rest)


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().splitlines()[0]
