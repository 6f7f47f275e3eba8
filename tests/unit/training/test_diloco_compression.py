"""DiLoCo with SparseLoCo compression and with overlapped outer steps, on simulated peers.

Claims: compressed DiLoCo trains and keeps every member bit-identical; a member sending garbage
or a scaled-up contribution is refused or clipped (issue 23's protections on the compressed
path); overlap keeps φ bit-identical, keeps the local steps (N = 1 oracle: plain AdamW) and
takes the network wait off the worker.
"""

from __future__ import annotations

import asyncio
import hashlib
import math

import numpy as np
import pytest
import torch

from hyphae.training import BatchStream, LoopConfig, ModelConfig, SimNetwork, build_model, evaluate, run_virtual, train
from hyphae.training.diloco import DiLoCo, DiLoCoConfig
from hyphae.training.loop import Callback
from hyphae.training.optim import AdamWConfig, clip_grad_norm, param_groups

INNER = AdamWConfig(lr=3e-3, warmup_steps=2, weight_decay=0.1, grad_clip=1.0)
TOKENS = np.random.default_rng(1).integers(0, 64, 50_000).astype(np.uint8)  # 64 symbols: learnable fast
SPARSE = {"compression": "topk-int8", "density": 0.05, "chunk_size": 256}


def _stream(i: int | str) -> BatchStream:
    return BatchStream([TOKENS], batch_size=4, seq_len=16, seed=0, stream=i)


def _digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


class _Digests(Callback):
    """Records the digest of φ (and θ) of a strategy after every step."""

    def __init__(self, strategy: DiLoCo, out: dict[tuple[str, int], set[str]]) -> None:
        self.strategy, self.out = strategy, out

    async def on_step(self, step: int) -> None:
        self.out.setdefault(("phi", step), set()).add(_digest(self.strategy.slow.values()))
        self.out.setdefault(("theta", step), set()).add(_digest(self.strategy.model.parameters()))


def _run(config: ModelConfig, cfg: DiLoCoConfig, n: int, steps: int, *, same_data: bool = False,
         net: SimNetwork | None = None, paced_s: float = 0.0):
    net = net or SimNetwork(latency_s=0.01, bandwidth_bytes_per_s=1e6)
    comms = net.add_peers(n)
    strategies = [DiLoCo(build_model(config, seed=0), c, cfg) for c in comms]
    digests: dict[tuple[str, int], set[str]] = {}
    waits: list[float] = []

    class Pace(Callback):
        def __init__(self, comm) -> None:
            self.comm, self.resumed = comm, 0.0

        async def on_step(self, step: int) -> None:
            waits.append(self.comm.now() - self.resumed)
            await self.comm.sleep(paced_s)
            self.resumed = self.comm.now()

    async def main():
        await asyncio.gather(*(
            train(s, _stream(0 if same_data else c.peer_id), LoopConfig(max_steps=steps),
                  callbacks=[_Digests(s, digests), Pace(c)]) for s, c in zip(strategies, comms)))

    torch.manual_seed(0)
    run_virtual(main())
    return strategies, digests, sum(waits) / n


@pytest.mark.parametrize("compression", ["topk-int8", "topk-2bit"])
def test_compressed_diloco_lowers_the_loss_and_members_stay_bit_identical(micro_config: ModelConfig,
                                                                          compression: str) -> None:
    h = 4
    cfg = DiLoCoConfig(inner=INNER, inner_steps=h, **{**SPARSE, "compression": compression})
    val = [_stream("val").next() for _ in range(2)]
    before = evaluate(build_model(micro_config, seed=0), val)
    strategies, digests, _ = _run(micro_config, cfg, 3, 6 * h)
    for step in range(h, 6 * h + 1, h):
        assert len(digests["phi", step]) == 1 and len(digests["theta", step]) == 1, step
    assert all(s.outer_steps == 6 and s.rejected_updates == 0 for s in strategies)
    assert evaluate(strategies[0].model, val) < before - 0.5
    assert strategies[0].compressor.error.abs().sum() > 0  # something is still owed: it was compressed


def test_compressed_rounds_move_far_fewer_bytes(micro_config: ModelConfig) -> None:
    def sent(extra: dict) -> int:
        net = SimNetwork()
        _run(micro_config, DiLoCoConfig(inner=INNER, inner_steps=2, **extra), 3, 4, net=net)
        return sum(net.traffic(p).sent_bytes for p in net.members())

    dense, sparse = sent({}), sent({**SPARSE, "density": 0.01})
    assert dense / sparse > 20


def _poison_scales(comm, scale: float) -> None:
    """Make `comm` send its compressed contribution with every scale times `scale`."""
    exchange = comm.exchange

    async def bad(peer, tensors, **kw):
        return await exchange(peer, {k: t * scale if k == "scales" else t for k, t in tensors.items()}, **kw)

    comm.exchange = bad


@pytest.mark.parametrize(("scale", "refused"), [(math.nan, True), (1000.0, False)])
def test_a_poisoned_compressed_member_is_refused_or_clipped(micro_config: ModelConfig, scale: float,
                                                            refused: bool) -> None:
    net = SimNetwork()
    comms = net.add_peers(4)
    cfg = DiLoCoConfig(inner=INNER, inner_steps=2, **SPARSE)
    strategies = [DiLoCo(build_model(micro_config, seed=0), c, cfg) for c in comms]
    _poison_scales(comms[0], scale)
    reports: list[tuple[str, str]] = []
    for comm in comms:
        async def refuse(peer, reason, _me=comm.peer_id):
            reports.append((_me, peer))
        comm.refuse = refuse

    async def main():
        await asyncio.gather(*(train(s, _stream(c.peer_id), LoopConfig(max_steps=6))
                               for s, c in zip(strategies, comms)))

    torch.manual_seed(0)
    run_virtual(main())
    honest = strategies[1:]
    assert len({_digest(s.slow.values()) for s in honest}) == 1
    assert all(torch.isfinite(t).all() for s in honest for t in s.slow.values())
    if refused:  # NaN scales: refused by every honest member each round, and reported
        assert all(s.rejected_updates == 3 for s in honest)
        assert {(me, bad) for me, bad in reports} == {(c.peer_id, comms[0].peer_id) for c in comms[1:]}
    else:  # 1000x: clipped to 3x the median norm, so φ moves about as much as without it
        assert not reports
        clean, _, _ = _run(micro_config, cfg, 4, 6, net=SimNetwork())
        moved = [sum(float((s.slow[n] - p.detach()).norm()) for n, p in build_model(micro_config, seed=0).named_parameters())
                 for s in (honest[0], clean[1])]
        assert moved[0] < 3 * moved[1]


def test_overlap_with_one_peer_lr1_mom0_is_plain_adamw(micro_config: ModelConfig) -> None:
    """θ ← φ_new + (θ − θ_b) with φ_new = θ_b (N = 1, outer lr 1, no momentum): the local steps stay."""
    steps = 12
    cfg = DiLoCoConfig(inner=INNER, inner_steps=3, outer_lr=1.0, outer_momentum=0.0, overlap_steps=2)
    diloco = DiLoCo(build_model(micro_config, seed=2), SimNetwork().add_peer(), cfg)
    run_virtual(train(diloco, _stream(0), LoopConfig(max_steps=steps)))
    assert diloco.outer_steps == 4  # the round started at step 12 was finished by aclose

    reference = build_model(micro_config, seed=2)
    opt = torch.optim.AdamW(param_groups(reference.named_parameters(), INNER.weight_decay), betas=INNER.betas,
                            eps=INNER.eps)
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
    assert worst <= 1e-5, worst


@pytest.mark.parametrize("extra", [{}, SPARSE])
def test_overlap_keeps_members_in_agreement(micro_config: ModelConfig, extra: dict) -> None:
    h, tau = 4, 2
    cfg = DiLoCoConfig(inner=INNER, inner_steps=h, overlap_steps=tau, **extra)
    _, digests, _ = _run(micro_config, cfg, 3, 5 * h)
    for step in range(h + tau, 5 * h, h):  # right after each round was applied
        assert len(digests["phi", step]) == 1, step
    _, same, _ = _run(micro_config, cfg, 3, 5 * h, same_data=True)  # identical data: θ agrees too
    assert all(len(d) == 1 for (kind, _), d in same.items())


def test_overlap_takes_the_network_wait_off_the_worker(micro_config: ModelConfig) -> None:
    """A slow link (~0.18 s per exchange) and 1 s steps: waiting drops to (almost) nothing."""
    def blocked(overlap: int) -> float:
        net = SimNetwork(latency_s=0.05, bandwidth_bytes_per_s=1e6)
        cfg = DiLoCoConfig(inner=INNER, inner_steps=4, overlap_steps=overlap)
        return _run(micro_config, cfg, 3, 12, net=net, paced_s=1.0)[2]

    before, after = blocked(0), blocked(1)
    assert before > 0.15 * 3  # three rounds, each waiting on the transfer
    assert after < 0.05 * before


def test_compressed_state_round_trips_the_error_feedback(micro_config: ModelConfig) -> None:
    cfg = DiLoCoConfig(inner=INNER, inner_steps=2, **SPARSE)
    a = DiLoCo(build_model(micro_config, seed=0), SimNetwork().add_peer(), cfg)
    run_virtual(train(a, _stream(0), LoopConfig(max_steps=4)))
    b = DiLoCo(build_model(micro_config, seed=0), SimNetwork().add_peer(), cfg)
    b.load_state_dict(a.state_dict())
    assert a.compressor.error.abs().sum() > 0 and torch.equal(a.compressor.error, b.compressor.error)


@pytest.mark.parametrize(
    ("changes", "message"),
    [({"overlap_steps": 5, "inner_steps": 4}, "overlap_steps must be <= inner_steps"),
     ({"overlap_steps": -1}, "overlap_steps must be >= 0"), ({"compression": "gzip"}, "compression must be one of"),
     ({"density": 0}, "density"), ({"average": "max"}, "average must be one of")],
)
def test_config_names_the_bad_field(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DiLoCoConfig(**changes)
