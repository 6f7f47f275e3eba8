"""Wire codecs for tensors: numpy reference implementations, declared per transfer.

A codec says how a tensor's values travel; the receiver always gets the tensor back in the
dtype its spec declares (a float32 tensor sent as ``bf16`` arrives as float32, rounded).

* ``raw``: the bytes as they are (any dtype; zero-copy both ways).
* ``fp16`` / ``bf16``: floats rounded to 16 bits (round to nearest even; NaN stays NaN).
* ``int8`` / ``int4``: blockwise absmax quantization, the format of ``hyphae.kernels.quant``
  (which protocol/ must not import): per block of ``block_size`` elements one little-endian
  fp32 scale ``absmax / QMAX`` (QMAX 127 or 7), codes ``clamp(round_half_even(x / scale),
  -QMAX, QMAX)`` (0 where the scale is 0). 8-bit codes are int8; 4-bit codes are ``q + 8``
  packed two per byte, element 2m in the low nibble. On the wire a tensor is all its scales,
  then all its codes, so its size follows from its spec alone.

Sizes are pure functions of (spec, codec): a receiver knows exactly how many bytes to expect
before it reads any, and decoding never trusts a length the peer sent.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .spec import FLOAT_DTYPES, Tensor, TensorSpec, numpy_dtype

__all__ = ["CODEC_NAMES", "Codec", "bf16_to_f32", "f32_to_bf16", "to_float32", "from_float32"]

CODEC_NAMES = ("raw", "fp16", "bf16", "int8", "int4")
DEFAULT_BLOCK_SIZE = {"int8": 256, "int4": 64}
MAX_BLOCK_SIZE = 1 << 16
_QMAX = {"int8": 127, "int4": 7}
_CHUNK = 1 << 20  # elements per numpy pass: temporaries stay a few MiB whatever the tensor size


@dataclass(frozen=True, kw_only=True)
class Codec:
    """How tensor values travel on the wire. ``Codec.named("int8")`` gives the defaults."""

    name: str = "raw"
    """One of ``raw``, ``fp16``, ``bf16``, ``int8``, ``int4``."""
    block_size: int = 0
    """Elements per quantization block (int8/int4 only; 0 elsewhere). int4 needs it even."""

    def __post_init__(self) -> None:
        if self.name not in CODEC_NAMES:
            raise ValueError(f"codec must be one of {', '.join(CODEC_NAMES)}, got {self.name!r}")
        if self.name in _QMAX:
            bs = self.block_size
            if isinstance(bs, bool) or not isinstance(bs, int) or not 1 <= bs <= MAX_BLOCK_SIZE:
                raise ValueError(f"block_size must be an int in [1, {MAX_BLOCK_SIZE}] for {self.name}, got {bs!r}")
            if self.name == "int4" and bs % 2:
                raise ValueError(f"block_size must be even for int4 (a byte holds two codes), got {bs}")
        elif self.block_size != 0:
            raise ValueError(f"block_size applies to int8/int4 only; {self.name} needs 0, got {self.block_size!r}")

    @classmethod
    def named(cls, codec: str | Codec) -> Codec:
        """Accept a codec or its name (quantizers get their default block size)."""
        if isinstance(codec, Codec):
            return codec
        return cls(name=codec, block_size=DEFAULT_BLOCK_SIZE.get(codec, 0))

    def applies_to(self, spec: TensorSpec) -> bool:
        """Whether this codec changes ``spec``'s bytes (non-float tensors always travel raw)."""
        return self.name != "raw" and spec.dtype in FLOAT_DTYPES and not _same_as_raw(self.name, spec.dtype)

    def wire_nbytes(self, spec: TensorSpec) -> int:
        """Exact bytes ``spec`` takes on the wire with this codec."""
        if not self.applies_to(spec):
            return spec.nbytes
        n = spec.numel
        if self.name in ("fp16", "bf16"):
            return 2 * n
        blocks = -(-n // self.block_size)
        codes = n if self.name == "int8" else (n + 1) // 2
        return 4 * blocks + codes

    def encode(self, tensor: Tensor) -> memoryview:
        """The wire bytes of ``tensor`` (the tensor's own memory for ``raw``)."""
        spec = tensor.spec
        if not self.applies_to(spec):
            return tensor.data
        x = np.frombuffer(tensor.data, dtype=numpy_dtype(spec.dtype))
        out = np.empty(self.wire_nbytes(spec), dtype=np.uint8)
        with np.errstate(all="ignore"):  # overflow to inf (fp16) and NaN inputs are kept as such
            self._encode_into(x, spec, out)
        return memoryview(out)

    def _encode_into(self, x: np.ndarray, spec: TensorSpec, out: np.ndarray) -> None:
        if self.name in ("fp16", "bf16"):
            dst = out.view("<f2" if self.name == "fp16" else "<u2")
            for lo in range(0, x.size, _CHUNK):
                x32 = to_float32(x[lo:lo + _CHUNK], spec.dtype)
                dst[lo:lo + _CHUNK] = x32.astype("<f2") if self.name == "fp16" else f32_to_bf16(x32)
        else:
            _quantize_into(x, spec.dtype, self.name, self.block_size, out)

    def decode(self, spec: TensorSpec, wire: memoryview) -> memoryview:
        """Bytes of ``spec.dtype`` from exactly :meth:`wire_nbytes` wire bytes.

        Raises:
            ValueError: ``wire`` has the wrong length (a caller bug: sizes are checked earlier).
        """
        if len(wire) != self.wire_nbytes(spec):
            raise ValueError(f"{spec.name!r}: {len(wire)} wire bytes, codec {self.name} needs {self.wire_nbytes(spec)}")
        if not self.applies_to(spec):
            return wire
        out = np.empty(spec.numel, dtype=numpy_dtype(spec.dtype))
        with np.errstate(all="ignore"):  # a peer's inf/NaN scales or out-of-range values are its business
            self._decode_into(wire, spec, out)
        return memoryview(out).cast("B") if out.size else memoryview(b"")

    def _decode_into(self, wire: memoryview, spec: TensorSpec, out: np.ndarray) -> None:
        if self.name in ("fp16", "bf16"):
            src = np.frombuffer(wire, dtype="<f2" if self.name == "fp16" else "<u2")
            for lo in range(0, src.size, _CHUNK):
                piece = src[lo:lo + _CHUNK]
                x32 = piece.astype(np.float32) if self.name == "fp16" else bf16_to_f32(piece)
                out[lo:lo + _CHUNK] = from_float32(x32, spec.dtype)
        else:
            _dequantize_into(wire, spec.dtype, self.name, self.block_size, out)


def _same_as_raw(codec: str, dtype: str) -> bool:
    return (codec, dtype) in (("fp16", "float16"), ("bf16", "bfloat16"))


# ---- 16-bit floats ---------------------------------------------------------------------------


def f32_to_bf16(x32: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, round to nearest even, NaN kept NaN (as torch does)."""
    bits = np.ascontiguousarray(x32, dtype=np.float32).view(np.uint32)
    with np.errstate(over="ignore"):
        rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    out = (rounded >> np.uint32(16)).astype(np.uint16)
    out[np.isnan(x32)] = 0x7FC0
    return out


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns -> float32 (exact)."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def to_float32(x: np.ndarray, dtype: str) -> np.ndarray:
    """Values of a ``dtype`` array (bf16 as uint16) as float32; exact except for float64."""
    if dtype == "bfloat16":
        return bf16_to_f32(x)
    return x.astype(np.float32, copy=False)


def from_float32(x32: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values rounded to ``dtype`` (bf16 as uint16 bit patterns)."""
    if dtype == "bfloat16":
        return f32_to_bf16(x32)
    return x32.astype(numpy_dtype(dtype), copy=False)


# ---- blockwise quantization ------------------------------------------------------------------


def _quantize_into(x: np.ndarray, dtype: str, name: str, block: int, out: np.ndarray) -> None:
    n, qmax = x.size, _QMAX[name]
    nb = -(-n // block)
    scales = out[:4 * nb].view("<f4")
    codes = out[4 * nb:]
    step = max(block, _CHUNK // block * block)  # whole blocks per pass
    for lo in range(0, n, step):
        x32 = to_float32(x[lo:lo + step], dtype)
        m = x32.size
        mb = -(-m // block)
        padded = np.zeros(mb * block, dtype=np.float32)
        padded[:m] = x32
        blocks = padded.reshape(mb, block)
        scale = (np.max(np.abs(blocks), axis=1) / np.float32(qmax)).astype(np.float32)
        scales[lo // block:lo // block + mb] = scale
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.rint(blocks / scale[:, None])
        q = np.clip(q, -qmax, qmax)
        q[scale == 0] = 0
        q = q.reshape(-1)[:m].astype(np.int8)
        if name == "int8":
            codes[lo:lo + m] = q.view(np.uint8)
        else:
            nibbles = (q + 8).astype(np.uint8)
            if m % 2:
                nibbles = np.append(nibbles, np.uint8(8))  # the missing last element is code 8 (= 0)
            codes[lo // 2:lo // 2 + nibbles.size // 2] = nibbles[0::2] | (nibbles[1::2] << 4)


def _dequantize_into(wire: memoryview, dtype: str, name: str, block: int, out: np.ndarray) -> None:
    n = out.size
    nb = -(-n // block)
    raw = np.frombuffer(wire, dtype=np.uint8)
    scales = raw[:4 * nb].view("<f4")
    codes = raw[4 * nb:]
    step = max(block, _CHUNK // block * block)
    for lo in range(0, n, step):
        m = min(step, n - lo)
        if name == "int8":
            q = codes[lo:lo + m].view(np.int8).astype(np.float32)
        else:
            packed = codes[lo // 2:(lo + m + 1) // 2]
            both = np.empty(2 * packed.size, dtype=np.int8)
            both[0::2] = (packed & 0x0F).astype(np.int8)
            both[1::2] = (packed >> 4).astype(np.int8)
            q = (both[:m] - 8).astype(np.float32)
        mb = -(-m // block)
        scale = np.repeat(scales[lo // block:lo // block + mb], block)[:m]
        with np.errstate(over="ignore", invalid="ignore"):
            out[lo:lo + m] = from_float32(q * scale, dtype)
