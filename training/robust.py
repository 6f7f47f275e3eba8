"""Robust aggregation of what other peers send: so one bad peer cannot wreck the model.

A received pseudo-gradient (DiLoCo's Δ, NoLoCo's θ − φ) or slow-weight copy (NoLoCo's φ) comes
from a stranger. Three defences, each pure tensor math (no I/O), used by the algorithms through
their config (`robust`, `trim_fraction`, `norm_clip`):

- **Finite check** (always on): a contribution holding NaN or ±Inf is dropped whole — one such
  value would otherwise poison every weight it touches, forever.
- **Norm check** (`norm_clip` = k > 0): a contribution whose L2 norm (over all its tensors)
  exceeds k × a reference is rejected. The reference is the larger of this peer's own norm and
  the running median of the norms it accepted before (`NormGuard`), so neither a peer that
  happens to move little this round nor a slowly growing honest scale trips it, while a vector
  scaled up by an attacker does. DiLoCo's gathered variant clips instead (scales the vector down
  to k × the median of the round's norms), which keeps an honest outlier's direction.
- **Coordinate-wise median / trimmed mean** (`robust` = "median" | "trimmed_mean"): per
  element, the median of the group's values, or the mean after dropping the `t` largest and
  `t` smallest (t = ⌊trim_fraction·n⌋, at least 1 once n ≥ 3). With n honest-majority rows
  an attacker can move each coordinate only within the honest values' range. Needs n ≥ 3 to
  differ from the mean (the median of two numbers is their mean): for NoLoCo's pairs the norm
  check is what protects.

Determinism: rows are taken in the order given (callers pass them sorted by peer id), reduced
in float64 and rounded once to fp32, so every peer holding the same rows gets the same bits.
Cost: the median and trimmed mean stack the n rows of each tensor (n × its size in float64).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Mapping, Sequence

import torch

__all__ = [
    "ROBUST_METHODS",
    "Tensors",
    "is_finite",
    "global_norm",
    "distance",
    "scaled",
    "aggregate",
    "coordinate_median",
    "trimmed_mean",
    "trim_count",
    "NormGuard",
    "check_robust_options",
]

ROBUST_METHODS = ("none", "median", "trimmed_mean")

Tensors = dict[str, torch.Tensor]


def check_robust_options(robust: object, trim_fraction: object, norm_clip: object) -> None:
    """Validate the three config options every robust-capable algorithm shares.

    Raises:
        ValueError: naming the option, the value and what is allowed.
    """
    if robust not in ROBUST_METHODS:
        raise ValueError(f"robust must be one of {', '.join(ROBUST_METHODS)}, got {robust!r}")
    if isinstance(trim_fraction, bool) or not isinstance(trim_fraction, int | float) or not 0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5) (the share dropped at each end), got {trim_fraction!r}")
    if isinstance(norm_clip, bool) or not isinstance(norm_clip, int | float) or not (
            norm_clip == 0 or 1 <= norm_clip < math.inf):
        raise ValueError(f"norm_clip must be 0 (off) or a factor >= 1 (e.g. 3), got {norm_clip!r}")


def is_finite(tensors: Mapping[str, torch.Tensor]) -> bool:
    """True if no tensor holds NaN or ±Inf."""
    return all(bool(torch.isfinite(t).all()) for t in tensors.values())


def global_norm(tensors: Mapping[str, torch.Tensor]) -> float:
    """L2 norm over all tensors together (float64 accumulation)."""
    total = 0.0
    for t in tensors.values():
        total += float(t.detach().double().pow(2).sum())
    return math.sqrt(total)


def distance(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """‖a − b‖ over the tensors of ``a`` (which ``b`` must also hold)."""
    total = 0.0
    for name, t in a.items():
        total += float((t.detach().double() - b[name].detach().to(t.device).double()).pow(2).sum())
    return math.sqrt(total)


def scaled(tensors: Mapping[str, torch.Tensor], factor: float) -> Tensors:
    """New tensors ``factor × tensors`` (fp32)."""
    return {n: t.float() * factor for n, t in tensors.items()}


def trim_count(n: int, trim_fraction: float) -> int:
    """Rows dropped at each end by the trimmed mean of ``n`` rows."""
    if n < 3 or trim_fraction <= 0:
        return 0
    return min((n - 1) // 2, max(1, math.floor(trim_fraction * n)))


def _stack(rows: Sequence[Mapping[str, torch.Tensor]], name: str, device: torch.device) -> torch.Tensor:
    return torch.stack([r[name].to(device, torch.float64) for r in rows])


def coordinate_median(rows: Sequence[Mapping[str, torch.Tensor]]) -> Tensors:
    """Per element, the median over rows (the mean of the two middle values for even n)."""
    if not rows:
        raise ValueError("coordinate_median needs at least one row")
    n = len(rows)
    out: Tensors = {}
    for name, ref in rows[0].items():
        values = _stack(rows, name, ref.device).sort(dim=0).values
        mid = values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2
        out[name] = mid.to(torch.float32)
    return out


def trimmed_mean(rows: Sequence[Mapping[str, torch.Tensor]], trim_fraction: float) -> Tensors:
    """Per element, the mean after dropping the :func:`trim_count` smallest and largest values."""
    if not rows:
        raise ValueError("trimmed_mean needs at least one row")
    n = len(rows)
    t = trim_count(n, trim_fraction)
    out: Tensors = {}
    for name, ref in rows[0].items():
        values = _stack(rows, name, ref.device)
        if t:
            values = values.sort(dim=0).values[t:n - t]
        out[name] = values.sum(dim=0).div_(n - 2 * t).to(torch.float32)
    return out


def _mean(rows: Sequence[Mapping[str, torch.Tensor]]) -> Tensors:
    out: Tensors = {}
    for name, ref in rows[0].items():
        acc = torch.zeros(ref.shape, dtype=torch.float64, device=ref.device)
        for row in rows:
            acc += row[name].to(ref.device, torch.float64)
        out[name] = acc.div_(len(rows)).to(torch.float32)
    return out


def aggregate(rows: Sequence[Mapping[str, torch.Tensor]], method: str, trim_fraction: float = 0.25) -> Tensors:
    """Combine rows by ``method`` ("none" = plain mean, summed in row order in float64).

    Raises:
        ValueError: no rows, or an unknown method.
    """
    if not rows:
        raise ValueError("aggregate needs at least one row")
    if method == "none":
        return _mean(rows)
    if method == "median":
        return coordinate_median(rows)
    if method == "trimmed_mean":
        return trimmed_mean(rows, trim_fraction)
    raise ValueError(f"robust method must be one of {', '.join(ROBUST_METHODS)}, got {method!r}")


class NormGuard:
    """Decides whether a received vector's norm is plausible, learning the honest scale.

    Args:
        factor: k; a norm above k × reference is rejected.
        window: accepted norms remembered for the running median.
    """

    def __init__(self, factor: float, *, window: int = 32) -> None:
        if not factor >= 1:
            raise ValueError(f"factor must be >= 1, got {factor!r}")
        self.factor = factor
        self._accepted: deque[float] = deque(maxlen=window)
        self.rejected = 0

    def reference(self, own_norm: float) -> float:
        """max(own norm, running median of accepted norms)."""
        median = statistics.median(self._accepted) if self._accepted else 0.0
        return max(own_norm, median)

    def check(self, norm: float, own_norm: float) -> bool:
        """True (and remembered) if ``norm`` ≤ k × reference; False (counted) otherwise.

        With no scale known yet (reference 0: nothing accepted, and this peer has not moved)
        only a zero norm passes — nothing honest moves when nobody has trained.
        """
        ok = math.isfinite(norm) and norm <= self.factor * self.reference(own_norm)
        if ok:
            self._accepted.append(norm)
        else:
            self.rejected += 1
        return ok

    def remember(self, norm: float) -> None:
        """Record an honest norm seen elsewhere (e.g. this peer's own) to anchor the median."""
        if math.isfinite(norm):
            self._accepted.append(norm)
