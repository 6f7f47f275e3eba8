"""The 1-byte codec of a projected gradient ("Just One Byte", ALGORITHMS.md §3).

A zeroth-order peer sends one scalar g per perturbation. It travels as one byte:

    bit 7      sign (1 = negative)
    bits 0-6   k in [0, 127]
    value      ĝ = ±exp((k − 64) / 8)

so the magnitudes form a geometric grid with ratio e^(1/8) from FLOOR = e^-8 ≈ 3.35e-4 to
CEILING = e^(63/8) ≈ 2.63e3. Encoding rounds ln|g| to the nearest grid point, so inside that
range the relative error is at most e^(1/16) − 1 ≈ 6.45 %.

Outside the range (documented choice, the same on every peer):
- below the floor, 0 included, a value is **sent as the floor** with its sign (+0 and −0 go
  as +FLOOR and −FLOOR). Nothing is dropped, so every log entry has a byte and the log keeps
  one byte per (step, peer, j); the bias is at most η·FLOOR per update, far below the noise
  of the estimator;
- above the ceiling it is sent as the ceiling (±inf included);
- NaN cannot be encoded (ValueError): a NaN loss is the caller's problem to handle.

Decoding uses a fixed table of fp32-rounded values (the ZO kernels round every coefficient
to fp32 anyway). Every peer must decode a byte to the same number, or replayed logs diverge;
`TABLE_SHA256` pins the table so a platform whose `exp` rounds differently fails its tests
instead of silently forking the run.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Iterable

__all__ = [
    "CEILING",
    "FLOOR",
    "MAX_RELATIVE_ERROR",
    "TABLE",
    "TABLE_SHA256",
    "decode",
    "decode_byte",
    "encode",
    "encode_byte",
    "table_digest",
]

_STEPS_PER_E = 8  # grid points per factor e
_BIAS = 64  # k of magnitude 1.0
_SIGN = 0x80

TABLE: tuple[float, ...] = tuple(
    struct.unpack("<f", struct.pack("<f", math.exp((k - _BIAS) / _STEPS_PER_E)))[0] for k in range(128)
)
"""|ĝ| for k = 0..127, each rounded once to fp32."""

TABLE_SHA256 = "7ae58308e1f24f58d1414b859473f77010491064ac150c5bea94a77386784671"
"""sha256 of the 128 little-endian fp32 table entries (checked by the tests)."""

FLOOR = TABLE[0]
"""Smallest magnitude sent, e^-8 ≈ 3.35e-4."""

CEILING = TABLE[127]
"""Largest magnitude sent, e^(63/8) ≈ 2.63e3."""

MAX_RELATIVE_ERROR = math.exp(1 / (2 * _STEPS_PER_E)) - 1
"""Worst |ĝ − g| / |g| for FLOOR <= |g| <= CEILING (≈ 0.0645), before fp32 rounding."""


def table_digest() -> str:
    """sha256 of the decode table as 128 little-endian fp32 values."""
    return hashlib.sha256(struct.pack("<128f", *TABLE)).hexdigest()


def encode_byte(g: float) -> int:
    """The byte (0..255) that carries `g`.

    Raises:
        ValueError: `g` is NaN.
    """
    if math.isnan(g):
        raise ValueError("cannot encode NaN as a ZO scalar; skip or zero the step that produced it")
    sign = _SIGN if math.copysign(1.0, g) < 0 else 0
    mag = abs(g)
    if mag <= FLOOR:
        k = 0
    elif mag >= CEILING:
        k = 127
    else:
        k = min(127, max(0, round(math.log(mag) * _STEPS_PER_E) + _BIAS))
    return sign | k


def decode_byte(b: int) -> float:
    """The value a byte carries (an fp32-representable float).

    Raises:
        ValueError: `b` outside 0..255.
    """
    if not 0 <= b <= 255:
        raise ValueError(f"a ZO scalar byte is in 0..255, got {b}")
    mag = TABLE[b & 0x7F]
    return -mag if b & _SIGN else mag


def encode(values: Iterable[float]) -> bytes:
    """One byte per value, in order."""
    return bytes(encode_byte(float(v)) for v in values)


def decode(data: bytes) -> list[float]:
    """The values of `data`, one per byte."""
    return [decode_byte(b) for b in data]
