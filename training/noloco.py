"""NoLoCo: DiLoCo's inner loop with an outer step that talks to one partner, never to everyone.

ALGORITHMS.md §2. Each replica i keeps its own slow weights φ_i and outer momentum δ_i (zero at
the start) beside its fast weights θ_i (the model). Every `inner_steps` (H) Adam steps:

    G  = the group of i at outer step t (see `_pairing.groups`: pairs for n = 2)
    D̄  = (1/|G|) Σ_{j∈G} (θ_j − φ_j)          mean progress of the group
    φ̄  = (1/|G|) Σ_{j∈G} φ_j                   mean slow weights of the group
    δ_i ← b·δ_i + a·D̄ + c·(φ̄ − φ_i)           heavy ball + the pull toward the group
    φ_i ← φ_i + δ_i;   θ_i ← φ_i

Defaults a = 0.7, b = 0.5, c = 0.7, n = 2. The group is computed by every member alone from
(run id, t, live members), and the only communication is `comm.exchange` of (φ, θ − φ) with each
other group member: no all-reduce, no barrier, latency one round trip whatever N is.

Churn: a partner that is gone (`PeerUnavailable`), does not arrive within `timeout_s`
(`TimeoutError`), or a node left without a partner (odd N) takes the **local-only** step:
D̄ = its own θ − φ and no consensus term. A partial group (n > 2, some missing) averages over
those that answered. Nothing ever waits longer than `timeout_s`.

Numerics: group means are summed in float64 over the members sorted by peer id and rounded once
to fp32, so every member of a group computes bit-identical D̄ and φ̄ (the exchanged tensors are
exact copies), and a mean of equal φ's is exactly φ (the consensus term is exactly zero when
the replicas agree: oracle 1). The update itself is `hyphae.kernels.noloco_outer_` (fused, the
Triton kernel on CUDA). With `quantize="int8"` the partner's φ and θ − φ arrive blockwise-int8
(`hyphae.kernels.quantize`, ~3.9x fewer bytes) with error feedback: each of the two streams
keeps the residual of what it failed to send and adds it to the next message, so the errors
telescope over outer steps instead of accumulating. A node always uses its own exact values in
the means, which halves the quantization error in the group mean compared to using its own
quantized copy.

Robustness (`training/robust.py`): a partner's (φ, θ − φ) holding NaN/Inf is always dropped,
and its sender reported to the node (`Comm.refuse`, which lowers its score); with `norm_clip`
= k > 0 (3 by default) so is one whose progress norm, or whose φ's distance from ours, exceeds
k × (our own progress norm or the running median of accepted ones) — the step then goes on
without it, as if it had not answered (not reported: an honest outlier can trip it). With `robust` = "median" / "trimmed_mean" a group of
n ≥ 3 combines coordinate-wise robustly instead of by the mean.

Compression (SparseLoCo, `compression = "topk-int8"` / `"topk-2bit"`, `density`): the progress
θ − φ goes into a local error-feedback buffer and only its top-k per chunk travels
(training/compression.py; decoded with bounds checks, a payload that fails is a bad reply). Then
this node's progress counts as what it *sent* in the group means too (the rest is still owed, in
the buffer), so both ends of a pair compute the same D̄. φ is not a delta and cannot be
sparsified: it travels as `quantize` says (fp32 or int8), which bounds the saving at about 4x
(int8) or 2x (fp32) over plain NoLoCo.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from hyphae.kernels import DEFAULT_BLOCK_SIZE, Quantized, dequantize, noloco_outer_, quantize, quantize_ef_
from hyphae.training._config import check_choice, check_int, check_positive, check_range, from_dict, to_dict
from hyphae.training._join import JoinDesk, check_outer_state, layout_of
from hyphae.training import robust
from hyphae.training._robust_gather import remember_refused
from hyphae.training._pairing import group_of
from hyphae.training.comm import Comm, CommClosed, CommError
from hyphae.training.compression import Compressor, check_compression_options, decode, encode
from hyphae.training.model import GPT
from hyphae.training.optim import AdamWConfig, build_adamw
from hyphae.training.strategy import Metrics, Precision, Strategy

__all__ = ["InnerAdamConfig", "NoLoCo", "NoLoCoConfig", "group_means"]

logger = logging.getLogger(__name__)

QUANTIZE = ("none", "int8")

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True, kw_only=True, slots=True)
class InnerAdamConfig(AdamWConfig):
    """NoLoCo's inner optimizer: Adam without weight decay (AdamWConfig with weight_decay 0)."""

    weight_decay: float = 0.0
    """Decoupled weight decay; the paper uses none."""


@dataclass(frozen=True, kw_only=True, slots=True)
class NoLoCoConfig:
    """Settings of NoLoCo (defaults from the paper, ALGORITHMS.md §2)."""

    inner: InnerAdamConfig = field(default_factory=InnerAdamConfig)
    """The local (inner) Adam: clip 1.0, warm-up then cosine (set decay_steps), no decay."""

    inner_steps: int = 50
    """H: local steps between two outer steps."""

    outer_lr: float = 0.7
    """a: weight of the group's mean progress D̄ in the momentum."""

    outer_momentum: float = 0.5
    """b: heavy-ball momentum of the outer step."""

    consensus: float = 0.7
    """c: pull of the slow weights toward the group mean φ̄ (0 = none)."""

    group_size: int = 2
    """n: members per group (2 = pairs; the number of members gives DiLoCo-like averaging)."""

    timeout_s: float = 60.0
    """Deadline of the outer exchange (partner's arrival and transfer); after it the step is
    local-only. Keep it below the duration of one outer step so no one waits on a straggler
    for longer than that."""

    quantize: str = "none"
    """How φ and θ − φ travel: "none" (fp32) or "int8" (blockwise absmax, error feedback)."""

    error_feedback: bool = True
    """With int8: carry each stream's quantization residual into its next message."""

    run_id: str = ""
    """Names the run in the pairing hash; every member must use the same value."""

    robust: str = "none"
    """How a group of n >= 3 combines (φ̄, D̄): "none" (mean), "median" or "trimmed_mean",
    coordinate-wise (training/robust.py). Pairs (n = 2) are protected by `norm_clip`."""

    trim_fraction: float = 0.25
    """With robust = "trimmed_mean": share of the group dropped at each end, per coordinate."""

    norm_clip: float = 3.0
    """k >= 1: reject a partner whose progress norm exceeds k × max(own progress norm, running
    median of accepted ones), or whose φ is further from ours than 2k × the same kind of
    reference; 0 = off."""

    compression: str = "none"
    """How the progress θ − φ travels: "none" (as `quantize` says), "topk-int8" or "topk-2bit"
    (SparseLoCo top-k per chunk with error feedback; φ still follows `quantize`)."""

    density: float = 0.01
    """With compression: the share of each chunk sent (k = density × chunk_size)."""

    chunk_size: int = 4096
    """With compression: elements per top-k chunk (at most 32768)."""

    error_decay: float = 1.0
    """With compression: β of e ← β·e + (θ − φ) (1 = plain error feedback)."""

    def __post_init__(self) -> None:
        if not isinstance(self.inner, AdamWConfig):
            raise ValueError(f"inner must be an AdamWConfig, got {type(self.inner).__name__}")
        check_int("inner_steps", self.inner_steps, minimum=1)
        check_positive("outer_lr", self.outer_lr)
        check_range("outer_momentum", self.outer_momentum, 0.0, 0.999999)
        check_range("consensus", self.consensus, 0.0, 1.0)
        check_compression_options(self.compression, self.density, self.chunk_size, self.error_decay)
        check_int("group_size", self.group_size, minimum=2)
        check_positive("timeout_s", self.timeout_s)
        check_choice("quantize", self.quantize, QUANTIZE)
        if not isinstance(self.error_feedback, bool):
            raise ValueError(f"error_feedback must be true or false, got {self.error_feedback!r}")
        if not isinstance(self.run_id, str):
            raise ValueError(f"run_id must be a string, got {self.run_id!r}")
        robust.check_robust_options(self.robust, self.trim_fraction, self.norm_clip)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NoLoCoConfig:
        return from_dict(cls, data)


def group_means(
    own: tuple[Tensors, Tensors], others: Mapping[str, tuple[Tensors, Tensors]], own_id: str
) -> tuple[Tensors, Tensors]:
    """The group's mean slow weights φ̄ and mean progress D̄.

    Args:
        own: this node's (φ, θ − φ), fp32.
        others: peer id -> that member's (φ, θ − φ) as received.
        own_id: this node's peer id (places `own` in the sorted order).

    Returns:
        (φ̄, D̄) in fp32: summed in float64 in peer-id order, divided once, rounded once, so
        every member with the same inputs gets the same bits and equal φ's average to φ.
    """
    rows = dict(others)
    rows[own_id] = own
    order = sorted(rows)
    k = len(order)
    means: list[Tensors] = []
    for which in (0, 1):
        out: Tensors = {}
        for name, ref in own[which].items():
            acc = torch.zeros(ref.shape, dtype=torch.float64, device=ref.device)
            for peer in order:
                acc += rows[peer][which][name].to(ref.device, torch.float64)
            out[name] = acc.div_(k).to(torch.float32)
        means.append(out)
    return means[0], means[1]


class NoLoCo(Strategy):
    """NoLoCo on one peer.

    Args:
        model: this peer's replica; its current weights become φ.
        comm: this peer's Comm.
        config: NoLoCo settings.
        precision: compute precision (see strategy.Precision).
    """

    algorithm = "noloco"

    def __init__(
        self,
        model: GPT,
        comm: Comm,
        config: NoLoCoConfig | None = None,
        *,
        precision: Precision = "auto",
    ) -> None:
        super().__init__(model, comm, precision=precision)
        self.config = config or NoLoCoConfig()
        self._params = list(self.trainable_parameters())
        self.inner = build_adamw(self._params, self.config.inner)
        self.slow = {n: p.detach().clone().float() for n, p in self._params}
        self.momentum = {n: torch.zeros_like(s) for n, s in self.slow.items()}
        self._errors: dict[str, Tensors] = {"phi": {}, "progress": {}}  # int8 error feedback
        self.outer_steps = 0
        self.local_only_steps = 0
        self.last_group: tuple[str, ...] = ()
        self.rejected_updates = 0
        self.rejected_peers: list[str] = []
        self._garbage: dict[str, str] = {}  # partner -> why, this step: reported to the node
        k = self.config.norm_clip
        # Progress norms of honest partners stay within ~1.4x of ours; φ distances, which build up
        # between pairings, reached ~3.6x our progress norm in 8-peer runs: that check gets 2k.
        self._guards = (robust.NormGuard(k), robust.NormGuard(2 * k)) if k else None  # progress, φ distance
        self.joins = JoinDesk(comm, self, layout=layout_of(self._params))
        cfg = self.config
        self.compressor: Compressor | None = None
        if cfg.compression != "none":
            self.compressor = Compressor({n: s.shape for n, s in self.slow.items()}, compression=cfg.compression,
                                         density=cfg.density, chunk_size=cfg.chunk_size,
                                         error_decay=cfg.error_decay, device=next(iter(self.slow.values())).device)
        self._sent_progress: Tensors | None = None  # with compression: this step's progress as sent

    async def step(self, step: int) -> Metrics:
        metrics = self.local_update(self.inner, self.config.inner, step)
        if (step + 1) % self.config.inner_steps == 0:
            metrics["peers"] = await self.outer_step()
            metrics["outer_step"] = self.outer_steps
            metrics["local_only_steps"] = self.local_only_steps
            metrics["rejected_updates"] = self.rejected_updates
            await self.joins.boundary(self.outer_steps)
        return metrics

    async def outer_step(self) -> int:
        """Exchange with this step's group, update φ and δ, reset θ to φ.

        Returns:
            How many members the step averaged over (1 = local-only).

        Raises:
            CommClosed: this peer left the run.

        Cancellation leaves φ, δ and θ untouched (the update is applied after all awaits); with
        int8 error feedback the residuals count the cancelled message as sent.
        """
        t, me = self.outer_steps, self.comm.peer_id
        with torch.no_grad():
            phi = self.slow  # read-only until the update below; the Comm copies what it sends
            progress = {n: p.detach().float() - self.slow[n] for n, p in self._params}
        self._sent_progress = None
        received = self._screen(await self._exchange_with_group(t, phi, progress), phi, progress)
        for peer, why in self._garbage.items():
            await self.comm.refuse(peer, f"noloco/{t}: {why}")
        if self._sent_progress is not None:  # compressed: what was not sent is still owed
            progress = self._sent_progress
        if received:
            phibar, dbar = self._group_means(phi, progress, received, me)
        else:
            phibar, dbar = None, progress
            self.local_only_steps += 1
        names = list(self.slow)
        params = dict(self._params)
        noloco_outer_(
            [self.slow[n] for n in names],
            [self.momentum[n] for n in names],
            [dbar[n] for n in names],
            [phibar[n] for n in names] if phibar is not None else None,
            [params[n].data for n in names],
            a=self.config.outer_lr,
            b=self.config.outer_momentum,
            c=self.config.consensus,
        )
        self.outer_steps += 1
        return 1 + len(received)

    def _screen(self, received: dict[str, tuple[Tensors, Tensors]], phi: Tensors,
                progress: Tensors) -> dict[str, tuple[Tensors, Tensors]]:
        """Drop partners whose (φ, θ − φ) is non-finite or implausibly large (see module doc)."""
        own = robust.global_norm(progress) if self._guards else 0.0
        kept: dict[str, tuple[Tensors, Tensors]] = {}
        self._garbage = {}
        for peer in sorted(received):
            their_phi, their_progress = received[peer]
            reason = ""
            if not (robust.is_finite(their_phi) and robust.is_finite(their_progress)):
                reason = self._garbage[peer] = "non-finite values"
            elif self._guards is not None:
                norm, dist = robust.global_norm(their_progress), robust.distance(their_phi, phi)
                if not self._guards[0].check(norm, own):
                    reason = f"progress norm {norm:.3g} > {self.config.norm_clip:g} x {self._guards[0].reference(own):.3g}"
                elif not self._guards[1].check(dist, own):
                    reason = f"slow weights {dist:.3g} away > {self._guards[1].factor:g} x {self._guards[1].reference(own):.3g}"
            if reason:
                self.rejected_updates += 1
                logger.warning("noloco outer step %d: rejected the update of %s (%s)", self.outer_steps, peer, reason)
                continue
            kept[peer] = received[peer]
        self.rejected_peers = remember_refused(self.rejected_peers, set(received) - set(kept))
        if self._guards is not None:
            self._guards[0].remember(own)
        return kept

    def _group_means(self, phi: Tensors, progress: Tensors, received: Mapping[str, tuple[Tensors, Tensors]],
                     me: str) -> tuple[Tensors, Tensors]:
        if self.config.robust == "none" or len(received) < 2:
            return group_means((phi, progress), received, me)
        rows = {**received, me: (phi, progress)}
        order = sorted(rows)
        return tuple(robust.aggregate([rows[p][which] for p in order], self.config.robust,  # type: ignore[return-value]
                                      self.config.trim_fraction) for which in (0, 1))

    async def _exchange_with_group(
        self, t: int, phi: Tensors, progress: Tensors
    ) -> dict[str, tuple[Tensors, Tensors]]:
        """Swap (φ, θ − φ) with every other member of this step's group; failures are skipped."""
        me = self.comm.peer_id
        members = await self.comm.members()
        group = group_of(self.config.run_id, t, members, self.config.group_size, me)
        self.last_group = group
        partners = [p for p in group if p != me]
        if not partners:
            return {}
        payload = self._encode(phi, progress)
        tag = f"noloco/{t}"
        try:
            async with asyncio.TaskGroup() as tasks:  # n > 2: every partner at once
                swaps = [tasks.create_task(self._swap(p, payload, tag)) for p in partners]
        except* CommClosed as errors:  # this peer left: say so plainly, not as a group
            raise errors.exceptions[0] from None
        replies = [s.result() for s in swaps]
        return {p: r for p, r in zip(partners, replies) if r is not None}

    async def _swap(self, peer: str, payload: Tensors, tag: str) -> tuple[Tensors, Tensors] | None:
        try:
            reply = await self.comm.exchange(peer, payload, tag=tag, timeout_s=self.config.timeout_s)
            return self._decode(reply)
        except CommClosed:
            raise
        except (CommError, TimeoutError) as exc:
            logger.info("noloco outer step %s: partner %s unavailable (%s); without it", tag, peer, exc)
            return None
        except (KeyError, ValueError, TypeError) as exc:  # a partner with another model or codec
            logger.warning("noloco outer step %s: bad reply from %s (%s); without it", tag, peer, exc)
            return None

    # --- wire format -------------------------------------------------------------------------

    def _encode(self, phi: Tensors, progress: Tensors) -> Tensors:
        if self.compressor is None:
            return {**self._encode_dense("phi", phi), **self._encode_dense("progress", progress)}
        if not robust.is_finite(progress):  # a NaN would poison the error buffer for good
            logger.warning("noloco outer step %d: this node's progress holds NaN/Inf; sending zeros", self.outer_steps)
            progress = {n: torch.zeros_like(t) for n, t in progress.items()}
        sent = self.compressor.compress(progress)
        self._sent_progress = self.compressor.unflatten(self.compressor.dense(sent))
        return {**self._encode_dense("phi", phi), **encode(sent, "progress/")}

    def _encode_dense(self, kind: str, tensors: Tensors) -> Tensors:
        if self.config.quantize == "none":
            return {f"{kind}/{n}": t for n, t in tensors.items()}
        out: Tensors = {}
        errors = self._errors[kind]
        for name, t in tensors.items():
            if self.config.error_feedback:
                buf = errors.setdefault(name, torch.zeros_like(t).contiguous())
                buf.add_(t)
                q = quantize_ef_(buf, bits=8)
            else:
                q = quantize(t, bits=8)
            out[f"{kind}/{name}/codes"] = q.codes
            out[f"{kind}/{name}/scales"] = q.scales
        return out

    def _decode(self, reply: Mapping[str, torch.Tensor]) -> tuple[Tensors, Tensors]:
        """(φ, θ − φ) of a partner; ValueError (CompressedPayloadError included) if it does not fit."""
        out: tuple[Tensors, Tensors] = ({}, {})
        block = DEFAULT_BLOCK_SIZE[8]
        kinds = ("phi", "progress")
        if self.compressor is not None:
            sp = decode(reply, self.compressor.layout, prefix="progress/", device=self.compressor.error.device)
            out = ({}, self.compressor.unflatten(self.compressor.dense(sp)))
            kinds = ("phi",)
        for which, kind in enumerate(kinds):
            for name, ref in self.slow.items():
                if self.config.quantize == "none":
                    t = reply[f"{kind}/{name}"]
                    if t.shape != ref.shape:
                        raise ValueError(f"{kind}/{name} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}")
                    out[which][name] = t.to(ref.device, torch.float32)
                else:
                    q = Quantized(
                        reply[f"{kind}/{name}/codes"].to(ref.device),
                        reply[f"{kind}/{name}/scales"].to(ref.device),
                        ref.shape, 8, block,
                    )
                    out[which][name] = dequantize(q)
        return out

    # --- state -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "inner": self.inner.state_dict(),
            "slow": {n: t.clone() for n, t in self.slow.items()},
            "momentum": {n: t.clone() for n, t in self.momentum.items()},
            "errors": {k: {n: t.clone() for n, t in v.items()} for k, v in self._errors.items()},
            "outer_steps": self.outer_steps,
            "local_only_steps": self.local_only_steps,
            **({"progress_error": self.compressor.error.clone()} if self.compressor is not None else {}),
        }

    def join_at(self, step: int) -> None:
        """Outer rounds are tagged by their index: a joiner at ``step`` is at round step // H."""
        self.outer_steps = step // self.config.inner_steps

    async def catch_up(self) -> int | None:
        """A joiner takes a member's (φ, δ) at the run's next outer step (see training/_join.py)."""
        return await self.joins.join()

    def outer_state(self) -> dict[str, torch.Tensor]:
        """This replica's φ and momentum δ: what a joiner starts from (its θ is then φ)."""
        return {**{f"slow/{n}": t for n, t in self.slow.items()}, **{f"momentum/{n}": t for n, t in self.momentum.items()}}

    def load_outer_state(self, tensors: Mapping[str, torch.Tensor], step: int) -> int:
        """Become a replica of the member that sent `tensors` at outer step `step`: φ, δ, θ ← φ.

        The int8 error-feedback residuals start empty: they belong to the sender's own messages.

        Raises:
            ValueError: not this model's tensors (nothing changed).
        """
        check_outer_state(tensors, self.slow, required=("slow", "momentum"))
        params = dict(self._params)
        with torch.no_grad():
            for name, slow in self.slow.items():
                slow.copy_(tensors[f"slow/{name}"])
                self.momentum[name].copy_(tensors[f"momentum/{name}"])
                params[name].copy_(slow)
        self._errors = {"phi": {}, "progress": {}}
        self.outer_steps = step
        return step * self.config.inner_steps

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        missing = sorted(set(self.slow) - set(state["slow"]))
        if missing:
            raise ValueError(f"NoLoCo state lacks slow weights for {missing[:3]}...; wrong model?")
        with torch.no_grad():
            for name in self.slow:
                self.slow[name].copy_(state["slow"][name])
                self.momentum[name].copy_(state["momentum"][name])
        self._errors = {k: {n: t.clone() for n, t in v.items()} for k, v in state.get("errors", {}).items()}
        self._errors.setdefault("phi", {})
        self._errors.setdefault("progress", {})
        self.inner.load_state_dict(state["inner"])
        self.outer_steps = int(state["outer_steps"])
        self.local_only_steps = int(state["local_only_steps"])
        if self.compressor is not None and "progress_error" in state:  # the progress still owed
            self.compressor.error.copy_(state["progress_error"])

