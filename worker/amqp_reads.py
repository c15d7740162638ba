"""Messages whose AMQP properties the client cannot decode, read all the same.

aiormq hands every frame it reads to `pamqp.frame.unmarshal`. pamqp raises on a content
header holding a property it cannot decode (a short string such as `message_id` that is
not UTF-8, a timestamp past the year 9999, a header key that is not UTF-8, a header value
of a type it does not know) and on a delivery whose routing key is not UTF-8; aiormq
turns that into InvalidFrameError and drops the connection. The broker then redelivers
the message, with the ones prefetched beside it, to the same fate until its delivery
limit dead-letters them all, and the `dlq` commands cannot read such a dead letter.

With `install()`, a frame pamqp refuses is decoded field by field instead: what decodes
is kept, what does not is left out (None, or that header entry dropped), and the frame
records the names of what was left out (never their values), which `undecodable(message)`
returns: the worker dead-letters such a message as `invalid_properties`, and `dlq` shows
it. Frames pamqp decodes are untouched, and any other frame it refuses still fails.

It wraps `pamqp.frame.unmarshal`, which aiormq's reader looks up on each frame, so it
holds for every connection in the process (aiormq is pamqp's only user here). It relies
on pamqp's decoders, hence the versions checked by `install()` (pinned in pyproject.toml)
and the tests (tests/unit/test_amqp_reads.py, tests/integration/test_bad_properties.py).

`publishable(headers)` is the other direction: decoded headers made safe to publish
again (pamqp's encoder refuses some values its decoder returns)."""

import struct
from collections.abc import Callable, Mapping
from importlib import metadata
from typing import Any

import aiormq.connection
import pamqp.frame
from pamqp import base, commands, constants, decode, encode, exceptions, header

from worker import log

logger = log.get(__name__)

UNDECODABLE = "leadrouter_undecodable"  # attribute set on a frame read leniently
SUPPORTED = {"aiormq": "7.2.", "pamqp": "4."}
MAX_KEY_BYTES = 128  # pamqp's encoder cuts longer header names (and logs them)

# The deliveries of messages: their routing key is whatever the publisher chose.
_MESSAGE_METHODS: dict[int, type[base.Frame]] = {
    m.index: m for m in (commands.Basic.Deliver, commands.Basic.GetOk, commands.Basic.Return)
}
# Bytes taken by a field-table value of each type after its type byte: fixed, or a
# 4-byte length and that many bytes.
_FIXED_VALUE_SIZE = {
    b"t": 1, b"b": 1, b"B": 1, b"s": 2, b"u": 2, b"I": 4, b"i": 4, b"f": 4,
    b"l": 8, b"L": 8, b"d": 8, b"T": 8, b"D": 5, b"V": 0, b"\x00": 0,
}  # fmt: skip
_PREFIXED_VALUES = frozenset({b"S", b"x", b"A", b"F"})
_FIXED_SIZE = {"octet": 1, "short": 2, "long": 4, "longlong": 8, "timestamp": 8}
# pamqp's names for properties, where they differ from the ones people know (aio-pika's).
_SHOWN_AS = {"message_type": "type"}

Unmarshal = Callable[[bytes], tuple[int, int, pamqp.frame.FrameTypes]]
_strict: Unmarshal = pamqp.frame.unmarshal


def undecodable(message: Any) -> tuple[str, ...]:
    """Names of what could not be decoded in a delivered message (aiormq's
    DeliveredMessage): properties, and `routing_key` or `exchange`."""
    return getattr(message.delivery, UNDECODABLE, ()) + getattr(message.header, UNDECODABLE, ())


def unmarshal(data_in: bytes) -> tuple[int, int, pamqp.frame.FrameTypes]:
    """pamqp.frame.unmarshal, but a content header or a delivery that it refuses is
    decoded leniently and marked."""
    try:
        return _strict(data_in)
    except exceptions.UnmarshalingException:
        lenient = _lenient(data_in)
        if lenient is None:
            raise
        return lenient


def install() -> bool:
    """Idempotent; for frames read from now on, on every connection. Leaves the libraries
    alone, with a warning, unless they are the versions this was written against."""
    problem = _unsupported()
    if problem:
        logger.warning("amqp_reads_not_installed", problem=problem)
        return False
    pamqp.frame.unmarshal = unmarshal
    return True


def uninstall() -> None:
    pamqp.frame.unmarshal = _strict  # type: ignore[assignment]


def publishable(headers: Mapping[str, Any]) -> tuple[dict[str, Any], int]:
    """Headers as decoded, less the entries pamqp cannot encode again (a float beyond
    single precision, a name longer than 128 bytes); long strings that were not UTF-8
    (decoded as bytes) are kept as byte arrays. Returns them and how many were dropped."""
    kept: dict[str, Any] = {}
    dropped = 0
    for key, value in headers.items():
        value = _byte_arrays(value)
        try:
            _check_names({key: value})
            encode.encode_table_value(value)
        except Exception:  # whatever pamqp's encoder refuses, with whichever exception
            dropped += 1
            continue
        kept[key] = value
    return kept, dropped


def _check_names(value: Any) -> None:
    """Raises if a table at any depth has a name pamqp would cut."""
    if isinstance(value, dict):
        for key, item in value.items():
            if len(key.encode("utf-8")) > MAX_KEY_BYTES:
                raise ValueError("name too long")
            _check_names(item)
    elif isinstance(value, list):
        for item in value:
            _check_names(item)


def _byte_arrays(value: Any) -> Any:
    if isinstance(value, bytes):
        return bytearray(value)
    if isinstance(value, dict):
        return {k: _byte_arrays(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_byte_arrays(v) for v in value]
    return value


def _unsupported() -> str | None:
    for package, prefix in SUPPORTED.items():
        try:
            version = metadata.version(package)
        except metadata.PackageNotFoundError:
            return f"{package} is not installed"
        if not version.startswith(prefix):
            return f"{package} {version} is not {prefix}x"
    if getattr(aiormq.connection, "pamqp", None) is not pamqp:
        return "aiormq.connection does not read frames through pamqp.frame"
    if pamqp.frame.unmarshal not in (_strict, unmarshal):
        return "pamqp.frame.unmarshal was replaced by something else"
    return None


def _lenient(data_in: bytes) -> tuple[int, int, pamqp.frame.FrameTypes] | None:
    """The frame, decoded field by field, or None if it is not one we can help with (or
    its structure, not just a value, is broken)."""
    try:
        frame_type, channel_id, frame_size = pamqp.frame.frame_parts(data_in)
        if frame_size is None:
            return None
        byte_count = constants.FRAME_HEADER_SIZE + frame_size + 1
        if byte_count > len(data_in) or data_in[byte_count - 1] != constants.FRAME_END:
            return None
        frame_data = data_in[constants.FRAME_HEADER_SIZE : byte_count - 1]
        frame: pamqp.frame.FrameTypes | None
        if frame_type == constants.FRAME_HEADER:
            frame = _content_header(frame_data)
        elif frame_type == constants.FRAME_METHOD:
            frame = _method(frame_data)
        else:
            return None
    except (struct.error, ValueError, IndexError):
        return None
    return None if frame is None else (byte_count, channel_id, frame)


def _content_header(frame_data: bytes) -> header.ContentHeader:
    frame = header.ContentHeader()
    frame.class_id, frame.weight, frame.body_size = struct.unpack(">HHQ", frame_data[0:12])
    offset, flags = header.ContentHeader._get_flags(frame_data[12:])
    data = frame_data[12 + offset :]
    properties = frame.properties
    lost: list[str] = []
    value: Any
    for name in properties.__slots__:
        if not flags & properties.flags[name]:
            continue
        data_type = properties.amqp_type(name)
        size = _size(data, data_type)
        if size is None:  # cut short: nothing after it can be found
            lost.extend(
                n for n in properties.__slots__[properties.__slots__.index(name) :]
                if flags & properties.flags[n]
            )  # fmt: skip
            break
        chunk, data = data[:size], data[size:]
        try:
            if data_type == "table":
                value, dropped = _table(chunk)
                if dropped:
                    lost.append(name)
            else:
                _, value = decode.by_type(chunk, data_type)
        except Exception:  # pamqp's decoders raise ValueError, OverflowError, OSError...
            lost.append(name)
            continue
        setattr(properties, name, value)
    setattr(frame, UNDECODABLE, tuple(_SHOWN_AS.get(n, n) for n in lost))
    return frame


def _size(data: bytes, data_type: str) -> int | None:
    """Bytes a property of this type takes at the head of `data`; None if cut short."""
    if data_type in _FIXED_SIZE:
        size = _FIXED_SIZE[data_type]
    elif data_type == "shortstr" and data:
        size = 1 + data[0]
    elif data_type in ("table", "longstr") and len(data) >= 4:
        size = 4 + struct.unpack(">I", data[:4])[0]
    else:
        return None
    return size if size <= len(data) else None


def _table(chunk: bytes) -> tuple[dict[str, Any], int]:
    """A field table entry by entry: the entries that decode, and how many did not (at
    least one when the rest could not be found)."""
    end = 4 + struct.unpack(">I", chunk[:4])[0]
    table: dict[str, Any] = {}
    dropped, offset = 0, 4
    while offset < end:
        key_end = offset + 1 + chunk[offset]
        kind = chunk[key_end : key_end + 1]
        if kind in _FIXED_VALUE_SIZE:
            value_end = key_end + 1 + _FIXED_VALUE_SIZE[kind]
        elif kind in _PREFIXED_VALUES and key_end + 5 <= end:
            value_end = key_end + 5 + struct.unpack(">I", chunk[key_end + 1 : key_end + 5])[0]
        else:  # an unknown type, or cut short: where the next entry starts is unknown
            return table, dropped + 1
        if value_end > end:
            return table, dropped + 1
        try:
            key = chunk[offset + 1 : key_end].decode("utf-8")
            _, table[key] = decode.embedded_value(chunk[key_end:value_end])
        except Exception:
            dropped += 1
        offset = value_end
    return table, dropped


def _method(frame_data: bytes) -> base.Frame | None:
    """A delivery whose routing key (or exchange) is not UTF-8: decoded with the bad
    bytes replaced (U+FFFD) and marked. Any other method frame pamqp refuses: None."""
    _, index = decode.long_int(frame_data[0:4])
    method_class = _MESSAGE_METHODS.get(index)
    if method_class is None:
        return None
    method = method_class()
    data = frame_data[4:]
    lost: list[str] = []
    bit, in_bits = 0, False
    value: Any
    # pamqp's Frame.unmarshal, with short strings decoded leniently.
    for name in method.__slots__:
        data_type = method.amqp_type(name)
        if in_bits and (data_type != "bit" or bit == 8):
            data, bit, in_bits = data[1:], 0, False
        if data_type == "bit":
            _, value = decode.bit(data, bit)
            bit, in_bits = bit + 1, True
        elif data_type == "shortstr":
            length = data[0]
            raw, data = data[1 : 1 + length], data[1 + length :]
            value = raw.decode("utf-8", errors="replace")
            if value.encode("utf-8") != raw:
                lost.append(name)
                # Each replaced byte takes three: cut to what a short string holds, so
                # that it can be published again (the dead letter's routing key).
                value = value.encode("utf-8")[:255].decode("utf-8", errors="ignore")
        else:
            consumed, value = decode.by_type(data, data_type)
            data = data[consumed:]
        setattr(method, name, value)
    setattr(method, UNDECODABLE, tuple(lost))
    return method
