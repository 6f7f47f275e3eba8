"""DiLoCo: H local AdamW steps, then one outer Nesterov step on the averaged pseudo-gradient.

ALGORITHMS.md §5. Each peer keeps the slow weights φ (identical on every peer) beside its fast
weights θ (the model). Every `inner_steps` (H) steps:

    Δ = mean_r(φ − θ_r)             all-reduce over the live members
    φ ← OuterSGD(φ, grad = Δ)       torch.optim.SGD(lr 0.7, momentum 0.9, nesterov=True)
    θ_r ← φ                         every replica restarts from the same φ

Inner AdamW state is kept across outer steps (as in the paper). Every peer that receives the
round's result (members that came late included) applies the same Δ to the same φ with the
same outer momentum, so the replicas are bit-identical after every outer step. A peer that
cannot reach the group at all falls back to its own Δ (a local outer step) and logs a warning.

Oracle: N = 1, outer lr 1, momentum 0 ⇒ φ − (φ − θ) = θ: plain AdamW, step for step (up to
the rounding of that subtraction). torch's SGD refuses nesterov with momentum 0, so Nesterov
is only switched on when momentum > 0.

Safe by default (`training/_robust_gather.py`): instead of the all-reduce, every peer swaps Δ
with every other member (an all-gather by `comm.exchange`, N − 1 model-sized transfers each way
per peer instead of ~2 for a ring), refuses non-finite contributions (and tells its node, which
lowers the sender's score), clips each Δ to `norm_clip` (3) × the round's median norm, and
combines by the mean, or the coordinate-wise median / trimmed mean (`robust`). Peers that
gathered the same set get the same bits; a peer that missed someone (or was told different
things by a liar) ends the round slightly apart, which the next rounds absorb as in NoLoCo.
`norm_clip = 0` with `robust = "none"` is the plain all-reduce (large groups, trusted peers):
then a round whose mean is non-finite is skipped (a local outer step), but nobody is refused.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from hyphae.training import robust
from hyphae.training._config import check_choice, check_int, check_positive, check_range, from_dict, to_dict
from hyphae.training._join import JoinDesk, check_outer_state, layout_of
from hyphae.training._robust_gather import checks_on, gather_checked, remember_refused, result_is_finite
from hyphae.training.comm import Comm, CommClosed, CommError
from hyphae.training.model import GPT
from hyphae.training.optim import AdamWConfig, build_adamw
from hyphae.training.strategy import Metrics, Precision, Strategy

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class DiLoCoConfig:
    """Settings of DiLoCo (defaults from the paper)."""

    inner: AdamWConfig = field(default_factory=AdamWConfig)
    """The local (inner) AdamW."""

    inner_steps: int = 500
    """H: local steps between two outer steps."""

    outer_lr: float = 0.7
    """Learning rate of the outer SGD."""

    outer_momentum: float = 0.9
    """Momentum of the outer SGD (0 disables momentum and Nesterov)."""

    nesterov: bool = True
    """Nesterov momentum for the outer SGD (only when outer_momentum > 0)."""

    timeout_s: float = 300.0
    """How long an outer all-reduce waits for stragglers before finishing without them."""

    robust: str = "none"
    """How the checked gather combines the Δs: "none" (mean), "median" or "trimmed_mean",
    coordinate-wise (training/robust.py)."""

    trim_fraction: float = 0.25
    """With robust = "trimmed_mean": share of the members dropped at each end, per coordinate."""

    norm_clip: float = 3.0
    """k >= 1: scale any Δ whose norm exceeds k × the round's median norm down to that. 0 (with
    robust = "none") = the unchecked all-reduce."""

    outer_state_device: str = "same"
    """Where φ and the outer momentum live: "same" (the model's device) or "cpu" — two fp32
    copies of the model off the GPU, so a 24 GB card fits a 1B model's DiLoCo (the outer step
    then moves θ to the CPU and φ back once per H steps)."""

    def __post_init__(self) -> None:
        if not isinstance(self.inner, AdamWConfig):
            raise ValueError(f"inner must be an AdamWConfig, got {type(self.inner).__name__}")
        check_int("inner_steps", self.inner_steps, minimum=1)
        check_positive("outer_lr", self.outer_lr)
        check_range("outer_momentum", self.outer_momentum, 0.0, 0.999999)
        check_positive("timeout_s", self.timeout_s)
        robust.check_robust_options(self.robust, self.trim_fraction, self.norm_clip)
        check_choice("outer_state_device", self.outer_state_device, ("same", "cpu"))

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DiLoCoConfig:
        return from_dict(cls, data)


class DiLoCo(Strategy):
    """DiLoCo on one peer.

    Args:
        model: this peer's replica; its current weights become φ.
        comm: this peer's Comm.
        config: DiLoCo settings.
        precision: compute precision (see strategy.Precision).
    """

    algorithm = "diloco"

    def __init__(
        self,
        model: GPT,
        comm: Comm,
        config: DiLoCoConfig | None = None,
        *,
        precision: Precision = "auto",
    ) -> None:
        super().__init__(model, comm, precision=precision)
        self.config = config or DiLoCoConfig()
        self._params = list(self.trainable_parameters())
        self.inner = build_adamw(self._params, self.config.inner)
        # φ lives beside θ (or on the CPU), in fp32, as plain leaf tensors for the outer SGD.
        where = "cpu" if self.config.outer_state_device == "cpu" else None
        self.slow = {n: p.detach().to(where, torch.float32, copy=True) for n, p in self._params}
        momentum = self.config.outer_momentum
        self.outer = torch.optim.SGD(
            list(self.slow.values()),
            lr=self.config.outer_lr,
            momentum=momentum,
            nesterov=self.config.nesterov and momentum > 0,
        )
        self.outer_steps = 0
        self.failed_rounds = 0
        self.rejected_updates = 0
        self.rejected_peers: list[str] = []
        self.joins = JoinDesk(comm, self, layout=layout_of(self._params))

    async def step(self, step: int) -> Metrics:
        outer_before = self.outer_steps
        metrics = self.local_update(self.inner, self.config.inner, step)
        if (step + 1) % self.config.inner_steps == 0:
            metrics["peers"] = await self._outer_step()
            metrics["outer_step"] = self.outer_steps
        if self.outer_steps != outer_before:  # φ took its outer step: a joiner may start from it
            await self.joins.boundary(self.outer_steps)
        return metrics

    async def _outer_step(self) -> int:
        """Average the pseudo-gradients, step φ, reset θ to φ; returns how many contributed."""
        with torch.no_grad():
            delta = {n: self.slow[n] - p.detach().to(self.slow[n].device, torch.float32) for n, p in self._params}
        peers = await self._average(delta)
        with torch.no_grad():
            for name, slow in self.slow.items():
                slow.grad = delta[name]
            self.outer.step()
            self.outer.zero_grad(set_to_none=True)
            for name, p in self._params:
                p.copy_(self.slow[name])
        self.outer_steps += 1
        return peers

    async def _average(self, delta: dict[str, torch.Tensor]) -> int:
        tag = f"diloco/{self.outer_steps}"
        cfg = self.config
        try:
            group = await self.comm.members()
            if checks_on(cfg.robust, cfg.norm_clip):
                gathered = await gather_checked(self.comm, delta, group=group, tag=tag, timeout_s=cfg.timeout_s,
                                                method=cfg.robust, trim_fraction=cfg.trim_fraction,
                                                norm_clip=cfg.norm_clip)
                self.rejected_updates += len(gathered.refused)
                self.rejected_peers = remember_refused(self.rejected_peers, gathered.refused)
                for t in delta.values():  # nothing passed (our own Δ was non-finite too): φ stays
                    t.zero_()
                if gathered.tensors is not None:
                    delta.update(gathered.tensors)
                return len(gathered.included)
            result = await self.comm.all_reduce(delta, group=group, tag=tag, timeout_s=cfg.timeout_s)
        except CommClosed:
            raise
        except (CommError, TimeoutError) as exc:
            self.failed_rounds += 1
            logger.warning("diloco outer step %d: all-reduce failed (%s); local outer step", self.outer_steps, exc)
            return 1
        if not result_is_finite(result.tensors, tag):  # a local outer step on our own Δ, if it is sane
            self.failed_rounds += 1
            if not robust.is_finite(delta):
                for t in delta.values():
                    t.zero_()
            return 1
        delta.update(result.tensors)
        return len(result.included)

    def state_dict(self) -> dict[str, Any]:
        return {
            "inner": self.inner.state_dict(),
            "outer": self.outer.state_dict(),
            "slow": {n: t.clone() for n, t in self.slow.items()},
            "outer_steps": self.outer_steps,
            "failed_rounds": self.failed_rounds,
        }

    def join_at(self, step: int) -> None:
        """Outer rounds are tagged by their index: a joiner at ``step`` is at round step // H."""
        self.outer_steps = step // self.config.inner_steps

    async def catch_up(self) -> int | None:
        """A joiner takes the run's φ and outer momentum at its next outer step (training/_join.py)."""
        return await self.joins.join()

    def outer_state(self) -> dict[str, torch.Tensor]:
        """φ and the outer SGD's momentum buffers: the same bits on every member after an outer step."""
        out = {f"slow/{n}": t for n, t in self.slow.items()}
        for name, slow in self.slow.items():
            buf = self.outer.state.get(slow, {}).get("momentum_buffer")
            if buf is not None:
                out[f"momentum/{name}"] = buf
        return out

    def load_outer_state(self, tensors: Mapping[str, torch.Tensor], step: int) -> int:
        """Start from the members' φ and momentum of outer step `step`: φ and θ ← φ, the outer
        step counter (round tags) ← `step`. The inner AdamW state and the compression error
        buffer stay this peer's own (every member's differ: they follow its data).

        Returns:
            The loop step the members were at when φ took that step.

        Raises:
            ValueError: not this model's tensors (nothing changed).
        """
        check_outer_state(tensors, self.slow, required=("slow",), optional=("momentum",))
        momenta = [n for n in self.slow if f"momentum/{n}" in tensors]
        if momenta and len(momenta) != len(self.slow):
            raise ValueError(f"outer state has momentum for {len(momenta)} of {len(self.slow)} tensors")
        with torch.no_grad():
            for name, slow in self.slow.items():
                slow.copy_(tensors[f"slow/{name}"])
            for name, p in self._params:
                p.copy_(self.slow[name])
        self.outer.state.clear()
        for name in momenta:
            slow = self.slow[name]
            self.outer.state[slow]["momentum_buffer"] = tensors[f"momentum/{name}"].to(slow.device, torch.float32).clone()
        self.outer_steps = step
        return step * self.config.inner_steps

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        missing = sorted(set(self.slow) - set(state["slow"]))
        if missing:
            raise ValueError(f"DiLoCo state lacks slow weights for {missing[:3]}...; wrong model?")
        with torch.no_grad():
            for name, slow in self.slow.items():
                slow.copy_(state["slow"][name])
        self.inner.load_state_dict(state["inner"])
        self.outer.load_state_dict(state["outer"])
        self.outer_steps = int(state["outer_steps"])
        self.failed_rounds = int(state["failed_rounds"])
