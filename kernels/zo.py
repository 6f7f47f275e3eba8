"""Fused shared-seed zeroth-order updates: theta += c * z(seed) over a parameter list, in place.

ALGORITHMS.md §3 (MeZO / FedKSeed): perturb (+eps z), un-perturb, and apply every peer's
scalar updates theta <- theta - (eta g) z, all with z regenerated from a seed
(`perturb.py`), never stored for the whole list.

Exactness contract (what makes a replayed log give bit-identical weights on CPU and GPU):

* Each coefficient is rounded once to fp32 on the host (round-to-nearest-even). Callers pass
  c = -(eta * g) for an update; computing eta*g in fp32 first is the caller's choice.
* Per element and per seed the update is exactly one IEEE fp32 operation, x + (+-c): z is
  +-1 so c*z is exact. For bf16/fp16 parameters x is widened exactly to fp32, the add is
  done in fp32 and the result rounded to the storage dtype (nearest-even) after every seed.
* A batch of K (seed, coef) pairs applies them in the given order per element, so
  `zo_apply_(p, [s0, s1], [c0, c1])` equals `zo_apply_(p, [s0], [c0])` then
  `zo_apply_(p, [s1], [c1])` bit for bit, in one pass over memory.

Float addition is not associative, so perturb then un-perturb does NOT restore theta exactly
in general (oracle 2): the canonical state comes only from replaying the log.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from hyphae.kernels import _triton
from hyphae.kernels._common import check_params, fp32_scalar, scratch, storage_kind
from hyphae.kernels.perturb import ELEMENTS_PER_HASH, SPAN_ELEMS, expand_bytes, hash_bytes, seed_keys

__all__ = ["zo_apply_", "zo_apply_ref_", "zo_apply_triton_", "zo_perturb_", "zo_unperturb_"]

_CHUNK = 1 << 21  # elements per pass: big enough that per-op overhead (and OpenMP barriers) stay small
_HASH_BUDGET = 1 << 24  # seeds x elements hashed per span (hash scratch <= ~8 MB)
_ROWS = 32  # Triton: 128-element hash blocks per program (4096 elements)

Piece = tuple[torch.Tensor, int]  # (contiguous tensor, global index of its first element)


def zo_perturb_(params: Sequence[torch.Tensor], seed: int, scale: float, *, offset: int = 0) -> None:
    """theta += scale * z(seed) over the list, in place (MeZO's +eps z step).

    Args:
        params: contiguous float32/bfloat16/float16 tensors, in the run's fixed order.
        seed: 64-bit seed (`perturb.derive_seed`).
        scale: rounded to fp32 once on the host.
        offset: global index of params[0]'s first element (0 for a whole model).
    """
    zo_apply_(params, [seed], [scale], offset=offset)


def zo_unperturb_(params: Sequence[torch.Tensor], seed: int, scale: float, *, offset: int = 0) -> None:
    """theta -= scale * z(seed): the inverse step, which is NOT an exact inverse in float."""
    zo_apply_(params, [seed], [-fp32_scalar("scale", scale)], offset=offset)


def zo_apply_(
    params: Sequence[torch.Tensor], seeds: Sequence[int], coefs: Sequence[float], *, offset: int = 0
) -> None:
    """theta += coefs[k] * z(seeds[k]) for k in order, fused into one pass, in place.

    CUDA tensors take the Triton kernel when Triton is installed; everything else the torch
    reference. Both give the same bits (module docstring).

    Raises:
        TypeError: a param is not a float32/bfloat16/float16 tensor.
        ValueError: lengths of seeds and coefs differ, a coef is not finite, a seed is outside
            [0, 2**64), a param is not contiguous, or offset + numel >= 2**62.
    """
    pieces, seed_list, coef_list = _prepare(params, seeds, coefs, offset)
    fast = [pc for pc in pieces if _triton.use_triton(pc[0])]
    slow = [pc for pc in pieces if not _triton.use_triton(pc[0])]
    if fast:
        _apply_triton(fast, seed_list, coef_list)
    if slow:
        _apply_ref(slow, seed_list, coef_list)


def zo_apply_ref_(
    params: Sequence[torch.Tensor], seeds: Sequence[int], coefs: Sequence[float], *, offset: int = 0
) -> None:
    """`zo_apply_` on the torch reference path, whatever the device."""
    _apply_ref(*_prepare(params, seeds, coefs, offset))


def zo_apply_triton_(
    params: Sequence[torch.Tensor], seeds: Sequence[int], coefs: Sequence[float], *, offset: int = 0
) -> None:
    """`zo_apply_` on the Triton path (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)."""
    _apply_triton(*_prepare(params, seeds, coefs, offset))


def _prepare(
    params: Sequence[torch.Tensor], seeds: Sequence[int], coefs: Sequence[float], offset: int
) -> tuple[list[Piece], list[int], list[float]]:
    starts = check_params(params, offset)
    seed_list, coef_list = list(seeds), list(coefs)
    if len(seed_list) != len(coef_list):
        raise ValueError(f"seeds and coefs must have the same length, got {len(seed_list)} and {len(coef_list)}")
    for s in seed_list:
        seed_keys(s)
    rounded = [fp32_scalar("coefs", c) for c in coef_list]  # the one host-side rounding to fp32
    pieces = [(p, s) for p, s in zip(params, starts) if p.numel() > 0]
    return pieces, seed_list, rounded


@torch.no_grad()
def _apply_ref(pieces: list[Piece], seeds: list[int], coefs: list[float]) -> None:
    """Torch reference: hash a span of the index space for all seeds, then walk it in chunks.

    Hashing is done for a large span at once (one Philox evaluation per 128 elements, as
    vectorized int64 ops whose per-call overhead would dominate on small chunks); the update
    itself walks each tensor in cache-sized chunks so every seed's add hits cache and main
    memory sees x once per call, like a copy.
    """
    if not pieces or not seeds:
        return
    for device in {p.device for p, _ in pieces}:
        group = sorted(((p, s) for p, s in pieces if p.device == device), key=lambda pc: pc[1])
        _apply_ref_device(group, seeds, coefs, device)


def _apply_ref_device(pieces: list[Piece], seeds: list[int], coefs: list[float], device: torch.device) -> None:
    span = max(1 << 13, min(SPAN_ELEMS, _HASH_BUDGET // len(seeds))) // 1024 * 1024
    begin = pieces[0][1]
    end = max(s + p.numel() for p, s in pieces)
    chunk = min(_CHUNK, end - begin)
    bufs = {
        "idx": scratch("zo_idx", chunk // 8 + 2, torch.int32, device),
        "z": scratch("zo_z", chunk // 8 + 2, torch.int64, device),
    }
    if any(p.dtype != torch.float32 for p, _ in pieces):
        bufs["acc"] = scratch("zo_acc", chunk, torch.float32, device)
    for g0 in range(begin - begin % ELEMENTS_PER_HASH, end, span):
        g1 = min(g0 + span, end)
        active = [(p, s) for p, s in pieces if s < g1 and s + p.numel() > g0]
        if not active:
            continue
        first = g0 // ELEMENTS_PER_HASH
        stream = hash_bytes(seeds, first, -(-g1 // ELEMENTS_PER_HASH) - first, device)
        for p, s in active:
            _apply_piece(p.view(-1), s, max(s, g0), min(s + p.numel(), g1), g0, stream, coefs, bufs)


def _apply_piece(
    flat: torch.Tensor,
    start: int,
    lo: int,
    hi: int,
    g0: int,
    stream: torch.Tensor,
    coefs: list[float],
    bufs: dict[str, torch.Tensor],
) -> None:
    """Update global elements [lo, hi) of one tensor (first element at `start`) from `stream`.

    `stream[k, b]` holds the bits of global elements g0 + 8b .. g0 + 8b + 7 for seed k.
    """
    while lo < hi:
        top = min(hi, lo - lo % _CHUNK + _CHUNK)  # chunk edges on multiples of _CHUNK
        x = flat[lo - start : top - start]
        n = top - lo
        shift = (lo - g0) % 8
        rows = slice((lo - g0) // 8, (top - g0 + 7) // 8)
        low = x.dtype != torch.float32
        acc = bufs["acc"][:n].copy_(x) if low else x
        for k, coef in enumerate(coefs):
            z = expand_bytes(stream[k, rows], bufs["idx"], bufs["z"])[shift : shift + n]
            acc.add_(z, alpha=coef)  # fp32 x + (+-1 as int8 -> fp32) * coef: exact product, one rounding
            if low:
                x.copy_(acc)  # round to storage (nearest-even) after every seed ...
                if k + 1 < len(coefs):
                    acc.copy_(x)  # ... and continue from the rounded value, as K calls would
        lo = top


@torch.no_grad()
def _apply_triton(pieces: list[Piece], seeds: list[int], coefs: list[float]) -> None:
    if not pieces or not seeds:
        return
    mod = _triton.module("zo")
    single = len(seeds) == 1
    key0, key1 = seed_keys(seeds[0])
    tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
    for x, start in pieces:
        if x.device not in tables:
            tables[x.device] = _seed_tables(seeds, coefs, x.device)
        keys, coef_t = tables[x.device]
        n = x.numel()
        nblocks = -(-(start + n) // ELEMENTS_PER_HASH) - start // ELEMENTS_PER_HASH
        with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
            mod.zo_apply_kernel[(-(-nblocks // _ROWS),)](
                x, n, start, keys, coef_t, len(seeds), key0, key1, coefs[0],
                ROWS=_ROWS, KIND=storage_kind(x.dtype), SINGLE=single, ALIGNED=start % ELEMENTS_PER_HASH == 0,
                enable_fp_fusion=False,
            )


def _seed_tables(seeds: list[int], coefs: list[float], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys [K, 2] and coefs [K] on `device`; a 1-element dummy pair when K == 1 (scalars used).

    Staged through pinned memory with a non-blocking copy, so a batched apply does not stall the
    host until the GPU has drained its queue (a plain copy from pageable memory would).
    """
    if len(seeds) == 1:
        dummy = torch.empty(2, dtype=torch.int64, device=device)
        return dummy, dummy.view(torch.float32)
    pin = device.type == "cuda"
    keys = torch.tensor([seed_keys(s) for s in seeds], dtype=torch.int64, pin_memory=pin)
    coef_t = torch.tensor(coefs, dtype=torch.float32, pin_memory=pin)
    return keys.to(device, non_blocking=True), coef_t.to(device, non_blocking=True)
