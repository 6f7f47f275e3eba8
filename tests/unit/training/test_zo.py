"""Shared-seed ZO oracles (ALGORITHMS.md §3) on the whole update path, with simulated peers."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Sequence

import numpy as np
import pytest
import torch

from hyphae.kernels import derive_seed, rademacher
from hyphae.training import (
    AdamWConfig,
    BatchStream,
    DataConfig,
    LoopConfig,
    ModelConfig,
    SimNetwork,
    build_adamw,
    build_model,
    build_strategy,
    evaluate,
    load_corpus,
    run_virtual,
    train,
    validation_batches,
)
from hyphae.training._zo_pool import SeedPool
from hyphae.training._zo_log import (
    LOG_PREFIX,
    SNAPSHOT_PREFIX,
    entries_from_state,
    replay_,
    snapshot_key,
    weights_digest,
)
from hyphae.training.zo import ZO, ZOConfig, spsa_gradient

TOKENS = np.random.default_rng(1).integers(0, 256, 50_000).astype(np.uint8)


def _stream(i: int) -> BatchStream:
    return BatchStream([TOKENS], batch_size=4, seq_len=16, seed=0, stream=i)


class Probe(ZO):
    """ZO that remembers its weights right before and after each boundary rebuild."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pre: dict[int, list[torch.Tensor]] = {}
        self.post: dict[int, list[torch.Tensor]] = {}

    async def _boundary(self, b: int):
        self.pre[b] = [p.clone() for p in self._params]
        metrics = await super()._boundary(b)
        self.post[b] = [p.clone() for p in self._params]
        return metrics


def _peers(config: ModelConfig, n: int, zo: ZOConfig, net: SimNetwork | None = None, seed: int = 0):
    net = net or SimNetwork(latency_s=0.01)
    return net, [Probe(build_model(config, seed=seed), c, zo) for c in net.add_peers(n)]


def _train_all(peers: Sequence[ZO], steps: int, *, start_step: int = 0):
    async def main():
        return await asyncio.gather(*(
            train(z, _stream(i), LoopConfig(max_steps=steps), start_step=start_step) for i, z in enumerate(peers)
        ))

    return run_virtual(main())


def _log(peer: ZO, *, start: int = 0, stop: int | None = None):
    items = run_virtual(peer.comm.state_items(LOG_PREFIX))
    return entries_from_state(items, start=start, stop=stop, perturbations=peer.config.perturbations)


def _hashes(peer: ZO, step: int) -> list[str]:
    records = run_virtual(peer.comm.state_items(SNAPSHOT_PREFIX))
    return [r["hash"] for r in records.values() if r["step"] == step]


def _same(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


_REPLAY_SCRIPT = """
import json, sys, torch
from hyphae.kernels import derive_seed
from hyphae.training import ModelConfig, build_model
from hyphae.training._zo_log import Entry, replay_, weights_digest
job = json.load(sys.stdin)
model = build_model(ModelConfig.from_dict(job["config"]), seed=job["seed"])
entries = [Entry(s, p, bytes.fromhex(d)) for s, p, d in job["entries"]]
params = [p.detach() for p in model.parameters()]
replay_(params, entries, lr=job["lr"], seed_of=lambda t, p, j: derive_seed(job["run_id"], t, p, j))
print(weights_digest(dict(model.named_parameters())))
"""


def test_a_log_replayed_in_another_process_reaches_the_same_weights_hash(micro_config: ModelConfig) -> None:
    zo = ZOConfig(run_id="oracle-1", lr=1e-3, snapshot_steps=4, perturbations=2)
    _, peers = _peers(micro_config, 2, zo)
    _train_all(peers, 4)
    assert len(set(_hashes(peers[0], 4))) == 1
    job = {
        "config": micro_config.to_dict(), "seed": 0, "lr": zo.lr, "run_id": zo.run_id,
        "entries": [[e.step, e.peer, e.data.hex()] for e in _log(peers[0], stop=4)],
    }
    assert len(job["entries"]) == 8
    out = subprocess.run([sys.executable, "-c", _REPLAY_SCRIPT], input=json.dumps(job), capture_output=True,
                         text=True, timeout=120, check=True)
    assert out.stdout.strip() == peers[0].last_hash == peers[1].last_hash


def test_plus_minus_eps_does_not_restore_the_weights_so_the_state_comes_only_from_the_log(
    micro_config: ModelConfig,
) -> None:
    model = build_model(micro_config, seed=0)
    strategy = ZO(model, SimNetwork().add_peer(), ZOConfig(eps=1e-3))
    before = [p.detach().clone() for p in model.parameters()]
    strategy.forward_backward(*_stream(0).next())
    after = list(model.parameters())
    assert not _same(before, after)  # rounding residue of +ε, −2ε, +ε
    assert max((a - b).abs().max().item() for a, b in zip(after, before)) < 1e-6

    _, peers = _peers(micro_config, 3, ZOConfig(lr=1e-3, snapshot_steps=3))
    _train_all(peers, 3)
    assert all(not _same(p.pre[3], p.post[3]) for p in peers)  # local drift, fixed at the boundary
    assert all(_same(peers[0].post[3], p.post[3]) for p in peers[1:])
    fresh = build_model(micro_config, seed=0)
    replay_([p.detach() for p in fresh.parameters()], _log(peers[0], stop=3), lr=1e-3,
            seed_of=lambda t, p, j: derive_seed("run", t, p, j))
    assert _same(list(fresh.parameters()), peers[0].post[3])


def test_replaying_the_same_log_in_the_same_order_gives_bit_identical_weights(micro_config: ModelConfig) -> None:
    _, peers = _peers(micro_config, 3, ZOConfig(lr=1e-3, snapshot_steps=100, perturbations=3))
    _train_all(peers, 5)
    entries = _log(peers[0])
    seed_of = peers[0]._seed
    results = []
    for _ in range(2):
        model = build_model(micro_config, seed=0)
        replay_([p.detach() for p in model.parameters()], entries, lr=1e-3, seed_of=seed_of)
        results.append([p.detach().clone() for p in model.parameters()])
    assert _same(results[0], results[1])
    by_one = build_model(micro_config, seed=0)  # one call per step instead of fused batches
    params = [p.detach() for p in by_one.parameters()]
    for t in sorted({e.step for e in entries}):
        replay_(params, [e for e in entries if e.step == t], lr=1e-3, seed_of=seed_of)
    assert _same(results[0], params)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_all_peers_are_bit_identical_after_every_boundary(micro_config: ModelConfig, weight_decay: float) -> None:
    _, peers = _peers(micro_config, 4, ZOConfig(lr=1e-3, snapshot_steps=3, weight_decay=weight_decay))
    _train_all(peers, 6)
    for b in (3, 6):
        assert all(_same(peers[0].post[b], p.post[b]) for p in peers[1:])
        assert len(set(_hashes(peers[0], 6))) == 1 and len(_hashes(peers[0], 6)) == 4
    assert peers[0].last_hash == weights_digest(peers[0].named_weights())


def test_a_peer_that_missed_scalars_is_bit_identical_again_after_the_boundary(micro_config: ModelConfig) -> None:
    slow = {("peer-0000", "peer-0002")}
    net = SimNetwork(latency_s=lambda a, b: 5.0 if (a, b) in slow else 0.01)
    _, peers = _peers(micro_config, 3, ZOConfig(lr=1e-3, snapshot_steps=4, timeout_s=1.0), net=net)
    _train_all(peers, 4)
    assert peers[2].updates_applied < peers[1].updates_applied  # it missed peer-0000's scalars
    assert not _same(peers[1].pre[4], peers[2].pre[4])
    assert _same(peers[1].post[4], peers[2].post[4]) and _same(peers[0].post[4], peers[2].post[4])


def test_a_peer_whose_snapshot_lost_the_vote_adopts_the_majority(micro_config: ModelConfig) -> None:
    _, peers = _peers(micro_config, 3, ZOConfig(lr=1e-3, snapshot_steps=3))
    _train_all(peers, 3)
    odd = peers[2]
    odd._reference = [r + 1e-3 for r in odd._reference]  # as if it had replayed a different log
    odd.last_hash = "0" * 64
    run_virtual(odd.comm.state_set(snapshot_key(3, odd.comm.peer_id), {"step": 3, "hash": odd.last_hash}))
    _train_all(peers, 6, start_step=3)
    assert odd.repairs == 1
    assert all(_same(peers[0].post[6], p.post[6]) for p in peers[1:])


def test_the_projected_gradient_is_unbiased_on_a_quadratic() -> None:
    gen = torch.Generator().manual_seed(0)
    d = 8
    a = torch.rand(d, generator=gen, dtype=torch.float64) + 0.5
    b = torch.randn(d, generator=gen, dtype=torch.float64)
    theta = torch.randn(d, generator=gen)
    true = (a * theta.double() + b)

    def loss() -> float:
        t = theta.double()
        return float(0.5 * (a * t * t).sum() + (b * t).sum())

    n = 800
    acc = torch.zeros(d, dtype=torch.float64)
    for k in range(n):
        seed = derive_seed("quadratic", k, "p", 0)
        g, _, _ = spsa_gradient([theta], loss, seed, 1e-3)
        acc += g * rademacher(seed, d).double()
    est = acc / n
    cosine = float(est @ true / (est.norm() * true.norm()))
    assert cosine > 0.98, cosine
    assert float(est.norm() / true.norm()) == pytest.approx(1.0, abs=0.1), float(est.norm() / true.norm())


def test_each_peer_sends_one_byte_per_projected_gradient(micro_config: ModelConfig) -> None:
    steps, m = 5, 4
    _, peers = _peers(micro_config, 3, ZOConfig(lr=1e-3, snapshot_steps=100, perturbations=m))
    _train_all(peers, steps)
    for p in peers:
        assert p.comm.traffic().sent_bytes == steps * m
        assert p.comm.traffic().received_bytes == steps * m * 2
    assert {len(e.data) for e in _log(peers[0])} == {m}


def test_fedkseed_rebuild_from_accumulated_scalars_matches_step_by_step(micro_config: ModelConfig) -> None:
    zo = ZOConfig(lr=1e-3, snapshot_steps=4, pool_size=64, pool_sampling="uniform", perturbations=2)
    _, peers = _peers(micro_config, 3, zo)
    initial = [p.detach().clone() for p in build_model(micro_config, seed=0).parameters()]
    _train_all(peers, 4)
    stepwise = [t.clone() for t in initial]
    pool = SeedPool("run", 64, sampling="uniform", clip=1000.0)  # the distribution of interval 0
    replay_(stepwise, _log(peers[0], stop=4), lr=1e-3, seed_of=pool.seed_of)
    rebuilt = peers[0].post[4]
    assert all(_same(rebuilt, p.post[4]) for p in peers[1:])
    for x, y in zip(rebuilt, stepwise):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)
    assert 0 < np.count_nonzero(peers[0].pool.accum) <= 24  # 4 steps x 3 peers x 2, some seeds drawn twice


def test_fedkseed_importance_sampling_prefers_seeds_with_large_scalars() -> None:
    pool = SeedPool("run", 8, sampling="importance", clip=1000.0)
    assert np.allclose(pool.probabilities(), 1 / 8)
    pool.abs_sum[3], pool.count[3] = 50.0, 1
    pool.abs_sum[5], pool.count[5] = 5000.0, 1  # clipped to 1000 when recorded; here raw
    p = pool.probabilities()
    assert p[5] == p.max() and p[0] == p.min() and p.sum() == pytest.approx(1.0)
    pool.refresh()
    draws = np.bincount([pool.index(t, "x", 0) for t in range(4000)], minlength=8) / 4000
    assert np.allclose(draws, p, atol=0.03)


def test_a_late_joiner_replaying_snapshot_and_log_reaches_the_incumbents_hash(micro_config: ModelConfig) -> None:
    zo = ZOConfig(lr=1e-3, snapshot_steps=4)
    net, peers = _peers(micro_config, 3, zo)
    _train_all(peers, 6)  # snapshot at 4, log for steps 4 and 5
    joiner = Probe(build_model(micro_config, seed=99), net.add_peer(), zo)  # wrong init on purpose
    run_virtual(joiner._start())
    assert joiner.snapshot_step == 4 and joiner.next_step == 5  # contributes from the newest logged step
    everyone = [*peers, joiner]
    _train_all(everyone, 8, start_step=6)
    hashes = _hashes(peers[0], 8)
    assert len(hashes) == 4 and len(set(hashes)) == 1
    assert joiner.last_hash == peers[0].last_hash


def test_a_joiner_that_starts_its_loop_at_catch_up_ends_on_the_same_run_step_bit_identical(
        micro_config: ModelConfig) -> None:
    zo = ZOConfig(lr=1e-3, snapshot_steps=4)
    net, peers = _peers(micro_config, 3, zo)
    _train_all(peers, 6)
    joiner = Probe(build_model(micro_config, seed=99), net.add_peer(), zo)
    start = run_virtual(joiner.catch_up())  # what the worker does for a fresh node
    assert start == 5

    async def main():
        return await asyncio.gather(
            *(train(z, _stream(i), LoopConfig(max_steps=12), start_step=6) for i, z in enumerate(peers)),
            train(joiner, _stream(3), LoopConfig(max_steps=12), start_step=start))

    run_virtual(main())
    assert joiner.snapshot_step == peers[0].snapshot_step == 12  # the loop stopped on the run's step 12
    assert joiner.last_hash == peers[0].last_hash == weights_digest(joiner.named_weights())
    assert all(torch.equal(a, b) for a, b in zip(joiner._params, peers[0]._params))


def test_a_fedkseed_joiner_rebuilds_from_k_scalars_and_proves_it_by_the_hash(micro_config: ModelConfig) -> None:
    zo = ZOConfig(lr=1e-3, snapshot_steps=4, pool_size=32)
    net, peers = _peers(micro_config, 2, zo)
    _train_all(peers, 4)
    joiner = Probe(build_model(micro_config, seed=0), net.add_peer(), zo)  # starts from the run's θ_0
    run_virtual(joiner._start())
    assert joiner.last_hash == peers[0].last_hash == weights_digest(joiner.named_weights())
    pool_blob = 32 * (8 + 8 + 8)
    assert pool_blob <= joiner.comm.traffic().received_bytes < pool_blob + 1024  # only the K scalars moved


def test_zo_with_four_peers_lowers_the_validation_loss_of_a_pretrained_model() -> None:
    torch.manual_seed(0)
    corpus = load_corpus(DataConfig())
    cfg = ModelConfig(vocab_size=256, context_length=32, n_layer=2, n_head=2, d_model=32)
    model = build_model(cfg, seed=0)
    opt_cfg = AdamWConfig(lr=3e-3, warmup_steps=20)
    opt = build_adamw(model.named_parameters(), opt_cfg)
    stream = BatchStream(corpus.train, batch_size=8, seq_len=32, seed=0, stream="pretrain")
    for step in range(150):  # a brief pretraining: ZO fine-tunes, it does not start from scratch
        for group in opt.param_groups:
            group["lr"] = opt_cfg.lr_at(step)
        model(*stream.next()).loss.backward()
        opt.step()
        opt.zero_grad()
    val = validation_batches(corpus.val, batch_size=8, seq_len=32, n_batches=8)
    before = evaluate(model, val)
    net = SimNetwork(latency_s=0.01)
    peers = []
    for comm in net.add_peers(4):
        replica = build_model(cfg, seed=0)
        replica.load_state_dict(model.state_dict())
        peers.append(ZO(replica, comm, ZOConfig(lr=1e-3, snapshot_steps=30)))

    async def main():
        await asyncio.gather(*(
            train(z, BatchStream(corpus.train, batch_size=8, seq_len=32, seed=1, stream=i), LoopConfig(max_steps=60))
            for i, z in enumerate(peers)
        ))

    run_virtual(main())
    after = evaluate(peers[0].model, val)
    assert after < before - 0.01, (before, after)


def test_zo_state_survives_a_weights_only_checkpoint_round_trip(micro_config: ModelConfig, tmp_path) -> None:
    _, peers = _peers(micro_config, 2, ZOConfig(lr=1e-3, snapshot_steps=2, pool_size=16))
    _train_all(peers, 3)
    torch.save(peers[0].state_dict(), tmp_path / "zo.pt")
    clone = ZO(build_model(micro_config, seed=0), SimNetwork().add_peer(), peers[0].config)
    clone.load_state_dict(torch.load(tmp_path / "zo.pt", weights_only=True))
    assert clone.next_step == 3 and clone.snapshot_step == 2 and clone.last_hash == peers[0].last_hash
    assert np.array_equal(clone.pool.accum, peers[0].pool.accum)


def test_zo_is_built_by_name_and_its_config_is_checked(micro_config: ModelConfig) -> None:
    strategy = build_strategy("zo", build_model(micro_config), SimNetwork().add_peer(), {"lr": 1e-3, "pool_size": 8})
    assert isinstance(strategy, ZO) and strategy.pool is not None
    with pytest.raises(ValueError, match="weight_decay=0"):
        ZOConfig(pool_size=8, weight_decay=0.1)
    with pytest.raises(ValueError, match="pool_sampling"):
        ZOConfig(pool_sampling="greedy")
    with pytest.raises(ValueError, match="perturbations"):
        ZOConfig(perturbations=0)
