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

Compression (SparseLoCo, `compression = "topk-int8"` or `"topk-2bit"`, `density`): Δ goes into
a local error-feedback buffer and only its top-k per chunk travels (training/compression.py);
members all-gather the (index, value) sets and each adds them up in peer order
(training/_compressed_gather.py, same decoding checks, NaN refusal and norm clipping), so φ
stays bit-identical. SparseLoCo proper drops the outer momentum (`outer_momentum = 0`) and lets
the decayed buffer (`error_decay` < 1) play its part.

Overlap (Streaming DiLoCo's one-round delay, `overlap_steps` = τ >= 1): at the outer step the
exchange is started in the background and the inner steps go on; τ steps later its result is
applied: φ takes the outer step and θ ← φ_new + (θ − θ_b), θ_b the weights at the boundary, so
the τ local steps are kept and counted in the next Δ. The worker waits on the network only if
the exchange outlasts τ steps. A stop (`aclose`) finishes a round in flight (bounded by
`timeout_s`) unless it is a cancellation, which drops it; a checkpoint taken while a round is in
flight does not hold it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from hyphae.kernels import Sparse
from hyphae.training import robust
from hyphae.training._compressed_gather import gather_sparse
from hyphae.training._config import check_choice, check_int, check_positive, check_range, from_dict, to_dict
from hyphae.training._join import JoinDesk, check_outer_state, layout_of
from hyphae.training._robust_gather import checks_on, gather_checked, remember_refused, result_is_finite
from hyphae.training.comm import Comm, CommClosed, CommError
from hyphae.training.compression import AVERAGES, Compressor, check_compression_options
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

    compression: str = "none"
    """How Δ travels: "none" (fp32), "topk-int8" or "topk-2bit" (SparseLoCo: top-k per chunk
    with error feedback, always through the checked gather)."""

    density: float = 0.01
    """With compression: the share of each chunk sent (k = density × chunk_size)."""

    chunk_size: int = 4096
    """With compression: elements per top-k chunk (at most 32768)."""

    error_decay: float = 1.0
    """With compression: β of e ← β·e + Δ (1 = plain error feedback; SparseLoCo uses < 1 with
    outer_momentum = 0)."""

    average: str = "members"
    """With compression: divide the summed contributions by the number of members ("members")
    or, per coordinate, by the number that sent it ("senders")."""

    overlap_steps: int = 0
    """τ: inner steps the outer exchange may run behind (0 = the worker waits for it; 1..H =
    Streaming DiLoCo's overlap, the result is applied τ steps after the outer step)."""

    def __post_init__(self) -> None:
        if not isinstance(self.inner, AdamWConfig):
            raise ValueError(f"inner must be an AdamWConfig, got {type(self.inner).__name__}")
        check_int("inner_steps", self.inner_steps, minimum=1)
        check_positive("outer_lr", self.outer_lr)
        check_range("outer_momentum", self.outer_momentum, 0.0, 0.999999)
        check_positive("timeout_s", self.timeout_s)
        robust.check_robust_options(self.robust, self.trim_fraction, self.norm_clip)
        check_choice("outer_state_device", self.outer_state_device, ("same", "cpu"))
        check_compression_options(self.compression, self.density, self.chunk_size, self.error_decay)
        check_choice("average", self.average, AVERAGES)
        check_int("overlap_steps", self.overlap_steps, minimum=0)
        if self.overlap_steps > self.inner_steps:
            raise ValueError(f"overlap_steps must be <= inner_steps ({self.inner_steps}): a round is applied before "
                             f"the next starts, got {self.overlap_steps}")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DiLoCoConfig:
        return from_dict(cls, data)


Tensors = dict[str, torch.Tensor]


@dataclass(slots=True)
class _Round:
    """An overlapped outer round in flight."""

    task: asyncio.Task
    own: Tensors
    """This peer's Δ at the boundary (θ_b = φ − own)."""
    apply_at: int
    """The loop step count at which its result is applied."""


async def _captured(work: Any) -> Any:
    """Run `work`; return its result or the CommClosed it raised (the TaskGroup must not see it)."""
    try:
        return await work
    except CommClosed as exc:
        return exc


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
        cfg = self.config
        self.compressor: Compressor | None = None
        if cfg.compression != "none":
            self.compressor = Compressor({n: p.shape for n, p in self._params}, compression=cfg.compression,
                                         density=cfg.density, chunk_size=cfg.chunk_size,
                                         error_decay=cfg.error_decay, device=next(iter(self.slow.values())).device)
        self._tasks: asyncio.TaskGroup | None = None
        self._pending: _Round | None = None

    async def start(self, tasks: asyncio.TaskGroup) -> None:
        self._tasks = tasks  # overlapped rounds run in the loop's TaskGroup

    async def aclose(self) -> None:
        """Finish a round still in flight (at most `timeout_s`); under cancellation, drop it."""
        pending = self._pending
        if pending is None:
            return
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            self._pending = None
            pending.task.cancel()
            return
        try:
            await self._finish_round()
        except CommClosed:
            pass

    async def step(self, step: int) -> Metrics:
        outer_before = self.outer_steps
        metrics = self.local_update(self.inner, self.config.inner, step)
        done, cfg = step + 1, self.config
        if self._pending is not None and done >= self._pending.apply_at:
            metrics["peers"] = await self._finish_round()
            metrics["outer_step"] = self.outer_steps
        if done % cfg.inner_steps == 0:
            if cfg.overlap_steps:
                self._start_round(done + cfg.overlap_steps)
            else:
                metrics["peers"] = await self._outer_step()
                metrics["outer_step"] = self.outer_steps
        if self.outer_steps != outer_before:  # φ took its outer step: a joiner may start from it
            await self.joins.boundary(self.outer_steps)
        return metrics

    async def _outer_step(self) -> int:
        """Average the pseudo-gradients, step φ, reset θ to φ; returns how many contributed."""
        sent = self._outgoing(self._pseudo_gradient())
        peers, mean = await self._average(sent, f"diloco/{self.outer_steps}")
        self._apply(mean, None)
        return peers

    def _start_round(self, apply_at: int) -> None:
        """Start the outer exchange in the background; `step` applies it at step `apply_at`."""
        own = self._pseudo_gradient()
        work = self._average(self._outgoing(own), f"diloco/{self.outer_steps}")
        name = f"diloco-outer-{self.outer_steps}"
        task = self._tasks.create_task(_captured(work), name=name) if self._tasks else asyncio.create_task(
            _captured(work), name=name)
        self._pending = _Round(task, own, apply_at)

    async def _finish_round(self) -> int:
        """Wait for the round in flight (the worker's only wait on the network) and apply it."""
        pending, self._pending = self._pending, None
        assert pending is not None
        outcome = await pending.task
        if isinstance(outcome, BaseException):
            raise outcome
        peers, mean = outcome
        self._apply(mean, pending.own)
        return peers

    def _pseudo_gradient(self) -> Tensors:
        with torch.no_grad():
            return {n: self.slow[n] - p.detach().to(self.slow[n].device, torch.float32) for n, p in self._params}

    def _outgoing(self, delta: Tensors) -> Tensors | Sparse:
        """What this peer contributes: Δ itself, or (compressed) the top-k of its error buffer."""
        if self.compressor is None:
            return delta
        if not robust.is_finite(delta):  # a NaN would poison the buffer for good: send nothing new
            logger.warning("diloco outer step %d: this peer's Δ holds NaN/Inf; contributing zeros", self.outer_steps)
            delta = {n: torch.zeros_like(t) for n, t in delta.items()}
        return self.compressor.compress(delta)

    def _apply(self, mean: Tensors, own: Tensors | None) -> None:
        """φ ← OuterSGD(φ, mean); θ ← φ, or (overlap, own = this peer's Δ) θ ← φ + (θ − θ_b)."""
        with torch.no_grad():
            local = None
            if own is not None:  # θ − θ_b with θ_b = φ_old − Δ_own: the steps taken since the boundary
                local = {n: p.detach().float() - (self.slow[n] - own[n]).to(p.device) for n, p in self._params}
                if not robust.is_finite(local):
                    local = None
            for name, slow in self.slow.items():
                slow.grad = mean[name]
            self.outer.step()
            self.outer.zero_grad(set_to_none=True)
            for name, p in self._params:
                if local is None:
                    p.copy_(self.slow[name])
                else:
                    p.copy_(self.slow[name].to(p.device) + local[name])
        self.outer_steps += 1

    async def _average(self, sent: Tensors | Sparse, tag: str) -> tuple[int, Tensors]:
        """(members included, the round's mean Δ); on a failed round (1, this peer's own Δ)."""
        cfg = self.config
        try:
            group = await self.comm.members()
            if isinstance(sent, Sparse):
                assert self.compressor is not None
                sparse = await gather_sparse(self.comm, self.compressor, sent, group=group, tag=tag,
                                             timeout_s=cfg.timeout_s, method=cfg.robust,
                                             trim_fraction=cfg.trim_fraction, norm_clip=cfg.norm_clip,
                                             average=cfg.average)
                self._count_refused(sparse.refused)
                flat = sparse.flat if sparse.flat is not None else torch.zeros_like(self.compressor.error)
                return len(sparse.included), self.compressor.unflatten(flat)
            if checks_on(cfg.robust, cfg.norm_clip):
                gathered = await gather_checked(self.comm, sent, group=group, tag=tag, timeout_s=cfg.timeout_s,
                                                method=cfg.robust, trim_fraction=cfg.trim_fraction,
                                                norm_clip=cfg.norm_clip)
                self._count_refused(gathered.refused)
                if gathered.tensors is None:  # nothing passed (our own Δ was non-finite too): φ stays
                    return 0, {n: torch.zeros_like(t) for n, t in sent.items()}
                return len(gathered.included), gathered.tensors
            result = await self.comm.all_reduce(sent, group=group, tag=tag, timeout_s=cfg.timeout_s)
        except CommClosed:
            raise
        except (CommError, TimeoutError) as exc:
            self.failed_rounds += 1
            logger.warning("%s: the exchange failed (%s); local outer step", tag, exc)
            return 1, self._local(sent)
        if not result_is_finite(result.tensors, tag):  # a local outer step on our own Δ, if it is sane
            self.failed_rounds += 1
            return 1, self._local(sent)
        return len(result.included), result.tensors

    def _local(self, sent: Tensors | Sparse) -> Tensors:
        """A local outer step's Δ: what this peer sent (zeros if that is not finite)."""
        if isinstance(sent, Sparse):
            assert self.compressor is not None
            return self.compressor.unflatten(self.compressor.dense(sent))
        return sent if robust.is_finite(sent) else {n: torch.zeros_like(t) for n, t in sent.items()}

    def _count_refused(self, refused: Mapping[str, str]) -> None:
        self.rejected_updates += len(refused)
        self.rejected_peers = remember_refused(self.rejected_peers, refused)

    def state_dict(self) -> dict[str, Any]:
        return {
            "inner": self.inner.state_dict(),
            "outer": self.outer.state_dict(),
            "slow": {n: t.clone() for n, t in self.slow.items()},
            "outer_steps": self.outer_steps,
            "failed_rounds": self.failed_rounds,
            **({"error": self.compressor.error.clone()} if self.compressor is not None else {}),
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
        return step * self.config.inner_steps + self.config.overlap_steps

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
        if self.compressor is not None and "error" in state:  # the error feedback owed to the run
            self.compressor.error.copy_(state["error"])
