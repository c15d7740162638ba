"""The inbound message models: strict types, no extra fields, bounded and storable text."""

from typing import Any

import pytest
from pydantic import ValidationError

from schemas.inbound import (
    MESSAGE_TEXT,
    ROUTING_KEYS,
    SHORT,
    ContactClose,
    Lead,
    LeadContact,
    OperatorPresence,
)


def lead_contact(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "source": "telegram-bot",
        "lead": {
            "external_id": "tg:42",
            "name": "Ann",
            "email": "ann@example.com",
            "phone": "+1 (555) 123-4567",
        },
        "message": "hello",
    }
    body.update(overrides)
    return body


def with_lead(**fields: Any) -> dict[str, Any]:
    body = lead_contact()
    body["lead"] = {**body["lead"], **fields}
    return body


def test_routing_keys_map_to_models() -> None:
    assert sorted(ROUTING_KEYS) == [
        "contact.accept",
        "contact.close",
        "contact.decline",
        "lead.contact",
        "operator.presence",
    ]
    assert ROUTING_KEYS["operator.presence"] is OperatorPresence
    assert ROUTING_KEYS["lead.contact"] is LeadContact
    assert ROUTING_KEYS["contact.close"] is ContactClose


def test_valid_lead_contact() -> None:
    parsed = LeadContact.model_validate(lead_contact(message_id="m-1"), strict=True)
    assert parsed.source == "telegram-bot"
    assert parsed.lead == Lead(
        external_id="tg:42", name="Ann", email="ann@example.com", phone="+1 (555) 123-4567"
    )
    assert parsed.message == "hello"
    assert parsed.message_id == "m-1"


def test_lead_contact_optional_fields_default() -> None:
    parsed = LeadContact.model_validate({"source": "s", "lead": {"external_id": "x"}}, strict=True)
    assert parsed.message == ""
    assert parsed.message_id is None
    assert parsed.lead.name is None
    assert parsed.lead.email is None
    assert parsed.lead.phone is None


def test_lead_contact_from_json() -> None:
    parsed = LeadContact.model_validate_json(
        '{"source": "web", "lead": {"external_id": "w:1"}, "message": "hi"}', strict=True
    )
    assert parsed.lead.external_id == "w:1"


def test_valid_contact_close() -> None:
    parsed = ContactClose.model_validate({"contact_id": 123}, strict=True)
    assert parsed.contact_id == 123
    assert parsed.message_id is None
    assert ContactClose.model_validate({"contact_id": 2**63 - 1}).contact_id == 2**63 - 1


@pytest.mark.parametrize("contact_id", [0, -1, 2**63])
def test_contact_id_range(contact_id: int) -> None:
    with pytest.raises(ValidationError):
        ContactClose.model_validate({"contact_id": contact_id}, strict=True)


@pytest.mark.parametrize(
    ("model", "body"),
    [
        (LeadContact, lead_contact(extra=1)),
        (LeadContact, with_lead(age=30)),
        (ContactClose, {"contact_id": 1, "reason": "done"}),
    ],
    ids=["lead_contact", "lead", "contact_close"],
)
def test_extra_fields_rejected(
    model: type[LeadContact | ContactClose], body: dict[str, Any]
) -> None:
    with pytest.raises(ValidationError) as info:
        model.model_validate(body, strict=True)
    assert info.value.errors()[0]["type"] == "extra_forbidden"


@pytest.mark.parametrize("contact_id", ["1", True, 1.5, 1.0, None, [1]])
def test_contact_id_wrong_types_rejected(contact_id: object) -> None:
    with pytest.raises(ValidationError):
        ContactClose.model_validate({"contact_id": contact_id}, strict=True)


@pytest.mark.parametrize("contact_id", ['"1"', "true", "1.5"])
def test_contact_id_wrong_json_types_rejected(contact_id: str) -> None:
    with pytest.raises(ValidationError):
        ContactClose.model_validate_json(f'{{"contact_id": {contact_id}}}', strict=True)


@pytest.mark.parametrize(
    "body",
    [
        with_lead(external_id=5),
        with_lead(name=5),
        with_lead(email=["a@b.co"]),
        lead_contact(message=5),
        lead_contact(source=5),
        lead_contact(lead="tg:42"),
        lead_contact(message_id=7),
    ],
)
def test_lead_contact_wrong_types_rejected(body: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        LeadContact.model_validate(body, strict=True)


@pytest.mark.parametrize("missing", ["source", "lead"])
def test_required_fields(missing: str) -> None:
    body = lead_contact()
    del body[missing]
    with pytest.raises(ValidationError):
        LeadContact.model_validate(body, strict=True)


def test_contact_close_requires_contact_id() -> None:
    with pytest.raises(ValidationError):
        ContactClose.model_validate({}, strict=True)


@pytest.mark.parametrize("field", ["external_id", "name"])
def test_short_fields_length(field: str) -> None:
    assert SHORT == 256
    ok = LeadContact.model_validate(with_lead(**{field: "x" * 256}), strict=True)
    assert getattr(ok.lead, field) == "x" * 256
    with pytest.raises(ValidationError):
        LeadContact.model_validate(with_lead(**{field: "x" * 257}), strict=True)


def test_short_length_counts_characters_not_bytes() -> None:
    ok = LeadContact.model_validate(with_lead(external_id="я" * 256), strict=True)
    assert len(ok.lead.external_id) == 256


def test_message_id_length() -> None:
    ok = ContactClose.model_validate({"contact_id": 1, "message_id": "m" * 256}, strict=True)
    assert ok.message_id == "m" * 256
    with pytest.raises(ValidationError):
        ContactClose.model_validate({"contact_id": 1, "message_id": "m" * 257}, strict=True)
    with pytest.raises(ValidationError):
        LeadContact.model_validate(lead_contact(message_id="m" * 257), strict=True)


def test_empty_external_id_rejected() -> None:
    with pytest.raises(ValidationError):
        LeadContact.model_validate(with_lead(external_id=""), strict=True)


def test_message_length() -> None:
    assert MESSAGE_TEXT == 10_000
    ok = LeadContact.model_validate(lead_contact(message="m" * 10_000), strict=True)
    assert len(ok.message) == 10_000
    with pytest.raises(ValidationError):
        LeadContact.model_validate(lead_contact(message="m" * 10_001), strict=True)


@pytest.mark.parametrize(
    "email",
    ["ann@example.com", "a.b+tag@sub.example.org", "x@y.io", "имя@пример.рф"],
)
def test_good_emails(email: str) -> None:
    assert LeadContact.model_validate(with_lead(email=email), strict=True).lead.email == email


@pytest.mark.parametrize(
    "email",
    [
        "not-an-email",
        "ann@example",
        "ann@@example.com",
        "a nn@example.com",
        "ann@example.com.",
        "@example.com",
        "ann@",
        "ann@exa mple.com",
        "",
    ],
)
def test_bad_emails(email: str) -> None:
    with pytest.raises(ValidationError):
        LeadContact.model_validate(with_lead(email=email), strict=True)


@pytest.mark.parametrize(
    "phone",
    ["+1 (555) 123-4567", "+79991234567", "555.1234", "123", "1" * 20],
)
def test_good_phones(phone: str) -> None:
    assert LeadContact.model_validate(with_lead(phone=phone), strict=True).lead.phone == phone


@pytest.mark.parametrize(
    "phone",
    ["12", "1" * 21, "call me", "+1 555 CALL-NOW", "+", "   ", "++1 555 1234", "555/1234", ""],
)
def test_bad_phones(phone: str) -> None:
    with pytest.raises(ValidationError):
        LeadContact.model_validate(with_lead(phone=phone), strict=True)


@pytest.mark.parametrize(
    "fields", [{"email": "ann@example.com\n"}, {"phone": "+1 555 1234\n"}], ids=["email", "phone"]
)
def test_trailing_newline_rejected(fields: dict[str, str]) -> None:
    with pytest.raises(ValidationError):
        LeadContact.model_validate(with_lead(**fields), strict=True)


@pytest.mark.parametrize(
    "body",
    [
        with_lead(external_id="tg:\x0042"),
        with_lead(name="Ann\x00"),
        lead_contact(message="hi\x00there"),
        lead_contact(message_id="m\x00"),
        with_lead(external_id="tg:\ud800"),
        with_lead(name="\udfffAnn"),
        lead_contact(message="lone \ud83d surrogate"),
    ],
    ids=["nul_id", "nul_name", "nul_message", "nul_message_id", "sur_id", "sur_name", "sur_msg"],
)
def test_unstorable_text_rejected(body: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        LeadContact.model_validate(body, strict=True)


def test_unstorable_text_rejected_from_json_escapes() -> None:
    for escaped in ("\\u0000", "\\ud800"):
        with pytest.raises(ValidationError):
            LeadContact.model_validate_json(
                f'{{"source": "s", "lead": {{"external_id": "a{escaped}"}}}}', strict=True
            )


def test_valid_surrogate_pair_accepted() -> None:
    parsed = LeadContact.model_validate(lead_contact(message="hi \U0001f600"), strict=True)
    assert parsed.message == "hi \U0001f600"


@pytest.mark.parametrize("key", ["telegram-bot", "a", "0", "web.form_2", "a" * 128, "x-1.y_2"])
def test_good_source_keys(key: str) -> None:
    assert LeadContact.model_validate(lead_contact(source=key), strict=True).source == key


@pytest.mark.parametrize(
    "key",
    [
        "",
        "Telegram",
        "-bot",
        ".bot",
        "_bot",
        "tele gram",
        "bot/1",
        "бот",
        "a" * 129,
        "bot\n",
        "bot\x00",
    ],
)
def test_bad_source_keys(key: str) -> None:
    with pytest.raises(ValidationError):
        LeadContact.model_validate(lead_contact(source=key), strict=True)


def test_models_are_frozen() -> None:
    parsed = ContactClose.model_validate({"contact_id": 1})
    with pytest.raises(ValidationError):
        parsed.contact_id = 2
