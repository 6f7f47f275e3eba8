"""DDP over SimComm: N peers equal one process on the union batch; dropped peers don't stall."""

import asyncio

import numpy as np
import pytest
import torch

from hyphae.training import (
    DDP,
    AdamWConfig,
    BatchStream,
    DDPConfig,
    LoopConfig,
    ModelConfig,
    SimNetwork,
    build_model,
    run_virtual,
    train,
)
from hyphae.training.loop import Callback
from hyphae.training.optim import clip_grad_norm, param_groups

OPT = AdamWConfig(lr=3e-3, warmup_steps=0, weight_decay=0.1, grad_clip=0.5)
TOKENS = np.random.default_rng(0).integers(0, 256, 50_000).astype(np.uint8)


def _streams(n: int) -> list[BatchStream]:
    return [BatchStream([TOKENS], batch_size=4, seq_len=16, seed=0, stream=i) for i in range(n)]


def test_ddp_with_n_peers_equals_one_process_on_the_union_batch(micro_config: ModelConfig) -> None:
    n, steps = 3, 6
    net = SimNetwork(latency_s=0.01)
    strategies = [DDP(build_model(micro_config, seed=1), c, DDPConfig(optimizer=OPT)) for c in net.add_peers(n)]
    streams = _streams(n)

    async def run_all() -> None:
        await asyncio.gather(*(train(s, b, LoopConfig(max_steps=steps)) for s, b in zip(strategies, streams)))

    run_virtual(run_all())

    reference = build_model(micro_config, seed=1)
    opt = torch.optim.AdamW(param_groups(reference.named_parameters(), OPT.weight_decay), lr=OPT.lr, betas=OPT.betas, eps=OPT.eps)
    oracle_streams = _streams(n)
    for _ in range(steps):
        batches = [s.next() for s in oracle_streams]
        x = torch.cat([b[0] for b in batches])
        y = torch.cat([b[1] for b in batches])
        reference(x, y).loss.backward()
        clip_grad_norm(reference.parameters(), OPT.grad_clip)
        opt.step()
        opt.zero_grad()

    for s in strategies:
        for (name, p), q in zip(s.model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5, msg=name)
    # and the replicas agree with each other bit for bit (same averaged gradient everywhere)
    for s in strategies[1:]:
        for p, q in zip(s.model.parameters(), strategies[0].model.parameters()):
            assert torch.equal(p, q)


def test_ddp_keeps_training_when_a_peer_is_killed_at_a_step(micro_config: ModelConfig) -> None:
    net = SimNetwork()
    comms = net.add_peers(3)
    strategies = [DDP(build_model(micro_config, seed=0), c, DDPConfig(optimizer=OPT, timeout_s=5)) for c in comms]

    class KillAt(Callback):
        async def on_step(self, step: int) -> None:
            if step == 2:
                net.kill("peer-0002")

    async def run_all():
        loops = [
            train(s, b, LoopConfig(max_steps=5), callbacks=[KillAt()] if i == 2 else [])
            for i, (s, b) in enumerate(zip(strategies, _streams(3)))
        ]
        return await asyncio.gather(*loops, return_exceptions=True)

    results = run_virtual(run_all())
    assert results[0].steps == results[1].steps == 5
    assert results[0].logs[-1].metrics["peers"] == 2.0
    assert type(results[2]).__name__ == "CommClosed"
    for p, q in zip(strategies[0].model.parameters(), strategies[1].model.parameters()):
        assert torch.equal(p, q)


def test_ddp_config_from_dict_nests_the_optimizer_and_rejects_typos() -> None:
    cfg = DDPConfig.from_dict({"optimizer": {"lr": 0.01}, "timeout_s": 3})
    assert cfg.optimizer.lr == 0.01 and cfg.optimizer.betas == (0.9, 0.95)
    assert DDPConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown AdamWConfig key"):
        DDPConfig.from_dict({"optimizer": {"learning_rate": 0.01}})
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        DDPConfig(timeout_s=0)
