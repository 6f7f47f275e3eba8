"""Tensor-plane wire formats and frame sealing: limits before allocation, authentication of every
byte, counters that expose replay/reorder/truncation, and malformed input as clear errors."""

import msgpack
import numpy as np
import pytest

from hyphae.protocol.errors import MessageTooLarge, ProtocolViolation
from hyphae.protocol.tensor.codecs import Codec
from hyphae.protocol.tensor.errors import IntegrityError
from hyphae.protocol.tensor.keys import Ephemeral, FrameOpener, FrameSealer, derive_keys
from hyphae.protocol.tensor.spec import TensorSpec
from hyphae.protocol.tensor.wire import (HEADER_BYTES, Accept, Begin, FrameType, Limits, Open, iter_frames,
                                         pack_header, parse_header, parse_preamble)

LIMITS = Limits(max_frame_bytes=1 << 20, max_transfer_bytes=1 << 30, max_tensors=16)


def _keys():
    a, b = Ephemeral(), Ephemeral()
    sid = b"s" * 16
    ka = derive_keys(a.shared(b.public), sid, "A", "B", a.public, b.public)
    kb = derive_keys(b.shared(a.public), sid, "A", "B", a.public, b.public)
    return ka, kb


def test_both_sides_derive_the_same_keys_and_each_direction_differs() -> None:
    ka, kb = _keys()
    assert ka == kb and ka.dialer_to_listener != ka.listener_to_dialer


def test_keys_are_bound_to_peer_ids_and_session() -> None:
    a, b = Ephemeral(), Ephemeral()
    s = a.shared(b.public)
    base = derive_keys(s, b"s" * 16, "A", "B", a.public, b.public)
    assert derive_keys(s, b"t" * 16, "A", "B", a.public, b.public) != base
    assert derive_keys(s, b"s" * 16, "A", "C", a.public, b.public) != base
    assert derive_keys(s, b"s" * 16, "B", "A", a.public, b.public) != base


def _sealed(n: int = 3):
    ka, _ = _keys()
    sealer = ka.sealer(dialer=True)
    frames = [sealer.seal(FrameType.DATA, bytes([i]) * 100) for i in range(n)]
    return ka, frames


def _open(keys, frames):
    opener = keys.opener(dialer=False)
    out = []
    for f in frames:
        ftype, length = parse_header(f[:HEADER_BYTES], LIMITS)
        out.append(opener.open(f[:HEADER_BYTES], f[HEADER_BYTES:]))
    return out


def test_frames_open_in_order() -> None:
    keys, frames = _sealed()
    assert _open(keys, frames) == [bytes([i]) * 100 for i in range(3)]


@pytest.mark.parametrize("attack", ["reorder", "replay", "drop", "flip_body", "flip_header", "other_key"])
def test_tampered_replayed_reordered_or_dropped_frames_fail_authentication(attack: str) -> None:
    keys, frames = _sealed()
    if attack == "reorder":
        frames = [frames[1], frames[0], frames[2]]
    elif attack == "replay":
        frames = [frames[0], frames[0]]
    elif attack == "drop":
        frames = [frames[0], frames[2]]
    elif attack == "flip_body":
        f = bytearray(frames[1])
        f[HEADER_BYTES + 5] ^= 1
        frames[1] = bytes(f)
    elif attack == "flip_header":
        f = bytearray(frames[1])
        f[0] = FrameType.BEGIN  # a header that still parses, but is authenticated data
        frames[1] = bytes(f)
    elif attack == "other_key":
        keys, _ = _keys()
    with pytest.raises(IntegrityError, match="failed authentication"):
        _open(keys, frames)


def test_header_limits_are_checked_before_reading_the_body() -> None:
    with pytest.raises(MessageTooLarge, match="limit 1048576"):
        parse_header(pack_header(FrameType.DATA, 1 << 30), LIMITS)
    with pytest.raises(MessageTooLarge, match="limit 65536"):
        parse_header(pack_header(FrameType.BEGIN, 1 << 20), LIMITS)
    with pytest.raises(ProtocolViolation, match="unknown frame type"):
        parse_header(b"\x63" + bytes(7), LIMITS)
    with pytest.raises(ProtocolViolation, match="shorter than"):
        parse_header(bytes([FrameType.DATA, 0, 0, 0, 0, 0, 0, 3]), LIMITS)


def test_preamble_must_carry_the_magic() -> None:
    assert parse_preamble(b"HYT1" + b"x" * 16) == b"x" * 16
    with pytest.raises(ProtocolViolation, match="not a hyphae tensor connection"):
        parse_preamble(b"GET / HTTP/1.1\r\n\r\n\r\n")


def _begin(**over) -> dict:
    m = {"tag": "t", "kind": 0, "id": 0, "meta": {}, "codec": "raw", "block": 0,
         "tensors": [["w", "float32", [4, 4]]], "wire": 64}
    m.update(over)
    return m


def test_begin_round_trips_and_computes_exact_wire_size() -> None:
    begin = Begin("tag", (TensorSpec("a", "float32", (10, 3)), TensorSpec("b", "int64", (2,))), Codec.named("int8"))
    back = Begin.from_bytes(begin.to_bytes(), LIMITS)
    assert back == begin and back.wire_bytes == 4 * 1 + 30 + 16


@pytest.mark.parametrize(("over", "error", "match"), [
    (dict(tensors=[["w", "float32", [1 << 20, 1 << 20]]], wire=4 << 40), MessageTooLarge, "limit 1073741824"),
    (dict(tensors=[["w", "float32", [4]]] * 17), MessageTooLarge, "17 tensors"),
    (dict(tensors=[["w", "float32", [4]], ["w", "float32", [4]]], wire=32), ProtocolViolation, "twice"),
    (dict(wire=65), ProtocolViolation, "wire bytes"),
    (dict(tensors=[["w", "complex", [4]]]), ProtocolViolation, "bad tensor spec"),
    (dict(tensors=[["w", "float32", [-4]]]), ProtocolViolation, "dimension"),
    (dict(codec="zstd"), ProtocolViolation, "unknown codec"),
    (dict(codec="int4", block=3), ProtocolViolation, "even"),
    (dict(tag=""), ProtocolViolation, "tag"),
    (dict(extra=1), ProtocolViolation, "unknown field"),
])
def test_lying_transfer_headers_are_refused_before_allocation(over: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        Begin.from_bytes(msgpack.packb(_begin(**over)), LIMITS)


def test_handshake_messages_validate_lengths() -> None:
    good = Open(b"s" * 16, b"k" * 32, True, ("/ip4/127.0.0.1/tcp/1",))
    assert Open.from_wire(good.to_wire()) == good
    with pytest.raises(ProtocolViolation, match="session id"):
        Open.from_wire(Open(b"s" * 15, b"k" * 32, True).to_wire())
    with pytest.raises(ProtocolViolation, match="data addresses"):
        Accept.from_wire(Accept(b"k" * 32, tuple(["/ip4/1.2.3.4/tcp/1"] * 9)).to_wire())
    with pytest.raises(ProtocolViolation, match="frame size"):
        Accept.from_wire(Accept(b"k" * 32, (), 1 << 30).to_wire())


def test_low_order_x25519_key_is_refused() -> None:
    with pytest.raises(ProtocolViolation, match="X25519"):
        Ephemeral().shared(bytes(32))


@pytest.mark.parametrize("sizes", [[10], [3, 3, 3], [8, 1, 8], [0, 5, 0], [16], [17, 15], []])
def test_iter_frames_cuts_exact_frames_and_copies_only_at_boundaries(sizes: list[int]) -> None:
    frame = 8
    rng = np.random.default_rng(1)
    pieces = [memoryview(rng.integers(0, 255, n, dtype=np.uint8).tobytes()) for n in sizes]
    staging = memoryview(bytearray(frame))
    frames = [bytes(f) for f in iter_frames(pieces, frame, staging)]
    assert b"".join(frames) == b"".join(bytes(p) for p in pieces)
    assert all(len(f) == frame for f in frames[:-1]) and all(0 < len(f) <= frame for f in frames)


def test_sealer_writes_into_a_caller_buffer_without_copying_the_plaintext() -> None:
    ka, kb = _keys()
    plain = np.arange(1000, dtype=np.float32)
    out = memoryview(bytearray(HEADER_BYTES + plain.nbytes + 16))
    n = ka.sealer(dialer=False).seal_into(FrameType.DATA, memoryview(plain).cast("B"), out)
    dest = np.empty_like(plain)
    kb.opener(dialer=True).open_into(bytes(out[:HEADER_BYTES]), out[HEADER_BYTES:n], memoryview(dest).cast("B"))
    assert np.array_equal(dest, plain)


def test_counters_start_at_zero_per_direction() -> None:
    sealer, opener = FrameSealer(b"k" * 32), FrameOpener(b"k" * 32)
    for i in range(3):
        f = sealer.seal(FrameType.ACK, b"x")
        opener.open(f[:HEADER_BYTES], f[HEADER_BYTES:])
    assert sealer.counter == opener.counter == 3
