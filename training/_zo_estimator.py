"""MeZO's SPSA estimator: a projected gradient from two forward passes, nothing stored.

Kept apart from the strategy (zo.py) because it is the one piece every ZO variant shares and
the one the quadratic oracle tests on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from hyphae.kernels import zo_apply_

__all__ = ["spsa_gradient"]


@torch.no_grad()
def spsa_gradient(
    params: Sequence[torch.Tensor], loss_fn: Callable[[], float], seed: int, eps: float
) -> tuple[float, float, float]:
    """MeZO's projected gradient along z(seed): two forward passes, nothing stored.

    θ += εz; L+ = loss_fn(); θ −= 2εz; L− = loss_fn(); θ += εz. The last step does not give
    back θ bit for bit (float rounding); callers that need exact weights rebuild them from
    a log.

    Returns:
        (g, L+, L−) with g = (L+ − L−) / (2ε).
    """
    zo_apply_(params, [seed], [eps])
    plus = loss_fn()
    zo_apply_(params, [seed], [-2.0 * eps])
    minus = loss_fn()
    zo_apply_(params, [seed], [eps])
    return (plus - minus) / (2.0 * eps), plus, minus
