"""DiLoCo: the N = 1 oracle, identical replicas after every outer step, robustness, config."""

import asyncio
import hashlib

import numpy as np
import pytest
import torch

from hyphae.training import (
    AdamWConfig,
    BatchStream,
    DiLoCo,
    DiLoCoConfig,
    LoopConfig,
    ModelConfig,
    SimNetwork,
    build_model,
    run_virtual,
    train,
)
from hyphae.training.loop import Callback
from hyphae.training.optim import clip_grad_norm, param_groups

INNER = AdamWConfig(lr=3e-3, warmup_steps=2, weight_decay=0.1, grad_clip=1.0)
TOKENS = np.random.default_rng(1).integers(0, 256, 50_000).astype(np.uint8)


def _stream(i: int) -> BatchStream:
    return BatchStream([TOKENS], batch_size=4, seq_len=16, seed=0, stream=i)


def _digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().numpy().tobytes())
    return h.hexdigest()


def test_diloco_n1_lr1_mom0_equals_adamw(micro_config: ModelConfig) -> None:
    steps = 12
    cfg = DiLoCoConfig(inner=INNER, inner_steps=3, outer_lr=1.0, outer_momentum=0.0)
    comm = SimNetwork().add_peer()
    diloco = DiLoCo(build_model(micro_config, seed=2), comm, cfg)
    run_virtual(train(diloco, _stream(0), LoopConfig(max_steps=steps)))
    assert diloco.outer_steps == 4

    reference = build_model(micro_config, seed=2)
    opt = torch.optim.AdamW(param_groups(reference.named_parameters(), INNER.weight_decay), betas=INNER.betas, eps=INNER.eps)
    stream = _stream(0)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = INNER.lr_at(step)
        x, y = stream.next()
        reference(x, y).loss.backward()
        clip_grad_norm(reference.parameters(), INNER.grad_clip)
        opt.step()
        opt.zero_grad()

    worst = max((p - q).abs().max().item() for p, q in zip(diloco.model.parameters(), reference.parameters()))
    assert worst <= 1e-6, worst


def test_replicas_are_identical_after_every_diloco_outer_step(micro_config: ModelConfig) -> None:
    n, h, outer = 3, 4, 3
    net = SimNetwork(latency_s=0.05, bandwidth_bytes_per_s=1e6)
    cfg = DiLoCoConfig(inner=INNER, inner_steps=h)
    strategies = [DiLoCo(build_model(micro_config, seed=0), c, cfg) for c in net.add_peers(n)]
    seen: dict[int, set[str]] = {}

    class Record(Callback):
        def __init__(self, strategy: DiLoCo) -> None:
            self.strategy = strategy

        async def on_step(self, step: int) -> None:
            if step % h == 0:
                seen.setdefault(step, set()).add(_digest(self.strategy.model))
                slow = torch.cat([t.flatten() for t in self.strategy.slow.values()])
                model = torch.cat([p.detach().flatten() for p in self.strategy.model.parameters()])
                assert torch.equal(slow, model)  # θ was reset to φ

    async def run_all():
        await asyncio.gather(*(
            train(s, _stream(i), LoopConfig(max_steps=h * outer), callbacks=[Record(s)])
            for i, s in enumerate(strategies)
        ))

    run_virtual(run_all())
    assert sorted(seen) == [h * k for k in range(1, outer + 1)]
    assert all(len(digests) == 1 for digests in seen.values()), "replicas diverged at an outer step"
    before = _digest(build_model(micro_config, seed=0))
    assert before not in seen[h]  # and they did train


def test_survivors_stay_identical_when_a_peer_is_killed_mid_run(micro_config: ModelConfig) -> None:
    net = SimNetwork()
    cfg = DiLoCoConfig(inner=INNER, inner_steps=2, timeout_s=10)
    comms = net.add_peers(3)
    strategies = [DiLoCo(build_model(micro_config, seed=0), c, cfg) for c in comms]

    class KillAt(Callback):
        async def on_step(self, step: int) -> None:
            if step == 3:
                await comms[2].aclose()

    async def run_all():
        return await asyncio.gather(*(
            train(s, _stream(i), LoopConfig(max_steps=8), callbacks=[KillAt()] if i == 2 else [])
            for i, s in enumerate(strategies)
        ), return_exceptions=True)

    results = run_virtual(run_all())
    assert results[0].steps == results[1].steps == 8
    assert results[0].logs[-1].metrics["peers"] == 2.0
    assert _digest(strategies[0].model) == _digest(strategies[1].model)


def test_diloco_state_dict_round_trips(micro_config: ModelConfig) -> None:
    comm = SimNetwork().add_peer()
    a = DiLoCo(build_model(micro_config, seed=0), comm, DiLoCoConfig(inner=INNER, inner_steps=2))
    run_virtual(train(a, _stream(0), LoopConfig(max_steps=4)))
    b = DiLoCo(build_model(micro_config, seed=5), comm, DiLoCoConfig(inner=INNER, inner_steps=2))
    b.load_state_dict(a.state_dict())
    assert b.outer_steps == 2
    assert all(torch.equal(b.slow[k], v) for k, v in a.slow.items())
    assert b.outer.state_dict()["state"].keys() == a.outer.state_dict()["state"].keys()


@pytest.mark.parametrize(
    ("changes", "message"),
    [({"inner_steps": 0}, "inner_steps must be >= 1"), ({"outer_lr": -1}, "outer_lr"), ({"outer_momentum": 1.0}, "outer_momentum")],
)
def test_diloco_config_validation_names_the_field(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DiLoCoConfig(**changes)


def test_diloco_defaults_follow_the_paper() -> None:
    cfg = DiLoCoConfig()
    assert (cfg.inner_steps, cfg.outer_lr, cfg.outer_momentum, cfg.nesterov) == (500, 0.7, 0.9, True)


def _two_peer_run(micro_config: ModelConfig, device: str, outer_state_device: str) -> tuple[DiLoCo, ...]:
    net = SimNetwork()
    cfg = DiLoCoConfig(inner=INNER, inner_steps=3, outer_state_device=outer_state_device)
    strategies = [DiLoCo(build_model(micro_config, seed=0, device=device), c, cfg) for c in net.add_peers(2)]

    async def run_all():
        await asyncio.gather(*(train(s, _stream(i), LoopConfig(max_steps=6)) for i, s in enumerate(strategies)))

    run_virtual(run_all())
    return tuple(strategies)


def test_outer_state_on_the_cpu_gives_the_same_bits_as_beside_the_model(micro_config: ModelConfig) -> None:
    same = _two_peer_run(micro_config, "cpu", "same")
    cpu = _two_peer_run(micro_config, "cpu", "cpu")
    assert _digest(same[0].model) == _digest(cpu[0].model) == _digest(cpu[1].model)
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in cpu[0].slow.values())
    with pytest.raises(ValueError, match="outer_state_device"):
        DiLoCoConfig(outer_state_device="gpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_outer_state_device_cpu_keeps_phi_and_momentum_off_the_gpu(micro_config: ModelConfig) -> None:
    strategy = _two_peer_run(micro_config, "cuda", "cpu")[0]
    assert next(strategy.model.parameters()).device.type == "cuda"
    assert all(t.device.type == "cpu" for t in strategy.slow.values())
    momenta = [s["momentum_buffer"] for s in strategy.outer.state.values()]
    assert momenta and all(m.device.type == "cpu" for m in momenta)
    slow = torch.cat([t.flatten() for t in strategy.slow.values()])
    model = torch.cat([p.detach().flatten().cpu() for p in strategy.model.parameters()])
    assert torch.equal(slow, model)  # θ was reset to φ after the last outer step
