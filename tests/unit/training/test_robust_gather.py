"""Safe by default: DiLoCo, DDP and SPES with their default configs refuse a NaN member, clip a
scaled one to the members' median norm, and tell the node who was refused — and with the checks
switched off (norm_clip = 0) the same NaN poisons everyone, so the tests can fail."""

import asyncio
import math

import numpy as np
import pytest
import torch

from hyphae.training import BatchStream, LoopConfig, ModelConfig, SimNetwork, build_model, run_virtual, train
from hyphae.training import robust
from hyphae.training._robust_gather import gather_checked
from hyphae.training.ddp import DDP, DDPConfig
from hyphae.training.diloco import DiLoCo, DiLoCoConfig
from hyphae.training.optim import AdamWConfig
from hyphae.training.spes import SPES, SPESConfig

TOKENS = np.random.default_rng(5).integers(0, 256, 20_000).astype(np.uint8)
MICRO = ModelConfig(vocab_size=256, context_length=16, n_layer=2, n_head=2, d_model=32)
POISONER = 0


def _poison(comm, scale: float = math.nan) -> None:
    """Make `comm` send every tensor it exchanges or all-reduces times `scale` (NaN by default)."""
    exchange, all_reduce = comm.exchange, comm.all_reduce

    async def bad_exchange(peer, tensors, **kw):
        return await exchange(peer, {k: t * scale for k, t in tensors.items()}, **kw)

    async def bad_all_reduce(tensors, **kw):
        return await all_reduce({k: t * scale for k, t in tensors.items()}, **kw)

    comm.exchange, comm.all_reduce = bad_exchange, bad_all_reduce


def _record_refusals(comms) -> list[tuple[str, str, str]]:
    """(reporter, refused peer, reason) for every `Comm.refuse` call."""
    seen: list[tuple[str, str, str]] = []
    for comm in comms:
        async def refuse(peer, reason, _me=comm.peer_id):
            seen.append((_me, peer, reason))

        comm.refuse = refuse
    return seen


def _run(strategies, comms, steps: int) -> None:
    async def main():
        await asyncio.gather(*(
            train(s, BatchStream([TOKENS], batch_size=4, seq_len=16, seed=0, stream=c.peer_id),
                  LoopConfig(max_steps=steps)) for s, c in zip(strategies, comms)))

    torch.manual_seed(0)
    run_virtual(main())


def _finite(strategy) -> bool:
    return robust.is_finite(dict(strategy.model.named_parameters()))


def _group(algorithm: str, config, n: int = 4, *, model: ModelConfig = MICRO):
    net = SimNetwork(latency_s=0.01)
    comms = net.add_peers(n)
    cls = {"diloco": DiLoCo, "ddp": DDP, "spes": SPES}[algorithm]
    return comms, [cls(build_model(model, seed=0), c, config, precision="fp32") for c in comms]


CONFIGS = {
    "diloco": lambda **kw: DiLoCoConfig(inner=AdamWConfig(lr=3e-3, warmup_steps=2), inner_steps=4, **kw),
    "ddp": lambda **kw: DDPConfig(optimizer=AdamWConfig(lr=3e-3, warmup_steps=2), **kw),
    "spes": lambda **kw: SPESConfig(optimizer=AdamWConfig(lr=3e-3, warmup_steps=2), sync_steps=4,
                                    merge_interval=0, **kw),
}


def _model(algorithm: str) -> ModelConfig:
    return MICRO.replace(n_experts=4, top_k=2) if algorithm == "spes" else MICRO


@pytest.mark.parametrize("algorithm", ["diloco", "ddp", "spes"])
def test_by_default_a_nan_member_is_refused_reported_and_the_others_stay_finite(algorithm: str) -> None:
    comms, strategies = _group(algorithm, CONFIGS[algorithm](), model=_model(algorithm))
    _poison(comms[POISONER])
    refusals = _record_refusals(comms)
    _run(strategies, comms, 8)
    honest = strategies[1:]
    assert all(_finite(s) for s in honest)
    poisoner = comms[POISONER].peer_id
    assert all(s.rejected_updates >= 1 and s.rejected_peers == [poisoner] for s in honest)
    reporters = {who for who, peer, why in refusals if peer == poisoner and "non-finite" in why}
    assert reporters == {c.peer_id for c in comms[1:]}
    assert all(peer == poisoner for _, peer, _ in refusals)  # nobody honest is reported


@pytest.mark.parametrize("algorithm", ["diloco", "ddp", "spes"])
def test_with_the_checks_switched_off_the_same_nan_poisons_every_member(algorithm: str) -> None:
    """The counter-test: what the default protects against is real. (The off path still skips a
    non-finite all-reduce result, so the members stay finite but learn nothing from anyone: every
    round failed, and nobody could say who poisoned it.)"""
    comms, strategies = _group(algorithm, CONFIGS[algorithm](norm_clip=0.0), model=_model(algorithm))
    _poison(comms[POISONER])
    refusals = _record_refusals(comms)
    _run(strategies, comms, 8)
    assert not refusals
    assert all(s.failed_rounds >= 1 for s in strategies[1:])


def test_diloco_honest_members_stay_bit_identical_beside_a_nan_member() -> None:
    comms, strategies = _group("diloco", CONFIGS["diloco"]())
    _poison(comms[POISONER])
    _run(strategies, comms, 8)
    ref = [p.detach() for p in strategies[1].model.parameters()]
    for s in strategies[2:]:
        assert all(torch.equal(a, b) for a, b in zip(ref, s.model.parameters()))


def test_a_member_scaling_its_delta_a_millionfold_moves_diloco_no_more_than_the_clip_allows() -> None:
    """DiLoCo's outer SGD steps by the averaged Δ itself: unclipped, a −10⁶-scaled Δ throws φ
    away; clipped to 3 × the median norm it can move φ by only a few honest Δs."""
    def run(attack: bool = True, **options):
        comms, strategies = _group("diloco", CONFIGS["diloco"](**options))
        if attack:
            _poison(comms[POISONER], scale=-1e6)
        _run(strategies, comms, 8)
        return strategies

    clean = run(attack=False)
    clipped, off = run(), run(norm_clip=0.0)
    reference = dict(clean[1].model.named_parameters())
    honest_travel = robust.distance(reference, dict(build_model(MICRO, seed=0).named_parameters()))

    def gap(s) -> float:
        return robust.distance(dict(s.model.named_parameters()), reference)

    assert max(gap(s) for s in clipped[1:]) < 3 * honest_travel
    assert gap(off[1]) > 1e4 * honest_travel


def test_gather_scales_a_row_over_k_times_the_median_norm_down_to_that() -> None:
    net = SimNetwork()
    comms = net.add_peers(4)
    values = [1.0, 2.0, 3.0, 1000.0]  # norms 1, 2, 3, 1000: median 2.5, cap 7.5 for k = 3

    async def one(comm, v):
        return await gather_checked(comm, {"w": torch.tensor([v])}, group=[c.peer_id for c in comms],
                                    tag="t", timeout_s=5.0, norm_clip=3.0)

    async def main():
        return await asyncio.gather(*(one(c, v) for c, v in zip(comms, values)))

    results = run_virtual(main())
    expected = (1.0 + 2.0 + 3.0 + 7.5) / 4
    assert all(r.tensors["w"].item() == pytest.approx(expected) for r in results)
    assert all(r.clipped == (comms[3].peer_id,) and not r.refused for r in results)
