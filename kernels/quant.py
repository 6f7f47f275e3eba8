"""Blockwise absmax quantization to int8 and 4-bit, for the tensor plane's codecs.

A tensor is flattened and cut into blocks of `block_size` consecutive elements (the last block
may be shorter). Each block b gets one fp32 scale and integer codes:

    scale_b = absmax_b / QMAX                (QMAX = 127 for 8 bits, 7 for 4 bits)
    q       = clamp(round_half_even(x / scale_b), -QMAX, QMAX)      (q = 0 where scale_b = 0)
    deq(q)  = q * scale_b

Defaults: block_size 256 for int8 (scale overhead 4/256 = 1.6 %), 64 for 4-bit (4 bytes of
scale per 32 bytes of codes = 12.5 %, but 4-bit needs small blocks to keep outliers from
crushing a block's resolution). 8-bit codes are int8, one per element. 4-bit codes are stored
as q + 8 in [1, 15], two per uint8: element 2m in the low nibble of byte m, element 2m+1 in
the high nibble (a missing last element is code 8, i.e. 0); 4-bit block sizes must be even so a
byte never straddles two blocks.

Error bound, per element x of a block with absmax A and scale s = fl(A / QMAX), with deq in
fp32 (inputs in bf16/fp16 are widened exactly first):

    |x - deq(q(x))| <= s/2 + 2**-21 * A

i.e. half a quantization step (absmax int8: s/2 = A/254) plus fp32 rounding of the division,
the clamp and the product (each <= 2**-24 relative). Dequantizing to bf16/fp16 adds that
dtype's rounding of the result.

Error feedback: `quantize_ef_(e)` quantizes an fp32 error buffer e and leaves e - deq(q(e))
in it, in the same pass (the e <- e - sent step of SparseLoCo / 4-bit Streaming DiLoCo).

The torch reference and the Triton kernel give the same codes, scales and residuals: IEEE
division, round-half-even, and no fused multiply-add in either (see `_quant_tl.py`).
Non-finite inputs give unspecified codes; their block's scale is inf/NaN, which a receiver sees.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from hyphae.kernels import _triton
from hyphae.kernels._common import scratch, storage_kind

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "Quantized",
    "dequantize",
    "dequantize_ref",
    "dequantize_triton",
    "quantize",
    "quantize_ef_",
    "quantize_ef_ref_",
    "quantize_ef_triton_",
    "quantize_ref",
    "quantize_triton",
]

DEFAULT_BLOCK_SIZE = {8: 256, 4: 64}
MAX_BLOCK_SIZE = 1 << 16
_QMAX = {8: 127, 4: 7}
_CHUNK = 1 << 21  # elements per reference pass (whole blocks): scratch stays in cache, few ops


class Quantized(NamedTuple):
    """A blockwise-quantized tensor.

    Attributes:
        codes: int8 [numel] for bits=8; uint8 [ceil(numel / 2)] of packed nibbles for bits=4.
        scales: fp32 [ceil(numel / block_size)], one per block.
        shape: the original tensor's shape.
        bits: 8 or 4.
        block_size: elements per block.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    shape: torch.Size
    bits: int
    block_size: int


def quantize(x: torch.Tensor, *, bits: int = 8, block_size: int | None = None) -> Quantized:
    """Quantize `x` (float32/bfloat16/float16, any shape) blockwise; see the module docstring.

    Raises:
        TypeError: x is not a float32/bfloat16/float16 tensor.
        ValueError: bits is not 4 or 8, or block_size is not in [1, 65536] (even for 4 bits).
    """
    bs = _check(x, bits, block_size)
    impl = _quantize_triton if _triton.use_triton(x) else _quantize_ref
    return impl(x.contiguous(), bits, bs, ef=False)


def quantize_ef_(buf: torch.Tensor, *, bits: int = 8, block_size: int | None = None) -> Quantized:
    """Quantize an fp32 error-feedback buffer and leave the residual buf - deq(q(buf)) in it.

    Raises:
        TypeError: buf is not float32.
        ValueError: as `quantize`, or buf is not contiguous.
    """
    bs = _check_ef(buf, bits, block_size)
    impl = _quantize_triton if _triton.use_triton(buf) else _quantize_ref
    return impl(buf, bits, bs, ef=True)


def dequantize(
    q: Quantized, *, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The tensor q stands for: codes * scale per block, rounded once to `dtype`.

    Args:
        q: what `quantize` returned (or its fields decoded from the wire).
        dtype: output dtype; ignored when `out` is given (its dtype is used).
        out: optional contiguous tensor with q.shape's numel on q's device, written in place
            (decoding into an existing buffer saves a fresh allocation per message).

    Raises:
        TypeError: the output dtype is not float32/bfloat16/float16.
        ValueError: q's fields are inconsistent (wrong codes/scales length or dtype), or `out`
            has the wrong size or is not contiguous.
    """
    out = _dequant_out(q, dtype, out)
    impl = _dequantize_triton if _triton.use_triton(q.codes) else _dequantize_ref
    return impl(q, out)


def quantize_ref(x: torch.Tensor, *, bits: int = 8, block_size: int | None = None) -> Quantized:
    """`quantize` on the torch reference path."""
    return _quantize_ref(x.contiguous(), bits, _check(x, bits, block_size), ef=False)


def quantize_triton(x: torch.Tensor, *, bits: int = 8, block_size: int | None = None) -> Quantized:
    """`quantize` on the Triton path (CUDA, or CPU under TRITON_INTERPRET=1)."""
    return _quantize_triton(x.contiguous(), bits, _check(x, bits, block_size), ef=False)


def quantize_ef_ref_(buf: torch.Tensor, *, bits: int = 8, block_size: int | None = None) -> Quantized:
    """`quantize_ef_` on the torch reference path."""
    return _quantize_ref(buf, bits, _check_ef(buf, bits, block_size), ef=True)


def quantize_ef_triton_(buf: torch.Tensor, *, bits: int = 8, block_size: int | None = None) -> Quantized:
    """`quantize_ef_` on the Triton path."""
    return _quantize_triton(buf, bits, _check_ef(buf, bits, block_size), ef=True)


def dequantize_ref(
    q: Quantized, *, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None
) -> torch.Tensor:
    """`dequantize` on the torch reference path."""
    return _dequantize_ref(q, _dequant_out(q, dtype, out))


def dequantize_triton(
    q: Quantized, *, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None
) -> torch.Tensor:
    """`dequantize` on the Triton path."""
    return _dequantize_triton(q, _dequant_out(q, dtype, out))


# --- checks -------------------------------------------------------------------------------


def _check(x: torch.Tensor, bits: int, block_size: int | None) -> int:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    storage_kind(x.dtype)
    if bits not in _QMAX:
        raise ValueError(f"bits must be 8 or 4, got {bits}")
    bs = DEFAULT_BLOCK_SIZE[bits] if block_size is None else block_size
    if isinstance(bs, bool) or not isinstance(bs, int) or not 1 <= bs <= MAX_BLOCK_SIZE:
        raise ValueError(f"block_size must be an int in [1, {MAX_BLOCK_SIZE}], got {bs!r}")
    if bits == 4 and bs % 2:
        raise ValueError(f"block_size must be a positive multiple of 2 for 4 bits, got {bs}")
    return bs


def _check_ef(buf: torch.Tensor, bits: int, block_size: int | None) -> int:
    bs = _check(buf, bits, block_size)
    if buf.dtype != torch.float32:
        raise TypeError(f"an error-feedback buffer must be float32, got {buf.dtype}")
    if not buf.is_contiguous():
        raise ValueError("an error-feedback buffer must be contiguous (updated in place); call .contiguous()")
    return bs


def _check_quantized(q: Quantized, dtype: torch.dtype) -> None:
    storage_kind(dtype)
    n = _numel(q.shape)
    if q.bits not in _QMAX or not isinstance(q.block_size, int) or q.block_size < 1 or q.bits * q.block_size % 8:
        raise ValueError(
            f"bits must be 8 or 4 and block_size >= 1 (even for 4 bits), got {q.bits} and {q.block_size}"
        )
    want = (torch.int8, n) if q.bits == 8 else (torch.uint8, (n + 1) // 2)
    if (q.codes.dtype, q.codes.numel()) != want:
        raise ValueError(f"codes must be {want[0]} with {want[1]} elements, got {q.codes.dtype} with {q.codes.numel()}")
    nb = -(-n // q.block_size)
    if q.scales.dtype != torch.float32 or q.scales.numel() != nb:
        raise ValueError(f"scales must be float32 with {nb} elements, got {q.scales.dtype} with {q.scales.numel()}")


def _dequant_out(q: Quantized, dtype: torch.dtype, out: torch.Tensor | None) -> torch.Tensor:
    _check_quantized(q, dtype if out is None else out.dtype)
    n = _numel(q.shape)
    if out is None:
        return torch.empty(q.shape, dtype=dtype, device=q.codes.device)
    if out.numel() != n or not out.is_contiguous() or out.device != q.codes.device:
        raise ValueError(
            f"out must be a contiguous tensor of {n} elements on {q.codes.device}, "
            f"got {out.numel()} elements on {out.device} (contiguous={out.is_contiguous()})"
        )
    return out


def _numel(shape: torch.Size) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# --- torch reference ----------------------------------------------------------------------


@torch.no_grad()
def _quantize_ref(x: torch.Tensor, bits: int, bs: int, ef: bool) -> Quantized:
    """Walk x in runs of whole blocks (~1M elements) so every temporary stays in cache."""
    flat = x.view(-1)
    n = flat.numel()
    code_dtype = torch.int8 if bits == 8 else torch.uint8
    codes = torch.empty(n if bits == 8 else (n + 1) // 2, dtype=code_dtype, device=x.device)
    scales = torch.empty(-(-n // bs), dtype=torch.float32, device=x.device)
    step = max(1, _CHUNK // bs) * bs  # whole blocks: an even count of elements for 4 bits
    for lo in range(0, n, step):
        hi = min(lo + step, n)
        out = codes[lo:hi] if bits == 8 else codes[lo // 2 : (hi + 1) // 2]
        _quantize_run(flat[lo:hi], out, scales[lo // bs : -(-hi // bs)], bs, bits, ef)
    return Quantized(codes, scales, x.shape, bits, bs)


def _quantize_run(
    seg: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bs: int, bits: int, ef: bool
) -> None:
    """Quantize a run of whole blocks (the last one may be short) into codes and scales.

    With `ef`, seg (fp32) is left holding seg - q * scale: a rounded product, then a rounded
    difference, exactly as the Triton kernel computes it.
    """
    m, nrows, qmax, dev = seg.numel(), scales.numel(), _QMAX[bits], seg.device
    direct = seg.dtype == torch.float32 and m == nrows * bs
    if direct:
        rows = seg.view(nrows, bs)  # EF writes straight through to seg
    else:  # widen, and pad a short last block with zeros (they do not change its absmax)
        work = scratch("quant_in", nrows * bs, torch.float32, dev)
        work[m:].zero_()
        work[:m].copy_(seg)
        rows = work.view(nrows, bs)
    q = scratch("quant_q", nrows * bs, torch.float32, dev).view(nrows, bs)
    scale = torch.abs(rows, out=q).amax(dim=1).div_(qmax)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)[:, None]
    torch.div(rows, safe, out=q).round_().clamp_(-qmax, qmax)  # round = half to even
    scales.copy_(scale)
    if bits == 8:
        codes.copy_(q.view(-1)[:m])
    else:
        _pack4(q.view(-1)[:m], codes)
    if ef:
        rows.sub_(q.mul_(scale[:, None]))
        if not direct:
            seg.copy_(rows.view(-1)[:m])


def _pack4(q: torch.Tensor, out: torch.Tensor) -> None:
    """Codes q in [-7, 7] (fp32) -> bytes (q[2i] + 8) | (q[2i+1] + 8) << 4; odd tail pads 8."""
    m = q.numel()
    u = scratch("quant_u4", m + 1, torch.int8, q.device)
    u[:m].copy_(q)
    u[m] = 0
    u = u[: m + m % 2].add_(8).view(torch.uint8)
    high = scratch("quant_hi4", out.numel(), torch.uint8, q.device)
    torch.bitwise_or(u[0::2], torch.bitwise_left_shift(u[1::2], 4, out=high), out=out)


@torch.no_grad()
def _dequantize_ref(q: Quantized, out: torch.Tensor) -> torch.Tensor:
    n, bs, dev = _numel(q.shape), q.block_size, q.codes.device
    flat = out.view(-1)
    step = max(1, _CHUNK // bs) * bs  # whole blocks (an even count of elements for 4 bits)
    for lo in range(0, n, step):
        hi = min(lo + step, n)
        m, nrows = hi - lo, -(-(hi - lo) // bs)
        v = scratch("dequant_v", nrows * bs, torch.float32, dev)
        if q.bits == 8:
            v[:m].copy_(q.codes[lo:hi])
        else:  # nrows * bs is even and >= m, so the padded high nibble of an odd tail fits
            b = q.codes[lo // 2 : (hi + 1) // 2]
            nib = scratch("dequant_nib", b.numel(), torch.uint8, dev)
            v[0 : 2 * b.numel() : 2].copy_(torch.bitwise_and(b, 15, out=nib))
            v[1 : 2 * b.numel() : 2].copy_(torch.bitwise_right_shift(b, 4, out=nib))
            v[: 2 * b.numel()].sub_(8)
        v.view(nrows, bs).mul_(q.scales[lo // bs : lo // bs + nrows, None])
        flat[lo:hi].copy_(v[:m])  # one rounding to the output dtype
    return out if out.shape == q.shape else out.view(q.shape)


# --- Triton -------------------------------------------------------------------------------


def _p2(v: int) -> int:
    return 1 << max(0, v - 1).bit_length()


@torch.no_grad()
def _quantize_triton(x: torch.Tensor, bits: int, bs: int, ef: bool) -> Quantized:
    mod = _triton.module("quant")
    n = x.numel()
    nb = -(-n // bs)
    scales = torch.empty(nb, dtype=torch.float32, device=x.device)
    kind = storage_kind(x.dtype)
    if bits == 8:
        codes = torch.empty(n, dtype=torch.int8, device=x.device)
        bsp = _p2(bs)
        rows = max(1, 4096 // bsp)
        if n:
            mod.quant8_kernel[(-(-nb // rows),)](
                x, codes, scales, n, nb, BS=bs, BSP=bsp, ROWS=rows, KIND=kind, EF=ef, enable_fp_fusion=False
            )
    else:
        codes = torch.empty((n + 1) // 2, dtype=torch.uint8, device=x.device)
        halfp = _p2(bs // 2)
        rows = max(1, 2048 // halfp)
        if n:
            mod.quant4_kernel[(-(-nb // rows),)](
                x, codes, scales, n, nb, BS=bs, HALFP=halfp, ROWS=rows, KIND=kind, EF=ef, enable_fp_fusion=False
            )
    return Quantized(codes, scales, x.shape, bits, bs)


@torch.no_grad()
def _dequantize_triton(q: Quantized, out: torch.Tensor) -> torch.Tensor:
    mod = _triton.module("quant")
    n, bs = _numel(q.shape), q.block_size
    nb = -(-n // bs)
    kind = storage_kind(out.dtype)
    if n and q.bits == 8:
        bsp = _p2(bs)
        rows = max(1, 4096 // bsp)
        mod.dequant8_kernel[(-(-nb // rows),)](
            q.codes, q.scales, out, n, BS=bs, BSP=bsp, ROWS=rows, KIND=kind, enable_fp_fusion=False
        )
    elif n:
        halfp = _p2(bs // 2)
        rows = max(1, 2048 // halfp)
        mod.dequant4_kernel[(-(-nb // rows),)](
            q.codes, q.scales, out, n, BS=bs, HALFP=halfp, ROWS=rows, KIND=kind, enable_fp_fusion=False
        )
    return out if out.shape == q.shape else out.view(q.shape)
