"""Wire formats of the tensor plane (pure: no I/O, no keys).

Two channels carry them:

* ``/hyphae/tensor/1``, a libp2p stream (msgpack maps, :mod:`hyphae.protocol.wire` framing):
  the dialer sends :class:`Open`, the listener answers :class:`Accept`; each side now holds the
  other's ephemeral X25519 key and the data connection's keys follow (:mod:`.keys`). The dialer
  then either dials the advertised data address over TCP, or sends :class:`Fallback` and keeps
  using this stream, each message one sealed frame (bytes).
* the data connection: on TCP the dialer first sends the clear :data:`PREAMBLE` (magic + the
  16-byte session id, so the listener knows which keys to try), then both sides exchange sealed
  frames. A frame is an 8-byte clear header, authenticated as AEAD associated data::

      type u8 | flags u8 (0) | reserved u16 (0) | ciphertext length u32 (big-endian)

  followed by the ciphertext (plaintext + 16-byte tag). Nonces are never sent: each direction
  counts its frames, so a dropped, repeated or reordered frame fails authentication.

A transfer is ``BEGIN`` (a :class:`Begin`: tag, tensor specs, codec, exact wire size), ``DATA``
frames carrying exactly that many bytes, then ``END``; the receiver answers ``ACK``. Every size a
peer announces is checked against :class:`Limits` before anything is allocated.
"""

from __future__ import annotations

import enum
import math
import struct
from dataclasses import dataclass, field
from collections.abc import Iterator
from typing import Any

import msgpack

from ..errors import MessageTooLarge, ProtocolViolation
from ..wire import decode_body, expect_map
from .codecs import CODEC_NAMES, MAX_BLOCK_SIZE, Codec
from .spec import DTYPE_BYTES, MAX_DIMS, MAX_NAME_CHARS, TensorSpec

__all__ = [
    "PROTOCOL_ID", "PREAMBLE", "PREAMBLE_BYTES", "SESSION_ID_BYTES", "HEADER_BYTES", "TAG_BYTES",
    "CONTROL_MAX_BYTES", "FrameType", "Limits", "Open", "Accept", "Fallback", "Hello", "Begin", "Ack",
    "pack_header", "parse_header", "parse_preamble", "pack_message", "unpack_message", "iter_frames",
]

PROTOCOL_ID = "/hyphae/tensor/1"
WIRE_VERSION = 1
MAGIC = b"HYT1"
SESSION_ID_BYTES = 16
PREAMBLE_BYTES = len(MAGIC) + SESSION_ID_BYTES
PREAMBLE = MAGIC  # followed by the session id
HEADER_BYTES = 8
TAG_BYTES = 16
CONTROL_MAX_BYTES = 64 * 1024
"""Plaintext limit of every frame but DATA (BEGIN carries the specs: ~100 bytes per tensor)."""
MAX_TAG_CHARS = 512
MIN_FRAME_BYTES, MAX_FRAME_BYTES = 16 * 1024, 16 << 20
MAX_DATA_ADDRS = 8
MAX_ADDR_CHARS = 128
KIND_MESSAGE, KIND_REQUEST, KIND_REPLY = 0, 1, 2

_HEADER = struct.Struct(">BBHI")


class FrameType(enum.IntEnum):
    HELLO = 1
    HELLO_OK = 2
    BEGIN = 16
    DATA = 17
    END = 18
    ACK = 32
    CLOSE = 48


_FRAME_TYPES = frozenset(int(t) for t in FrameType)


@dataclass(frozen=True, kw_only=True)
class Limits:
    """What a receiver accepts from a peer; everything a peer announces is checked against it."""

    max_frame_bytes: int = 1 << 20
    """Plaintext bytes per DATA frame."""
    max_transfer_bytes: int = 4 << 30
    """Decoded bytes of one transfer (all its tensors)."""
    max_tensors: int = 4096
    """Tensors in one transfer."""


def pack_header(ftype: FrameType, plaintext_bytes: int) -> bytes:
    return _HEADER.pack(ftype, 0, 0, plaintext_bytes + TAG_BYTES)


def parse_header(header: bytes | memoryview, limits: Limits) -> tuple[FrameType, int]:
    """Return (type, ciphertext length) of a frame header, refusing anything over the limits.

    Raises:
        MessageTooLarge: the announced length exceeds the limit for that frame type.
        ProtocolViolation: unknown type, non-zero flags, or a length shorter than the tag.
    """
    if len(header) != HEADER_BYTES:
        raise ProtocolViolation(f"frame header must be {HEADER_BYTES} bytes, got {len(header)}")
    ftype, flags, reserved, length = _HEADER.unpack(header)
    if ftype not in _FRAME_TYPES:
        raise ProtocolViolation(f"unknown frame type {ftype}")
    if flags or reserved:
        raise ProtocolViolation(f"frame flags/reserved must be 0, got {flags}/{reserved}")
    if length < TAG_BYTES:
        raise ProtocolViolation(f"frame of {length} bytes is shorter than its {TAG_BYTES}-byte tag")
    limit = limits.max_frame_bytes if ftype == FrameType.DATA else CONTROL_MAX_BYTES
    if length - TAG_BYTES > limit:
        raise MessageTooLarge(f"{FrameType(ftype).name} frame announces {length - TAG_BYTES} bytes, limit {limit}")
    return FrameType(ftype), length


def parse_preamble(data: bytes | memoryview) -> bytes:
    """Return the session id of a TCP data connection's clear preamble.

    Raises:
        ProtocolViolation: wrong length or magic (not a hyphae tensor connection).
    """
    if len(data) != PREAMBLE_BYTES or bytes(data[:len(MAGIC)]) != MAGIC:
        raise ProtocolViolation(f"not a hyphae tensor connection (preamble {bytes(data[:8])!r})")
    return bytes(data[len(MAGIC):])


def pack_message(message: dict[str, Any]) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def unpack_message(body: bytes | memoryview, what: str) -> dict[str, Any]:
    message = decode_body(bytes(body))
    if not isinstance(message, dict):
        raise ProtocolViolation(f"{what} must be a map, got {type(message).__name__}")
    return message


def _check_version(m: dict[str, Any], what: str) -> None:
    if m["v"] != WIRE_VERSION:
        raise ProtocolViolation(f"{what} has wire version {m['v']}, we speak {WIRE_VERSION}")


def _check_addrs(addrs: list[Any], what: str) -> tuple[str, ...]:
    if len(addrs) > MAX_DATA_ADDRS or not all(isinstance(a, str) and 0 < len(a) <= MAX_ADDR_CHARS for a in addrs):
        raise ProtocolViolation(f"{what} data addresses must be <= {MAX_DATA_ADDRS} strings of <= {MAX_ADDR_CHARS} chars")
    return tuple(addrs)


def _check_frame(n: int) -> int:
    if not MIN_FRAME_BYTES <= n <= MAX_FRAME_BYTES:
        raise ProtocolViolation(f"peer's frame size {n} is outside [{MIN_FRAME_BYTES}, {MAX_FRAME_BYTES}]")
    return n


def _check_bytes(value: bytes, n: int, what: str) -> bytes:
    if len(value) != n:
        raise ProtocolViolation(f"{what} must be {n} bytes, got {len(value)}")
    return value


# ---- the libp2p handshake --------------------------------------------------------------------


@dataclass(frozen=True)
class Open:
    """Dialer -> listener: a new data connection with this session id and ephemeral key."""

    session_id: bytes
    public_key: bytes
    direct: bool
    """Whether the dialer will try the listener's data address (else it falls back at once)."""
    data_addrs: tuple[str, ...] = ()
    """The dialer's own data addresses (for a later reverse dial or simultaneous open)."""
    frame_bytes: int = 1 << 20
    """The largest DATA frame the dialer accepts (the listener sends no larger ones)."""

    def to_wire(self) -> dict[str, Any]:
        return {"v": WIRE_VERSION, "t": "open", "sid": self.session_id, "pub": self.public_key,
                "direct": self.direct, "data": list(self.data_addrs), "frame": self.frame_bytes}

    @classmethod
    def from_wire(cls, message: Any) -> Open:
        m = expect_map(message, {"v": int, "t": str, "sid": bytes, "pub": bytes, "direct": bool, "data": list,
                                 "frame": int}, what="tensor open")
        _check_version(m, "tensor open")
        if m["t"] != "open":
            raise ProtocolViolation(f"expected a tensor open, got {m['t']!r:.40}")
        return cls(_check_bytes(m["sid"], SESSION_ID_BYTES, "session id"), _check_bytes(m["pub"], 32, "X25519 key"),
                   m["direct"], _check_addrs(m["data"], "open"), _check_frame(m["frame"]))


@dataclass(frozen=True)
class Accept:
    """Listener -> dialer: its ephemeral key and where its data listener can be dialed."""

    public_key: bytes
    data_addrs: tuple[str, ...] = ()
    frame_bytes: int = 1 << 20
    """The largest DATA frame the listener accepts (the dialer sends no larger ones)."""

    def to_wire(self) -> dict[str, Any]:
        return {"v": WIRE_VERSION, "t": "accept", "pub": self.public_key, "data": list(self.data_addrs),
                "frame": self.frame_bytes}

    @classmethod
    def from_wire(cls, message: Any) -> Accept:
        m = expect_map(message, {"v": int, "t": str, "pub": bytes, "data": list, "frame": int}, what="tensor accept")
        _check_version(m, "tensor accept")
        if m["t"] != "accept":
            raise ProtocolViolation(f"expected a tensor accept, got {m['t']!r:.40}")
        return cls(_check_bytes(m["pub"], 32, "X25519 key"), _check_addrs(m["data"], "accept"),
                   _check_frame(m["frame"]))


@dataclass(frozen=True)
class Fallback:
    """Dialer -> listener: no direct path; sealed frames follow on this stream."""

    def to_wire(self) -> dict[str, Any]:
        return {"v": WIRE_VERSION, "t": "fallback"}

    @classmethod
    def from_wire(cls, message: Any) -> Fallback:
        m = expect_map(message, {"v": int, "t": str}, what="tensor fallback")
        _check_version(m, "tensor fallback")
        if m["t"] != "fallback":
            raise ProtocolViolation(f"expected a tensor fallback, got {m['t']!r:.40}")
        return cls()


@dataclass(frozen=True)
class Hello:
    """First sealed frame each way on a data connection: proves the sender holds the keys."""

    session_id: bytes
    peer_id: str

    def to_bytes(self) -> bytes:
        return pack_message({"sid": self.session_id, "peer": self.peer_id})

    @classmethod
    def from_bytes(cls, body: bytes | memoryview) -> Hello:
        m = expect_map(unpack_message(body, "hello"), {"sid": bytes, "peer": str}, what="hello")
        return cls(_check_bytes(m["sid"], SESSION_ID_BYTES, "session id"), m["peer"][:128])


# ---- transfers -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Begin:
    """The header of one transfer: what follows, exactly."""

    tag: str
    specs: tuple[TensorSpec, ...]
    codec: Codec = field(default_factory=Codec)
    kind: int = KIND_MESSAGE
    """0 message (to a mailbox), 1 request (to a route handler), 2 reply (to a request)."""
    request_id: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    """Small caller data (a request's arguments, a reply's status): plain msgpack values."""

    @property
    def wire_bytes(self) -> int:
        return sum(self.codec.wire_nbytes(s) for s in self.specs)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.specs)

    def to_bytes(self) -> bytes:
        body = pack_message({
            "tag": self.tag, "kind": self.kind, "id": self.request_id, "meta": self.meta,
            "codec": self.codec.name, "block": self.codec.block_size,
            "tensors": [s.to_wire() for s in self.specs], "wire": self.wire_bytes,
        })
        if len(body) > CONTROL_MAX_BYTES:
            raise ValueError(f"transfer header is {len(body)} bytes, limit {CONTROL_MAX_BYTES}: "
                             "send fewer tensors per transfer or a smaller meta")
        return body

    @classmethod
    def from_bytes(cls, body: bytes | memoryview, limits: Limits) -> Begin:
        """Decode and check a BEGIN body against ``limits`` (nothing is allocated for tensors).

        Raises:
            ProtocolViolation: malformed, unknown codec/dtype, duplicate names, or sizes that
                disagree with the specs.
            MessageTooLarge: more tensors or bytes than ``limits`` allow.
        """
        m = expect_map(unpack_message(body, "transfer header"),
                       {"tag": str, "kind": int, "id": int, "meta": dict, "codec": str, "block": int,
                        "tensors": list, "wire": int}, what="transfer header")
        if not 0 < len(m["tag"]) <= MAX_TAG_CHARS:
            raise ProtocolViolation(f"transfer tag must be 1-{MAX_TAG_CHARS} chars, got {len(m['tag'])}")
        if m["kind"] not in (KIND_MESSAGE, KIND_REQUEST, KIND_REPLY) or not 0 <= m["id"] < 1 << 63:
            raise ProtocolViolation(f"transfer kind {m['kind']} / id {m['id']} out of range")
        if m["codec"] not in CODEC_NAMES or not 0 <= m["block"] <= MAX_BLOCK_SIZE:
            raise ProtocolViolation(f"unknown codec {m['codec']!r:.40} / block {m['block']}")
        try:
            codec = Codec(name=m["codec"], block_size=m["block"])
        except ValueError as exc:
            raise ProtocolViolation(str(exc)) from exc
        if len(m["tensors"]) > limits.max_tensors:
            raise MessageTooLarge(f"transfer announces {len(m['tensors'])} tensors, limit {limits.max_tensors}")
        specs = tuple(_spec_from_wire(t, limits) for t in m["tensors"])
        if len({s.name for s in specs}) != len(specs):
            raise ProtocolViolation("transfer names a tensor twice")
        begin = cls(m["tag"], specs, codec, m["kind"], m["id"], m["meta"])
        total = begin.nbytes
        if total > limits.max_transfer_bytes:
            raise MessageTooLarge(f"transfer announces {total} bytes, limit {limits.max_transfer_bytes}: "
                                  "the receiver sizes max_transfer_bytes from its model (TensorPlane.set_budget): "
                                  "a payload larger than its model, or send it in parts")
        if m["wire"] != begin.wire_bytes:
            raise ProtocolViolation(f"transfer announces {m['wire']} wire bytes, its specs need {begin.wire_bytes}")
        return begin


def _spec_from_wire(item: Any, limits: Limits) -> TensorSpec:
    if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str) and isinstance(item[1], str)
            and isinstance(item[2], list)):
        raise ProtocolViolation("a tensor spec must be [name, dtype, [dims...]]")
    name, dtype, shape = item
    if not 0 < len(name) <= MAX_NAME_CHARS or dtype not in DTYPE_BYTES or len(shape) > MAX_DIMS:
        raise ProtocolViolation(f"bad tensor spec: name of {len(name)} chars, dtype {dtype!r:.20}, {len(shape)} dims")
    for d in shape:
        if isinstance(d, bool) or not isinstance(d, int) or d < 0:
            raise ProtocolViolation(f"tensor {name!r:.40} has dimension {d!r:.20}; must be an int >= 0")
    nbytes = math.prod(shape) * DTYPE_BYTES[dtype]  # <= 8 dims of < 2**64: a cheap exact product
    if nbytes > limits.max_transfer_bytes:
        raise MessageTooLarge(f"tensor {name!r:.40} announces {nbytes} bytes, limit {limits.max_transfer_bytes}: "
                              "the receiver sizes max_transfer_bytes from its model (TensorPlane.set_budget): "
                              "a payload larger than its model, or send it in parts")
    return TensorSpec(name, dtype, tuple(shape))


@dataclass(frozen=True)
class Ack:
    """Receiver -> sender after END: the transfer was verified and delivered (or why not)."""

    ok: bool
    error: str = ""

    def to_bytes(self) -> bytes:
        return pack_message({"ok": self.ok, "error": self.error[:1000]})

    @classmethod
    def from_bytes(cls, body: bytes | memoryview) -> Ack:
        m = expect_map(unpack_message(body, "ack"), {"ok": bool, "error": str}, what="ack")
        return cls(m["ok"], m["error"][:1000])


def iter_frames(pieces: list[memoryview], frame_bytes: int, staging: memoryview) -> Iterator[memoryview]:
    """Cut the concatenation of ``pieces`` into DATA plaintexts of ``frame_bytes`` (last shorter).

    A frame inside one piece is a view of that piece (no copy); a frame that spans pieces is
    gathered into ``staging`` (at most one such frame per piece boundary). Each yielded view is
    valid until the next one is requested.
    """
    filled = 0
    for piece in pieces:
        off, size = 0, len(piece)
        while off < size:
            if filled == 0 and size - off >= frame_bytes:
                yield piece[off:off + frame_bytes]
                off += frame_bytes
                continue
            take = min(frame_bytes - filled, size - off)
            staging[filled:filled + take] = piece[off:off + take]
            filled += take
            off += take
            if filled == frame_bytes:
                yield staging[:frame_bytes]
                filled = 0
    if filled:
        yield staging[:filled]
