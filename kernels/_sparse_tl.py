"""Triton side of `sparse.py`: chunked top-k + quantization + error feedback, one program per chunk.

Imported lazily through `_triton.module("sparse")`. The k-th largest |x| of a chunk is found by
bisection on its fp32 bit pattern (for non-negative floats the integer order is the float
order): 31 rounds of "how many are >= t", independent of k. Everything above that threshold is
kept, then as many of the entries equal to it as are still needed, lowest index first (an
inclusive prefix sum ranks them), which is the reference's stable sort. A second prefix sum
gives each kept entry its slot, so indices come out in increasing order. Quantization follows
quant.py's rules: `div_rn`, round-half-even by the 1.5 * 2**23 trick, launches with
enable_fp_fusion=False so the residual is a rounded product then a rounded difference.
"""

import triton
import triton.language as tl

_RNE_MAGIC: tl.constexpr = tl.constexpr(12582912.0)  # 1.5 * 2**23


@triton.jit
def _rne(y):
    return (y + _RNE_MAGIC) - _RNE_MAGIC


@triton.jit
def topk_ef_kernel(
    x_ptr, idx_ptr, codes_ptr, scales_ptr, n,
    CHUNK: tl.constexpr, CP: tl.constexpr, K: tl.constexpr, BITS: tl.constexpr,
):
    """Chunk pid: keep its min(K, L) largest |x|, write offsets, codes (int8 q, or 2-bit code
    0..3 unpacked), the scale, and x - q*scale at the kept places."""
    c = tl.program_id(0).to(tl.int64)
    start = c * CHUNK
    offs = tl.arange(0, CP)
    pos = start + offs
    n64 = tl.cast(n, tl.int64)
    mask = (offs < CHUNK) & (pos < n64)
    x = tl.load(x_ptr + pos, mask=mask, other=0.0)
    a = tl.abs(x)
    bits = tl.where(mask, a.to(tl.int32, bitcast=True), -1)  # padding ranks below every value
    length = tl.minimum(n64 - start, CHUNK).to(tl.int32)
    kc = tl.minimum(length, K)
    lo = tl.zeros((), tl.int32)  # count(bits >= lo) >= kc holds (every finite |x| has bits >= 0)
    hi = tl.full((), 0x7F800000, tl.int32)  # count(bits >= hi) = 0 < kc (no inf or NaN)
    for _ in range(31):
        mid = lo + (hi - lo) // 2
        cnt = tl.sum((bits >= mid).to(tl.int32), axis=0)
        lo = tl.where(cnt >= kc, mid, lo)
        hi = tl.where(cnt >= kc, hi, mid)
    gt = bits > lo
    eq = bits == lo
    need = kc - tl.sum(gt.to(tl.int32), axis=0)
    keep = gt | (eq & (tl.cumsum(eq.to(tl.int32), axis=0) <= need))
    slot = c * K + (tl.cumsum(keep.to(tl.int32), axis=0) - 1).to(tl.int64)
    tl.store(idx_ptr + slot, offs.to(tl.int16), mask=keep)
    if BITS == 8:
        scale = tl.math.div_rn(tl.max(a, axis=0), 127.0)
        safe = tl.where(scale == 0.0, 1.0, scale)
        q = tl.minimum(tl.maximum(_rne(tl.math.div_rn(x, safe)), -127.0), 127.0)
        tl.store(codes_ptr + slot, q.to(tl.int8), mask=keep)
    else:
        scale = tl.math.div_rn(tl.max(a, axis=0), 2.0)
        safe = tl.where(scale == 0.0, 1.0, scale)
        m = tl.minimum(tl.maximum(_rne(tl.math.div_rn(a, safe)), 1.0), 2.0)
        q = tl.where(x < 0.0, -m, m)
        code = tl.where(q < 0.0, q + 2.0, q + 1.0)
        tl.store(codes_ptr + slot, code.to(tl.uint8), mask=keep)
    tl.store(scales_ptr + c, scale)
    tl.store(x_ptr + pos, x - q * scale, mask=keep)
