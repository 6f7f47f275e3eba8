"""Triton side of `zo.py`: x += coef_k * z(seed_k) for k = 0..K-1, one pass over x.

Imported lazily through `_triton.module("zo")`. Bit-exact with `zo.zo_apply_ref_`:
the z bits come from the same Philox stream, `coef * z` is a sign flip (exact), so each seed
costs exactly one IEEE fp32 add per element, and for bf16/fp16 storage the sum is rounded to
storage after every seed, exactly as K separate calls would.
"""

import triton
import triton.language as tl

from hyphae.kernels._perturb_tl import from_f32, rademacher_bits, tile, to_f32


@triton.jit(do_not_specialize=["num_seeds", "key0", "key1", "coef0"])
def zo_apply_kernel(
    x_ptr, n, start, keys_ptr, coefs_ptr, num_seeds, key0, key1, coef0,
    ROWS: tl.constexpr, KIND: tl.constexpr, SINGLE: tl.constexpr, ALIGNED: tl.constexpr,
):
    """x[j] (global index start + j) += coef_k * z(key_k, start + j), k in order.

    SINGLE: one seed passed as scalars (key0, key1, coef0), so a perturb needs no host-to-device
    copy; otherwise keys_ptr [K, 2] (int64 holding uint32) and coefs_ptr [K] (fp32).
    n and start stay specializable so Triton sees their divisibility (vectorized access).
    The program's tile is ROWS whole 128-element hash blocks in global index space (`tile`),
    so each Philox call is made once per 128 elements; elements outside the tensor are masked.
    """
    blocks, local, mask = tile(n, start, ROWS, ALIGNED)
    ptrs = x_ptr + local
    acc = to_f32(tl.load(ptrs, mask=mask, other=0.0), KIND)
    if SINGLE:
        bits = rademacher_bits(blocks, tl.cast(key0, tl.uint32), tl.cast(key1, tl.uint32))
        acc = acc + tl.where(bits != 0, -coef0, coef0)
    else:
        for k in range(num_seeds):
            k0 = tl.load(keys_ptr + 2 * k).to(tl.uint32)
            k1 = tl.load(keys_ptr + 2 * k + 1).to(tl.uint32)
            coef = tl.load(coefs_ptr + k)
            bits = rademacher_bits(blocks, k0, k1)
            # theta + coef*z with z = +-1: add +coef or -coef, one rounding, no multiply to fuse.
            acc = acc + tl.where(bits != 0, -coef, coef)
            if KIND != 0:
                acc = to_f32(from_f32(acc, KIND), KIND)  # round to storage after every seed
    tl.store(ptrs, from_f32(acc, KIND), mask=mask)
