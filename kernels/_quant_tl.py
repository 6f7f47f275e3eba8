"""Triton side of `quant.py`: blockwise absmax int8 / int4 quantize and dequantize.

Imported lazily through `_triton.module("quant")`. Written to give the same bits as the torch
reference: divisions are `div_rn` (IEEE, round-to-nearest-even; plain `/` may be approximate on
GPU), rounding to an integer uses the 1.5 * 2**23 trick (exact round-half-even for |y| < 2**22,
the same rule as torch.round), and launches pass enable_fp_fusion=False so `x - q*scale` is a
rounded product then a rounded difference, as in torch.
"""

import triton
import triton.language as tl

from hyphae.kernels._perturb_tl import from_f32, to_f32

_RNE_MAGIC: tl.constexpr = tl.constexpr(12582912.0)  # 1.5 * 2**23


@triton.jit
def _codes(x, safe, QMAX: tl.constexpr):
    """round_half_even(x / safe) clamped to [-QMAX, QMAX], as fp32."""
    y = tl.math.div_rn(x, safe)
    q = (y + _RNE_MAGIC) - _RNE_MAGIC
    return tl.minimum(tl.maximum(q, -QMAX), QMAX)


@triton.jit
def quant8_kernel(
    x_ptr, codes_ptr, scales_ptr, n, num_blocks,
    BS: tl.constexpr, BSP: tl.constexpr, ROWS: tl.constexpr, KIND: tl.constexpr, EF: tl.constexpr,
):
    """Blocks pid*ROWS .. +ROWS: scale = absmax/127, codes = rne(x/scale); EF: x <- x - q*scale."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    cols = tl.arange(0, BSP)
    idx = rows[:, None] * BS + cols[None, :]
    mask = (cols[None, :] < BS) & (idx < tl.cast(n, tl.int64))
    x = to_f32(tl.load(x_ptr + idx, mask=mask, other=0.0), KIND)
    scale = tl.math.div_rn(tl.max(tl.abs(x), axis=1), 127.0)
    safe = tl.where(scale == 0.0, 1.0, scale)
    q = _codes(x, safe[:, None], 127.0)
    tl.store(codes_ptr + idx, q.to(tl.int8), mask=mask)
    tl.store(scales_ptr + rows, scale, mask=rows < tl.cast(num_blocks, tl.int64))
    if EF:
        tl.store(x_ptr + idx, x - q * scale[:, None], mask=mask)


@triton.jit
def dequant8_kernel(
    codes_ptr, scales_ptr, out_ptr, n,
    BS: tl.constexpr, BSP: tl.constexpr, ROWS: tl.constexpr, KIND: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    cols = tl.arange(0, BSP)
    idx = rows[:, None] * BS + cols[None, :]
    mask = (cols[None, :] < BS) & (idx < tl.cast(n, tl.int64))
    q = tl.load(codes_ptr + idx, mask=mask, other=0).to(tl.float32)
    scale = tl.load(scales_ptr + rows, mask=rows * BS < tl.cast(n, tl.int64), other=0.0)
    tl.store(out_ptr + idx, from_f32(q * scale[:, None], KIND), mask=mask)


@triton.jit
def quant4_kernel(
    x_ptr, packed_ptr, scales_ptr, n, num_blocks,
    BS: tl.constexpr, HALFP: tl.constexpr, ROWS: tl.constexpr, KIND: tl.constexpr, EF: tl.constexpr,
):
    """As quant8 with QMAX 7; element 2m goes to the low nibble of byte m, 2m+1 to the high."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    pairs = tl.arange(0, HALFP)
    even = rows[:, None] * BS + 2 * pairs[None, :]
    n64 = tl.cast(n, tl.int64)
    in_block = pairs[None, :] < BS // 2
    m_even = in_block & (even < n64)
    m_odd = in_block & (even + 1 < n64)
    xe = to_f32(tl.load(x_ptr + even, mask=m_even, other=0.0), KIND)
    xo = to_f32(tl.load(x_ptr + even + 1, mask=m_odd, other=0.0), KIND)
    absmax = tl.maximum(tl.max(tl.abs(xe), axis=1), tl.max(tl.abs(xo), axis=1))
    scale = tl.math.div_rn(absmax, 7.0)
    safe = tl.where(scale == 0.0, 1.0, scale)[:, None]
    qe = _codes(xe, safe, 7.0)
    qo = _codes(xo, safe, 7.0)  # a missing odd tail element is 0 -> code 8, as in the reference
    byte = (qe + 8.0).to(tl.uint8) | ((qo + 8.0).to(tl.uint8) << 4)
    tl.store(packed_ptr + even // 2, byte, mask=m_even)
    tl.store(scales_ptr + rows, scale, mask=rows < tl.cast(num_blocks, tl.int64))
    if EF:
        tl.store(x_ptr + even, xe - qe * scale[:, None], mask=m_even)
        tl.store(x_ptr + even + 1, xo - qo * scale[:, None], mask=m_odd)


@triton.jit
def dequant4_kernel(
    packed_ptr, scales_ptr, out_ptr, n,
    BS: tl.constexpr, HALFP: tl.constexpr, ROWS: tl.constexpr, KIND: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    pairs = tl.arange(0, HALFP)
    even = rows[:, None] * BS + 2 * pairs[None, :]
    n64 = tl.cast(n, tl.int64)
    in_block = pairs[None, :] < BS // 2
    m_even = in_block & (even < n64)
    m_odd = in_block & (even + 1 < n64)
    byte = tl.load(packed_ptr + even // 2, mask=m_even, other=0x88)
    scale = tl.load(scales_ptr + rows, mask=rows * BS < n64, other=0.0)[:, None]
    lo = (byte & 15).to(tl.float32) - 8.0
    hi = (byte >> 4).to(tl.float32) - 8.0
    tl.store(out_ptr + even, from_f32(lo * scale, KIND), mask=m_even)
    tl.store(out_ptr + even + 1, from_f32(hi * scale, KIND), mask=m_odd)
