"""DDP: all-reduce the gradients every step, then the local AdamW step (ALGORITHMS.md §5).

The quality ceiling and the bandwidth floor every low-communication method is measured
against. With N peers and equal batches, the mean of the per-peer mean gradients equals the
gradient of the union batch, so N peers train exactly like one process on N times the batch
(up to float rounding) — the test oracle.

Gradients of parameters that got none this step (an MoE expert no token chose) are sent as
zeros so every peer contributes the same tensor layout; AdamW then updates those parameters on
a zero gradient (momentum and decay), as it would in a single process with zeroed gradients.
If the all-reduce fails (this peer could not reach the group), the peer steps on its own
gradient and logs a warning: replicas drift apart until the next full round.

Safe by default (`training/_robust_gather.py`, `reduce_verified`): a step whose all-reduced
gradient holds NaN/Inf is redone as a checked gather — every member swaps its gradient with
every other, a non-finite one is refused (its sender reported to the node) and any whose norm
exceeds `norm_clip` (3) × the members' median is scaled down to that. Honest steps cost nothing
extra. `robust` = "median" / "trimmed_mean" gathers (and clips) every step, N − 1 transfers per
peer instead of ~2; `norm_clip = 0` with `robust = "none"` only skips a poisoned step.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from hyphae.training import robust
from hyphae.training._config import check_positive, from_dict, to_dict
from hyphae.training._robust_gather import checks_on, reduce_verified, remember_refused, result_is_finite
from hyphae.training.comm import Comm, CommClosed, CommError
from hyphae.training.model import GPT
from hyphae.training.optim import AdamWConfig, build_adamw
from hyphae.training.strategy import Metrics, Precision, Strategy

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class DDPConfig:
    """Settings of the DDP baseline."""

    optimizer: AdamWConfig = field(default_factory=AdamWConfig)
    """The local AdamW applied to the averaged gradient."""

    timeout_s: float = 60.0
    """How long a gradient all-reduce waits for stragglers before finishing without them."""

    robust: str = "none"
    """How the checked gather combines gradients: "none" (mean), "median" or "trimmed_mean"."""

    trim_fraction: float = 0.25
    """With robust = "trimmed_mean": share of the members dropped at each end, per coordinate."""

    norm_clip: float = 3.0
    """k >= 1: in a checked gather, scale a gradient whose norm exceeds k × the members' median
    down to that. 0 (with robust = "none") = the plain all-reduce, a poisoned step only skipped."""

    def __post_init__(self) -> None:
        if not isinstance(self.optimizer, AdamWConfig):
            raise ValueError(f"optimizer must be an AdamWConfig, got {type(self.optimizer).__name__}")
        check_positive("timeout_s", self.timeout_s)
        robust.check_robust_options(self.robust, self.trim_fraction, self.norm_clip)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DDPConfig:
        return from_dict(cls, data)


class DDP(Strategy):
    """Synchronous data parallelism over a `Comm`.

    Args:
        model: this peer's replica.
        comm: this peer's Comm.
        config: DDP settings.
        precision: compute precision (see strategy.Precision).
    """

    algorithm = "ddp"

    def __init__(
        self, model: GPT, comm: Comm, config: DDPConfig | None = None, *, precision: Precision = "auto"
    ) -> None:
        super().__init__(model, comm, precision=precision)
        self.config = config or DDPConfig()
        self._params = list(self.trainable_parameters())
        self.optimizer = build_adamw(self._params, self.config.optimizer)
        self.failed_rounds = 0
        self.rejected_updates = 0
        self.rejected_peers: list[str] = []

    async def step(self, step: int) -> Metrics:
        grads = {}
        for name, p in self._params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads[name] = p.grad
        peers = await self._average(grads, step)
        metrics = self.local_update(self.optimizer, self.config.optimizer, step)
        metrics["peers"] = peers
        return metrics

    async def _average(self, grads: dict[str, torch.Tensor], step: int) -> int:
        """Replace the gradients by their mean over the group; returns how many contributed."""
        cfg, tag = self.config, f"ddp/{step}"
        try:
            group = await self.comm.members()
            if group == [self.comm.peer_id]:
                return 1  # alone in the run: the mean is our own gradient, nothing to send
            if checks_on(cfg.robust, cfg.norm_clip):
                gathered = await reduce_verified(self.comm, grads, group=group, tag=tag, timeout_s=cfg.timeout_s,
                                                method=cfg.robust, trim_fraction=cfg.trim_fraction,
                                                norm_clip=cfg.norm_clip)
                self.rejected_updates += len(gathered.refused)
                self.rejected_peers = remember_refused(self.rejected_peers, gathered.refused)
                mean, included = gathered.tensors, gathered.included
            else:
                result = await self.comm.all_reduce(grads, group=group, tag=tag, timeout_s=cfg.timeout_s)
                ok = result_is_finite(result.tensors, tag)
                mean, included = (result.tensors if ok else None), (result.included if ok else ())
        except CommClosed:
            raise
        except (CommError, TimeoutError) as exc:
            self.failed_rounds += 1
            logger.warning("ddp step %d: all-reduce failed (%s); stepping on the local gradient", step, exc)
            return 1
        with torch.no_grad():
            if mean is None:  # a poisoned round, or nothing passed: our own gradient, if it is sane
                self.failed_rounds += 1
                if not robust.is_finite(grads):
                    for grad in grads.values():
                        grad.zero_()
                return 1
            for name, grad in grads.items():
                grad.copy_(mean[name])
        return len(included)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "failed_rounds": self.failed_rounds}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.failed_rounds = int(state["failed_rounds"])
