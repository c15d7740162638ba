"""Inbound bytes to a validated message, or DeadLetter with the reason. No I/O."""

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import ValidationError

from schemas.inbound import ROUTING_KEYS, SHORT, ContactClose, LeadContact, storable
from worker.errors import DeadLetter, Reason

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
    body: LeadContact | ContactClose


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
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise DeadLetter(Reason.INVALID_JSON, _short(str(exc))) from None

    model = ROUTING_KEYS.get(routing_key)
    if model is None:
        raise DeadLetter(
            Reason.INVALID_SCHEMA,
            f"unknown routing key {_short(routing_key)!r}; expected one of {sorted(ROUTING_KEYS)}",
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


def describe(exc: ValidationError) -> str:
    """One readable line per error, without echoing the (possibly personal) input."""
    parts = []
    for error in exc.errors(include_input=False, include_url=False)[:5]:
        where = ".".join(str(p) for p in error["loc"]) or "body"
        parts.append(f"{where}: {error['msg']}")
    more = exc.error_count() - len(parts)
    if more > 0:
        parts.append(f"and {more} more")
    return _short("; ".join(parts))


def _short(text: str, limit: int = 500) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
