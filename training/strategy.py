"""`Strategy`: how one peer turns batches into weight updates and when it talks to the others.

The training loop (loop.py) stays one nanoGPT-like loop for every algorithm:

    for step in range(start, max_steps):
        x, y = batches.next()
        metrics = strategy.forward_backward(x, y)      # forward + backward (overridable)
        step_metrics = await strategy.step(step)        # local update + any communication
        ...callbacks: log, eval, checkpoint

A strategy owns the local optimizer(s) and every piece of algorithm state, talks to other peers
only through its `Comm`, and saves/restores all of it through `state_dict()`. How the planned
algorithms plug into this shape without changing the loop:

- DDP (ddp.py): `step` all-reduces gradients, then takes the AdamW step.
- DiLoCo (diloco.py): `step` takes the AdamW step; every H steps it all-reduces the
  pseudo-gradient and takes the outer Nesterov step on the slow weights.
- NoLoCo: DiLoCo's shape with its own outer rule: at an outer step it pairs peers from
  `await comm.members()` and a shared permutation, calls `comm.exchange(partner, {phi,
  theta - phi}, tag=..., timeout_s=...)`, and on `PeerUnavailable`/`TimeoutError` takes the
  local-only outer step; it never blocks on an all-reduce.
- DADAO / A²CiD²: `step` is the gradient event (optimizer step on x, same step on x~, after
  flowing the mixing ODE to `comm.now()`); `start(tasks)` launches a gossip task in the loop's
  TaskGroup that draws Poisson times with `comm.sleep` and averages with a neighbour through
  `comm.exchange`; `aclose()` stops it. A simulation gives gradient events virtual duration
  with an `on_step` callback that awaits `comm.sleep(step_time)`.
- SPES: the constructor freezes experts this peer does not own (`requires_grad_(False)`) and
  builds the optimizer over `trainable_parameters()` only (shared + owned experts, the memory
  saving); `step` syncs every `sync_steps`: all-reduce of the shared tensors, owned experts
  published with `comm.put_tensors` (hash in the run state via `comm.state_set`), others
  fetched with `comm.get_tensors`. Ownership comes from `comm.state_items("spes/owner/")`.
- Shared-seed zeroth-order: overrides `forward_backward` with the two perturbed forward
  passes under `torch.no_grad()` (no backward, no gradients kept) and stores the projected
  gradient; `step` publishes its 1-byte scalar with `comm.publish`, gathers the others' with
  `comm.collect`, and replays the updates; `state_dict` carries the snapshot and the log.
"""

from __future__ import annotations

import asyncio
import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from hyphae.training.comm import Comm
from hyphae.training.model import GPT
from hyphae.training.optim import AdamWConfig, clip_grad_norm, set_lr

Precision = Literal["auto", "fp32", "bf16"]
"""Compute precision: "auto" is bf16 autocast on CUDA devices that support it, fp32 elsewhere.
fp16 is not offered: it needs loss scaling, and bf16 exists wherever fp16 would pay."""

Metrics = dict[str, float | torch.Tensor]
"""Per-step numbers a strategy reports; tensors are read (synced) only when the loop logs."""


def resolve_precision(precision: Precision, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device` (None = plain fp32).

    Raises:
        ValueError: unknown precision, or "bf16" on a device without bf16 support.
    """
    if precision == "fp32":
        return None
    if precision not in ("auto", "bf16"):
        raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got {precision!r}")
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "auto":
        return torch.bfloat16 if cuda_bf16 else None
    if device.type == "cuda" and not cuda_bf16:
        raise ValueError(f"bf16 is not supported on {device}; use precision='fp32'")
    return torch.bfloat16


class Strategy(ABC):
    """Base class of a training algorithm running on one peer.

    Args:
        model: this peer's replica (already on its device, identically initialised on every
            peer).
        comm: this peer's handle on the run.
        precision: compute precision for forward passes (see `Precision`).
    """

    algorithm: ClassVar[str] = ""
    """Name stored in checkpoint manifests and the run state ("ddp", "diloco", ...)."""

    def __init__(self, model: GPT, comm: Comm, *, precision: Precision = "auto") -> None:
        self.model = model
        self.comm = comm
        self.device = next(model.parameters()).device
        self.autocast_dtype = resolve_precision(precision, self.device)
        self.weights_lock = asyncio.Lock()
        """Held by the loop over each step (forward/backward and update); background work that
        reads or writes the weights (A²CiD²'s gossip) takes it too, so a step never sees its
        weights change halfway."""

    # --- the loop calls these ----------------------------------------------------------------

    def forward_backward(
        self, inputs: torch.Tensor, targets: torch.Tensor, *, loss_scale: float = 1.0
    ) -> dict[str, torch.Tensor]:
        """Forward the batch and accumulate gradients into `.grad`.

        Override for gradient-free methods (zeroth-order: two perturbed forwards, no backward).

        Args:
            inputs, targets: (batch, time) token ids on the model's device.
            loss_scale: multiplies the loss before backward (1 / accumulation steps).

        Returns:
            Detached scalars: "loss" (LM cross-entropy, what curves plot) and, for MoE
            models, "load_balance" and "router_z".
        """
        with self.autocast():
            out = self.model(inputs, targets)
        (out.loss * loss_scale).backward()
        metrics = {"loss": out.ce.detach()}
        metrics.update({k: v.detach() for k, v in out.aux.items()})
        return metrics

    @abstractmethod
    async def step(self, step: int) -> Metrics:
        """Apply the accumulated gradients for loop step `step` (0-based), communicating if due.

        Must leave `.grad` cleared for the next step. Expected network failures
        (`CommError`, `TimeoutError`) are handled inside by the algorithm's fallback, so the
        loop never dies of a lost peer; `CommClosed` (this peer left) propagates.

        Returns:
            Numbers to log (e.g. "lr", "peers").
        """

    async def start(self, tasks: asyncio.TaskGroup) -> None:
        """Called once before the first step; background work (gossip) goes into `tasks`."""

    async def aclose(self) -> None:
        """Called once after the last step (also on error); stop background work here."""

    def eval_module(self) -> nn.Module:
        """The weights validation loss is measured on (the local replica by default)."""
        return self.model

    async def catch_up(self) -> int | None:
        """Catch up with a run in progress from the run's own record; return the run step to start at.

        Called once before training by a fresh peer (no checkpoint of its own) whose algorithm
        joins through the run state itself (ZO replays the seed log), so the loop counts run
        steps from there: a joiner then stops at the same run step as everyone else and its
        checkpoints name the same boundaries. Default: None (nothing to catch up this way).
        """
        return None

    def join_at(self, step: int) -> None:
        """Align step-derived counters with a run that is at ``step`` (e.g. outer-step tags).

        Called once before training by a peer that joined a run in progress and took its
        weights from it, so its collectives carry the same round tags as everyone else's.
        Default: nothing to align.
        """

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume this strategy (optimizer and algorithm state).

        Only tensors, numbers, strings, lists and dicts: checkpoints load it with
        `torch.load(weights_only=True)`.
        """

    @abstractmethod
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what `state_dict` returned (the model weights are restored separately)."""

    # --- helpers for subclasses --------------------------------------------------------------

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast context for forward passes (a no-op in fp32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Named parameters this peer trains (SPES narrows it to shared + owned experts)."""
        return ((n, p) for n, p in self.model.named_parameters() if p.requires_grad)

    def local_update(
        self, optimizer: torch.optim.Optimizer, config: AdamWConfig, step: int
    ) -> Metrics:
        """Schedule the lr, clip, step `optimizer` and clear the gradients."""
        lr = config.lr_at(step)
        set_lr(optimizer, lr)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        norm = clip_grad_norm(params, config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        metrics: Metrics = {"lr": lr}
        if norm is not None:
            metrics["grad_norm"] = norm
        return metrics
