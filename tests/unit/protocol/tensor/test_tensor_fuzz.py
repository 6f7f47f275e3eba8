"""Fuzzing the decoders with malformed bytes: every input ends in a value or a clear
ProtocolViolation/ValueError, never a crash, a hang or a partial delivery.

The session fuzz drives a real :class:`Session` reader from an in-memory carrier, both with raw
garbage (an outsider) and with correctly *sealed* garbage (an authenticated peer that lies).
"""

import asyncio

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hyphae.protocol.errors import EndOfStream, ProtocolViolation
from hyphae.protocol.tensor.carrier import Carrier
from hyphae.protocol.tensor.codecs import CODEC_NAMES, Codec
from hyphae.protocol.tensor.keys import FrameOpener, FrameSealer
from hyphae.protocol.tensor.session import Session, Traffic
from hyphae.protocol.tensor.spec import DTYPE_BYTES, TensorSpec
from hyphae.protocol.tensor.wire import (HEADER_BYTES, Accept, Ack, Begin, FrameType, Hello, Limits, Open,
                                         parse_header, parse_preamble)

LIMITS = Limits(max_frame_bytes=4096, max_transfer_bytes=1 << 20, max_tensors=8)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=20,
)


@FUZZ
@given(st.binary(min_size=0, max_size=12))
def test_parse_header_never_crashes(data: bytes) -> None:
    try:
        ftype, length = parse_header(data, LIMITS)
    except ProtocolViolation:
        return
    assert length >= 16 and ftype in FrameType


@FUZZ
@given(st.binary(max_size=64))
def test_parse_preamble_never_crashes(data: bytes) -> None:
    try:
        assert len(parse_preamble(data)) == 16
    except ProtocolViolation:
        pass


@FUZZ
@given(st.one_of(st.binary(max_size=200), msgpack_values.map(lambda v: msgpack.packb(v, use_bin_type=True))))
def test_message_decoders_never_crash(body: bytes) -> None:
    for decode in (lambda b: Begin.from_bytes(b, LIMITS), Ack.from_bytes, Hello.from_bytes):
        try:
            decode(body)
        except ProtocolViolation:
            pass


@FUZZ
@given(msgpack_values)
def test_handshake_decoders_never_crash(value: object) -> None:
    for decode in (Open.from_wire, Accept.from_wire):
        try:
            decode(value)
        except ProtocolViolation:
            pass


def _begin_maps():
    spec = st.tuples(st.text(min_size=0, max_size=4), st.sampled_from([*DTYPE_BYTES, "x"]),
                     st.lists(st.integers(-2, 2**40), max_size=4)).map(list)
    return st.fixed_dictionaries({
        "tag": st.text(max_size=10), "kind": st.integers(-1, 3), "id": st.integers(-1, 2**64 - 1),
        "meta": st.dictionaries(st.text(max_size=3), st.integers(-(2**63), 2**63 - 1), max_size=2),
        "codec": st.sampled_from([*CODEC_NAMES, "zip"]), "block": st.integers(-1, 70000),
        "tensors": st.lists(spec, max_size=10), "wire": st.integers(-1, 2**50),
    })


@FUZZ
@given(_begin_maps())
def test_structured_lying_headers_are_refused_or_consistent(m: dict) -> None:
    try:
        begin = Begin.from_bytes(msgpack.packb(m), LIMITS)
    except ProtocolViolation:
        return
    assert begin.nbytes <= LIMITS.max_transfer_bytes and len(begin.specs) <= LIMITS.max_tensors
    assert begin.wire_bytes == m["wire"]


@FUZZ
@given(st.sampled_from(CODEC_NAMES), st.sampled_from(["float32", "float16", "bfloat16", "float64", "int32"]),
       st.integers(0, 300), st.data())
def test_codec_decode_of_random_bytes_never_crashes(name: str, dtype: str, n: int, data: st.DataObject) -> None:
    codec = Codec.named(name)
    spec = TensorSpec("x", dtype, (n,))
    size = codec.wire_nbytes(spec)
    wire = data.draw(st.binary(min_size=size, max_size=size))
    out = codec.decode(spec, memoryview(wire))
    assert len(out) == spec.nbytes
    with pytest.raises(ValueError):
        codec.decode(spec, memoryview(wire + b"x"))


class _BytesCarrier(Carrier):
    """Serves frames out of a byte string, as a socket would."""

    path = "direct"

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0
        self.written: list[bytes] = []

    @property
    def remote(self) -> str:
        return "fuzz"

    def _take(self, n: int, boundary: bool) -> bytes:
        if self.pos == len(self.data) and boundary:
            raise EndOfStream("eof")
        if self.pos + n > len(self.data):
            raise ProtocolViolation("truncated")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    async def read_frame(self, limits: Limits):
        header = self._take(HEADER_BYTES, True)
        ftype, length = parse_header(header, limits)
        await asyncio.sleep(0)
        return ftype, header, memoryview(self._take(length, False))

    async def write(self, frame) -> None:
        self.written.append(bytes(frame))

    def abort(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


class _Inbox:
    def __init__(self) -> None:
        self.delivered: list = []
        self.admitted = self.discarded = 0

    def admit(self, session, begin) -> None:
        self.admitted += 1

    def deliver(self, session, begin, tensors) -> None:
        for spec, t in zip(begin.specs, tensors):
            assert len(t.data) == spec.nbytes  # never a partial tensor
        self.delivered.append(begin)

    def discard(self, session, begin) -> None:
        self.discarded += 1


async def _run(data: bytes) -> _Inbox:
    inbox = _Inbox()
    key = b"k" * 32
    session = Session(_BytesCarrier(data), FrameSealer(key), FrameOpener(key), peer_id="fuzz", limits=LIMITS,
                      inbox=inbox, traffic=Traffic())
    async with asyncio.timeout(5):
        await session.run()
    assert session.is_closed
    assert inbox.admitted == len(inbox.delivered) + inbox.discarded  # every admitted transfer accounted for
    return inbox


@FUZZ
@given(st.binary(max_size=400))
def test_session_reader_survives_raw_garbage(data: bytes) -> None:
    inbox = asyncio.run(_run(data))
    assert not inbox.delivered


_frame_types = st.sampled_from(list(FrameType))


@FUZZ
@given(st.lists(st.tuples(_frame_types, st.one_of(
    st.binary(max_size=64),
    _begin_maps().map(lambda m: msgpack.packb(m)),
    st.just(Begin("t", (TensorSpec("a", "float32", (3,)),)).to_bytes()),
    st.just(b"\x00" * 12))), max_size=8))
def test_session_reader_survives_authenticated_lies(frames: list) -> None:
    sealer = FrameSealer(b"k" * 32)
    data = b"".join(sealer.seal(t, body) for t, body in frames)
    asyncio.run(_run(data))


def test_session_delivers_a_well_formed_transfer_and_nothing_partial() -> None:
    sealer = FrameSealer(b"k" * 32)
    values = np.arange(3, dtype=np.float32).tobytes()
    begin = Begin("t", (TensorSpec("a", "float32", (3,)),))
    good = [sealer.seal(FrameType.BEGIN, begin.to_bytes()), sealer.seal(FrameType.DATA, values),
            sealer.seal(FrameType.END, b"")]
    inbox = asyncio.run(_run(b"".join(good)))
    assert len(inbox.delivered) == 1
    sealer = FrameSealer(b"k" * 32)
    truncated = [sealer.seal(FrameType.BEGIN, begin.to_bytes()), sealer.seal(FrameType.DATA, values[:8])]
    inbox = asyncio.run(_run(b"".join(truncated)))
    assert not inbox.delivered and inbox.discarded == 1

