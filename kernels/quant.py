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
from hyphae.kernels.perturb import storage_kind

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
_CHUNK = 1 << 20  # elements per reference pass (whole blocks), so temporaries stay in cache


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


def dequantize(q: Quantized, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The tensor q stands for: codes * scale per block, rounded once to `dtype`.

    Raises:
        TypeError: dtype is not float32/bfloat16/float16.
        ValueError: q's fields are inconsistent (wrong codes/scales length or dtype).
    """
    _check_quantized(q, dtype)
    impl = _dequantize_triton if _triton.use_triton(q.codes) else _dequantize_ref
    return impl(q, dtype)


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


def dequantize_ref(q: Quantized, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`dequantize` on the torch reference path."""
    _check_quantized(q, dtype)
    return _dequantize_ref(q, dtype)


def dequantize_triton(q: Quantized, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`dequantize` on the Triton path."""
    _check_quantized(q, dtype)
    return _dequantize_triton(q, dtype)


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


def _numel(shape: torch.Size) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# --- torch reference ----------------------------------------------------------------------


@torch.no_grad()
def _quantize_ref(x: torch.Tensor, bits: int, bs: int, ef: bool) -> Quantized:
    flat = x.view(-1)
    n = flat.numel()
    qmax = _QMAX[bits]
    codes = torch.empty(n if bits == 8 else (n + 1) // 2, dtype=torch.int8 if bits == 8 else torch.uint8, device=x.device)
    scales = torch.empty(-(-n // bs), dtype=torch.float32, device=x.device)
    step = max(1, _CHUNK // bs) * bs
    for lo in range(0, n, step):
        hi = min(lo + step, n)
        q, sc = _quantize_segment(flat[lo:hi], bs, qmax, ef)
        scales[lo // bs : lo // bs + sc.numel()] = sc
        if bits == 8:
            codes[lo:hi].copy_(q)
        else:
            _pack4(q, codes[lo // 2 : (hi + 1) // 2])
    return Quantized(codes, scales, x.shape, bits, bs)


def _quantize_segment(seg: torch.Tensor, bs: int, qmax: int, ef: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (fp32, integral) and scales for a run of whole blocks; EF updates seg in place."""
    m = seg.numel()
    padded = m % bs != 0
    if padded:  # only the last segment of a tensor: pad its short block with zeros
        rows = torch.zeros(-(-m // bs) * bs, dtype=torch.float32, device=seg.device)
        rows[:m] = seg
        rows = rows.view(-1, bs)
    else:
        rows = seg.view(-1, bs).float()  # no copy for fp32: EF writes through to seg
    scale = rows.abs().amax(dim=1) / qmax
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = (rows / safe[:, None]).round_().clamp_(-qmax, qmax)
    if ef:
        rows.sub_(q * scale[:, None])  # rounded product, then rounded difference (no FMA)
        if padded:
            seg.copy_(rows.view(-1)[:m])
    return q.view(-1)[:m], scale


def _pack4(q: torch.Tensor, out: torch.Tensor) -> None:
    u = (q + 8).to(torch.uint8)
    if u.numel() % 2:
        u = torch.cat([u, u.new_full((1,), 8)])
    torch.bitwise_or(u[0::2], u[1::2] << 4, out=out)


@torch.no_grad()
def _dequantize_ref(q: Quantized, dtype: torch.dtype) -> torch.Tensor:
    n, bs = _numel(q.shape), q.block_size
    out = torch.empty(n, dtype=dtype, device=q.codes.device)
    step = max(1, _CHUNK // bs) * bs  # whole blocks (an even count of elements for 4 bits)
    for lo in range(0, n, step):
        hi = min(lo + step, n)
        if q.bits == 8:
            v = q.codes[lo:hi].float()
        else:
            b = q.codes[lo // 2 : (hi + 1) // 2]
            v = torch.stack([b & 15, b >> 4], dim=1).view(-1)[: hi - lo].float() - 8
        sc = q.scales[lo // bs : -(-hi // bs)]
        full = (hi - lo) // bs * bs
        out[lo : lo + full] = (v[:full].view(-1, bs) * sc[: full // bs, None]).view(-1)
        if full < hi - lo:
            out[lo + full : hi] = v[full:] * sc[-1]
    return out.view(q.shape)


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
def _dequantize_triton(q: Quantized, dtype: torch.dtype) -> torch.Tensor:
    mod = _triton.module("quant")
    n, bs = _numel(q.shape), q.block_size
    out = torch.empty(n, dtype=dtype, device=q.codes.device)
    nb = -(-n // bs)
    kind = storage_kind(dtype)
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
    return out.view(q.shape)
