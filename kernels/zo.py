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

import concurrent.futures
import contextlib
import dataclasses
import queue
from collections.abc import Sequence

import numpy as np
import torch

from hyphae.kernels import _triton
from hyphae.kernels._common import check_params, fp32_scalar, scratch, storage_kind
from hyphae.kernels.perturb import (
    ELEMENTS_PER_HASH,
    expand_bytes,
    hash_buffers,
    hash_bytes,
    hash_into,
    philox_keys,
    seed_keys,
)

__all__ = ["zo_apply_", "zo_apply_ref_", "zo_apply_triton_", "zo_perturb_", "zo_unperturb_"]

_TILE = 1 << 20  # elements updated per step: the tile's fp32 z (4 MB) is still in cache (L3) when added
_HASH_BLOCKS = 1 << 14  # seeds x 128-element blocks hashed per span: Philox temporaries (~0.7 MB) fit L2
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
    """Reference path: fp32 host tensors take `_apply_host_f32`, the rest `_apply_ref_device`."""
    if not pieces or not seeds:
        return
    host = [pc for pc in pieces if pc[0].device.type == "cpu" and pc[0].dtype == torch.float32]
    if host:
        _apply_host_f32(host, seeds, coefs)
    rest = [pc for pc in pieces if not (pc[0].device.type == "cpu" and pc[0].dtype == torch.float32)]
    for device in {p.device for p, _ in rest}:
        group = sorted(((p, s) for p, s in rest if p.device == device), key=lambda pc: pc[1])
        _apply_ref_device(group, seeds, coefs, device)


def _apply_host_f32(pieces: list[Piece], seeds: list[int], coefs: list[float], *, assign: bool = False) -> None:
    """fp32 CPU tensors: numpy over spans of the index space, spans shared by helper threads.

    Every op here is single-threaded numpy that releases the GIL, so up to
    torch.get_num_threads() threads each take whole spans (hash, then update) from a shared
    list. Nothing waits on an OpenMP barrier, which on a busy machine cost the torch
    formulation (hundreds of parallel regions per call) more than the work itself. z enters
    as `_signed_rows`: one gather of 8 fp32 values (+-coef) per byte of the bit stream, then
    one add, so x is read and written once per call, like a copy. `assign` (one seed) writes
    coef * z instead of adding it, for `fill_z_host_`.
    """
    pieces = sorted(pieces, key=lambda pc: pc[1])
    flats = [(p.detach().view(-1).numpy(), s) for p, s in pieces]  # share memory with the params
    k = len(seeds)
    span = max(_TILE, _HASH_BLOCKS // k * ELEMENTS_PER_HASH)
    begin, end = pieces[0][1], max(s + p.numel() for p, s in pieces)
    spans = [(g0, min(g0 + span, end)) for g0 in range(begin - begin % ELEMENTS_PER_HASH, end, span)]
    spans = [(g0, g1) for g0, g1 in spans if any(s < g1 and s + x.size > g0 for x, s in flats)]
    workers = max(1, min(torch.get_num_threads(), len(spans)))
    nblocks = span // ELEMENTS_PER_HASH + 1
    free: queue.SimpleQueue[_HostBuffers] = queue.SimpleQueue()
    for w in range(workers):
        free.put(_HostBuffers.scratch(k * nblocks, min(_TILE, end - begin), str(w)))
    keys, tables = philox_keys(seeds), [_signed_rows(c) for c in coefs]

    def run(edges: tuple[int, int]) -> None:
        bufs = free.get()  # one set per worker thread, so never waits
        try:
            _apply_span_host(flats, *edges, keys, tables, bufs, assign)
        finally:
            free.put(bufs)

    if workers == 1:
        for edges in spans:
            run(edges)
    else:  # threads live for this call only: nothing is left running (or forked) in between
        with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="hyphae-zo") as pool:
            list(pool.map(run, spans))
    for p, _ in pieces:
        torch.autograd.graph.increment_version(p)  # numpy wrote behind autograd's back


@torch.no_grad()
def fill_z_host_(out: torch.Tensor, seed: int, offset: int) -> None:
    """out[j] = z(seed, offset + j) for a contiguous fp32 CPU tensor, on the threaded host path.

    `perturb.rademacher_ref` uses it: the same gathers as the update, written instead of added.
    """
    _apply_host_f32([(out, offset)], [seed], [1.0], assign=True)


@dataclasses.dataclass
class _HostBuffers:
    """One worker's scratch for `_apply_span_host`: Philox output and temporaries, gather buffers."""

    words: np.ndarray
    work: list[np.ndarray]
    idx: np.ndarray  # intp [tile / 8]: bytes of the bit stream as gather indices
    rows: np.ndarray  # float32 [tile / 8, 8]: gathered +-coef

    @classmethod
    def scratch(cls, num_words: int, tile: int, tag: str) -> _HostBuffers:
        cpu = torch.device("cpu")
        words, work = hash_buffers(num_words, tag)
        m = tile // 8 + 2
        idx = scratch(f"zo_idx{tag}", m, torch.int64, cpu).numpy().view(np.intp)
        rows = scratch(f"zo_rows{tag}", 8 * m, torch.float32, cpu).numpy().reshape(m, 8)
        return cls(words, work, idx, rows)


def _signed_rows(coef: float) -> np.ndarray:
    """float32 [256, 8]: row v is coef * z for the 8 elements whose bits are byte v.

    coef * (+-1) is exact, so adding a gathered row is the same single IEEE add per element as
    x + coef * z (and as the Triton kernel's x + where(bit, -coef, coef)).
    """
    bits = (np.arange(256)[:, None] >> np.arange(8)) & 1
    return np.where(bits == 1, np.float32(-coef), np.float32(coef)).astype(np.float32)


def _apply_span_host(
    flats: list[tuple[np.ndarray, int]],
    g0: int,
    g1: int,
    keys: list[tuple[np.ndarray, np.ndarray]],
    tables: list[np.ndarray],
    bufs: _HostBuffers,
    assign: bool = False,
) -> None:
    """Hash global elements [g0, g1) for every seed, then add (or assign) coef * z to each tensor."""
    first = g0 // ELEMENTS_PER_HASH
    stream = hash_into(keys, first, -(-g1 // ELEMENTS_PER_HASH) - first, bufs.words, bufs.work)
    for x, s in flats:
        lo, hi = max(s, g0), min(s + x.size, g1)
        while lo < hi:
            top = min(hi, lo - lo % _TILE + _TILE)  # tile edges on multiples of _TILE
            tile = x[lo - s : top - s]
            shift, r0, r1 = (lo - g0) % 8, (lo - g0) // 8, (top - g0 + 7) // 8
            idx, rows = bufs.idx[: r1 - r0], bufs.rows[: r1 - r0]
            for k, table in enumerate(tables):  # seeds in order: one rounding per seed, like K calls
                np.copyto(idx, stream[k, r0:r1])
                np.take(table, idx, axis=0, out=rows, mode="wrap")  # "wrap": unbuffered; idx < 256
                z = rows.reshape(-1)[shift : shift + top - lo]
                if assign:
                    np.copyto(tile, z)
                else:
                    np.add(tile, z, out=tile)
            lo = top


def _apply_ref_device(pieces: list[Piece], seeds: list[int], coefs: list[float], device: torch.device) -> None:
    """Torch reference for other devices and bf16/fp16: hash a span for all seeds, walk it in tiles.

    Every seed's z is expanded and added while the tile is in cache, so main memory sees x
    once per call.
    """
    span = max(_TILE, _HASH_BLOCKS // len(seeds) * ELEMENTS_PER_HASH)  # elements hashed per call
    begin = pieces[0][1]
    end = max(s + p.numel() for p, s in pieces)
    tile = min(_TILE, end - begin)
    bufs = {
        "idx": scratch("zo_idx", tile // 8 + 2, torch.int32, device),
        "z": scratch("zo_z", tile // 8 + 2, torch.int64, device),
        "zf": scratch("zo_zf", tile, torch.float32, device),
    }
    if any(p.dtype != torch.float32 for p, _ in pieces):
        bufs["acc"] = scratch("zo_acc", tile, torch.float32, device)
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
    z is widened to an fp32 scratch tile before the add: a mixed int8 + fp32 add would
    allocate that temporary itself on every call.
    """
    while lo < hi:
        top = min(hi, lo - lo % _TILE + _TILE)  # tile edges on multiples of _TILE
        x = flat[lo - start : top - start]
        n = top - lo
        shift = (lo - g0) % 8
        rows = slice((lo - g0) // 8, (top - g0 + 7) // 8)
        low = x.dtype != torch.float32
        acc = bufs["acc"][:n].copy_(x) if low else x
        zf = bufs["zf"][:n]
        for k, coef in enumerate(coefs):
            zf.copy_(expand_bytes(stream[k, rows], bufs["idx"], bufs["z"])[shift : shift + n])  # int8 +-1, exact
            acc.add_(zf, alpha=coef)  # fp32 x + (+-1) * coef: exact product, one rounding
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
