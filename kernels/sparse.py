"""Chunked top-k with quantized values and error feedback: SparseLoCo's compressor.

A flat fp32 buffer e (an error-feedback accumulator) is cut into chunks of `chunk` consecutive
elements (the last chunk may be shorter, length L). Chunk c keeps k_c = min(k, L_c) entries:
those of largest |e|, ties to the lower index, so the choice is a pure function of the values.
They travel as

    indices  int16 [K]            offset within the chunk, strictly increasing within a chunk
    codes    int8 [K]  (bits 8)   q = clamp(rne(v / s), -127, 127),  s = absmax_c / 127
             uint8 [ceil(K / 4)] (bits 2)   q = sign(v) * clamp(rne(|v| / s), 1, 2),  s = absmax_c / 2
    scales   fp32 [n_chunks]      s per chunk (absmax_c is the chunk's largest |e|: always selected)

with K = Σ k_c, chunk c's entries at [c*k, c*k + k_c). A 2-bit code is q + 2 for q < 0 and
q + 1 for q > 0 (0..3 stands for -2, -1, +1, +2), four per byte, entry 4m + j in bits 2j..2j+1
of byte m, padding 0. The selected entries of e are left holding e - q*s (a rounded product,
then a rounded difference): what was not sent stays in the buffer for the next round, so over
rounds sent + residual = everything accumulated.

Bytes: 3 per kept entry at 8 bits (2 index + 1 code), 2.25 at 2 bits, + 4 per chunk; density
k / chunk = 1 % is ~130x (8 bits) or ~170x (2 bits) fewer than fp32.

The torch reference (a stable sort per chunk) and the Triton kernel (the k-th largest |e| found
by bisection on its float bits, then a prefix sum places the kept entries in index order) give
the same indices, codes, scales and residuals: IEEE division, round-half-even, no fused
multiply-add (see `_sparse_tl.py`). Inputs must be finite (the caller checks: a NaN has no rank).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from hyphae.kernels import _triton
from hyphae.kernels._common import scratch

__all__ = [
    "MAX_CHUNK",
    "Sparse",
    "SparseLayout",
    "sparse_topk_ef_",
    "sparse_topk_ef_ref_",
    "sparse_topk_ef_triton_",
    "sparse_values",
]

MAX_CHUNK = 1 << 15  # offsets fit int16
_QMAX = {8: 127, 2: 2}
_LUT2 = (-2.0, -1.0, 1.0, 2.0)
_ROWS_PER_PASS = 512  # reference: chunks sorted per pass (temporaries ~ 512 * chunk * 12 bytes)


class SparseLayout(NamedTuple):
    """Sizes of one compressed buffer; both ends derive it from the model, never from the wire.

    Attributes:
        numel: elements of the flat buffer.
        chunk: elements per chunk (1..32768).
        k: entries kept per full chunk (1..chunk).
        bits: 8 or 2.
    """

    numel: int
    chunk: int
    k: int
    bits: int

    @property
    def n_chunks(self) -> int:
        return -(-self.numel // self.chunk)

    @property
    def kept(self) -> int:
        """K: entries kept over all chunks."""
        if self.numel == 0:
            return 0
        last = self.numel - (self.n_chunks - 1) * self.chunk
        return (self.n_chunks - 1) * self.k + min(self.k, last)

    @property
    def code_numel(self) -> int:
        return self.kept if self.bits == 8 else -(-self.kept // 4)

    def payload_bytes(self) -> int:
        """Bytes on the wire: indices + codes + scales."""
        return 2 * self.kept + self.code_numel + 4 * self.n_chunks

    def check(self) -> SparseLayout:
        """Raise ValueError naming the bad field; return self."""
        for name in ("numel", "chunk", "k", "bits"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{name} must be an int, got {v!r}")
        if self.numel < 0:
            raise ValueError(f"numel must be >= 0, got {self.numel}")
        if not 1 <= self.chunk <= MAX_CHUNK:
            raise ValueError(f"chunk must be in [1, {MAX_CHUNK}] (int16 offsets), got {self.chunk}")
        if not 1 <= self.k <= self.chunk:
            raise ValueError(f"k must be in [1, chunk={self.chunk}], got {self.k}")
        if self.bits not in _QMAX:
            raise ValueError(f"bits must be 8 or 2, got {self.bits}")
        return self


class Sparse(NamedTuple):
    """One compressed buffer: what `sparse_topk_ef_` sends (see the module docstring)."""

    indices: torch.Tensor
    codes: torch.Tensor
    scales: torch.Tensor
    layout: SparseLayout


def sparse_topk_ef_(buf: torch.Tensor, layout: SparseLayout) -> Sparse:
    """Select, quantize and send the top-k of each chunk of `buf`; leave the residual in `buf`.

    Args:
        buf: flat contiguous fp32 tensor of `layout.numel` finite values, updated in place.
        layout: chunk, k and bits.

    Raises:
        TypeError: buf is not a float32 tensor.
        ValueError: buf is not flat and contiguous, or does not match the layout.
    """
    _check_buf(buf, layout)
    impl = _topk_triton if _triton.use_triton(buf) else _topk_ref
    return impl(buf, layout)


def sparse_topk_ef_ref_(buf: torch.Tensor, layout: SparseLayout) -> Sparse:
    """`sparse_topk_ef_` on the torch reference path."""
    _check_buf(buf, layout)
    return _topk_ref(buf, layout)


def sparse_topk_ef_triton_(buf: torch.Tensor, layout: SparseLayout) -> Sparse:
    """`sparse_topk_ef_` on the Triton path (CUDA, or CPU under TRITON_INTERPRET=1)."""
    _check_buf(buf, layout)
    return _topk_triton(buf, layout)


def sparse_values(sp: Sparse) -> tuple[torch.Tensor, torch.Tensor]:
    """(global int64 indices [K], fp32 values [K]) that `sp` stands for.

    The fields must already match `sp.layout` (training/compression.py checks what comes off the
    wire before calling this); values are code * scale, one fp32 product each.
    """
    lay = sp.layout
    offsets, chunk_of = _chunk_offsets(lay, sp.indices.device)
    index = sp.indices.to(torch.int64) + offsets
    if lay.bits == 8:
        q = sp.codes.to(torch.float32)
    else:
        q = _unpack2(sp.codes, lay.kept)
    return index, q.mul_(sp.scales[chunk_of])


# --- checks and layout helpers ---------------------------------------------------------------


def _check_buf(buf: torch.Tensor, layout: SparseLayout) -> None:
    layout.check()
    if not isinstance(buf, torch.Tensor) or buf.dtype != torch.float32:
        raise TypeError(f"buf must be a float32 tensor, got {getattr(buf, 'dtype', type(buf).__name__)}")
    if buf.dim() != 1 or not buf.is_contiguous() or buf.numel() != layout.numel:
        raise ValueError(
            f"buf must be flat and contiguous with {layout.numel} elements, got shape {tuple(buf.shape)} "
            f"(contiguous={buf.is_contiguous()}); pass buf.view(-1) of a contiguous buffer"
        )


def _chunk_offsets(lay: SparseLayout, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per kept entry: the global start of its chunk, and its chunk's number."""
    pos = torch.arange(lay.kept, device=device)
    chunk_of = torch.div(pos, lay.k, rounding_mode="floor")
    return chunk_of * lay.chunk, chunk_of


def _pack2(u: torch.Tensor, out: torch.Tensor) -> None:
    """Codes 0..3 (uint8 [K]) -> bytes, four per byte, entry 4m + j at bits 2j; padding 0."""
    k = u.numel()
    padded = torch.zeros(4 * out.numel(), dtype=torch.uint8, device=u.device)
    padded[:k] = u
    p = padded.view(-1, 4)
    torch.bitwise_or(p[:, 0] | (p[:, 1] << 2), (p[:, 2] << 4) | (p[:, 3] << 6), out=out)


def _unpack2(codes: torch.Tensor, kept: int) -> torch.Tensor:
    """Bytes -> q in {-2, -1, 1, 2} as fp32 [kept]."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=codes.device)
    u = torch.bitwise_and(torch.bitwise_right_shift(codes[:, None], shifts), 3).view(-1)[:kept]
    lut = torch.tensor(_LUT2, dtype=torch.float32, device=codes.device)
    return lut[u.to(torch.int64)]


def _codes_from_q(q: torch.Tensor, bits: int) -> torch.Tensor:
    """fp32 q -> what is stored per entry before packing: int8 q, or the 2-bit code 0..3."""
    if bits == 8:
        return q.to(torch.int8)
    return torch.where(q < 0, q + 2, q + 1).to(torch.uint8)


# --- torch reference ------------------------------------------------------------------------


@torch.no_grad()
def _topk_ref(buf: torch.Tensor, lay: SparseLayout) -> Sparse:
    dev, n, kept = buf.device, lay.numel, lay.kept
    indices = torch.empty(kept, dtype=torch.int16, device=dev)
    q_all = torch.empty(kept, dtype=torch.float32, device=dev)
    scales = torch.empty(lay.n_chunks, dtype=torch.float32, device=dev)
    n_full = n // lay.chunk
    for lo in range(0, n_full, _ROWS_PER_PASS):
        hi = min(lo + _ROWS_PER_PASS, n_full)
        rows = buf[lo * lay.chunk : hi * lay.chunk].view(hi - lo, lay.chunk)
        _select_rows(rows, lay, indices[lo * lay.k : hi * lay.k], q_all[lo * lay.k : hi * lay.k],
                     scales[lo:hi])
    if n_full * lay.chunk < n:  # the short last chunk
        tail = buf[n_full * lay.chunk :].view(1, -1)
        _select_rows(tail, lay._replace(k=min(lay.k, tail.numel())), indices[n_full * lay.k :],
                     q_all[n_full * lay.k :], scales[n_full:])
    codes = torch.empty(lay.code_numel, dtype=torch.int8 if lay.bits == 8 else torch.uint8, device=dev)
    if lay.bits == 8:
        codes.copy_(q_all)
    else:
        _pack2(_codes_from_q(q_all, 2), codes)
    return Sparse(indices, codes, scales, lay)


def _select_rows(rows: torch.Tensor, lay: SparseLayout, indices: torch.Tensor, q_out: torch.Tensor,
                 scales: torch.Tensor) -> None:
    """Top-k of each row (stable: ties to the lower index), quantized; residual written back."""
    k, qmax = lay.k, _QMAX[lay.bits]
    mag = torch.abs(rows, out=scratch("sparse_abs", rows.numel(), torch.float32, rows.device).view(rows.shape))
    order = torch.sort(mag, dim=1, descending=True, stable=True).indices[:, :k]
    idx = order.sort(dim=1).values
    values = rows.gather(1, idx)
    scale = mag.amax(dim=1).div_(qmax)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)[:, None]
    if lay.bits == 8:
        q = torch.div(values, safe).round_().clamp_(-qmax, qmax)
    else:
        q = torch.div(values.abs(), safe).round_().clamp_(1, 2)
        q = torch.where(values < 0, -q, q)
    rows.scatter_(1, idx, values - q * scale[:, None])
    indices.copy_(idx.view(-1))
    q_out.copy_(q.view(-1))
    scales.copy_(scale)


# --- Triton ---------------------------------------------------------------------------------


def _p2(v: int) -> int:
    return 1 << max(0, v - 1).bit_length()


@torch.no_grad()
def _topk_triton(buf: torch.Tensor, lay: SparseLayout) -> Sparse:
    mod = _triton.module("sparse")
    dev, kept = buf.device, lay.kept
    indices = torch.empty(kept, dtype=torch.int16, device=dev)
    raw = torch.empty(kept, dtype=torch.int8 if lay.bits == 8 else torch.uint8, device=dev)
    scales = torch.empty(lay.n_chunks, dtype=torch.float32, device=dev)
    if lay.numel:
        mod.topk_ef_kernel[(lay.n_chunks,)](
            buf, indices, raw, scales, lay.numel,
            CHUNK=lay.chunk, CP=_p2(lay.chunk), K=lay.k, BITS=lay.bits, enable_fp_fusion=False,
        )
    if lay.bits == 8:
        return Sparse(indices, raw, scales, lay)
    codes = torch.empty(lay.code_numel, dtype=torch.uint8, device=dev)
    _pack2(raw, codes)
    return Sparse(indices, codes, scales, lay)
