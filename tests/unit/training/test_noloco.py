"""NoLoCo: the oracles of ALGORITHMS.md §2, the pairing, churn, the int8 wire format, config."""

import asyncio
import hashlib
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hyphae.kernels import noloco_outer_
from hyphae.training import (
    BatchStream,
    Callback,
    CommClosed,
    DiLoCo,
    DiLoCoConfig,
    LoopConfig,
    ModelConfig,
    SimComm,
    SimNetwork,
    build_model,
    build_strategy,
    run_virtual,
    train,
)
from hyphae.training._pairing import group_of, groups, permutation, round_key
from hyphae.training.noloco import InnerAdamConfig, NoLoCo, NoLoCoConfig, group_means

INNER = InnerAdamConfig(lr=3e-3, warmup_steps=2, grad_clip=1.0)
TOKENS = np.random.default_rng(1).integers(0, 256, 50_000).astype(np.uint8)


def _stream(i: int | str) -> BatchStream:
    return BatchStream([TOKENS], batch_size=4, seq_len=16, seed=0, stream=i)


def _digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().numpy().tobytes())
    return h.hexdigest()


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().flatten().float() for t in tensors])


def _run_all(strategies, streams, steps: int, callbacks=None) -> list:
    async def main():
        return await asyncio.gather(*(
            train(s, b, LoopConfig(max_steps=steps), callbacks=(callbacks or {}).get(i, []))
            for i, (s, b) in enumerate(zip(strategies, streams))
        ))

    return run_virtual(main())


# --- pairing (oracle 5) ---------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=40),
    t=st.integers(min_value=0, max_value=10**6),
    size=st.integers(min_value=2, max_value=6),
    run=st.text(max_size=8),
    shuffle_seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_groups_are_a_partition_identical_on_every_member(n, t, size, run, shuffle_seed) -> None:
    members = [f"peer-{i:03d}" for i in range(n)]
    shuffled = list(members)
    np.random.default_rng(shuffle_seed).shuffle(shuffled)
    result = groups(run, t, members, size)
    assert groups(run, t, shuffled + shuffled[:2], size) == result  # order/duplicates do not matter
    flat = [p for g in result for p in g]
    assert sorted(flat) == members  # a partition: everyone exactly once
    assert [len(g) for g in result] == [size] * (n // size) + [1] * (n % size)
    for peer in members:  # every member, computing alone, finds the same group
        assert group_of(run, t, members, size, peer) == next(g for g in result if peer in g)


def test_pairs_are_pi_g_and_pi_g_plus_half_of_the_sorted_members() -> None:
    members = ["d", "a", "c", "b", "f", "e"]
    perm = permutation(round_key("run", 7), 6)
    ids = sorted(members)
    assert groups("run", 7, members, 2) == [(ids[perm[g]], ids[perm[g + 3]]) for g in range(3)]
    odd = groups("run", 7, members[:5], 2)
    assert [len(g) for g in odd] == [2, 2, 1]  # the odd one out takes a local-only step


def test_pairing_is_pinned_across_versions() -> None:
    # A changed pairing would silently split a run whose members run different hyphae versions.
    assert permutation(round_key("hyphae", 0), 8) == [4, 6, 0, 7, 2, 1, 3, 5]
    assert groups("hyphae", 3, [f"p{i}" for i in range(6)], 2) == [("p3", "p0"), ("p5", "p2"), ("p1", "p4")]


def test_pairing_changes_every_round_and_is_uniform() -> None:
    members = ["a", "b", "c", "d"]
    counts = Counter(frozenset(frozenset(g) for g in groups("r", t, members, 2)) for t in range(3000))
    assert len(counts) == 3  # the three perfect matchings of 4 members
    assert all(abs(c / 3000 - 1 / 3) < 0.04 for c in counts.values())
    perms = Counter(tuple(permutation(round_key("r", t), 3)) for t in range(6000))
    assert len(perms) == 6 and all(abs(c / 6000 - 1 / 6) < 0.025 for c in perms.values())


def test_groups_reject_a_group_size_below_two() -> None:
    with pytest.raises(ValueError, match="group_size must be an integer >= 2"):
        groups("r", 0, ["a", "b"], 1)


# --- the outer rule (oracles 1-3, 6) ---------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(k=st.integers(min_value=2, max_value=64), seed=st.integers(min_value=0, max_value=1000))
def test_group_mean_of_equal_slow_weights_is_exactly_them(k: int, seed: int) -> None:
    phi = {"w": torch.randn(33, generator=torch.Generator().manual_seed(seed)) * 10 ** (seed % 7 - 3)}
    prog = {"w": torch.randn(33)}
    others = {f"p{i}": ({"w": phi["w"].clone()}, {"w": prog["w"].clone()}) for i in range(k - 1)}
    phibar, dbar = group_means((phi, prog), others, "me")
    assert torch.equal(phibar["w"], phi["w"])  # consensus term c·(φ̄ − φ) is exactly zero
    assert torch.equal(dbar["w"], prog["w"])


def test_group_means_are_bit_identical_on_every_member() -> None:
    rows = {p: ({"w": torch.randn(50)}, {"w": torch.randn(50)}) for p in "abcde"}
    results = []
    for me in rows:
        others = {p: v for p, v in rows.items() if p != me}
        results.append(group_means(rows[me], others, me))
    assert all(torch.equal(r[0]["w"], results[0][0]["w"]) and torch.equal(r[1]["w"], results[0][1]["w"])
               for r in results)


async def _outer_group(n: int, c: float, *, equal_momenta: bool, seed: int = 0):
    """n NoLoCo peers in one group, hand-set φ, δ, θ; one concurrent outer step."""
    cfg = ModelConfig(vocab_size=16, context_length=4, n_layer=1, n_head=1, d_model=8)
    net = SimNetwork()
    conf = NoLoCoConfig(inner=INNER, group_size=n, consensus=c, norm_clip=0.0)  # random φs: the guard off
    peers = [NoLoCo(build_model(cfg, seed=0), comm, conf) for comm in net.add_peers(n)]
    gen = torch.Generator().manual_seed(seed)
    shared = {name: torch.randn(t.shape, generator=gen) for name, t in peers[0].slow.items()}
    before = []
    for peer in peers:
        with torch.no_grad():
            for name, p in peer.model.named_parameters():
                peer.slow[name].copy_(torch.randn(p.shape, generator=gen))
                peer.momentum[name].copy_(shared[name] if equal_momenta else torch.randn(p.shape, generator=gen))
                p.copy_(peer.slow[name] + 0.1 * torch.randn(p.shape, generator=gen))
        before.append({
            "phi": _flat(peer.slow.values()), "delta": _flat(peer.momentum.values()),
            "theta": _flat(peer.model.parameters()),
        })
    sizes = await asyncio.gather(*(peer.outer_step() for peer in peers))
    after = [{"phi": _flat(p.slow.values()), "delta": _flat(p.momentum.values()),
              "theta": _flat(p.model.parameters())} for p in peers]
    return conf, sizes, before, after


def test_consensus_term_preserves_the_group_mean() -> None:
    for n in (2, 3):
        conf, sizes, before, after = run_virtual(_outer_group(n, 0.7, equal_momenta=False))
        assert sizes == [n] * n
        a, b = conf.outer_lr, conf.outer_momentum
        mean = lambda key, rows: torch.stack([r[key] for r in rows]).mean(0)  # noqa: E731
        dbar = mean("theta", before) - mean("phi", before)
        expected = mean("phi", before) + b * mean("delta", before) + a * dbar
        torch.testing.assert_close(mean("phi", after), expected, atol=1e-5, rtol=1e-5)
        assert all(torch.equal(r["theta"], r["phi"]) for r in after)  # θ ← φ


def test_pair_with_equal_momenta_contracts_its_gap_by_one_minus_c() -> None:
    for c in (0.7, 0.3, 0.0):
        _, _, before, after = run_virtual(_outer_group(2, c, equal_momenta=True, seed=3))
        gap_before = before[0]["phi"] - before[1]["phi"]
        gap_after = after[0]["phi"] - after[1]["phi"]
        torch.testing.assert_close(gap_after, (1 - c) * gap_before, atol=2e-5, rtol=1e-4)


def test_noloco_with_everyone_in_one_group_is_heavy_ball_diloco_with_identical_replicas(
    micro_config: ModelConfig,
) -> None:
    n, h, outer = 3, 3, 4
    noloco_cfg = NoLoCoConfig(inner=INNER, inner_steps=h, group_size=n, outer_lr=0.7, outer_momentum=0.5)
    diloco_cfg = DiLoCoConfig(inner=INNER, inner_steps=h, outer_lr=0.7, outer_momentum=0.5, nesterov=False)
    net = SimNetwork()
    nolocos = [NoLoCo(build_model(micro_config, seed=0), c, noloco_cfg) for c in net.add_peers(n)]
    net2 = SimNetwork()
    dilocos = [DiLoCo(build_model(micro_config, seed=0), c, diloco_cfg) for c in net2.add_peers(n)]
    seen: dict[int, set[str]] = {}

    class Record(Callback):
        def __init__(self, strategy: NoLoCo) -> None:
            self.strategy = strategy

        async def on_step(self, step: int) -> None:
            if step % h == 0:
                seen.setdefault(step, set()).add(_digest(self.strategy.model))

    _run_all(nolocos, [_stream(i) for i in range(n)], h * outer, {i: [Record(s)] for i, s in enumerate(nolocos)})
    _run_all(dilocos, [_stream(i) for i in range(n)], h * outer)
    assert all(len(d) == 1 for d in seen.values()) and len(seen) == outer  # bit-identical replicas
    assert all(s.local_only_steps == 0 for s in nolocos)
    worst = (_flat(nolocos[0].model.parameters()) - _flat(dilocos[0].model.parameters())).abs().max().item()
    assert worst <= 1e-5, worst


def test_identical_data_and_init_stay_identical_forever(micro_config: ModelConfig) -> None:
    n = 5  # odd: every outer step one peer goes local-only, and still nobody diverges
    cfg = NoLoCoConfig(inner=INNER, inner_steps=2)
    strategies = [NoLoCo(build_model(micro_config, seed=0), c, cfg) for c in SimNetwork().add_peers(n)]
    _run_all(strategies, [_stream("same") for _ in range(n)], 2 * 8)
    assert len({_digest(s.model) for s in strategies}) == 1
    assert len({_flat(s.momentum.values()).numpy().tobytes() for s in strategies}) == 1
    assert sum(s.local_only_steps for s in strategies) == 8  # one odd one out per outer step
    assert _digest(strategies[0].model) != _digest(build_model(micro_config, seed=0))


def _spread(rows: list[torch.Tensor]) -> float:
    stacked = torch.stack(rows)
    return float(((stacked - stacked.mean(0)) ** 2).sum(1).mean())


def test_spread_across_replicas_stays_bounded_over_a_long_run() -> None:
    # 12 replicas, 400 outer steps, every replica's progress pure noise (the worst case: no
    # shared signal pulls them together). Without consensus the spread is a random walk
    # (grows ~linearly); with c = 0.7 it settles at a level set by the noise.
    n, d, rounds = 12, 64, 400
    members = [f"p{i:02d}" for i in range(n)]

    def run(c: float) -> list[float]:
        gen = torch.Generator().manual_seed(0)
        phi = {p: torch.zeros(d) for p in members}
        delta = {p: torch.zeros(d) for p in members}
        spreads = []
        for t in range(rounds):
            progress = {p: 0.01 * torch.randn(d, generator=gen) for p in members}
            new = {}
            for group in groups("long", t, members, 2):
                for me in group:
                    others = {q: ({"w": phi[q]}, {"w": progress[q]}) for q in group if q != me}
                    mine = ({"w": phi[me]}, {"w": progress[me]})
                    phibar, dbar = group_means(mine, others, me) if others else (None, {"w": progress[me]})
                    p, m = phi[me].clone(), delta[me].clone()
                    noloco_outer_([p], [m], [dbar["w"]], [phibar["w"]] if phibar else None, c=c)
                    new[me] = (p, m)
            for p, (x, m) in new.items():
                phi[p], delta[p] = x, m
            spreads.append(_spread(list(phi.values())))
        return spreads

    with_consensus, without = run(0.7), run(0.0)
    first, last = max(with_consensus[50:200]), max(with_consensus[250:])
    assert last < 2.0 * first, (first, last)  # bounded: no growth between the two halves
    assert without[-1] > 10 * with_consensus[-1]  # and the test can tell a drifting run


def test_spread_of_trained_replicas_stays_bounded(micro_config: ModelConfig) -> None:
    n, h, outer = 6, 2, 30
    cfg = NoLoCoConfig(inner=INNER, inner_steps=h)
    strategies = [NoLoCo(build_model(micro_config, seed=0), c, cfg) for c in SimNetwork().add_peers(n)]
    spreads: list[float] = []

    class Spread(Callback):
        async def on_step(self, step: int) -> None:
            if step % h == 0:
                spreads.append(_spread([_flat(s.slow.values()) for s in strategies]))

    _run_all(strategies, [_stream(i) for i in range(n)], h * outer, {0: [Spread()]})
    assert len(spreads) == outer
    assert max(spreads[2 * outer // 3 :]) < 3.0 * max(spreads[: outer // 3]), spreads


# --- churn: never blocked -------------------------------------------------------------------


def test_silent_partner_means_local_only_step_after_the_deadline(micro_config: ModelConfig) -> None:
    net = SimNetwork()
    comm_a, _silent = net.add_peers(2)  # the second member is live but never trains
    cfg = NoLoCoConfig(inner=INNER, inner_steps=2, timeout_s=7.0)
    a = NoLoCo(build_model(micro_config, seed=0), comm_a, cfg)
    solo = NoLoCo(build_model(micro_config, seed=0), SimNetwork().add_peer(), cfg)

    async def main():
        result = await train(a, _stream(0), LoopConfig(max_steps=6))
        return result, comm_a.now()

    result, elapsed = run_virtual(main())
    assert result.steps == 6 and a.outer_steps == 3 and a.local_only_steps == 3
    assert elapsed == pytest.approx(3 * 7.0)  # each outer step waited exactly the deadline
    run_virtual(train(solo, _stream(0), LoopConfig(max_steps=6)))
    assert _digest(a.model) == _digest(solo.model)  # local-only = what a peer alone would do


def test_killed_partner_means_immediate_local_only_step(micro_config: ModelConfig) -> None:
    net = SimNetwork()
    comms = net.add_peers(2)
    cfg = NoLoCoConfig(inner=INNER, inner_steps=4, timeout_s=100.0)
    strategies = [NoLoCo(build_model(micro_config, seed=0), c, cfg) for c in comms]

    class KillAt(Callback):
        async def on_step(self, step: int) -> None:
            if step == 6:
                await comms[1].aclose()

    async def main():
        results = await asyncio.gather(*(
            train(s, _stream(i), LoopConfig(max_steps=12), callbacks=[KillAt()] if i == 1 else [])
            for i, s in enumerate(strategies)
        ), return_exceptions=True)
        return results, comms[0].now()

    results, elapsed = run_virtual(main())
    assert results[0].steps == 12
    assert strategies[0].outer_steps == 3 and strategies[0].local_only_steps == 2
    assert elapsed < 1.0  # the gone partner cost no waiting at all


def test_partial_group_averages_over_the_members_that_answered(micro_config: ModelConfig) -> None:
    net = SimNetwork()
    comms = net.add_peers(3)  # one group of three; the third never shows up
    cfg = NoLoCoConfig(inner=INNER, group_size=3, timeout_s=2.0, norm_clip=0.0)  # unlike seeds: guard off
    strategies = [NoLoCo(build_model(micro_config, seed=i), c, cfg) for i, c in enumerate(comms[:2])]

    async def main():
        sizes = await asyncio.gather(*(s.outer_step() for s in strategies))
        return sizes, comms[0].now()

    sizes, elapsed = run_virtual(main())
    assert sizes == [2, 2] and elapsed == pytest.approx(2.0)
    assert all(s.local_only_steps == 0 for s in strategies)


def test_leaving_mid_exchange_raises_comm_closed_not_a_group(micro_config: ModelConfig) -> None:
    net = SimNetwork()
    comms = net.add_peers(3)
    cfg = NoLoCoConfig(inner=INNER, group_size=3, timeout_s=50.0)
    strategy = NoLoCo(build_model(micro_config, seed=0), comms[0], cfg)

    async def main():
        net.kill(comms[0].peer_id, at_s=1.0)
        await strategy.outer_step()

    with pytest.raises(CommClosed):
        run_virtual(main())


def test_no_all_reduce_is_ever_called(micro_config: ModelConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    async def forbidden(*args, **kwargs):
        raise AssertionError("NoLoCo called all_reduce")

    monkeypatch.setattr(SimComm, "all_reduce", forbidden)
    cfg = NoLoCoConfig(inner=INNER, inner_steps=2)
    strategies = [NoLoCo(build_model(micro_config, seed=0), c, cfg) for c in SimNetwork().add_peers(4)]
    results = _run_all(strategies, [_stream(i) for i in range(4)], 6)
    assert all(r.steps == 6 for r in results) and all(s.local_only_steps == 0 for s in strategies)


# --- int8 exchange ---------------------------------------------------------------------------


def test_int8_exchange_sends_a_quarter_of_the_bytes_and_lands_close(micro_config: ModelConfig) -> None:
    out = {}
    for quant in ("none", "int8"):
        net = SimNetwork()
        comms = net.add_peers(2)
        cfg = NoLoCoConfig(inner=INNER, inner_steps=3, quantize=quant)
        strategies = [NoLoCo(build_model(micro_config, seed=0), c, cfg) for c in comms]
        _run_all(strategies, [_stream(i) for i in range(2)], 6)
        out[quant] = (strategies, comms[0].traffic().sent_bytes)
    ratio = out["int8"][1] / out["none"][1]
    assert 0.25 < ratio < 0.27, ratio  # 1 byte + a 4-byte scale per 256 values, vs 4 bytes
    fp32, int8 = (_flat(out[q][0][0].model.parameters()) for q in ("none", "int8"))
    assert (fp32 - int8).abs().max().item() < 5e-3
    errors = out["int8"][0][0]._errors
    assert set(errors) == {"phi", "progress"} and errors["phi"]  # residuals carried over


# --- config and state ------------------------------------------------------------------------


def test_noloco_defaults_follow_the_paper() -> None:
    cfg = NoLoCoConfig()
    assert (cfg.inner_steps, cfg.outer_lr, cfg.outer_momentum, cfg.consensus, cfg.group_size) == (50, 0.7, 0.5, 0.7, 2)
    assert cfg.inner.weight_decay == 0.0 and cfg.inner.grad_clip == 1.0


def test_noloco_from_dict_keeps_adam_without_decay_and_names_unknown_keys() -> None:
    cfg = NoLoCoConfig.from_dict({"inner": {"lr": 1e-3}, "inner_steps": 10, "quantize": "int8"})
    assert cfg.inner.lr == 1e-3 and cfg.inner.weight_decay == 0.0
    assert NoLoCoConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown NoLoCoConfig key"):
        NoLoCoConfig.from_dict({"consensus_weight": 0.5})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"inner_steps": 0}, "inner_steps must be >= 1"),
        ({"consensus": 1.5}, "consensus must be in"),
        ({"group_size": 1}, "group_size must be >= 2"),
        ({"quantize": "fp8"}, "quantize must be one of"),
        ({"timeout_s": 0}, "timeout_s must be > 0"),
        ({"outer_momentum": 1.0}, "outer_momentum"),
    ],
)
def test_noloco_config_validation_names_the_field(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        NoLoCoConfig(**changes)


def test_noloco_is_built_by_the_registry_and_its_state_round_trips(micro_config: ModelConfig) -> None:
    comms = SimNetwork().add_peers(2)
    a, b_ = (build_strategy("noloco", build_model(micro_config, seed=0), c, {"inner_steps": 2}) for c in comms)
    assert isinstance(a, NoLoCo) and a.algorithm == "noloco"
    _run_all([a, b_], [_stream(0), _stream(1)], 4)
    fresh = NoLoCo(build_model(micro_config, seed=9), comms[0], NoLoCoConfig(inner_steps=2))
    fresh.load_state_dict(a.state_dict())
    assert fresh.outer_steps == 2
    assert torch.equal(_flat(fresh.slow.values()), _flat(a.slow.values()))
    assert torch.equal(_flat(fresh.momentum.values()), _flat(a.momentum.values()))
    assert all(v.any() for v in fresh.momentum.values())
