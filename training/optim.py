"""The local optimizer every algorithm shares: AdamW with clipping and a warm-up/cosine schedule.

Defaults follow ALGORITHMS.md §1 (SPES local training): betas (0.9, 0.95), eps 1e-8, weight
decay 0.1 on matrices and embeddings (not on norms and biases, nanoGPT's rule), gradient clip
1.0, linear warm-up then cosine decay to `min_lr_ratio * lr`. NoLoCo's inner Adam is the same
optimizer with `weight_decay=0`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hyphae.training._config import check_int, check_positive, check_range, from_dict, to_dict


@dataclass(frozen=True, kw_only=True, slots=True)
class AdamWConfig:
    """AdamW hyper-parameters and the learning-rate schedule."""

    lr: float = 1e-3
    """Peak learning rate."""

    betas: tuple[float, float] = (0.9, 0.95)
    """Adam's (beta1, beta2)."""

    eps: float = 1e-8
    """Adam's epsilon."""

    weight_decay: float = 0.1
    """Decoupled weight decay on tensors with >= 2 dims (norm weights and biases get none)."""

    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""

    warmup_steps: int = 100
    """Linear warm-up from lr / warmup_steps to lr over this many steps; 0 starts at lr."""

    decay_steps: int | None = None
    """Cosine decay from lr to min_lr_ratio * lr, ending at this step; None keeps lr constant
    after the warm-up."""

    min_lr_ratio: float = 0.1
    """Floor of the cosine schedule as a fraction of lr."""

    def __post_init__(self) -> None:
        check_positive("lr", self.lr)
        if len(self.betas) != 2:
            raise ValueError(f"betas must be two numbers (beta1, beta2), got {self.betas!r}")
        for i, b in enumerate(self.betas):
            check_range(f"betas[{i}]", b, 0.0, 0.999999)
        check_positive("eps", self.eps)
        check_positive("weight_decay", self.weight_decay, allow_zero=True)
        check_positive("grad_clip", self.grad_clip, allow_zero=True)
        check_int("warmup_steps", self.warmup_steps, minimum=0)
        if self.decay_steps is not None:
            check_int("decay_steps", self.decay_steps, minimum=1)
            if self.decay_steps <= self.warmup_steps:
                raise ValueError(
                    f"decay_steps ({self.decay_steps}) must exceed warmup_steps "
                    f"({self.warmup_steps}); raise decay_steps or use None for a constant lr"
                )
        check_range("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)

    def lr_at(self, step: int) -> float:
        """Learning rate for optimizer step `step` (0-based)."""
        if self.warmup_steps and step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.decay_steps is None:
            return self.lr
        if step >= self.decay_steps:
            return self.lr * self.min_lr_ratio
        progress = (step - self.warmup_steps) / (self.decay_steps - self.warmup_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.lr * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AdamWConfig:
        return from_dict(cls, data)


def param_groups(
    named: Iterable[tuple[str, nn.Parameter]], weight_decay: float
) -> list[dict[str, Any]]:
    """Split trainable parameters into a decayed group (>= 2 dims) and a non-decayed one."""
    decay, no_decay = [], []
    for _, p in named:
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_adamw(named: Iterable[tuple[str, nn.Parameter]], config: AdamWConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of `named` (frozen ones get no optimizer state).

    Uses the fused CUDA kernel when every parameter is on CUDA; the plain for-each
    implementation otherwise (it is bit-stable on CPU, which the equivalence tests rely on).
    """
    groups = param_groups(named, config.weight_decay)
    params = [p for g in groups for p in g["params"]]
    if not params:
        raise ValueError("no trainable parameters to optimise; unfreeze some or check the model")
    fused = all(p.is_cuda for p in params)
    return torch.optim.AdamW(
        groups, lr=config.lr, betas=config.betas, eps=config.eps, fused=fused or None
    )


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's learning rate (the schedule is applied by the strategy each step)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def clip_grad_norm(params: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor | None:
    """Clip the global gradient norm in place.

    Returns:
        The norm before clipping as a 0-dim tensor (not a float: reading it would force a
        device sync every step), or None when clipping is off or there are no gradients.
    """
    if max_norm <= 0:
        return None
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return None
    return torch.nn.utils.clip_grad_norm_(grads, max_norm)
