"""The lenient frame decoder on raw frame bytes, as the broker sends them: what pamqp
refuses is decoded property by property and marked, never raised; what pamqp decodes is
left exactly as pamqp decodes it."""

import datetime
import struct
from collections.abc import Iterator
from typing import Any

import pamqp.frame
import pytest
import structlog
from pamqp import commands, encode, exceptions

from worker import amqp_reads

# Property flags of Basic.Properties (AMQP 0-9-1), highest bit first.
FLAGS = {
    "content_type": 1 << 15,
    "content_encoding": 1 << 14,
    "headers": 1 << 13,
    "delivery_mode": 1 << 12,
    "priority": 1 << 11,
    "correlation_id": 1 << 10,
    "reply_to": 1 << 9,
    "expiration": 1 << 8,
    "message_id": 1 << 7,
    "timestamp": 1 << 6,
    "type": 1 << 5,
    "user_id": 1 << 4,
    "app_id": 1 << 3,
}


@pytest.fixture(autouse=True)
def installed() -> Iterator[None]:
    assert amqp_reads.install()
    yield
    amqp_reads.uninstall()


def shortstr(raw: bytes) -> bytes:
    return bytes([len(raw)]) + raw


def longstr(raw: bytes) -> bytes:
    return struct.pack(">I", len(raw)) + raw


def table(*entries: tuple[bytes, bytes]) -> bytes:
    """A field table from (raw key, type byte + raw value) pairs."""
    return longstr(b"".join(shortstr(key) + value for key, value in entries))


def frame(frame_type: int, payload: bytes, channel: int = 1) -> bytes:
    return struct.pack(">BHI", frame_type, channel, len(payload)) + payload + b"\xce"


def content_header(body_size: int = 2, **properties: bytes) -> bytes:
    """A content header frame with these properties, already encoded, in spec order."""
    flags = 0
    encoded = b""
    for name, flag in FLAGS.items():
        if name in properties:
            flags |= flag
            encoded += properties[name]
    return frame(2, struct.pack(">HHQH", 60, 0, body_size, flags) + encoded)


def deliver(routing_key: bytes, exchange: bytes = b"leads.inbound") -> bytes:
    arguments = (
        shortstr(b"ctag") + struct.pack(">QB", 7, 0) + shortstr(exchange) + shortstr(routing_key)
    )
    return frame(1, struct.pack(">HH", 60, 60) + arguments)


def read(data: bytes) -> Any:
    consumed, channel, decoded = pamqp.frame.unmarshal(data)
    assert (consumed, channel) == (len(data), 1)
    return decoded


def marks(frame_object: Any) -> tuple[str, ...]:
    return getattr(frame_object, amqp_reads.UNDECODABLE, ())


def test_a_message_id_that_is_not_utf8_is_left_out_and_the_rest_kept() -> None:
    data = content_header(
        content_type=shortstr(b"application/json"),
        delivery_mode=b"\x02",
        message_id=shortstr(b"\xff\xfe\x80abc"),
        timestamp=struct.pack(">Q", 1_700_000_000),
        app_id=shortstr(b"bot"),
    )
    with pytest.raises(exceptions.UnmarshalingException):
        amqp_reads._strict(data)  # what aiormq turned into a reconnect
    header = read(data)
    p = header.properties
    assert (p.content_type, p.delivery_mode, p.message_id, p.app_id) == (
        "application/json",
        2,
        None,
        "bot",
    )
    assert p.timestamp == datetime.datetime.fromtimestamp(1_700_000_000, tz=datetime.UTC)
    assert header.body_size == 2
    assert marks(header) == ("message_id",)


@pytest.mark.parametrize(
    ("name", "encoded", "shown"),
    [
        ("content_type", shortstr(b"\xc3("), "content_type"),
        ("correlation_id", shortstr(b"\x80"), "correlation_id"),
        ("reply_to", shortstr(b"\xed\xa0\x80"), "reply_to"),  # a UTF-16 surrogate
        ("type", shortstr(b"\xff"), "type"),
        ("user_id", shortstr(b"\xfe"), "user_id"),
        ("app_id", shortstr(b"a\xffb"), "app_id"),
        ("timestamp", struct.pack(">Q", 2**62), "timestamp"),  # past the year 9999
        ("timestamp", struct.pack(">Q", 2**64 - 1), "timestamp"),
    ],
)
def test_each_kind_of_undecodable_property_is_named(name: str, encoded: bytes, shown: str) -> None:
    header = read(content_header(**{name: encoded}, message_id=shortstr(b"m-1")))
    assert marks(header) == (shown,)
    assert header.properties.message_id == "m-1"


def test_header_entries_that_do_not_decode_are_dropped_and_the_others_kept() -> None:
    headers = table(
        (b"trace", b"S" + longstr(b"t-1")),
        (b"\xffkey", b"S" + longstr(b"v")),  # a name that is not UTF-8
        (b"when", b"T" + struct.pack(">Q", 2**62)),  # a timestamp past 9999
        (b"nested", b"F" + table((b"\xfe", b"t\x01"))),  # a bad name deeper down
        (b"count", b"I" + struct.pack(">i", 3)),
        (b"raw", b"S" + longstr(b"\xff")),  # pamqp keeps a long string as bytes
    )
    header = read(content_header(headers=headers, message_id=shortstr(b"m-1")))
    assert header.properties.headers == {"trace": "t-1", "count": 3, "raw": b"\xff"}
    assert header.properties.message_id == "m-1"
    assert marks(header) == ("headers",)


def test_an_unknown_header_type_loses_the_rest_of_the_table_only() -> None:
    headers = table(
        (b"first", b"t\x01"),
        (b"odd", b"Z" + b"\x00\x01"),  # a type nobody knows: its size is unknown
        (b"after", b"t\x01"),
    )
    header = read(
        content_header(headers=headers, message_id=shortstr(b"m-1"), app_id=shortstr(b"a"))
    )
    assert header.properties.headers == {"first": True}
    assert (header.properties.message_id, header.properties.app_id) == ("m-1", "a")
    assert marks(header) == ("headers",)


def test_a_property_cut_short_loses_itself_and_what_follows() -> None:
    cut = struct.pack(">I", 100) + b"\x01k"  # says 100 bytes, holds 2
    header = read(content_header(content_type=shortstr(b"text/plain"), headers=cut))
    assert header.properties.content_type == "text/plain"
    assert header.properties.headers is None
    assert marks(header) == ("headers",)


def test_a_frame_pamqp_decodes_is_pamqp_s_own_and_unmarked() -> None:
    data = content_header(
        content_type=shortstr(b"application/json"),
        headers=table((b"k", b"S" + longstr(b"v")), (b"n", b"l" + struct.pack(">q", -1))),
        message_id=shortstr("é-1".encode()),
        timestamp=struct.pack(">Q", 1_700_000_000),
    )
    header = read(data)
    assert header.properties == amqp_reads._strict(data)[2].properties
    assert marks(header) == ()
    assert header.properties.headers == {"k": "v", "n": -1}


def test_a_routing_key_that_is_not_utf8_is_replaced_and_named() -> None:
    data = deliver(b"lead.\xffcontact")
    with pytest.raises(exceptions.UnmarshalingException):
        amqp_reads._strict(data)
    method = read(data)
    assert isinstance(method, commands.Basic.Deliver)
    assert (method.consumer_tag, method.delivery_tag, method.redelivered) == ("ctag", 7, False)
    assert (method.exchange, method.routing_key) == ("leads.inbound", "lead.\ufffdcontact")
    assert marks(method) == ("routing_key",)
    assert marks(read(deliver(b"lead.contact"))) == ()
    # Replaced, it still fits a short string (a dead letter is published with it).
    long_key = read(deliver(b"\xff" * 255)).routing_key
    assert set(long_key) == {"\ufffd"} and len(long_key.encode()) <= 255


def test_other_frames_pamqp_refuses_still_fail() -> None:
    declare_ok = frame(1, struct.pack(">HH", 50, 11) + shortstr(b"\xff") + b"\0" * 8)
    with pytest.raises(exceptions.UnmarshalingException):
        pamqp.frame.unmarshal(declare_ok)
    truncated_flags = frame(2, struct.pack(">HHQ", 60, 0, 1) + b"\x00")
    with pytest.raises(exceptions.UnmarshalingException):
        pamqp.frame.unmarshal(truncated_flags)
    bad_end = content_header(message_id=shortstr(b"\xff"))[:-1] + b"\x00"
    with pytest.raises(exceptions.UnmarshalingException):
        pamqp.frame.unmarshal(bad_end)


def test_undecodable_joins_the_delivery_and_the_header() -> None:
    class Delivered:
        delivery = read(deliver(b"\xff"))
        header = read(content_header(message_id=shortstr(b"\xff"), app_id=shortstr(b"\xfe")))

    assert amqp_reads.undecodable(Delivered()) == ("routing_key", "message_id", "app_id")


def test_aiormq_reads_through_it_once_installed() -> None:
    import aiormq.connection

    assert aiormq.connection.pamqp.frame.unmarshal is amqp_reads.unmarshal
    assert amqp_reads.install()  # idempotent
    amqp_reads.uninstall()
    assert aiormq.connection.pamqp.frame.unmarshal is amqp_reads._strict


def test_other_library_versions_are_left_alone_with_a_warning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    amqp_reads.uninstall()
    monkeypatch.setitem(amqp_reads.SUPPORTED, "aiormq", "7.3.")
    with structlog.testing.capture_logs() as logged:
        assert not amqp_reads.install()
    assert pamqp.frame.unmarshal is amqp_reads._strict
    [entry] = logged
    assert (entry["event"], entry["log_level"]) == ("amqp_reads_not_installed", "warning")
    assert entry["problem"].startswith("aiormq 7.2.") and entry["problem"].endswith("not 7.3.x")


def test_publishable_keeps_what_pamqp_can_encode_again() -> None:
    headers = {
        "trace": "t-1",
        "raw": b"\xff",  # a long string that was not UTF-8
        "nested": {"inner": [b"\xfe", 1]},
        "huge": 1e300,  # decoded from a double, encoded as a float: refused
        "k" * 129: "v",  # pamqp would cut the name (and log it)
        "deep": [{"n" * 129: 1}],  # at any depth
        "when": datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC),
    }
    kept, dropped = amqp_reads.publishable(headers)
    assert kept == {
        "trace": "t-1",
        "raw": bytearray(b"\xff"),
        "nested": {"inner": [bytearray(b"\xfe"), 1]},
        "when": headers["when"],
    }
    assert dropped == 3
    encode.field_table(kept)  # raises if anything kept cannot be published
