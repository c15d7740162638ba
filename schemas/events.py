"""Outbound events on `leads.events`: CloudEvents 1.0 structured JSON envelopes."""

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

EVENT_TYPE_PREFIX = "org.leadrouter."


class ContactEventData(BaseModel):
    model_config = ConfigDict(extra="forbid")

    contact_id: int
    status: Literal["open", "closed"]
    lead_id: int
    lead_external_id: str
    source: str = Field(description="Key of the source the contact came through")
    operator_id: int | None = Field(description="Null while the contact is queued")
    inbound_message_id: str
    queued_seconds: float | None = Field(
        default=None,
        description="contact.assigned and contact.waiting only: how long the contact has waited"
        " in the queue",
    )
    affinity: bool = Field(
        default=False,
        description="contact.assigned only: went back to the operator who had this lead before",
    )
    offer_expires_at: datetime | None = Field(
        default=None, description="contact.offered only: when the offer lapses unanswered"
    )
    attempt: int | None = Field(
        default=None,
        description="Offers only: which offer of this contact (1 for the first); null elsewhere",
    )
    reason: str | None = Field(
        default=None,
        max_length=256,
        description="contact.declined: the operator's reason, if given; "
        "contact.answer_rejected: expired, not_offered or closed",
    )
    answer: Literal["accept", "decline"] | None = Field(
        default=None, description="contact.answer_rejected only: the answer rejected"
    )
    overflow_to: str | None = Field(
        default=None,
        description="contact.overflowed only: key of the source whose operators may now take"
        " the contact too (it keeps its own source)",
    )
    requeued_from: int | None = Field(
        default=None,
        description="contact.requeued only: the operator who handed the contact back",
    )


class ContactEvent(BaseModel):
    """Envelope shared by every contact event: contact.assigned, contact.queued,
    contact.closed, contact.overflowed, contact.waiting and, for sources with offers on,
    contact.offered, contact.declined, contact.expired and contact.answer_rejected."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    specversion: Literal["1.0"] = "1.0"
    # CloudEvents requires id, source and subject (when present) to be non-empty strings.
    id: str = Field(min_length=1, description="Stable across re-publishes: de-duplicate on it")
    source: str = Field(
        min_length=1, description="URI reference of the leadrouter source, /leadrouter/sources/KEY"
    )
    type: Literal[
        "org.leadrouter.contact.assigned",
        "org.leadrouter.contact.queued",
        "org.leadrouter.contact.closed",
        "org.leadrouter.contact.offered",
        "org.leadrouter.contact.declined",
        "org.leadrouter.contact.expired",
        "org.leadrouter.contact.answer_rejected",
        "org.leadrouter.contact.overflowed",
        "org.leadrouter.contact.waiting",
        "org.leadrouter.contact.requeued",
    ]
    time: datetime
    subject: str = Field(min_length=1, description="contacts/ID")
    datacontenttype: Literal["application/json"] = "application/json"
    data: ContactEventData


ROUTING_KEYS = (
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
OPERATOR_ROUTING_KEYS = ("operator.presence_changed",)


class OperatorPresenceData(BaseModel):
    model_config = ConfigDict(extra="forbid")

    operator_id: int
    status: Literal["online", "away", "offline"] = Field(description="The operator's presence")
    available: bool = Field(
        description="Whether they get contacts now: active, online, on shift, not on leave"
    )
    on_shift: bool = Field(description="Within their shift now (true without a shift)")
    on_leave: bool
    reason: Literal["message", "cli", "shift", "leave", "expired_offers"] = Field(
        description="What changed it: an operator.presence message, the CLI, a shift "
        "starting or ending, leave starting or ending, or offers of a source with "
        "--expire-to-away that lapsed unanswered that many times in a row"
    )


class OperatorEvent(BaseModel):
    """Envelope of operator.presence_changed."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    specversion: Literal["1.0"] = "1.0"
    id: str = Field(min_length=1, description="Stable across re-publishes: de-duplicate on it")
    source: str = Field(min_length=1, description="/leadrouter/operators/ID")
    type: Literal["org.leadrouter.operator.presence_changed"]
    time: datetime
    subject: str = Field(min_length=1, description="operators/ID")
    datacontenttype: Literal["application/json"] = "application/json"
    data: OperatorPresenceData


def operator_envelope(
    event_id: str, routing_key: str, time: datetime, data: dict[str, Any]
) -> dict[str, Any]:
    """The envelope of an event about an operator, as plain data."""
    if routing_key not in OPERATOR_ROUTING_KEYS:
        raise ValueError(f"unknown event routing key {routing_key!r}")
    operator = data["operator_id"]
    return _envelope(
        event_id,
        routing_key,
        time,
        data,
        f"/leadrouter/operators/{operator}",
        f"operators/{operator}",
    )


def envelope(
    event_id: str, routing_key: str, time: datetime, data: dict[str, Any]
) -> dict[str, Any]:
    """The envelope of one contact state change as plain data: what the worker writes to
    the outbox (pydantic would cost more than the routing itself on that path)."""
    if routing_key not in ROUTING_KEYS:
        raise ValueError(f"unknown event routing key {routing_key!r}")
    return _envelope(
        event_id,
        routing_key,
        time,
        data,
        f"/leadrouter/sources/{data['source']}",
        f"contacts/{data['contact_id']}",
    )


def _envelope(
    event_id: str,
    routing_key: str,
    time: datetime,
    data: dict[str, Any],
    source: str,
    subject: str,
) -> dict[str, Any]:
    """A CloudEvents 1.0 envelope around `data`, as plain data."""
    return {
        "specversion": "1.0",
        "id": event_id,
        "source": source,
        "type": EVENT_TYPE_PREFIX + routing_key,
        "time": time.isoformat(),
        "subject": subject,
        "datacontenttype": "application/json",
        "data": data,
    }


def build_event(
    event_id: str, routing_key: str, time: datetime, data: ContactEventData
) -> ContactEvent:
    """The same envelope, validated against the contract's model; pure, so it is tested
    without I/O."""
    return ContactEvent.model_validate(envelope(event_id, routing_key, time, data.model_dump()))
