"""FedKSeed's finite seed pool: K seeds, their accumulated scalars, importance sampling.

With a pool, perturbation (step, peer, j) does not get its own seed: it draws an index s from
the K pool seeds, so with a constant lr and no decay the weights are

    θ = θ_0 − η Σ_s A_s z(seed_s),   A_s = Σ over updates that drew s of ĝ / √N_t,

and K accumulated scalars A (not the whole log) rebuild the model: a joiner fetches θ_0 and A.

The index is derived, not sent: u = (derive_seed(run, step, peer, j) >> 11) / 2^53 is a
uniform draw in [0, 1), and s = the first index whose cumulative probability exceeds u. The
probabilities are frozen at every snapshot boundary from the canonical statistics, so every
peer draws the same s for the same (step, peer, j):

    uniform:     p_s = 1 / K
    importance:  imp_s = mean |clip(history_s, ±clip)|  (0 for a seed never drawn),
                 p = softmax(minmax(imp))                 (FedKSeed's probability-
                                                           differentiated sampling)

All arithmetic here is float64 on the host in canonical order, so A and the statistics are
the same on every peer that saw the same log.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np
import torch

from hyphae.kernels import derive_seed
from hyphae.training._zo_codec import decode_byte
from hyphae.training._zo_log import Entry, by_step

__all__ = ["POOL_PEER", "SeedPool"]

POOL_PEER = "hyphae/fedkseed-pool"
"""The peer-id slot of `derive_seed` used to name the pool seeds (no real peer id has a '/')."""


class SeedPool:
    """The pool and its canonical accumulators.

    Args:
        run_id: the run (seeds are derived from it).
        size: K, seeds in the pool.
        sampling: "importance" (FedKSeed) or "uniform".
        clip: |ĝ| clip of the importance statistics.
    """

    def __init__(self, run_id: str, size: int, *, sampling: str, clip: float) -> None:
        if size < 1:
            raise ValueError(f"pool size must be >= 1, got {size}")
        if sampling not in ("importance", "uniform"):
            raise ValueError(f"sampling must be 'importance' or 'uniform', got {sampling!r}")
        self.run_id, self.size, self.sampling, self.clip = run_id, size, sampling, clip
        self.seeds = [derive_seed(run_id, 0, POOL_PEER, i) for i in range(size)]
        self.accum = np.zeros(size, dtype=np.float64)
        self.abs_sum = np.zeros(size, dtype=np.float64)
        self.count = np.zeros(size, dtype=np.int64)
        self.cdf = np.empty(size, dtype=np.float64)
        self.refresh()

    def probabilities(self) -> np.ndarray:
        """The sampling distribution the current statistics give (not yet frozen)."""
        if self.sampling == "uniform":
            return np.full(self.size, 1.0 / self.size)
        imp = np.divide(self.abs_sum, self.count, out=np.zeros(self.size), where=self.count > 0)
        lo, hi = imp.min(), imp.max()
        norm = (imp - lo) / (hi - lo) if hi > lo else np.zeros(self.size)
        w = np.exp(norm - norm.max())
        return w / w.sum()

    def refresh(self) -> None:
        """Freeze the sampling distribution for the next interval (call at a boundary)."""
        cdf = np.cumsum(self.probabilities())
        cdf[-1] = 1.0
        self.cdf = cdf

    def index(self, step: int, peer: str, j: int) -> int:
        """The pool index perturbation (step, peer, j) draws."""
        u = (derive_seed(self.run_id, step, peer, j) >> 11) * 2.0**-53
        return min(int(np.searchsorted(self.cdf, u, side="right")), self.size - 1)

    def seed_of(self, step: int, peer: str, j: int) -> int:
        """The seed perturbation (step, peer, j) uses."""
        return self.seeds[self.index(step, peer, j)]

    def accumulate(self, entries: Iterable[Entry]) -> int:
        """Add the entries' scalars to A and the statistics, in canonical order; returns updates."""
        n = 0
        for group in by_step(entries):
            scale = 1.0 / math.sqrt(len(group))
            for e in group:
                for j, b in enumerate(e.data):
                    g = decode_byte(b)
                    s = self.index(e.step, e.peer, j)
                    self.accum[s] += g * scale
                    self.abs_sum[s] += min(abs(g), self.clip)
                    self.count[s] += 1
                    n += 1
        return n

    def rebuild_coefficients(self, lr: float) -> tuple[list[int], list[float]]:
        """Seeds and coefficients −η·A_s, index order, of every seed with A_s ≠ 0."""
        nz = np.flatnonzero(self.accum)
        return [self.seeds[i] for i in nz], [-lr * float(self.accum[i]) for i in nz]

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """A and the statistics as tensors (the pool blob a joiner fetches)."""
        return {
            "accum": torch.from_numpy(self.accum.copy()),
            "abs_sum": torch.from_numpy(self.abs_sum.copy()),
            "count": torch.from_numpy(self.count.copy()),
        }

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Restore `state_tensors()` and re-freeze the distribution from it.

        Raises:
            ValueError: the tensors do not describe a pool of this size.
        """
        for name in ("accum", "abs_sum", "count"):
            if name not in tensors or tuple(tensors[name].shape) != (self.size,):
                raise ValueError(f"pool state needs {name!r} of shape ({self.size},); wrong pool_size?")
        self.accum = tensors["accum"].double().numpy().copy()
        self.abs_sum = tensors["abs_sum"].double().numpy().copy()
        self.count = tensors["count"].long().numpy().copy()
        self.refresh()
