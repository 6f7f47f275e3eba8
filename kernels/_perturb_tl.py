"""Triton side of `perturb.py`: Philox-4x32-10, the Rademacher bit tile, dtype helpers.

Imported lazily through `_triton.module("perturb")` (see `_triton.py` for why). Every helper
here is written to give the same bits as the torch reference in `perturb.py`:

* Philox uses only uint32 multiply/umulhi/xor/add, which are exact and wrap identically
  everywhere.
* bf16 <-> fp32 conversions are done with integer ops, not `.to()`: the Triton interpreter
  truncates fp32 -> bf16 instead of rounding to nearest-even, while torch and the GPU round.
  Doing it by hand gives round-to-nearest-even on every backend.
"""

import triton
import triton.language as tl


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox-4x32 with 10 rounds (Salmon et al. 2011, Random123 constants). All uint32."""
    for _ in tl.static_range(10):
        _c0 = c0
        _c2 = c2
        c0 = tl.umulhi(_c2, 0xCD9E8D57) ^ c1 ^ k0
        c2 = tl.umulhi(_c0, 0xD2511F53) ^ c3 ^ k1
        c1 = _c2 * 0xCD9E8D57
        c3 = _c0 * 0xD2511F53
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def rademacher_bits(blocks, k0, k1):
    """Bits of z for a [ROWS, 128] tile: row r covers global elements blocks[r]*128 + [0, 128).

    One Philox call per 128 elements: the 4 output words give 128 bits, element `i` takes bit
    `i & 31` of word `(i >> 5) & 3` of Philox(counter=(i >> 7 as lo32, hi32, 0, 0), key).
    Returns 0/1 as uint32; z = +1 where the bit is 0, -1 where it is 1.
    """
    c0 = blocks.to(tl.uint32)  # truncation keeps the low 32 bits
    c1 = (blocks >> 32).to(tl.uint32)
    zero = tl.zeros_like(c0)
    r0, r1, r2, r3 = philox4x32_10(c0, c1, zero, zero, k0, k1)
    cols = tl.arange(0, 128)
    word_of_col = (cols >> 5)[None, :]
    word = tl.where(
        word_of_col == 0,
        r0[:, None],
        tl.where(word_of_col == 1, r1[:, None], tl.where(word_of_col == 2, r2[:, None], r3[:, None])),
    )
    shift = (cols & 31).to(tl.uint32)[None, :]
    return (word >> shift) & 1


@triton.jit
def bf16_to_f32(x):
    """Exact widening: the bf16 bits are the high half of the fp32 bits."""
    return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)


@triton.jit
def f32_to_bf16_rne(x):
    """Round fp32 to bf16, nearest-even (the torch/c10 rule; NaN -> canonical quiet NaN)."""
    u = x.to(tl.uint32, bitcast=True)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    rounded = tl.where(x != x, 0x7FC0, rounded)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def to_f32(x, KIND: tl.constexpr):
    """Widen a tile of storage kind KIND (`_common.storage_kind`: 0 fp32, 1 bf16, 2 fp16), exactly."""
    if KIND == 1:
        return bf16_to_f32(x)
    else:
        return x.to(tl.float32)


@triton.jit
def from_f32(x, KIND: tl.constexpr):
    """Round an fp32 tile to storage kind KIND, nearest-even (fp16 `.to` is RNE everywhere)."""
    if KIND == 1:
        return f32_to_bf16_rne(x)
    elif KIND == 2:
        return x.to(tl.float16)
    else:
        return x


@triton.jit
def tile(n, start, ROWS: tl.constexpr, ALIGNED: tl.constexpr):
    """This program's tile: ROWS whole 128-element hash blocks in global index space.

    Returns (blocks, local, mask): the int64 hash-block counters [ROWS], the tensor-local
    element index of each tile element [ROWS, 128] (int64; negative before the tensor when
    `start` is not block-aligned) and the mask of indices inside the tensor. ALIGNED
    (start % 128 == 0, decided on the host) gives the plain `pid * TILE + arange` form, which
    lets Triton prove alignment and contiguity and emit vectorized loads and stores.
    """
    pid = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, ROWS)[:, None] * 128 + tl.arange(0, 128)[None, :]
    if ALIGNED:
        blocks = tl.cast(start, tl.int64) // 128 + pid * ROWS + tl.arange(0, ROWS).to(tl.int64)
        local = pid * (ROWS * 128) + offs
        mask = local < n
    else:
        start64 = tl.cast(start, tl.int64)
        first = start64 // 128 + pid * ROWS
        blocks = first + tl.arange(0, ROWS).to(tl.int64)
        local = (first * 128 - start64) + offs
        mask = (local >= 0) & (local < n)
    return blocks, local, mask


@triton.jit(do_not_specialize=["k0", "k1"])
def rademacher_kernel(out_ptr, n, start, k0, k1, ROWS: tl.constexpr, KIND: tl.constexpr, ALIGNED: tl.constexpr):
    """out[j] = z(seed, start + j) for j < n, written in storage kind KIND."""
    blocks, local, mask = tile(n, start, ROWS, ALIGNED)
    bits = rademacher_bits(blocks, tl.cast(k0, tl.uint32), tl.cast(k1, tl.uint32))
    z = tl.where(bits != 0, -1.0, 1.0)
    tl.store(out_ptr + local, from_f32(z, KIND), mask=mask)
