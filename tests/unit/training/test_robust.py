"""Robust aggregation: the math, the norm guard, config checks, and the hooks in NoLoCo/DiLoCo."""

import asyncio
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hyphae.training import BatchStream, LoopConfig, ModelConfig, SimNetwork, build_model, run_virtual, train
from hyphae.training import robust
from hyphae.training.diloco import DiLoCo, DiLoCoConfig
from hyphae.training.noloco import InnerAdamConfig, NoLoCo, NoLoCoConfig

TOKENS = np.random.default_rng(2).integers(0, 256, 20_000).astype(np.uint8)


def rows_of(*values: list[float]) -> list[dict[str, torch.Tensor]]:
    return [{"w": torch.tensor(v, dtype=torch.float32)} for v in values]


def test_median_and_trimmed_mean_ignore_one_outlier_per_coordinate() -> None:
    rows = rows_of([1, 10], [2, 20], [3, 30], [1e9, -1e9])
    assert robust.coordinate_median(rows)["w"].tolist() == [2.5, 15.0]
    assert robust.trimmed_mean(rows, 0.25)["w"].tolist() == [2.5, 15.0]  # drops 1 at each end
    odd = rows_of([1], [5], [-1e30])
    assert robust.coordinate_median(odd)["w"].tolist() == [1.0]
    assert robust.aggregate(rows_of([1], [2], [6]), "none")["w"].tolist() == [3.0]


@pytest.mark.parametrize(("n", "frac", "t"), [(1, 0.25, 0), (2, 0.25, 0), (3, 0.1, 1), (8, 0.25, 2), (9, 0.49, 4),
                                               (5, 0.0, 0)])
def test_trim_count(n: int, frac: float, t: int) -> None:
    assert robust.trim_count(n, frac) == t


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.floats(-1e6, 1e6), min_size=3, max_size=3), min_size=3, max_size=9),
       st.sampled_from(["median", "trimmed_mean"]))
def test_robust_result_stays_within_the_honest_range_with_one_liar(honest: list[list[float]], method: str) -> None:
    rows = rows_of(*honest, [1e30, -1e30, float(np.float32(3e38))])
    out = robust.aggregate(rows, method, 0.25)["w"]
    low = torch.tensor(honest).min(dim=0).values
    high = torch.tensor(honest).max(dim=0).values
    assert bool(((out >= low - 1e-3 * low.abs() - 1e-3) & (out <= high + 1e-3 * high.abs() + 1e-3)).all())


def test_aggregates_are_deterministic_and_exact_for_equal_rows() -> None:
    w = {"w": torch.randn(7, 5), "b": torch.randn(3)}
    for method in robust.ROBUST_METHODS:
        out = robust.aggregate([w, w, w], method)
        assert all(torch.equal(out[k], w[k]) for k in w)


def test_norm_guard_learns_the_honest_scale_and_rejects_scaled_vectors() -> None:
    guard = robust.NormGuard(3.0)
    assert guard.check(0.0, own_norm=0.0)  # nobody moved yet: only zero passes
    assert not guard.check(1.0, own_norm=0.0)
    for norm in (1.0, 1.2, 0.9, 1.1):
        assert guard.check(norm, own_norm=1.0)
    assert guard.check(2.9, own_norm=0.01)  # the median of accepted norms anchors the scale
    assert not guard.check(30.0, own_norm=1.0) and not guard.check(math.nan, own_norm=1.0)
    assert guard.rejected == 3


def test_finite_norm_and_distance() -> None:
    a = {"x": torch.tensor([3.0, 4.0])}
    assert robust.global_norm(a) == 5.0 and robust.distance(a, {"x": torch.zeros(2)}) == 5.0
    assert robust.is_finite(a) and not robust.is_finite({"x": torch.tensor([1.0, math.inf])})


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(robust="mean"), "robust must be one of"),
    (dict(trim_fraction=0.5), "trim_fraction"),
    (dict(norm_clip=0.5), "norm_clip"),
    (dict(norm_clip=math.inf), "norm_clip"),
    (dict(norm_clip=True), "norm_clip"),
])
def test_configs_refuse_bad_robust_options(kwargs: dict, match: str) -> None:
    for cls in (NoLoCoConfig, DiLoCoConfig):
        with pytest.raises(ValueError, match=match):
            cls(**kwargs)
    assert NoLoCoConfig.from_dict({"robust": "median", "norm_clip": 3}).robust == "median"


MICRO = ModelConfig(vocab_size=256, context_length=16, n_layer=2, n_head=2, d_model=32)


def _liar(comm, scale: float = -50.0):
    inner = comm.exchange

    async def lie(peer, tensors, **kw):
        return await inner(peer, {k: t * scale + (1.0 if "phi" in k else 0.0) for k, t in tensors.items()}, **kw)

    comm.exchange = lie


def _train(strategies, comms, steps: int) -> None:
    async def main():
        await asyncio.gather(*(train(s, BatchStream([TOKENS], batch_size=4, seq_len=16, seed=0, stream=c.peer_id),
                                     LoopConfig(max_steps=steps)) for s, c in zip(strategies, comms)))

    torch.manual_seed(0)
    run_virtual(main())


def test_noloco_with_norm_clip_rejects_a_liars_update_and_keeps_finite_weights() -> None:
    net = SimNetwork(latency_s=0.01)
    comms = net.add_peers(4)
    _liar(comms[0])
    cfg = NoLoCoConfig(inner=InnerAdamConfig(lr=3e-3, warmup_steps=2), inner_steps=4, norm_clip=3.0)
    strategies = [NoLoCo(build_model(MICRO, seed=0), c, cfg, precision="fp32") for c in comms]
    _train(strategies, comms, 16)
    honest = strategies[1:]
    assert sum(s.rejected_updates for s in honest) >= 1
    assert all(robust.is_finite(dict(s.model.named_parameters())) for s in honest)
    assert all(max(p.abs().max().item() for p in s.slow.values()) < 5 for s in honest)


def test_noloco_always_drops_a_non_finite_update_even_without_options() -> None:
    net = SimNetwork(latency_s=0.01)
    comms = net.add_peers(2)
    _liar(comms[0], scale=math.nan)
    cfg = NoLoCoConfig(inner=InnerAdamConfig(lr=3e-3, warmup_steps=2), inner_steps=4)
    strategies = [NoLoCo(build_model(MICRO, seed=0), c, cfg, precision="fp32") for c in comms]
    _train(strategies, comms, 8)
    assert strategies[1].rejected_updates == 2
    assert robust.is_finite(dict(strategies[1].model.named_parameters()))


def test_noloco_robust_median_on_equal_replicas_keeps_them_bit_identical() -> None:
    net = SimNetwork(latency_s=0.01)
    comms = net.add_peers(3)
    cfg = NoLoCoConfig(inner=InnerAdamConfig(lr=3e-3, warmup_steps=2), inner_steps=4, group_size=3,
                       robust="median")
    strategies = [NoLoCo(build_model(MICRO, seed=0), c, cfg, precision="fp32") for c in comms]

    async def main():  # identical data everywhere: the median of equal rows is those rows
        await asyncio.gather(*(train(s, BatchStream([TOKENS], batch_size=4, seq_len=16, seed=0, stream=0),
                                     LoopConfig(max_steps=8)) for s in strategies))

    run_virtual(main())
    ref = [p.detach().clone() for p in strategies[0].model.parameters()]
    for s in strategies[1:]:
        assert all(torch.equal(a, b) for a, b in zip(ref, s.model.parameters()))


def test_diloco_robust_gathers_every_member_and_ignores_a_liar() -> None:
    net = SimNetwork(latency_s=0.01)
    comms = net.add_peers(4)
    _liar(comms[0], scale=1e6)
    cfg = DiLoCoConfig(inner_steps=4, robust="trimmed_mean", norm_clip=3.0)
    strategies = [DiLoCo(build_model(MICRO, seed=0), c, cfg, precision="fp32") for c in comms]
    clean_net = SimNetwork(latency_s=0.01)
    clean_comms = clean_net.add_peers(4)
    clean = [DiLoCo(build_model(MICRO, seed=0), c, DiLoCoConfig(inner_steps=4), precision="fp32") for c in clean_comms]
    _train(strategies, comms, 8)
    _train(clean, clean_comms, 8)
    gap = max(robust.distance(dict(s.model.named_parameters()), dict(clean[1].model.named_parameters()))
              for s in strategies[1:])
    size = robust.global_norm(dict(clean[1].model.named_parameters()))
    assert gap < 0.05 * size  # near the clean run, not thrown off by a 1e6-scaled Δ
