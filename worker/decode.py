"""Inbound bytes to a validated message, or DeadLetter with the reason. No I/O.

A dead letter's detail goes into the `x-leadrouter-error` header and the worker's log, so
it says only what leadrouter itself defines: field names of the models (any other key is
`<unknown key>`), error templates, lengths and positions; never a value, key or routing
key that a message brings."""

import codecs
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from inspect import isclass
from typing import Any

from pydantic import BaseModel, ValidationError

from schemas.inbound import (
    ROUTING_KEYS,
    SHORT,
    ContactAccept,
    ContactClose,
    ContactDecline,
    Lead,
    LeadContact,
    OperatorPresence,
    storable,
)
from schemas.inbound import Inbound as Body
from worker.errors import DeadLetter, Reason

UNKNOWN_KEY = "<unknown key>"
UNKNOWN_ROUTING_KEY = "<unknown routing key>"
# Byte order marks, longest first: the UTF-32 LE mark begins with the UTF-16 LE one.
_BOMS = (
    (codecs.BOM_UTF32_LE, "UTF-32"),
    (codecs.BOM_UTF32_BE, "UTF-32"),
    (codecs.BOM_UTF8, "UTF-8"),
    (codecs.BOM_UTF16_LE, "UTF-16"),
    (codecs.BOM_UTF16_BE, "UTF-16"),
)
_MODELS: dict[str, type[BaseModel]] = {
    m.__name__: m
    for m in (LeadContact, ContactClose, ContactAccept, ContactDecline, Lead, OperatorPresence)
}
# pydantic error types whose message template holds only what the schema says (a type,
# a length, a pattern, a class name, or the fixed text of our own validators' ValueError);
# any other type is reported by its name alone.
_SAFE_MESSAGES = frozenset(
    {
        "missing",
        "extra_forbidden",
        "model_type",
        "model_attributes_type",
        "dict_type",
        "list_type",
        "none_required",
        "bool_type",
        "int_type",
        "int_from_float",
        "int_parsing",
        "int_parsing_size",
        "float_type",
        "string_type",
        "string_sub_type",
        "string_unicode",
        "string_too_short",
        "string_too_long",
        "string_pattern_mismatch",
        "greater_than",
        "greater_than_equal",
        "less_than",
        "less_than_equal",
        "value_error",
        "literal_error",
        "recursion_loop",
    }
)

# The message_id property of what we publish for a message that had no id (its dead
# letter, its replay): aiormq stamps a random id on any publish without one, which would
# turn each copy into a message of its own. A message id with this prefix counts as none.
NO_ID_PREFIX = "leadrouter-no-id:"


def no_id() -> str:
    """A message id that says "none" (unique, so that aiormq can match a returned
    publish to its confirmation)."""
    return NO_ID_PREFIX + uuid.uuid4().hex


def message_id_of(prop: str | None) -> str | None:
    """The message_id property as the message's id: None if missing or our "none"."""
    return None if not prop or prop.startswith(NO_ID_PREFIX) else prop


@dataclass(frozen=True, slots=True)
class Inbound:
    message_id: str
    routing_key: str
    body: Body


def decode(
    body: bytes,
    routing_key: str,
    message_id: str | None,
    max_bytes: int,
    undecodable: Sequence[str] = (),
) -> Inbound:
    """Check the AMQP properties (`undecodable`: the names of those the client could not
    decode, see worker/amqp_reads.py), size, JSON, schema and id, in that order; the first
    failure is the reason."""
    if undecodable:
        raise DeadLetter(
            Reason.INVALID_PROPERTIES,
            f"could not decode the AMQP {', '.join(undecodable)}",
        )
    if len(body) > max_bytes:
        raise DeadLetter(Reason.TOO_LARGE, f"body is {len(body)} bytes, the limit is {max_bytes}")
    data = parse_json(body)

    model = ROUTING_KEYS.get(routing_key)
    if model is None:
        raise DeadLetter(
            Reason.INVALID_SCHEMA,
            f"unknown routing key ({len(routing_key)} characters); "
            f"expected one of {sorted(ROUTING_KEYS)}",
        )
    try:
        parsed = model.model_validate(data, strict=True)
    except ValidationError as exc:
        raise DeadLetter(Reason.INVALID_SCHEMA, describe(exc)) from None
    except RecursionError:
        raise DeadLetter(Reason.INVALID_SCHEMA, "nested too deeply") from None

    # The body field wins: it is the bot's own choice, while some clients (aiormq) stamp
    # a random message_id property on anything published without one.
    message_id = parsed.message_id or message_id_of(message_id)
    if not message_id:
        raise DeadLetter(
            Reason.MISSING_MESSAGE_ID, "set the AMQP message_id property or a message_id field"
        )
    if len(message_id) > SHORT:
        raise DeadLetter(Reason.INVALID_SCHEMA, f"message id longer than {SHORT} characters")
    try:
        storable(message_id)
    except ValueError as exc:
        raise DeadLetter(Reason.INVALID_SCHEMA, f"message id {exc}") from None
    return Inbound(message_id=message_id, routing_key=routing_key, body=parsed)


def parse_json(body: bytes) -> Any:
    """UTF-8 JSON without a byte order mark, as the contract says; json.loads alone would
    also take UTF-16 and UTF-32 (it guesses the encoding of bytes) and a UTF-8 BOM."""
    for bom, encoding in _BOMS:
        if body.startswith(bom):
            raise DeadLetter(
                Reason.INVALID_JSON,
                f"starts with a {encoding} byte order mark; send UTF-8 JSON without one",
            )
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DeadLetter(
            Reason.INVALID_JSON, f"not UTF-8 (at byte {exc.start}); send UTF-8 JSON"
        ) from None
    if "\x00" in text:  # never in JSON text; the mark of UTF-16 or UTF-32 without a BOM
        raise DeadLetter(
            Reason.INVALID_JSON,
            f"a NUL byte at byte {body.index(0)} (UTF-16 or UTF-32?); send UTF-8 JSON",
        )
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        # The template only: a message (`Invalid \escape: 'x'`) may quote the input.
        what = exc.msg.split(": ", 1)[0].removesuffix(" at")
        raise DeadLetter(
            Reason.INVALID_JSON, f"{what} at line {exc.lineno} column {exc.colno}"
        ) from None
    except ValueError as exc:
        detail = "a number too long to read" if "digits" in str(exc) else type(exc).__name__
        raise DeadLetter(Reason.INVALID_JSON, detail) from None
    except RecursionError:
        raise DeadLetter(Reason.INVALID_JSON, "nested too deeply") from None


def describe(exc: ValidationError) -> str:
    """One readable line per error, saying only what the schema defines: the path of known
    field names (others are `<unknown key>`) and the message template, never the input.
    Our own validators raise ValueError with fixed texts for the same reason."""
    parts = []
    model = _MODELS.get(exc.title)
    for error in exc.errors(include_input=False, include_url=False, include_context=False)[:5]:
        where = field_path(error["loc"], model) or "body"
        kind = error["type"]
        parts.append(f"{where}: {error['msg'] if kind in _SAFE_MESSAGES else kind}")
    more = exc.error_count() - len(parts)
    if more > 0:
        parts.append(f"and {more} more")
    return _short("; ".join(parts))


def field_path(loc: tuple[int | str, ...], model: type[BaseModel] | None) -> str:
    """`lead.email` for a path of known fields; any key the model does not define (the
    key of an extra input, which may be anything a client wrote) becomes UNKNOWN_KEY."""
    parts = []
    current: Any = model
    for item in loc:
        fields = current.model_fields if isclass(current) and issubclass(current, BaseModel) else {}
        if isinstance(item, int):  # a list index: a bounded number
            parts.append(str(item))
            current = None
        elif item in fields:
            parts.append(item)
            current = fields[item].annotation
        else:
            parts.append(UNKNOWN_KEY)
            current = None
    return ".".join(parts)


def shown_routing_key(routing_key: str | None) -> str:
    """A routing key fit for a log line: ours as it is, any other as UNKNOWN_ROUTING_KEY."""
    return routing_key if routing_key in ROUTING_KEYS else UNKNOWN_ROUTING_KEY


def _short(text: str, limit: int = 500) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
