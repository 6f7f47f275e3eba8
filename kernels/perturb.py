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
reference computes Philox on the host with numpy: uint32 words, products formed exactly in
uint64 and split into umulhi/mullo through a uint32 view, so it is bit-exact with the Triton
kernel, which uses native uint32 ops. Philox-4x32-10 is checked against the Random123
known-answer vectors in the tests.
"""

from __future__ import annotations

import functools
import hashlib
import operator
import sys
from collections.abc import Sequence

import numpy as np
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
    """Philox-4x32-10 (Salmon et al. 2011; Random123's philox4x32_10), the reference's generator.

    Args:
        c0, c1, c2, c3: counter words; k0, k1: key words. int64 tensors holding uint32 values
            ([0, 2**32)), broadcastable to one shape.

    Returns:
        The four output words as new int64 tensors of the broadcast shape, values in [0, 2**32),
        on the device of c0 (computed on the host).
    """
    ins = [t.detach().cpu().numpy().astype(np.uint32) for t in (c0, c1, c2, c3, k0, k1)]
    shape = np.broadcast_shapes(*(a.shape for a in ins))
    out = np.empty((*shape, 4), dtype=np.uint32)
    k0s = np.broadcast_to(ins[4], shape).astype(np.uint64)
    k1s = np.broadcast_to(ins[5], shape).astype(np.uint64)
    _philox_rounds(*ins[:4], _round_keys(k0s, k1s), out)
    words = (torch.from_numpy(out[..., w].astype(np.int64)).to(c0.device) for w in range(4))
    return tuple(words)  # type: ignore[return-value]


def _round_keys(k0: np.ndarray, k1: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """The 10 rounds' key words as uint32 arrays (k + r * Weyl increment, mod 2**32)."""
    return [
        (((k0 + r * _W0) & MASK32).astype(np.uint32), ((k1 + r * _W1) & MASK32).astype(np.uint32))
        for r in range(10)
    ]


def _halves(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) uint32 halves of a uint64 array, as strided views (little-endian host)."""
    h = p.view(np.uint32).reshape(*p.shape, 2)
    return h[..., 0], h[..., 1]


def _philox_rounds(
    c0: np.ndarray,
    c1: np.ndarray,
    c2: np.ndarray,
    c3: np.ndarray,
    keys: list[tuple[np.ndarray, np.ndarray]],
    out: np.ndarray,
    work: Sequence[np.ndarray] | None = None,
) -> None:
    """The 10 rounds on numpy uint32 words, 6 ufunc calls per round, into out[..., 0:4].

    Each round multiplies words 0 and 2 into uint64 products (exact: both factors < 2**32)
    and reads umulhi and mullo as the high and low uint32 halves of the product through a
    view, so no shifts or masks are spent: the new words 0 and 2 are hi ^ old word ^ key, the
    new words 1 and 3 are the low halves, used in place. The torch formulation (int64 words,
    10 ops a round for shifts and masks) was ~1.5x slower on one core, and numpy's smaller
    per-call overhead lets the caller hash in cache-sized spans.

    Args:
        c0..c3: counter words, uint32 arrays broadcastable to out.shape[:-1].
        keys: `_round_keys` of the key words, broadcastable likewise.
        out: uint32 array [..., 4] receiving the output words.
        work: optional temporaries (`_philox_work`) of at least out.shape[:-1] elements;
            fresh arrays when None.
    """
    shape = out.shape[:-1]
    n = int(np.prod(shape))
    if work is None:
        work = [np.empty(n, np.uint32), np.empty(n, np.uint32)] + [np.empty(n, np.uint64) for _ in range(4)]
    w0, w2, *prods = (a[:n].reshape(shape) for a in work)
    np.copyto(w0, c0)
    np.copyto(w2, c2)
    w1, w3 = c1, c3  # then the low halves of the previous round's products
    for r, (ka, kb) in enumerate(keys):
        p0, p1 = prods[2 * (r % 2)], prods[2 * (r % 2) + 1]  # alternate: w1/w3 still view the others
        np.multiply(w0, np.uint64(_M0), out=p0, dtype=np.uint64)
        np.multiply(w2, np.uint64(_M1), out=p1, dtype=np.uint64)
        (lo0, hi0), (lo1, hi1) = _halves(p0), _halves(p1)
        if r == 9:
            w0, w2 = out[..., 0], out[..., 2]
        np.bitwise_xor(hi1, w1, out=w0)
        np.bitwise_xor(w0, ka, out=w0)
        np.bitwise_xor(hi0, w3, out=w2)
        np.bitwise_xor(w2, kb, out=w2)
        w1, w3 = lo1, lo0
    np.copyto(out[..., 1], w1)
    np.copyto(out[..., 3], w3)


def philox_keys(seeds: Sequence[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """`_round_keys` for a list of seeds: arrays of shape [K, 1], one row per seed."""
    keys = np.array([seed_keys(s) for s in seeds], dtype=np.uint64).reshape(len(seeds), 2, 1)
    return _round_keys(keys[:, 0], keys[:, 1])


def hash_buffers(num_words: int, tag: str = "") -> tuple[np.ndarray, list[np.ndarray]]:
    """This thread's scratch for `hash_into` over `num_words` (= seeds x blocks) Philox calls.

    Returns (out, work): uint32 [4 * num_words] for the result and the six `_philox_rounds`
    temporaries. `tag` names an independent set, so helper threads can each be handed one.
    """
    cpu = torch.device("cpu")
    out = scratch(f"hash_bytes{tag}", 4 * num_words, torch.int32, cpu).numpy().view(np.uint32)
    words = [scratch(f"philox_w{i}{tag}", num_words, torch.int32, cpu).numpy().view(np.uint32) for i in (0, 2)]
    prods = [scratch(f"philox_p{i}{tag}", num_words, torch.int64, cpu).numpy().view(np.uint64) for i in range(4)]
    return out, words + prods


def hash_into(
    keys: list[tuple[np.ndarray, np.ndarray]],
    first_block: int,
    num_blocks: int,
    out: np.ndarray,
    work: Sequence[np.ndarray],
) -> np.ndarray:
    """The z bit stream of blocks [first_block, first_block + num_blocks) for K seeds, on the host.

    Args:
        keys: `philox_keys(seeds)`. out, work: `hash_buffers(K * num_blocks)` (or larger).

    Returns:
        uint8 view of `out`, [K, 16 * num_blocks]: byte b of row k holds the bits of elements
        first_block*128 + 8b .. +7 of seed k, bit t for element 8b + t (set -> z = -1).
    """
    if sys.byteorder != "little":  # the uint64 -> uint32 halves and the uint32 -> uint8 views assume it
        raise RuntimeError("hyphae.kernels needs a little-endian host")
    k = keys[0][0].shape[0]
    counters = np.arange(first_block, first_block + num_blocks, dtype=np.uint64)
    c_lo, c_hi = _halves(counters)
    zero = np.zeros((), dtype=np.uint32)
    words = out[: 4 * k * num_blocks].reshape(k, num_blocks, 4)
    _philox_rounds(c_lo, c_hi, zero, zero, keys, words, work)
    return words.view(np.uint8).reshape(k, 16 * num_blocks)


def hash_bytes(seeds: Sequence[int], first_block: int, num_blocks: int, device: torch.device) -> torch.Tensor:
    """`hash_into` as a torch tensor on `device`: uint8 [K, 16 * num_blocks].

    The hash runs on the host (numpy); for another device the bytes (1/32 of the fp32 data
    they describe) are copied there. On the host the result lives in this thread's scratch
    memory: use it before the next call.
    """
    out, work = hash_buffers(len(seeds) * num_blocks)
    return torch.from_numpy(hash_into(philox_keys(seeds), first_block, num_blocks, out, work)).to(device)


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
    """`rademacher` on the reference path.

    fp32 on the host goes through the fused update's threaded numpy path (`zo.fill_z_host_`),
    which is several times faster than this chain of torch ops on a busy machine.
    """
    start, end = _range(numel, offset)
    seed_keys(seed)  # validate even when there is nothing to hash
    out = _z_out(end - start, dtype, device, out)
    if out.device.type == "cpu" and out.dtype == torch.float32 and out.numel():
        from hyphae.kernels.zo import fill_z_host_  # zo imports this module

        fill_z_host_(out, seed, start)
        return out
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
