"""Inbound message bodies published by upstream bots to `leads.inbound`."""

import re
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
)

SHORT = 256
MESSAGE_TEXT = 10_000


def storable(value: str) -> str:
    """PostgreSQL text holds neither NUL nor lone surrogates; refuse them here."""
    if "\x00" in value:
        raise ValueError("contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("is not valid Unicode") from None
    return value


Short = Annotated[str, StringConstraints(min_length=1, max_length=SHORT), AfterValidator(storable)]
Text = Annotated[str, StringConstraints(max_length=MESSAGE_TEXT), AfterValidator(storable)]
SourceKey = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9._-]{0,127}$")]

_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s.]+")
_PHONE = re.compile(r"\+?[0-9 ()\-.]+")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Lead(_Strict):
    """The end customer as the bot knows them."""

    external_id: Short = Field(
        description="Stable id of the customer in the bot's world, e.g. tg:42"
    )
    name: Short | None = None
    email: Short | None = None
    phone: Short | None = None

    @field_validator("email")
    @classmethod
    def _email(cls, value: str | None) -> str | None:
        if value is not None and not _EMAIL.fullmatch(value):
            raise ValueError("not an e-mail address")
        return value

    @field_validator("phone")
    @classmethod
    def _phone(cls, value: str | None) -> str | None:
        if value is not None:
            digits = sum(ch.isdigit() for ch in value)
            if not _PHONE.fullmatch(value) or not 3 <= digits <= 20:
                raise ValueError("not a phone number")
        return value


class LeadContact(_Strict):
    """Routing key `lead.contact`: a lead wrote to us through a source."""

    source: SourceKey = Field(description="Key of the source (channel/bot) the lead wrote to")
    lead: Lead
    message: Text = ""
    message_id: Short | None = Field(
        default=None,
        description="Idempotency key; takes precedence over the AMQP message_id property",
    )
    priority: Annotated[int, Field(ge=0, le=9)] = Field(
        default=0,
        description="0-9, higher first: the source's backlog is served by priority, then age",
    )


class ContactClose(_Strict):
    """Routing key `contact.close`: the conversation is over; free the operator."""

    contact_id: Annotated[int, Field(gt=0, lt=2**63)]
    message_id: Short | None = Field(
        default=None,
        description="Idempotency key; takes precedence over the AMQP message_id property",
    )


class ContactAccept(_Strict):
    """Routing key `contact.accept`: the operator takes the contact offered to them."""

    contact_id: Annotated[int, Field(gt=0, lt=2**63)]
    operator_id: Annotated[int, Field(gt=0, lt=2**63)] = Field(
        description="The operator answering: must be the one the contact is offered to"
    )
    message_id: Short | None = Field(
        default=None,
        description="Idempotency key; takes precedence over the AMQP message_id property",
    )


class ContactDecline(_Strict):
    """Routing key `contact.decline`: the operator turns the offer down; the contact is
    offered to the next operator at once."""

    contact_id: Annotated[int, Field(gt=0, lt=2**63)]
    operator_id: Annotated[int, Field(gt=0, lt=2**63)] = Field(
        description="The operator answering: must be the one the contact is offered to"
    )
    reason: Annotated[str, StringConstraints(max_length=SHORT), AfterValidator(storable)] | None = (
        Field(default=None, description="Why, in a few words (kept with the offer, never logged)")
    )
    message_id: Short | None = Field(
        default=None,
        description="Idempotency key; takes precedence over the AMQP message_id property",
    )


class OperatorPresence(_Strict):
    """Routing key `operator.presence`: an operator's app says whether they take work."""

    operator_id: Annotated[int, Field(gt=0, lt=2**63)]
    status: Literal["online", "away", "offline"] = Field(
        description="online: takes contacts (within their shift, outside leave); away or "
        "offline: takes none"
    )
    requeue_open: bool = Field(
        default=False,
        description="Going away or offline: also hand their open contacts back to the queue "
        "(contact.requeued), to be routed again at once in their old place",
    )
    message_id: Short | None = Field(
        default=None,
        description="Idempotency key; takes precedence over the AMQP message_id property",
    )


Answer = ContactAccept | ContactDecline
Inbound = LeadContact | ContactClose | ContactAccept | ContactDecline | OperatorPresence

ROUTING_KEYS: dict[str, type[Inbound]] = {
    "lead.contact": LeadContact,
    "contact.close": ContactClose,
    "contact.accept": ContactAccept,
    "contact.decline": ContactDecline,
    "operator.presence": OperatorPresence,
}
