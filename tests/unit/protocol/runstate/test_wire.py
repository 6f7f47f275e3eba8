"""Envelopes and sync messages: exact schema, signatures bound to every field, and decoders that
raise only ProtocolViolation whatever bytes arrive (hypothesis)."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hyphae.protocol.errors import ProtocolViolation
from hyphae.protocol.identity import Identity
from hyphae.protocol.runstate.wire import (MAX_UPDATE_BYTES, Envelope, Head, SyncReply, SyncRequest,
                                           decode_envelope, decode_sync_reply_bytes, decode_sync_request_bytes,
                                           parse_sync_reply, parse_sync_request, sign_envelope, topic_for,
                                           verify_envelope)

ALICE = Identity.generate()


def _env(**changes) -> Envelope:
    env = sign_envelope(ALICE, "run-1", "member", 1_700_000_000_000, 3, b"\x01\x02update")
    return dataclasses.replace(env, **changes) if changes else env


def test_envelope_round_trips_and_verifies() -> None:
    env = _env()
    back = decode_envelope(env.encode())
    assert back == env and verify_envelope(back)
    assert back.digest == env.digest and len(env.digest) == 16


@pytest.mark.parametrize("field,value", [
    ("run", "run-2"), ("section", "progress"), ("epoch", 1_700_000_000_001), ("seq", 4),
    ("update", b"\x01\x02other"), ("author", Identity.generate().peer_id),
], ids=["run", "section", "epoch", "seq", "update", "author"])  # the author is random: xdist compares ids
def test_signature_binds_every_field(field: str, value: object) -> None:
    assert not verify_envelope(_env(**{field: value}))


def test_garbage_author_does_not_verify() -> None:
    assert not verify_envelope(_env(author="1111"))


@pytest.mark.parametrize(("change", "match"), [
    ({"v": 2}, "version 2"),
    ({"x": 1}, "unknown field"),
    ({"e": 0}, "epoch must be"),
    ({"n": -1}, "seq must be"),
    ({"s": "Bad-Section"}, "section"),
    ({"r": "bad run name!"}, "run name"),
    ({"g": b"short"}, "64 bytes"),
    ({"u": "text"}, "must be bytes"),
    ({"e": True}, "must be int"),
])
def test_bad_envelopes_are_refused(change: dict, match: str) -> None:
    message = msgpack.unpackb(_env().encode())
    message.update(change)
    with pytest.raises(ProtocolViolation, match=match):
        decode_envelope(msgpack.packb(message, use_bin_type=True))


def test_oversized_update_is_refused_before_decoding() -> None:
    with pytest.raises(ValueError, match="at most"):
        sign_envelope(ALICE, "run-1", "member", 1, 1, b"x" * (MAX_UPDATE_BYTES + 1))
    with pytest.raises(ProtocolViolation, match="limit"):
        decode_envelope(b"\x00" * (MAX_UPDATE_BYTES + 2048))


def test_sync_messages_round_trip() -> None:
    heads = {(ALICE.peer_id, "member"): Head(5, 2, b"12345678"), (ALICE.peer_id, "config"): Head(1, 0, b"abcdefgh")}
    request = SyncRequest("run-1", heads)
    assert parse_sync_request(msgpack.unpackb(msgpack.packb(request.to_wire()))) == request
    reply = SyncReply("run-1", [_env().encode()], True, False)
    assert parse_sync_reply(reply.to_wire()) == reply


@pytest.mark.parametrize("heads,match", [
    ({"not a peer id!": {}}, "base58"),
    ({ALICE.peer_id: []}, "map of sections"),
    ({ALICE.peer_id: {"member": [1, 2]}}, "epoch:int"),
    ({ALICE.peer_id: {"member": [0, 0, b"12345678"]}}, "out of range"),
    ({ALICE.peer_id: {"member": [1, 0, b"short"]}}, "out of range"),
    ({ALICE.peer_id: {"BAD": [1, 0, b"12345678"]}}, "section"),
])
def test_bad_sync_requests_are_refused(heads: dict, match: str) -> None:
    with pytest.raises(ProtocolViolation, match=match):
        parse_sync_request({"v": 1, "run": "run-1", "heads": heads})


def test_topic_names_the_run() -> None:
    assert topic_for("run-1") == "/hyphae/run/run-1/1"
    with pytest.raises(ValueError, match="run name"):
        topic_for("../etc")


# ---- fuzzing: any bytes in, only ProtocolViolation out ------------------------------------------

_json_like = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


def _only_protocol_violation(fn, data) -> None:
    try:
        fn(data)
    except ProtocolViolation:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_fuzz_envelope_decoder_with_random_bytes(data: bytes) -> None:
    _only_protocol_violation(decode_envelope, data)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_fuzz_envelope_decoder_with_mutated_envelopes(data: st.DataObject) -> None:
    raw = bytearray(_env().encode())
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    try:
        env = decode_envelope(bytes(raw))
    except ProtocolViolation:
        return
    assert verify_envelope(env) == (env == _env())


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_fuzz_sync_decoders_with_random_bytes(data: bytes) -> None:
    _only_protocol_violation(decode_sync_request_bytes, data)
    _only_protocol_violation(decode_sync_reply_bytes, data)


@settings(max_examples=300, deadline=None)
@given(_json_like)
def test_fuzz_sync_decoders_with_wrong_shapes(obj: object) -> None:
    for wrap in (obj, {"v": 1, "run": "r", "heads": obj}, {"v": 1, "run": "r", "envelopes": obj,
                                                           "more": False, "behind": False}):
        _only_protocol_violation(parse_sync_request, wrap)
        _only_protocol_violation(parse_sync_reply, wrap)
