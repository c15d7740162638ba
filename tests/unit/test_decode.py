"""decode: bytes to a validated message, or DeadLetter with the first failing reason."""

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.inbound import ContactClose, LeadContact
from worker.decode import Inbound, decode, field_path, message_id_of, no_id, shown_routing_key
from worker.errors import DeadLetter, Reason

LIMIT = 1024 * 1024
CLOSE = b'{"contact_id": 7}'
CONTACT = json.dumps(
    {
        "source": "telegram-bot",
        "lead": {"external_id": "tg:42", "name": "Ann", "email": "ann@example.com"},
        "message": "hello",
    }
).encode()


def dead(
    body: bytes,
    routing_key: str = "contact.close",
    message_id: str | None = "m-1",
    limit: int = LIMIT,
) -> DeadLetter:
    with pytest.raises(DeadLetter) as info:
        decode(body, routing_key, message_id, limit)
    return info.value


def test_decodes_contact_close() -> None:
    inbound = decode(CLOSE, "contact.close", "m-1", LIMIT)
    assert inbound == Inbound("m-1", "contact.close", ContactClose(contact_id=7))


def test_decodes_lead_contact() -> None:
    inbound = decode(CONTACT, "lead.contact", "m-2", LIMIT)
    assert inbound.message_id == "m-2"
    assert inbound.routing_key == "lead.contact"
    assert isinstance(inbound.body, LeadContact)
    assert inbound.body.source == "telegram-bot"
    assert inbound.body.lead.email == "ann@example.com"


# --- too_large ---------------------------------------------------------------------


def test_too_large() -> None:
    body = b'{"contact_id": 7, "message_id": "' + b"x" * 2000 + b'"}'
    error = dead(body, limit=1024)
    assert error.reason is Reason.TOO_LARGE
    assert str(len(body)) in error.detail
    assert "1024" in error.detail


def test_too_large_checked_before_parsing() -> None:
    error = dead(b"\xff{{{ not json" * 200, routing_key="x", message_id=None, limit=1024)
    assert error.reason is Reason.TOO_LARGE


def test_too_large_before_deep_nesting() -> None:
    assert dead(b"[" * 100_000, limit=99_999).reason is Reason.TOO_LARGE


def test_exactly_the_limit_is_accepted() -> None:
    assert decode(CLOSE, "contact.close", "m", len(CLOSE)).body == ContactClose(contact_id=7)
    assert dead(CLOSE, limit=len(CLOSE) - 1).reason is Reason.TOO_LARGE


# --- invalid_json ------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{",
        b"not json",
        b'{"contact_id": 7',
        b"{'contact_id': 7}",
        b'{"contact_id": 7} trailing',
        b"\xff\xfe\xfd",
        b"\x80abc",
        b'{"contact_id": 7, "message_id": "\xc3\x28"}',
        b"\xed\xa0\x80",
        b"[" * 100_000,
        b'{"a":' * 50_000,
    ],
    ids=[
        "empty",
        "open_brace",
        "words",
        "truncated",
        "single_quotes",
        "trailing",
        "utf16_bom_truncated",
        "invalid_utf8",
        "invalid_utf8_in_string",
        "encoded_surrogate",
        "deep_list",
        "deep_object",
    ],
)
def test_invalid_json(body: bytes) -> None:
    error = dead(body)
    assert error.reason is Reason.INVALID_JSON
    assert error.detail
    assert len(error.detail) <= 500


def test_invalid_json_before_schema_and_id() -> None:
    assert dead(b"{", routing_key="unknown.key", message_id=None).reason is Reason.INVALID_JSON


# --- invalid_schema ----------------------------------------------------------------


@pytest.mark.parametrize(
    "routing_key", ["lead.created", "", "contact.close.x", "#", "CONTACT.CLOSE"]
)
def test_unknown_routing_key(routing_key: str) -> None:
    error = dead(CLOSE, routing_key=routing_key)
    assert error.reason is Reason.INVALID_SCHEMA
    assert "routing key" in error.detail


def test_unknown_routing_key_detail_is_bounded() -> None:
    error = dead(CLOSE, routing_key="k" * 10_000)
    assert error.reason is Reason.INVALID_SCHEMA
    assert len(error.detail) < 1000


@pytest.mark.parametrize(
    ("routing_key", "body"),
    [
        ("contact.close", b'{"contact_id": "7"}'),
        ("contact.close", b'{"contact_id": true}'),
        ("contact.close", b'{"contact_id": 7.5}'),
        ("contact.close", b'{"contact_id": 0}'),
        ("contact.close", b'{"contact_id": 7, "extra": 1}'),
        ("contact.close", b"{}"),
        ("contact.close", b"[7]"),
        ("contact.close", b"7"),
        ("contact.close", b'"7"'),
        ("contact.close", b"null"),
        ("contact.close", b'{"contact_id": 7, "message_id": ""}'),
        ("contact.close", b'{"contact_id": 7, "message_id": 12}'),
        ("lead.contact", b'{"source": "s", "lead": {"external_id": 5}}'),
        ("lead.contact", b'{"source": "s", "lead": {"external_id": "x"}, "x": 1}'),
        ("lead.contact", b'{"source": "Bad Key", "lead": {"external_id": "x"}}'),
        ("lead.contact", b'{"source": "s", "lead": {"external_id": "x\\u0000"}}'),
        ("lead.contact", b'{"source": "s", "lead": {"external_id": "\\ud800"}}'),
        ("lead.contact", CLOSE),
        ("contact.close", CONTACT),
        ("lead.contact", b'{"source": "s", "lead": ' + b"[" * 500 + b"]" * 500 + b"}"),
    ],
)
def test_invalid_schema(routing_key: str, body: bytes) -> None:
    assert dead(body, routing_key=routing_key).reason is Reason.INVALID_SCHEMA


def test_body_message_id_too_long() -> None:
    body = json.dumps({"contact_id": 7, "message_id": "m" * 257}).encode()
    assert dead(body, message_id=None).reason is Reason.INVALID_SCHEMA


def test_property_message_id_too_long() -> None:
    error = dead(CLOSE, message_id="m" * 257)
    assert error.reason is Reason.INVALID_SCHEMA
    assert "256" in error.detail
    assert decode(CLOSE, "contact.close", "m" * 256, LIMIT).message_id == "m" * 256


def test_invalid_schema_before_missing_message_id() -> None:
    assert dead(b'{"contact_id": "7"}', message_id=None).reason is Reason.INVALID_SCHEMA


def test_schema_detail_names_the_field() -> None:
    error = dead(b'{"contact_id": "7"}')
    assert "contact_id" in error.detail


def test_schema_detail_is_bounded_with_many_errors() -> None:
    body = json.dumps({f"field_{i}": "v" * 100 for i in range(200)}).encode()
    error = dead(body)
    assert error.reason is Reason.INVALID_SCHEMA
    assert len(error.detail) <= 500
    assert "more" in error.detail


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("email", "ann.private.person.at.example"),
        ("phone", "call ann-private-person"),
        ("name", "Ann Private Person" + "x" * 300),
        ("external_id", "ann-private-person\u0000"),
    ],
)
def test_schema_detail_does_not_echo_personal_data(field: str, value: str) -> None:
    lead = {"external_id": "tg:1", field: value}
    body = json.dumps({"source": "s", "lead": lead, "message": "private text"}).encode()
    error = dead(body, routing_key="lead.contact")
    assert error.reason is Reason.INVALID_SCHEMA
    assert field in error.detail
    assert "private" not in error.detail.lower()
    assert "private" not in str(error).lower()


def test_message_text_is_not_echoed() -> None:
    body = json.dumps(
        {"source": "s", "lead": {"external_id": "x"}, "message": "private " * 2000}
    ).encode()
    error = dead(body, routing_key="lead.contact")
    assert error.reason is Reason.INVALID_SCHEMA
    assert "private" not in error.detail


# --- missing_message_id ------------------------------------------------------------


@pytest.mark.parametrize("message_id", [None, ""])
def test_missing_message_id(message_id: str | None) -> None:
    assert dead(CLOSE, message_id=message_id).reason is Reason.MISSING_MESSAGE_ID
    error = dead(CONTACT, routing_key="lead.contact", message_id=message_id)
    assert error.reason is Reason.MISSING_MESSAGE_ID


def test_body_message_id_is_enough() -> None:
    body = json.dumps({"contact_id": 7, "message_id": "from-body"}).encode()
    assert decode(body, "contact.close", None, LIMIT).message_id == "from-body"


def test_body_message_id_takes_precedence_over_property() -> None:
    body = json.dumps({"contact_id": 7, "message_id": "from-body"}).encode()
    assert decode(body, "contact.close", "from-property", LIMIT).message_id == "from-body"
    contact = json.loads(CONTACT)
    contact["message_id"] = "bot-id"
    inbound = decode(json.dumps(contact).encode(), "lead.contact", "random-stamp", LIMIT)
    assert inbound.message_id == "bot-id"


def test_property_used_when_body_has_none() -> None:
    body = json.dumps({"contact_id": 7, "message_id": None}).encode()
    assert decode(body, "contact.close", "from-property", LIMIT).message_id == "from-property"


def test_property_message_id_must_be_storable() -> None:
    assert dead(CLOSE, message_id="m\x001").reason is Reason.INVALID_SCHEMA


def test_our_none_id_counts_as_none() -> None:
    """What the dead letter or replay of an id-less message carries (aiormq would stamp a
    random id): still no id, so it can never become a contact of its own."""
    marker = no_id()
    assert marker != no_id() and message_id_of(marker) is None
    assert dead(CLOSE, message_id=marker).reason is Reason.MISSING_MESSAGE_ID
    with_body_id = b'{"contact_id": 7, "message_id": "b-1"}'
    assert decode(with_body_id, "contact.close", marker, LIMIT).message_id == "b-1"
    assert message_id_of("m-1") == "m-1" and message_id_of("") is None


# --- invalid_properties ------------------------------------------------------------


def test_undecodable_properties_come_first_and_are_named() -> None:
    for body in (CLOSE, b"{not json", b" " * 2048):
        with pytest.raises(DeadLetter) as info:
            decode(body, "contact.close", None, 1024, undecodable=("message_id", "headers"))
        assert info.value.reason is Reason.INVALID_PROPERTIES
        assert info.value.detail == "could not decode the AMQP message_id, headers"


# --- never anything but Inbound or DeadLetter --------------------------------------

ROUTING_KEYS = st.sampled_from(["lead.contact", "contact.close", "x"])
MESSAGE_IDS = st.none() | st.text(max_size=300)
KEYS = st.sampled_from(
    [
        "source",
        "lead",
        "external_id",
        "name",
        "email",
        "phone",
        "message",
        "message_id",
        "contact_id",
        "x",
    ]
) | st.text(max_size=5)
JSONISH = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**62, max_value=2**70)
    | st.floats()
    | st.text(max_size=300)
    | st.sampled_from(["telegram-bot", "a@b.co", "+1 555 1234", "\x00", "\ud800"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(KEYS, children, max_size=5),
    max_leaves=20,
)


def check(body: bytes, routing_key: str, message_id: str | None) -> None:
    try:
        inbound = decode(body, routing_key, message_id, 4096)
    except DeadLetter as exc:
        assert isinstance(exc.reason, Reason)
        assert isinstance(exc.detail, str)
        return
    assert isinstance(inbound, Inbound)
    assert inbound.routing_key == routing_key
    assert 1 <= len(inbound.message_id) <= 256
    assert isinstance(inbound.body, LeadContact | ContactClose)


@settings(max_examples=200, deadline=None)
@given(body=st.binary(max_size=5000), routing_key=ROUTING_KEYS, message_id=MESSAGE_IDS)
def test_arbitrary_bytes(body: bytes, routing_key: str, message_id: str | None) -> None:
    check(body, routing_key, message_id)


@settings(max_examples=200, deadline=None)
@given(value=JSONISH, routing_key=ROUTING_KEYS, message_id=MESSAGE_IDS)
def test_arbitrary_json(value: Any, routing_key: str, message_id: str | None) -> None:
    body = json.dumps(value).encode("utf-8", errors="surrogatepass")
    check(body, routing_key, message_id)


@settings(max_examples=200, deadline=None)
@given(value=JSONISH, routing_key=ROUTING_KEYS, message_id=MESSAGE_IDS)
def test_arbitrary_json_unescaped(value: Any, routing_key: str, message_id: str | None) -> None:
    body = json.dumps(value, ensure_ascii=False).encode("utf-8", errors="surrogatepass")
    check(body, routing_key, message_id)


# --- only UTF-8 without a byte order mark -----------------------------------------

VALID_CLOSE = {"contact_id": 7, "message_id": "m-enc"}


@pytest.mark.parametrize(
    ("encoding", "says"),
    [
        ("utf-8-sig", "UTF-8 byte order mark"),
        ("utf-16", "UTF-16 byte order mark"),
        ("utf-16-le", "NUL byte"),
        ("utf-16-be", "NUL byte"),
        ("utf-32", "UTF-32 byte order mark"),
        ("utf-32-le", "NUL byte"),
        ("utf-32-be", "NUL byte"),
    ],
)
def test_only_utf8_without_bom(encoding: str, says: str) -> None:
    body = json.dumps(VALID_CLOSE).encode(encoding)
    assert json.loads(body) == VALID_CLOSE  # what json.loads alone would have accepted
    error = dead(body)
    assert error.reason is Reason.INVALID_JSON
    assert says in error.detail and "UTF-8" in error.detail


def test_bom_inside_a_string_is_fine() -> None:
    body = json.dumps({"contact_id": 7, "message_id": "\ufeffm"}, ensure_ascii=False).encode()
    assert decode(body, "contact.close", None, LIMIT).message_id == "\ufeffm"


# --- nothing a message says reaches the detail ------------------------------------

EMAIL = "ann.secret@example.com"
PHONE = "+4915112345678"


def test_unknown_keys_are_not_echoed_at_any_depth() -> None:
    body = json.dumps(
        {
            "source": "tg",
            EMAIL: 1,
            "lead": {"external_id": "x", PHONE: {EMAIL: 2}, EMAIL: True},
            "message": {PHONE: EMAIL},
        }
    ).encode()
    error = dead(body, routing_key="lead.contact")
    assert error.reason is Reason.INVALID_SCHEMA
    assert EMAIL not in str(error) and PHONE not in str(error)
    assert "<unknown key>: Extra inputs are not permitted" in error.detail
    assert "lead.<unknown key>: Extra inputs are not permitted" in error.detail
    assert "message: Input should be a valid string" in error.detail


@pytest.mark.parametrize(
    "body",
    [
        b'{"contact_id": 7, "x": "\\q ann.secret@example.com"}',  # bad escape after a marker
        b'{"contact_id": "ann.secret@example.com" +4915112345678}',
        b'{"ann.secret@example.com\x01": 1}',  # control character in a key
        b'{"contact_id": 7}\n+4915112345678',  # extra data
        b'\xef\xbb\xbf{"ann.secret@example.com": 1}',
        b'{"ann.secret@example.com": 1' + b"9" * 5000 + b"}",
        b'{"x": "ann.secret@example.com\xff"}',
    ],
)
def test_json_errors_say_where_not_what(body: bytes) -> None:
    error = dead(body)
    assert error.reason is Reason.INVALID_JSON
    assert EMAIL not in str(error) and PHONE not in str(error) and "4915112345678" not in str(error)


@pytest.mark.parametrize(
    ("routing_key", "body"),
    [
        (EMAIL, CLOSE),
        ("contact.close", json.dumps({"contact_id": PHONE}).encode()),
        ("contact.close", json.dumps({"contact_id": 7, "message_id": [EMAIL]}).encode()),
        ("lead.contact", json.dumps({"source": EMAIL, "lead": {"external_id": "x"}}).encode()),
        (
            "lead.contact",
            json.dumps({"source": "tg", "lead": {"external_id": EMAIL * 20}}).encode(),
        ),
        (
            "lead.contact",
            json.dumps({"source": "tg", "lead": {"external_id": "x", "email": PHONE}}).encode(),
        ),
        (
            "lead.contact",
            json.dumps({"source": "tg", "lead": {"external_id": "x", "phone": EMAIL}}).encode(),
        ),
        ("lead.contact", json.dumps({"source": "tg", "lead": EMAIL}).encode()),
        ("lead.contact", json.dumps([EMAIL, PHONE]).encode()),
    ],
)
def test_schema_errors_say_where_not_what(routing_key: str, body: bytes) -> None:
    error = dead(body, routing_key=routing_key)
    assert error.reason is Reason.INVALID_SCHEMA
    assert EMAIL not in str(error) and PHONE not in str(error) and "4915112345678" not in str(error)


@pytest.mark.parametrize(
    ("loc", "path"),
    [
        (("lead", "email"), "lead.email"),
        (("lead", EMAIL), "lead.<unknown key>"),
        ((EMAIL, "lead"), "<unknown key>.<unknown key>"),  # no field of an unknown key
        (("message", "lead"), "message.<unknown key>"),  # a field, but not of a str
        (("lead", 3), "lead.3"),
        ((), ""),
    ],
)
def test_field_path_keeps_only_known_fields(loc: tuple[int | str, ...], path: str) -> None:
    assert field_path(loc, LeadContact) == path


def test_unknown_model_has_no_known_fields() -> None:
    assert field_path(("lead", "email"), None) == "<unknown key>.<unknown key>"


def test_routing_key_in_logs() -> None:
    assert shown_routing_key("lead.contact") == "lead.contact"
    assert shown_routing_key(EMAIL) == "<unknown routing key>"
    assert shown_routing_key(None) == "<unknown routing key>"


@settings(max_examples=300, deadline=None)
@given(value=JSONISH, key=st.text(min_size=1), routing_key=ROUTING_KEYS)
def test_no_key_or_value_is_echoed(value: Any, key: str, routing_key: str) -> None:
    """A marker planted as a key or a value anywhere never reaches the detail."""
    marker = "ann.secret@example.com"
    planted = {"source": "tg", "lead": {"external_id": "x", marker: value}, marker + key: value}
    body = json.dumps([planted, {"contact_id": marker}][routing_key == "contact.close"]).encode(
        "utf-8", errors="surrogatepass"
    )
    with pytest.raises(DeadLetter) as info:
        decode(body, routing_key, "m-1", LIMIT)
    assert marker not in str(info.value)


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (b'{"a" 1}', "Expecting ':' delimiter at line 1 column 6"),
        (b'{"a": "x\x01"}', "Invalid control character at line 1 column 9"),
        (b'{"a": "abc', "Unterminated string starting at line 1 column 7"),
        (b'{"a": 1}\n x', "Extra data at line 2 column 2"),
        (b'{"a": "\xc3\x28"}', "not UTF-8 (at byte 7); send UTF-8 JSON"),
    ],
)
def test_json_detail_is_the_template_and_the_position(body: bytes, detail: str) -> None:
    assert dead(body).detail == detail
