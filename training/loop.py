"""The training loop: one clear, nanoGPT-like async loop shared by every algorithm.

    batch -> strategy.forward_backward -> await strategy.step -> callbacks / log / eval / checkpoint

It is a plain coroutine so N simulated peers can run as tasks of one event loop (each with its
own `SimComm`), and so the daemon's worker can run it beside its IPC. It never reads a tensor
value except when it logs (every `log_every` steps) or evaluates: reading forces a GPU sync.

Example (one CPU peer on the built-in corpus):

    net = SimNetwork(); comm = net.add_peer()
    model = build_model(model_config("tiny"), seed=0)
    corpus = load_corpus(DataConfig(cache_dir=".cache"))
    batches = BatchStream(corpus.train, batch_size=8, seq_len=128, seed=0, stream=comm.peer_id)
    val = validation_batches(corpus.val, batch_size=8, seq_len=128, n_batches=8)
    result = run_virtual(train(DDP(model, comm), batches, LoopConfig(max_steps=500), val_set=val))
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hyphae.training._config import check_int, from_dict, to_dict
from hyphae.training.checkpoint import CheckpointCorrupt, CheckpointError, CheckpointStore, Manifest
from hyphae.training.data import BatchStream
from hyphae.training.model_config import ModelConfig
from hyphae.training.strategy import Metrics, Strategy

logger = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True, kw_only=True, slots=True)
class LoopConfig:
    """How long to train and how often to log, evaluate and checkpoint."""

    max_steps: int | None
    """Optimizer steps to run in total (a resumed run continues up to this); None trains until
    the caller cancels the task (the daemon's "run until stopped")."""

    grad_accum_steps: int = 1
    """Micro-batches per optimizer step (gradients accumulate; the loss is scaled by 1/n)."""

    log_every: int = 10
    """Log (and call `on_log`) every this many steps, with the mean loss since the last log."""

    eval_every: int = 0
    """Measure validation loss every this many steps and after the last; 0 disables."""

    checkpoint_every: int = 0
    """Save a checkpoint every this many steps and after the last; 0 disables."""

    compute_in_thread: bool = False
    """Run forward/backward in a thread, so the event loop (background gossip, the daemon's IPC)
    keeps moving during compute instead of once per step. The daemon's worker turns it on;
    simulations on the virtual clock keep it off (their clock cannot see another thread)."""

    def __post_init__(self) -> None:
        if self.max_steps is not None:
            check_int("max_steps", self.max_steps, minimum=0)
        check_int("grad_accum_steps", self.grad_accum_steps, minimum=1)
        check_int("log_every", self.log_every, minimum=1)
        check_int("eval_every", self.eval_every, minimum=0)
        check_int("checkpoint_every", self.checkpoint_every, minimum=0)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoopConfig:
        return from_dict(cls, data)


@dataclass(frozen=True, slots=True)
class StepInfo:
    """A log record: `step` steps done, mean training loss over the last interval."""

    step: int
    loss: float
    tokens: int
    elapsed_s: float
    metrics: dict[str, float]


@dataclass(frozen=True, slots=True)
class EvalInfo:
    """A validation measurement after `step` steps."""

    step: int
    val_loss: float
    tokens: int
    elapsed_s: float


@dataclass
class TrainResult:
    """What a `train` call did."""

    steps: int = 0
    tokens: int = 0
    elapsed_s: float = 0.0
    logs: list[StepInfo] = field(default_factory=list)
    evals: list[EvalInfo] = field(default_factory=list)


class Callback:
    """Hooks the loop awaits; override the ones you need (all default to doing nothing).

    Callbacks run inside the loop's task: a slow callback slows training, and an exception
    ends the run. In simulations, `on_step` is where a peer is killed at a given step or
    where a gradient step is given virtual duration (`await comm.sleep(step_time_s)`).
    """

    async def on_gradients(self, step: int, strategy: Strategy) -> None:
        """Between forward/backward and the strategy's step: the gradients of loop step `step`
        (0-based) are in `.grad` (a node's local workers average them here, see local_group.py)."""

    async def on_step(self, step: int) -> None:
        """After every step; `step` steps are done. Must not read tensors (no sync)."""

    async def on_log(self, info: StepInfo) -> None:
        """Every `log_every` steps."""

    async def on_eval(self, info: EvalInfo) -> None:
        """After each validation measurement."""

    async def on_checkpoint(self, manifest: Manifest) -> None:
        """After a checkpoint was written (e.g. to announce its hash to the run)."""


async def train(
    strategy: Strategy,
    batches: BatchStream,
    config: LoopConfig,
    *,
    val_set: Sequence[Batch] | None = None,
    checkpoints: CheckpointStore | None = None,
    callbacks: Sequence[Callback] = (),
    start_step: int = 0,
) -> TrainResult:
    """Train `strategy.model` from `start_step` to `config.max_steps`.

    Args:
        strategy: the algorithm (owns the model, optimizer and Comm).
        batches: this peer's data stream (its position advances).
        config: loop schedule.
        val_set: fixed validation batches (see `validation_batches`); needed if eval_every > 0.
        checkpoints: where to save if checkpoint_every > 0 (see `resume`).
        callbacks: hooks called in order.
        start_step: steps already done (what `resume` returned).

    Returns:
        Steps, tokens, time, the log and the validation curve.

    Raises:
        ValueError: eval or checkpoints requested without a val_set / store.
        CommClosed: this peer's Comm closed (left or was killed) — the run is over for it.

    Cancellation stops after the current await; the strategy is closed, nothing is saved.
    """
    if config.eval_every and not val_set:
        raise ValueError("eval_every > 0 needs a val_set; pass validation_batches(...) or set eval_every=0")
    if config.checkpoint_every and checkpoints is None:
        raise ValueError("checkpoint_every > 0 needs a CheckpointStore; pass checkpoints=... or set it to 0")
    try:
        return await _train(strategy, batches, config, val_set, checkpoints, callbacks, start_step)
    except ExceptionGroup as group:
        # The TaskGroup that hosts background work wraps even a lone loop error; callers
        # should see CommClosed itself, not a group of one.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


async def _train(
    strategy: Strategy,
    batches: BatchStream,
    config: LoopConfig,
    val_set: Sequence[Batch] | None,
    checkpoints: CheckpointStore | None,
    callbacks: Sequence[Callback],
    start_step: int,
) -> TrainResult:
    run = _Run(strategy, batches, config, val_set, checkpoints, callbacks, start_step)
    steps = itertools.count(start_step) if config.max_steps is None else range(start_step, config.max_steps)
    with _Compute(in_thread=config.compute_in_thread) as compute:
        async with asyncio.TaskGroup() as tasks:
            await strategy.start(tasks)
            try:
                for step in steps:
                    async with strategy.weights_lock:  # background work never sees a half-done step
                        await compute(run.forward_backward)
                        for cb in callbacks:
                            await cb.on_gradients(step, strategy)
                        metrics = await strategy.step(step)
                    await run.after_step(step + 1, metrics)
                    await asyncio.sleep(0)  # let the other peers' tasks (and gossip) run
            finally:
                await strategy.aclose()
    run.result.elapsed_s = time.perf_counter() - run.start
    return run.result


class _Compute:
    """Runs forward/backward inline, or (``in_thread``) in one long-lived thread.

    The thread keeps the caller's torch thread count: OpenMP's count is per thread, and a fresh
    thread would use every core (measured: 2 threads where the loop asked for 1)."""

    def __init__(self, *, in_thread: bool) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="hyphae-compute", initializer=torch.set_num_threads,
                                        initargs=(torch.get_num_threads(),)) if in_thread else None

    async def __call__(self, fn: Callable[[], None]) -> None:
        """Run ``fn``; cancelled, still wait for its thread, so no step is left half-done
        behind a caller that goes on to save a checkpoint."""
        if self._pool is None:
            fn()
            return
        work = asyncio.get_running_loop().run_in_executor(self._pool, fn)
        try:
            await asyncio.shield(work)
        except asyncio.CancelledError:
            await asyncio.wait([work])
            raise

    def __enter__(self) -> _Compute:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


class _Run:
    """The loop's bookkeeping: micro-batches, the loss since the last log, the hooks."""

    def __init__(
        self,
        strategy: Strategy,
        batches: BatchStream,
        config: LoopConfig,
        val_set: Sequence[Batch] | None,
        checkpoints: CheckpointStore | None,
        callbacks: Sequence[Callback],
        start_step: int,
    ) -> None:
        self.strategy, self.batches, self.config = strategy, batches, config
        self.val_set, self.checkpoints, self.callbacks = val_set, checkpoints, callbacks
        self.result = TrainResult(steps=start_step)
        self.tokens_per_step = batches.batch_size * batches.seq_len * config.grad_accum_steps
        self.loss_sum = torch.zeros((), device=strategy.device)  # summed on device: no sync
        self.since_log = 0
        self.start = time.perf_counter()

    def forward_backward(self) -> None:
        n, device = self.config.grad_accum_steps, self.strategy.device
        for _ in range(n):
            x, y = self.batches.next()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            out = self.strategy.forward_backward(x, y, loss_scale=1.0 / n)
            self.loss_sum += out["loss"] / n

    async def after_step(self, done: int, metrics: Metrics) -> None:
        """Account for step `done` and run whatever is due: hooks, log, eval, checkpoint."""
        self.since_log += 1
        self.result.steps, self.result.tokens = done, self.result.tokens + self.tokens_per_step
        self.result.elapsed_s = time.perf_counter() - self.start
        for cb in self.callbacks:
            await cb.on_step(done)
        cfg = self.config
        last = done == cfg.max_steps
        if done % cfg.log_every == 0 or last:
            await self._log(done, metrics)
        if cfg.eval_every and (done % cfg.eval_every == 0 or last):
            await self._eval(done)
        if self.checkpoints is not None and cfg.checkpoint_every and (done % cfg.checkpoint_every == 0 or last):
            manifest = save_checkpoint(self.checkpoints, done, self.strategy, self.batches)
            for cb in self.callbacks:
                await cb.on_checkpoint(manifest)

    async def _log(self, done: int, metrics: Metrics) -> None:
        loss = float(self.loss_sum) / self.since_log  # the one device sync per log interval
        info = StepInfo(done, loss, self.result.tokens, self.result.elapsed_s, {k: float(v) for k, v in metrics.items()})
        self.loss_sum.zero_()
        self.since_log = 0
        self.result.logs.append(info)
        logger.info("step %d loss %.4f %s", done, info.loss, info.metrics)
        for cb in self.callbacks:
            await cb.on_log(info)

    async def _eval(self, done: int) -> None:
        val_loss = evaluate(self.strategy.eval_module(), self.val_set or (), strategy=self.strategy)
        info = EvalInfo(done, val_loss, self.result.tokens, time.perf_counter() - self.start)
        self.result.evals.append(info)
        logger.info("step %d val_loss %.4f", done, val_loss)
        for cb in self.callbacks:
            await cb.on_eval(info)


@torch.no_grad()
def evaluate(model: nn.Module, val_set: Sequence[Batch], *, strategy: Strategy | None = None) -> float:
    """Mean cross-entropy (nats/token) of `model` over `val_set`, in eval mode.

    Args:
        model: the weights to evaluate.
        val_set: fixed (inputs, targets) batches.
        strategy: if given, its autocast precision is used.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=device, dtype=torch.float64)
    try:
        for x, y in val_set:
            ctx = strategy.autocast() if strategy is not None else torch.autocast("cpu", enabled=False)
            with ctx:
                out = model(x.to(device), y.to(device))
            total += out.ce.double()
    finally:
        model.train(was_training)
    return float(total) / max(1, len(val_set))


def save_checkpoint(
    store: CheckpointStore, step: int, strategy: Strategy, batches: BatchStream
) -> Manifest:
    """Checkpoint everything needed to resume after `step` steps: weights, strategy, data, RNG."""
    state = {
        "step": step,
        "strategy": strategy.state_dict(),
        "data": batches.state_dict(),
        "rng": _rng_state(),
    }
    return store.save(
        step=step, algorithm=strategy.algorithm, model_config=strategy.model.config.to_dict(),
        weights=strategy.model.state_dict(), state=state,
    )


def resume(store: CheckpointStore, strategy: Strategy, batches: BatchStream) -> int:
    """Restore the newest loadable checkpoint into `strategy`/`batches`; returns its step (0 if none).

    A corrupt newest checkpoint is skipped with an error log and the next older one is used.

    Raises:
        CheckpointError: checkpoints exist but none is loadable, or one belongs to another
            algorithm or model shape.
    """
    steps = store.steps()
    for step in reversed(steps):
        try:
            ckpt = store.load(step, map_location=strategy.device)
        except CheckpointCorrupt as exc:
            logger.error("skipping corrupt checkpoint: %s", exc)
            continue
        _check_compatible(ckpt.manifest, strategy)
        strategy.model.load_state_dict(ckpt.weights)
        strategy.load_state_dict(ckpt.state["strategy"])
        batches.load_state_dict(ckpt.state["data"])
        _set_rng_state(ckpt.state["rng"])
        logger.info("resumed from %s", ckpt.path)
        return int(ckpt.state["step"])
    if steps:
        raise CheckpointError(f"no loadable checkpoint among steps {steps} in {store.directory}")
    return 0


def _check_compatible(manifest: Manifest, strategy: Strategy) -> None:
    if manifest.algorithm != strategy.algorithm:
        raise CheckpointError(
            f"checkpoint step {manifest.step} was written by {manifest.algorithm!r}, this run uses "
            f"{strategy.algorithm!r}; use another checkpoint directory"
        )
    if not _same_model(manifest.model_config, strategy.model.config):
        raise CheckpointError(
            f"checkpoint step {manifest.step} has model config {manifest.model_config}, "
            "which differs from this run's; use the same model preset or another directory"
        )


def _same_model(recorded: Mapping[str, Any], config: ModelConfig) -> bool:
    """Whether a manifest's model config is `config`. A manifest written before a ModelConfig
    field existed lacks it, and that field then had its default value (e.g. arch="gpt").
    Activation checkpointing changes how a step runs, not the weights: it may differ."""
    try:
        saved = ModelConfig.from_dict(recorded)
    except (ValueError, TypeError):
        return False
    return saved.replace(activation_checkpointing=config.activation_checkpointing) == config


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
