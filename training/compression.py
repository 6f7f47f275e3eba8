"""Pseudo-gradient compression with error feedback (SparseLoCo), for DiLoCo's and NoLoCo's outer steps.

ALGORITHMS.md §5 (SparseLoCo). A peer never sends its pseudo-gradient Δ itself. It keeps an
fp32 accumulator e (the error feedback, local, never sent) over all its trained tensors laid
end to end, and at each outer step:

    e ← β·e + Δ                         β = `error_decay` (1 = plain error feedback)
    sent = Q(top-k per chunk of e)      `hyphae.kernels.sparse_topk_ef_`: k = density × chunk
    e ← e − sent                        what was not sent waits for the next round

so sent + e is everything accumulated (nothing is lost, only delayed). "topk-int8" sends 8-bit
values, "topk-2bit" 2-bit ones; with chunks of 4096 and density 1 % that is ~130x / ~170x fewer
bytes than fp32.

What comes back from the others is untrusted: `decode` checks names, dtypes and sizes against
the layout this peer derives from its own model (so nothing is allocated from a sender's
numbers), that every offset lies inside its chunk and increases strictly (no entry twice), that
int8 codes stay on the grid and that scales are >= 0 and finite even times the largest code; anything else is a
`CompressedPayloadError` (a ValueError) naming the problem. Decoded values are always finite.

Compressed contributions cannot be summed by a plain all-reduce (every peer keeps different
coordinates), so members all-gather them (`_compressed_gather.gather_sparse`) and each adds them
up in peer-id order in float64: the same rows give every member the same bits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from hyphae.kernels import Sparse, SparseLayout, sparse_topk_ef_, sparse_values
from hyphae.kernels.sparse import MAX_CHUNK

__all__ = [
    "AVERAGES",
    "COMPRESSIONS",
    "CompressedPayloadError",
    "Compressor",
    "check_compression_options",
    "decode",
    "encode",
]

COMPRESSIONS = ("none", "topk-int8", "topk-2bit")
AVERAGES = ("members", "senders")
_BITS = {"topk-int8": 8, "topk-2bit": 2}

Tensors = dict[str, torch.Tensor]


class CompressedPayloadError(ValueError):
    """A peer's compressed contribution does not fit this peer's layout (or holds garbage)."""


def check_compression_options(compression: object, density: object, chunk_size: object,
                              error_decay: object) -> None:
    """Validate the compression options DiLoCo and NoLoCo share.

    Raises:
        ValueError: naming the option, the value and what is allowed.
    """
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {', '.join(COMPRESSIONS)}, got {compression!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or not 1 <= chunk_size <= MAX_CHUNK:
        raise ValueError(f"chunk_size must be an integer in [1, {MAX_CHUNK}] (e.g. 4096), got {chunk_size!r}")
    if isinstance(density, bool) or not isinstance(density, int | float) or not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1] (the share of each chunk sent, e.g. 0.01), got {density!r}")
    if isinstance(error_decay, bool) or not isinstance(error_decay, int | float) or not 0 < error_decay <= 1:
        raise ValueError(f"error_decay must be in (0, 1] (1 = plain error feedback), got {error_decay!r}")


def kept_per_chunk(density: float, chunk_size: int) -> int:
    """k = round(density × chunk), at least 1."""
    return max(1, min(chunk_size, round(density * chunk_size)))


class Compressor:
    """One peer's compressor for a fixed set of tensors: the layout and the error-feedback buffer.

    Args:
        shapes: name -> shape of the tensors compressed together, in the order they are laid
            end to end (every member must use the same names and order: the model's).
        compression: "topk-int8" or "topk-2bit".
        density: share of each chunk sent.
        chunk_size: elements per chunk.
        error_decay: β.
        device: where the buffer lives (the slow weights' device).
    """

    def __init__(self, shapes: Mapping[str, torch.Size], *, compression: str, density: float, chunk_size: int,
                 error_decay: float, device: torch.device | str | None = None) -> None:
        check_compression_options(compression, density, chunk_size, error_decay)
        if compression == "none":
            raise ValueError("Compressor needs a compression other than 'none'")
        self.names = list(shapes)
        self.shapes = {n: torch.Size(s) for n, s in shapes.items()}
        self.sizes = [self.shapes[n].numel() for n in self.names]
        numel = sum(self.sizes)
        self.layout = SparseLayout(numel, chunk_size, kept_per_chunk(density, chunk_size), _BITS[compression]).check()
        self.error_decay = float(error_decay)
        self.error = torch.zeros(numel, dtype=torch.float32, device=device)

    def flatten(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The tensors laid end to end in fp32 on the buffer's device (a fresh tensor)."""
        return torch.cat([tensors[n].detach().reshape(-1).to(self.error.device, torch.float32) for n in self.names])

    def unflatten(self, flat: torch.Tensor) -> Tensors:
        """Views of `flat` shaped like the tensors."""
        return {n: part.view(self.shapes[n]) for n, part in zip(self.names, flat.split(self.sizes))}

    def compress(self, tensors: Mapping[str, torch.Tensor]) -> Sparse:
        """e ← β·e + flat(tensors); send the top-k of e and keep the rest (the module docstring)."""
        flat = self.flatten(tensors)
        if self.error_decay != 1.0:
            self.error.mul_(self.error_decay)
        self.error.add_(flat)
        return sparse_topk_ef_(self.error, self.layout)

    def dense(self, sp: Sparse, *, scale: float = 1.0) -> torch.Tensor:
        """The flat fp32 tensor `sp` stands for (zeros where nothing was sent), times `scale`."""
        out = torch.zeros(self.layout.numel, dtype=torch.float32, device=self.error.device)
        index, values = sparse_values(sp)
        out.index_add_(0, index.to(out.device), values.to(out.device).mul_(scale))
        return out


def encode(sp: Sparse, prefix: str = "") -> Tensors:
    """The tensors that carry `sp` over `Comm.exchange`."""
    return {f"{prefix}indices": sp.indices, f"{prefix}codes": sp.codes, f"{prefix}scales": sp.scales}


def decode(payload: Mapping[str, torch.Tensor], layout: SparseLayout, *, prefix: str = "",
           device: torch.device | str | None = None) -> Sparse:
    """Check a received compressed contribution against `layout` and return it on `device`.

    Args:
        payload: what the peer sent: exactly the three tensors `encode` writes under `prefix`
            (other keys are allowed only outside `prefix`, for a caller that sends more).
        layout: this peer's own layout (from its model and config, never from the payload).

    Raises:
        CompressedPayloadError: missing or extra tensors, a wrong dtype or size, an offset
            outside its chunk or not strictly increasing, an off-grid code, a non-finite or
            negative scale.
    """
    names = {f"{prefix}{k}" for k in ("indices", "codes", "scales")}
    mine = {k for k in payload if k.startswith(prefix)} if prefix else set(payload)
    if mine != names:
        raise CompressedPayloadError(f"expected tensors {sorted(names)}, got {sorted(mine)[:6]}")
    code_dtype = torch.int8 if layout.bits == 8 else torch.uint8
    indices = _tensor(payload, f"{prefix}indices", torch.int16, layout.kept)
    codes = _tensor(payload, f"{prefix}codes", code_dtype, layout.code_numel)
    scales = _tensor(payload, f"{prefix}scales", torch.float32, layout.n_chunks)
    indices, codes, scales = (t.to(device) for t in (indices, codes, scales))
    qmax = 127.0 if layout.bits == 8 else 2.0
    if not bool(torch.isfinite(scales * qmax).all()) or bool((scales < 0).any()):
        raise CompressedPayloadError(f"scales must be finite and >= 0, also times {qmax:g} (the largest code)")
    if layout.bits == 8 and bool((codes == -128).any()):
        raise CompressedPayloadError("int8 code -128 is off the [-127, 127] grid")
    _check_offsets(indices, layout)
    return Sparse(indices, codes, scales, layout)


def _tensor(payload: Mapping[str, torch.Tensor], name: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
    t = payload[name]
    if not isinstance(t, torch.Tensor) or t.dtype != dtype or t.dim() != 1 or t.numel() != numel:
        got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise CompressedPayloadError(f"{name} must be {dtype} of shape ({numel},), got {got}")
    return t.contiguous()


def _check_offsets(indices: torch.Tensor, layout: SparseLayout) -> None:
    """Every offset inside its chunk, strictly increasing within a chunk (so none repeats)."""
    if layout.kept == 0:
        return
    idx = indices.to(torch.int32)
    chunk_of = torch.div(torch.arange(layout.kept, device=idx.device), layout.k, rounding_mode="floor")
    last_len = layout.numel - (layout.n_chunks - 1) * layout.chunk
    limit = torch.where(chunk_of == layout.n_chunks - 1, last_len, layout.chunk)
    if bool((idx < 0).any()) or bool((idx >= limit).any()):
        raise CompressedPayloadError(f"an offset lies outside its chunk of {layout.chunk} (or the last, {last_len})")
    same = chunk_of[1:] == chunk_of[:-1]
    if bool(((idx[1:] <= idx[:-1]) & same).any()):
        raise CompressedPayloadError("offsets within a chunk must increase strictly (an entry was sent twice)")


def sparse_norm(sp: Sparse) -> float:
    """‖sp‖ (the L2 norm of the dense tensor it stands for), accumulated in float64."""
    _, values = sparse_values(sp)
    return float(values.double().pow(2).sum().sqrt())


def accumulate(rows: Sequence[tuple[torch.Tensor, torch.Tensor]], numel: int, *, average: str,
               device: torch.device | str | None = None) -> torch.Tensor:
    """The mean of sparse rows (index, value), added in the given order in float64, rounded once.

    Args:
        rows: (int64 global indices, fp32 values) per member, in peer-id order.
        numel: size of the dense result.
        average: "members" divides every coordinate by the number of rows; "senders" by the
            number of rows that sent that coordinate (SparseLoCo's per-coordinate mean).
    """
    if average not in AVERAGES:
        raise ValueError(f"average must be one of {', '.join(AVERAGES)}, got {average!r}")
    acc = torch.zeros(numel, dtype=torch.float64, device=device)
    for index, values in rows:
        acc.index_add_(0, index.to(acc.device), values.to(acc.device, torch.float64))
    if average == "members":
        return acc.div_(max(len(rows), 1)).to(torch.float32)
    counts = torch.zeros(numel, dtype=torch.float64, device=acc.device)
    for index, _ in rows:
        counts.index_add_(0, index.to(acc.device), torch.ones(index.numel(), dtype=torch.float64, device=acc.device))
    return acc.div_(counts.clamp_(min=1)).to(torch.float32)
