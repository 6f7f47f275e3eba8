"""Framing and decoding: limits are checked before allocation, malformed input is a clear error."""

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hyphae.protocol.errors import MessageTooLarge, ProtocolViolation
from hyphae.protocol.wire import HEADER_BYTES, decode_body, encode_frame, expect_map, parse_header


def test_frame_round_trips() -> None:
    msg = {"a": 1, "b": [1.5, "x", b"\x00\xff"], "c": None, "d": True}
    frame = encode_frame(msg)
    length = parse_header(frame[:HEADER_BYTES], 1 << 20)
    assert length == len(frame) - HEADER_BYTES
    assert decode_body(frame[HEADER_BYTES:]) == msg


def test_oversized_length_refused_before_reading_body() -> None:
    header = (10_000_000).to_bytes(4, "big")
    with pytest.raises(MessageTooLarge, match="10000000 bytes, limit 1024"):
        parse_header(header, 1024)


def test_extension_types_are_refused() -> None:
    body = msgpack.packb(msgpack.ExtType(7, b"evil"))
    with pytest.raises(ProtocolViolation, match="extension type 7"):
        decode_body(body)


def test_truncated_body_is_a_protocol_violation() -> None:
    body = msgpack.packb({"key": "value" * 10})
    with pytest.raises(ProtocolViolation, match="malformed"):
        decode_body(body[:-3])


def test_non_string_map_keys_are_refused() -> None:
    with pytest.raises(ProtocolViolation):
        decode_body(msgpack.packb({1: "x"}))


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=256))
def test_decode_never_crashes_on_garbage(data: bytes) -> None:
    try:
        decode_body(data)
    except ProtocolViolation:
        pass


def test_expect_map_checks_fields_and_types() -> None:
    ok = expect_map({"v": 1, "name": "x"}, {"v": int}, {"name": str})
    assert ok["name"] == "x"
    with pytest.raises(ProtocolViolation, match="unknown field 'extra'"):
        expect_map({"v": 1, "extra": 2}, {"v": int})
    with pytest.raises(ProtocolViolation, match="lacks required field 'v'"):
        expect_map({}, {"v": int})
    with pytest.raises(ProtocolViolation, match="'v' must be int, got bool"):
        expect_map({"v": True}, {"v": int})
    with pytest.raises(ProtocolViolation, match="must be a map"):
        expect_map([1], {"v": int})
