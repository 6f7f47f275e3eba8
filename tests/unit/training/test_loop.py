"""The training loop: a real tiny run on the stdlib learns; hooks, accounting, errors."""

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hyphae.training import (
    DDP,
    AdamWConfig,
    BatchStream,
    Callback,
    CommClosed,
    DataConfig,
    DDPConfig,
    EvalInfo,
    LoopConfig,
    ModelConfig,
    SimNetwork,
    StepInfo,
    Strategy,
    build_model,
    evaluate,
    model_config,
    load_corpus,
    run_virtual,
    train,
    validation_batches,
)

TOKENS = np.random.default_rng(3).integers(0, 256, 20_000).astype(np.uint8)


def test_tiny_preset_on_the_stdlib_corpus_lowers_validation_loss(tmp_path: Path) -> None:
    corpus = load_corpus(DataConfig(cache_dir=str(tmp_path)))
    comm = SimNetwork().add_peer()
    strategy = DDP(build_model(model_config("tiny"), seed=0), comm,
                   DDPConfig(optimizer=AdamWConfig(lr=3e-3, warmup_steps=10)))
    batches = BatchStream(corpus.train, batch_size=8, seq_len=64, seed=0, stream=comm.peer_id)
    val = validation_batches(corpus.val, batch_size=8, seq_len=64, n_batches=4)
    before = evaluate(strategy.model, val)
    result = run_virtual(train(strategy, batches, LoopConfig(max_steps=150, eval_every=50), val_set=val))
    curve = [before] + [e.val_loss for e in result.evals]
    assert [e.step for e in result.evals] == [50, 100, 150]
    assert curve[0] > 5.0  # ~ln 256 at init
    assert curve[-1] < curve[0] - 2.0, curve
    assert all(b < a for a, b in zip(curve, curve[1:])), curve


def test_hooks_run_on_schedule_and_tokens_are_counted(micro_config: ModelConfig) -> None:
    events: list[tuple[str, int]] = []

    class Recorder(Callback):
        async def on_step(self, step: int) -> None:
            events.append(("step", step))

        async def on_log(self, info: StepInfo) -> None:
            events.append(("log", info.step))
            assert np.isfinite(info.loss) and "lr" in info.metrics

        async def on_eval(self, info: EvalInfo) -> None:
            events.append(("eval", info.step))

    comm = SimNetwork().add_peer()
    strategy = DDP(build_model(micro_config), comm)
    batches = BatchStream([TOKENS], batch_size=2, seq_len=8, seed=0)
    val = validation_batches([TOKENS], batch_size=2, seq_len=8, n_batches=1)
    config = LoopConfig(max_steps=5, log_every=2, eval_every=4, grad_accum_steps=3)
    result = run_virtual(train(strategy, batches, config, val_set=val, callbacks=[Recorder()]))
    assert [s for kind, s in events if kind == "step"] == [1, 2, 3, 4, 5]
    assert [s for kind, s in events if kind == "log"] == [2, 4, 5]
    assert [s for kind, s in events if kind == "eval"] == [4, 5]
    assert result.tokens == 5 * 3 * 2 * 8 and batches.position == 15
    assert all(p.grad is None for p in strategy.model.parameters())


def test_eval_or_checkpoints_without_their_inputs_are_refused(micro_config: ModelConfig) -> None:
    comm = SimNetwork().add_peer()
    strategy = DDP(build_model(micro_config), comm)
    batches = BatchStream([TOKENS], batch_size=1, seq_len=8, seed=0)
    with pytest.raises(ValueError, match="needs a val_set"):
        run_virtual(train(strategy, batches, LoopConfig(max_steps=1, eval_every=1)))
    with pytest.raises(ValueError, match="needs a CheckpointStore"):
        run_virtual(train(strategy, batches, LoopConfig(max_steps=1, checkpoint_every=1)))


def test_strategy_background_tasks_start_and_stop_with_the_loop(micro_config: ModelConfig) -> None:
    calls: list[str] = []

    class Gossiping(DDP):
        async def start(self, tasks: asyncio.TaskGroup) -> None:
            self._gossip = tasks.create_task(self._run())

        async def _run(self) -> None:
            while True:
                calls.append("gossip")
                await self.comm.sleep(0.5)

        async def aclose(self) -> None:
            self._gossip.cancel()
            calls.append("closed")

    class Tick(Callback):
        def __init__(self, comm) -> None:
            self.comm = comm

        async def on_step(self, step: int) -> None:
            await self.comm.sleep(1.0)  # a gradient step that takes 1 s of virtual time

    comm = SimNetwork().add_peer()
    strategy = Gossiping(build_model(micro_config), comm)
    batches = BatchStream([TOKENS], batch_size=1, seq_len=8, seed=0)
    run_virtual(train(strategy, batches, LoopConfig(max_steps=3), callbacks=[Tick(comm)]))
    assert calls[-1] == "closed" and calls.count("gossip") >= 5


def test_a_killed_peer_stops_with_comm_closed_not_an_exception_group(micro_config: ModelConfig) -> None:
    net = SimNetwork()
    comm = net.add_peer()
    net.kill(comm.peer_id)
    strategy = DDP(build_model(micro_config), comm)
    with pytest.raises(CommClosed):
        run_virtual(train(strategy, BatchStream([TOKENS], batch_size=1, seq_len=8, seed=0), LoopConfig(max_steps=2)))


def test_loop_config_validates_and_round_trips() -> None:
    cfg = LoopConfig(max_steps=10, eval_every=5)
    assert LoopConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="log_every must be >= 1"):
        LoopConfig(max_steps=1, log_every=0)


def test_strategy_is_abstract(micro_config: ModelConfig) -> None:
    with pytest.raises(TypeError):
        Strategy(build_model(micro_config), SimNetwork().add_peer())  # type: ignore[abstract]


def test_cpu_runs_in_fp32_by_default(micro_config: ModelConfig) -> None:
    strategy = DDP(build_model(micro_config), SimNetwork().add_peer())
    assert strategy.autocast_dtype is None
    bf16 = DDP(build_model(micro_config), SimNetwork().add_peer(), precision="bf16")
    x = torch.randint(0, 256, (1, 8))
    assert bf16.forward_backward(x, x)["loss"].dtype == torch.float32


def test_strategies_are_built_by_name_from_plain_dicts(micro_config: ModelConfig) -> None:
    from hyphae.training import ALGORITHMS, DiLoCo, build_strategy

    comm = SimNetwork().add_peer()
    strategy = build_strategy("diloco", build_model(micro_config), comm, {"inner_steps": 7, "inner": {"lr": 0.01}})
    assert isinstance(strategy, DiLoCo) and strategy.config.inner_steps == 7 and strategy.config.inner.lr == 0.01
    assert set(ALGORITHMS) >= {"ddp", "diloco"}
    with pytest.raises(ValueError, match="unknown algorithm 'sgd'"):
        build_strategy("sgd", build_model(micro_config), comm)


def test_max_steps_none_trains_until_cancelled(micro_config: ModelConfig) -> None:
    comm = SimNetwork().add_peer()
    strategy = DDP(build_model(micro_config), comm)
    batches = BatchStream([TOKENS], batch_size=1, seq_len=8, seed=0)

    async def main() -> None:
        task = asyncio.create_task(train(strategy, batches, LoopConfig(max_steps=None)))
        while batches.position < 5:
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run_virtual(main())
    assert batches.position >= 5


class _SlowCompute(DDP):
    """Each forward/backward takes 0.2 s of real time and records when it ran."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.computing = False
        self.spans: list[tuple[float, float]] = []

    def forward_backward(self, inputs, targets, *, loss_scale: float = 1.0):
        self.computing = True
        start = time.monotonic()
        time.sleep(0.2)
        out = super().forward_backward(inputs, targets, loss_scale=loss_scale)
        self.spans.append((start, time.monotonic()))
        self.computing = False
        return out


@pytest.mark.parametrize("in_thread", [False, True])
def test_compute_in_thread_keeps_the_event_loop_moving_and_the_weights_lock_held(
        micro_config: ModelConfig, in_thread: bool) -> None:
    strategy = _SlowCompute(build_model(micro_config), SimNetwork().add_peer())
    batches = BatchStream([TOKENS], batch_size=1, seq_len=8, seed=0)
    ticks: list[float] = []
    saw_compute_under_lock: list[bool] = []

    async def ticker() -> None:
        while True:
            await asyncio.sleep(0.01)
            ticks.append(time.monotonic())

    async def gossip() -> None:
        while True:
            await asyncio.sleep(0.01)
            async with strategy.weights_lock:  # what a gossip does before touching weights
                saw_compute_under_lock.append(strategy.computing)

    async def main() -> None:
        side = [asyncio.create_task(ticker()), asyncio.create_task(gossip())]
        await train(strategy, batches, LoopConfig(max_steps=4, compute_in_thread=in_thread))
        for task in side:
            task.cancel()

    asyncio.run(main())
    assert len(strategy.spans) == 4 and saw_compute_under_lock and not any(saw_compute_under_lock)
    during = [t for t in ticks if any(a < t < b for a, b in strategy.spans)]
    if in_thread:
        assert len(during) >= 10, "the loop should tick while a step computes in its thread"
    else:
        assert during == [], "inline compute blocks the loop"


def test_a_cancelled_threaded_step_finishes_before_the_loop_returns(micro_config: ModelConfig) -> None:
    strategy = _SlowCompute(build_model(micro_config), SimNetwork().add_peer())
    batches = BatchStream([TOKENS], batch_size=1, seq_len=8, seed=0)

    async def main() -> None:
        task = asyncio.create_task(train(strategy, batches, LoopConfig(max_steps=None, compute_in_thread=True)))
        while not strategy.computing:
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not strategy.computing, "the step's thread was still running after cancellation"

    asyncio.run(main())
