"""Shared-seed perturbations: z(seed, i) in {-1, +1}, the same bits on every device.

ALGORITHMS.md §3 needs every peer (CPU worker or GPU worker) to regenerate the exact same
perturbation z(seed) from a 64-bit seed, so seeds never travel and a log of scalars rebuilds
the weights bit for bit. torch's CPU and CUDA generators differ, so z comes from a
counter-based keyed hash instead:

    block  = i >> 7                      (128 elements per hash call)
    words  = Philox-4x32-10(counter=(block mod 2^32, block >> 32, 0, 0),
                            key=(seed mod 2^32, seed >> 32))
    bit    = (words[(i >> 5) & 3] >> (i & 31)) & 1
    z      = +1 if bit == 0 else -1      (Rademacher)

`i` is the index into the flattened concatenation of a list of tensors in a fixed order:
tensor k's element j has i = offset + (numel of tensors 0..k-1) + j. One seed therefore
perturbs a whole parameter list, and any sub-range can be regenerated alone.

One hash per 128 elements keeps the hash cost small next to memory traffic on both paths. The
torch reference emulates uint32 arithmetic on int64 tensors (products of two uint32 values
wrap modulo 2^64, and the low/high halves are masked out), so it is bit-exact with the Triton
kernel, which uses native uint32 ops. Philox-4x32-10 is checked against the Random123
known-answer vectors in the tests.
"""

from __future__ import annotations

import functools
import hashlib
import operator
import sys
from collections.abc import Sequence

import torch

from hyphae.kernels import _triton
from hyphae.kernels._common import MAX_INDEX, check_params, scratch, storage_kind, u64

__all__ = [
    "derive_seed",
    "philox4x32_10_ref",
    "rademacher",
    "rademacher_like",
    "rademacher_ref",
    "rademacher_triton",
]

MASK32 = 0xFFFFFFFF
_M0, _M1 = 0xD2511F53, 0xCD9E8D57  # Philox-4x32 round multipliers
_W0, _W1 = 0x9E3779B9, 0xBB67AE85  # Philox-4x32 key increments (Weyl sequence)
ELEMENTS_PER_HASH = 128
SPAN_ELEMS = 1 << 24  # elements hashed per pass for one seed: 128K Philox calls, ~6 MB of scratch

_SEED_PERSON = b"hyphae-zo-seed1"  # blake2b personalization: versions the derivation


def derive_seed(run_id: str, step: int, peer_id: str, j: int) -> int:
    """The 64-bit seed of perturbation j of `peer_id` at `step` in run `run_id` (ALGORITHMS §3).

    Seeds are never sent: every peer derives them from the log entry's coordinates. The hash is
    blake2b (digest 8 bytes, personalization b"hyphae-zo-seed1") over an unambiguous
    encoding: for each string its UTF-8 length as 4 bytes little-endian then its bytes, and
    step and j as 8 bytes little-endian each, in the order run_id, step, peer_id, j. The
    digest is read as a little-endian unsigned integer. Changing any of this changes every
    seed, so the personalization string carries a version.

    Raises:
        TypeError: a string argument is not a str, or step/j are not ints.
        ValueError: step or j are outside [0, 2**64).
    """
    for name, value in (("run_id", run_id), ("peer_id", peer_id)):
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    h = hashlib.blake2b(digest_size=8, person=_SEED_PERSON)
    for name, value in (("run_id", run_id), ("step", step), ("peer_id", peer_id), ("j", j)):
        if isinstance(value, str):
            raw = value.encode("utf-8")
            h.update(len(raw).to_bytes(4, "little") + raw)
        else:
            h.update(u64(name, value).to_bytes(8, "little"))
    return int.from_bytes(h.digest(), "little")


def seed_keys(seed: int) -> tuple[int, int]:
    """Split a 64-bit seed into the Philox key words (low 32 bits, high 32 bits)."""
    s = u64("seed", seed)
    return s & MASK32, s >> 32


def philox4x32_10_ref(
    c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor, k0: torch.Tensor, k1: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox-4x32-10 (Salmon et al. 2011; Random123's philox4x32_10) on int64 tensors.

    Args:
        c0, c1, c2, c3: counter words; k0, k1: key words. int64 tensors holding uint32 values
            ([0, 2**32)), broadcastable to one shape.

    Returns:
        The four output words as new int64 tensors of the broadcast shape, values in [0, 2**32).
    """
    shape = torch.broadcast_shapes(c0.shape, c1.shape, c2.shape, c3.shape, k0.shape, k1.shape)
    bufs = [torch.empty(shape, dtype=torch.int64, device=c0.device) for _ in range(6)]
    words = _philox_rounds(c0, c1, c2, c3, k0, k1, bufs)
    return tuple(w.bitwise_and(MASK32) for w in words)  # type: ignore[return-value]


def _philox_rounds(
    c0: torch.Tensor,
    c1: torch.Tensor,
    c2: torch.Tensor,
    c3: torch.Tensor,
    k0: torch.Tensor,
    k1: torch.Tensor,
    bufs: list[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 10 rounds in 10 in-place int64 ops each, on six caller-owned buffers.

    uint32 arithmetic on int64: a product of two values < 2**32 fits 64 bits and int64 wraps
    modulo 2**64, so `p >> 32` (masked, to drop the sign extension) is umulhi and the low half
    is mullo. Only the low 32 bits of a word are meaningful; words 1 and 3 are left unmasked
    (they are the raw products) because they only ever feed an xor whose result is masked, and
    only masked words (0 and 2) are multiplied. The caller masks or truncates the outputs.
    """
    w0, w1, w2, w3, p0, p1 = bufs
    w0.copy_(c0.expand_as(w0))
    w1.copy_(c1.expand_as(w1))
    w2.copy_(c2.expand_as(w2))
    w3.copy_(c3.expand_as(w3))
    keys = [(k0 + r * _W0) & MASK32 for r in range(10)], [(k1 + r * _W1) & MASK32 for r in range(10)]
    for r in range(10):
        torch.mul(w0, _M0, out=p0)
        torch.mul(w2, _M1, out=p1)
        torch.bitwise_right_shift(p1, 32, out=w0).bitwise_xor_(w1).bitwise_xor_(keys[0][r]).bitwise_and_(MASK32)
        torch.bitwise_right_shift(p0, 32, out=w2).bitwise_xor_(w3).bitwise_xor_(keys[1][r]).bitwise_and_(MASK32)
        w1, p1 = p1, w1  # the new word 1 is the raw product; its old buffer is next round's scratch
        w3, p0 = p0, w3
    return w0, w1, w2, w3


def hash_bytes(seeds: Sequence[int], first_block: int, num_blocks: int, device: torch.device) -> torch.Tensor:
    """The bit stream of z as bytes: row k, byte b holds the bits of elements 8b .. 8b+7.

    Element `first_block*128 + 8*b + t` of seed k is bit t of `out[k, b]` (bit set -> z = -1).
    The result lives in this thread's scratch memory: use it before the next call.

    Returns:
        uint8 tensor [K, 16 * num_blocks].
    """
    if sys.byteorder != "little":  # the int32 -> uint8 view below assumes little-endian words
        raise RuntimeError("hyphae.kernels needs a little-endian host")
    k = len(seeds)
    counters = torch.arange(first_block, first_block + num_blocks, dtype=torch.int64, device=device)
    keys = torch.tensor([seed_keys(s) for s in seeds], dtype=torch.int64, device=device)
    zero = torch.zeros((), dtype=torch.int64, device=device)
    bufs = [scratch(f"philox{i}", k * num_blocks, torch.int64, device).view(k, num_blocks) for i in range(6)]
    words = _philox_rounds(counters & MASK32, counters >> 32, zero, zero, keys[:, :1], keys[:, 1:], bufs)
    out = scratch("hash_bytes", k * num_blocks * 4, torch.int32, device).view(k, num_blocks, 4)
    for w, word in enumerate(words):
        out[:, :, w].copy_(word)  # int64 -> int32 keeps the low 32 bits (two's complement)
    return out.view(torch.uint8).view(k, 16 * num_blocks)


@functools.cache
def sign_table(device: torch.device) -> torch.Tensor:
    """int64 [256]: entry v packs the 8 int8 z values of byte v (z_t = -1 if bit t is set).

    Viewed as int8, entry v's byte t is z for element t of the byte (little-endian), so one
    int64 gather expands 8 elements: ~4x cheaper than gathering rows of 8 floats, which is the
    largest cost of the reference update after the hash itself.
    """
    v = torch.arange(256, device=device).unsqueeze(1)
    bits = (v >> torch.arange(8, device=device)) & 1
    return (1 - 2 * bits).to(torch.int8).contiguous().view(torch.int64).view(256)


def expand_bytes(byte_row: torch.Tensor, idx_buf: torch.Tensor, z_buf: torch.Tensor) -> torch.Tensor:
    """z values (int8 +-1) for the bytes in `byte_row`, 8 per byte, via a 2 KB lookup table.

    `idx_buf` (int32) and `z_buf` (int64) are caller-owned scratch of at least
    `byte_row.numel()` elements, reused across chunks so nothing large is allocated per call.
    """
    m = byte_row.numel()
    idx = idx_buf[:m]
    idx.copy_(byte_row)
    torch.index_select(sign_table(byte_row.device), 0, idx, out=z_buf[:m])
    return z_buf[:m].view(torch.int8)


def rademacher_ref(
    seed: int,
    numel: int,
    *,
    offset: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """`rademacher` on the torch reference path."""
    start, end = _range(numel, offset)
    seed_keys(seed)  # validate even when there is nothing to hash
    out = _z_out(end - start, dtype, device, out)
    flat, dev = out.view(-1), out.device
    for lo in range(start - start % ELEMENTS_PER_HASH, end, SPAN_ELEMS):
        hi = min(lo + SPAN_ELEMS, end)
        first = lo // ELEMENTS_PER_HASH
        row = hash_bytes([seed], first, -(-hi // ELEMENTS_PER_HASH) - first, dev)[0]
        m = row.numel()
        z = expand_bytes(row, scratch("z_idx", m, torch.int32, dev), scratch("z_values", m, torch.int64, dev))
        a = max(lo, start)
        flat[a - start : hi - start].copy_(z[a - lo : hi - lo])  # int8 +-1 -> dtype, exact
    return out


def rademacher_triton(
    seed: int,
    numel: int,
    *,
    offset: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cuda",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """`rademacher` on the Triton path (CUDA, or CPU under TRITON_INTERPRET=1)."""
    start, end = _range(numel, offset)
    k0, k1 = seed_keys(seed)
    out = _z_out(end - start, dtype, device, out)
    if out.numel():
        rows = 32
        nblocks = -(-end // ELEMENTS_PER_HASH) - start // ELEMENTS_PER_HASH
        _triton.module("perturb").rademacher_kernel[(-(-nblocks // rows),)](
            out, out.numel(), start, k0, k1,
            ROWS=rows, KIND=storage_kind(out.dtype), ALIGNED=start % ELEMENTS_PER_HASH == 0, enable_fp_fusion=False,
        )
    return out


def rademacher(
    seed: int,
    numel: int,
    *,
    offset: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """z(seed, offset + j) for j in [0, numel): a 1-D tensor of exact +-1 values.

    The same (seed, index) gives the same value on every device and path. Materializing z is
    for tests and analysis; the update paths (`zo.py`) never build z for a whole tensor.

    Args:
        seed: 64-bit seed. numel, offset: the global index range [offset, offset + numel).
        dtype, device: of the result when `out` is None.
        out: optional contiguous float32/bfloat16/float16 tensor of `numel` elements to fill
            (its dtype and device are used; the result keeps its shape).

    Raises:
        ValueError: seed outside [0, 2**64), numel < 0, offset + numel >= 2**62, or a bad `out`.
        TypeError: dtype is not float32, bfloat16 or float16.
    """
    probe = out if out is not None else torch.empty(0, device=device)
    impl = rademacher_triton if _triton.use_triton(probe) else rademacher_ref
    return impl(seed, numel, offset=offset, dtype=dtype, device=device, out=out)


def _z_out(numel: int, dtype: torch.dtype, device: torch.device | str, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        storage_kind(dtype)
        return torch.empty(numel, dtype=dtype, device=device)
    storage_kind(out.dtype)
    if out.numel() != numel or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous tensor of {numel} elements, got {out.numel()} "
            f"(contiguous={out.is_contiguous()})"
        )
    return out


def rademacher_like(params: Sequence[torch.Tensor], seed: int, *, offset: int = 0) -> list[torch.Tensor]:
    """z(seed) for a parameter list, one tensor per parameter (same shape, dtype, device)."""
    starts = check_params(params, offset)
    return [
        rademacher(seed, p.numel(), offset=s, dtype=p.dtype, device=p.device).view(p.shape)
        for p, s in zip(params, starts)
    ]


def _range(numel: int, offset: int) -> tuple[int, int]:
    n = operator.index(numel)
    if n < 0:
        raise ValueError(f"numel must be >= 0, got {n}")
    start = u64("offset", offset)
    if start + n >= MAX_INDEX:
        raise ValueError(f"offset + numel must be < 2**62, got {start + n}")
    return start, start + n
