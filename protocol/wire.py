"""Framing and decoding shared by every hyphae protocol on libp2p streams.

A frame is a 4-byte big-endian length followed by that many bytes of msgpack. The length is
checked against the protocol's limit *before* anything is allocated, and the body is decoded with
msgpack's own limits bounded by the frame, with extension types refused: a stranger can make us
read at most ``max_frame_bytes`` and can never make us build an object of its choosing (no pickle,
no ext hooks).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

import msgpack

from .errors import MessageTooLarge, ProtocolViolation

__all__ = [
    "HEADER_BYTES",
    "DEFAULT_MAX_FRAME_BYTES",
    "encode_frame",
    "parse_header",
    "decode_body",
    "expect_map",
]

HEADER_BYTES = 4
DEFAULT_MAX_FRAME_BYTES = 1 << 20
_HEADER = struct.Struct(">I")


def encode_frame(message: Any) -> bytes:
    """Serialize ``message`` (plain msgpack types only) into one length-prefixed frame."""
    body = msgpack.packb(message, use_bin_type=True)
    return _HEADER.pack(len(body)) + body


def parse_header(header: bytes, max_frame_bytes: int) -> int:
    """Return the body length announced by ``header``, refusing lengths over the limit.

    Raises:
        MessageTooLarge: the announced length exceeds ``max_frame_bytes``.
    """
    (length,) = _HEADER.unpack(header)
    if length > max_frame_bytes:
        raise MessageTooLarge(f"frame announces {length} bytes, limit {max_frame_bytes}")
    return length


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ProtocolViolation(f"msgpack extension type {code} is not allowed")


def decode_body(body: bytes) -> Any:
    """Decode one frame body; any malformation becomes :class:`ProtocolViolation`."""
    try:
        return msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            use_list=True,
            ext_hook=_refuse_ext,
            timestamp=0,
        )
    except ProtocolViolation:
        raise
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as exc:
        raise ProtocolViolation(f"malformed msgpack body ({type(exc).__name__}: {exc})") from exc


_Spec = type | tuple[type, ...]


def expect_map(message: Any, required: Mapping[str, _Spec], optional: Mapping[str, _Spec] | None = None,
               *, what: str = "message") -> dict[str, Any]:
    """Check that ``message`` is a map with exactly the allowed keys and value types.

    Unknown keys are refused (a newer peer must bump the protocol version instead), so a message
    that passes carries nothing we did not ask for. ``bool`` is not accepted where ``int`` is
    asked for.

    Raises:
        ProtocolViolation: with the offending key and what was expected.
    """
    if not isinstance(message, dict):
        raise ProtocolViolation(f"{what} must be a map, got {type(message).__name__}")
    optional = optional or {}
    for key in message:
        if key not in required and key not in optional:
            raise ProtocolViolation(f"{what} has unknown field {key!r}")
    for key, spec in required.items():
        if key not in message:
            raise ProtocolViolation(f"{what} lacks required field {key!r}")
        _check_type(message[key], spec, what, key)
    for key, spec in optional.items():
        if key in message:
            _check_type(message[key], spec, what, key)
    return message


def _check_type(value: Any, spec: _Spec, what: str, key: str) -> None:
    types = spec if isinstance(spec, tuple) else (spec,)
    if isinstance(value, bool) and bool not in types:
        ok = False
    else:
        ok = isinstance(value, types)
    if not ok:
        names = "|".join(t.__name__ for t in types)
        raise ProtocolViolation(f"{what} field {key!r} must be {names}, got {type(value).__name__}")
