"""One of 8 simulated NoLoCo peers sends scaled or garbage updates: without protection the honest
peers' validation loss is wrecked; with `norm_clip` it stays within 5 % of the clean run.

The setting of tests/unit/training/test_noloco_vs_diloco.py (tiny preset, stdlib corpus, 8 peers,
pairs). Peer 3 trains honestly but lies in every exchange: "scaled" sends −30× its progress and
its slow weights pushed 30× away from their mean; "garbage" sends N(0, 3²) noise. Its own
model is not scored. Longer runs and robust aggregates over groups of 4 are marked slow.
"""

import asyncio
import statistics

import pytest
import torch

from hyphae.training import (BatchStream, DataConfig, SimNetwork, build_model, evaluate, load_corpus, model_config,
                             run_virtual, train, validation_batches)
from hyphae.training.loop import LoopConfig
from hyphae.training.noloco import InnerAdamConfig, NoLoCo, NoLoCoConfig

BATCH, SEQ, LIAR = 4, 32, 3


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(DataConfig())


def _lie(comm, attack: str) -> None:
    inner = comm.exchange
    gen = torch.Generator().manual_seed(1)

    async def exchange(peer, tensors, **kw):
        if attack == "scaled":
            out = {k: t * -30.0 if k.startswith("progress/") else t + 30.0 * (t - t.mean()) for k, t in tensors.items()}
        else:
            out = {k: torch.randn(t.shape, generator=gen) * 3.0 for k, t in tensors.items()}
        return await inner(peer, out, **kw)

    comm.exchange = exchange


def honest_losses(corpus, attack: str | None, steps: int = 30, h: int = 10, **options) -> tuple[list[float], int]:
    val = validation_batches(corpus.val, batch_size=8, seq_len=SEQ, n_batches=4)
    net = SimNetwork(latency_s=0.05)
    comms = net.add_peers(8)
    if attack:
        _lie(comms[LIAR], attack)
    cfg = NoLoCoConfig(inner=InnerAdamConfig(lr=3e-3, warmup_steps=10, decay_steps=steps), inner_steps=h,
                       timeout_s=30.0, **options)
    strategies = [NoLoCo(build_model(model_config("tiny"), seed=0), c, cfg, precision="fp32") for c in comms]

    async def main():
        await asyncio.gather(*(
            train(s, BatchStream(corpus.train, batch_size=BATCH, seq_len=SEQ, seed=0, stream=c.peer_id),
                  LoopConfig(max_steps=steps, log_every=steps))
            for s, c in zip(strategies, comms)))

    torch.manual_seed(0)
    run_virtual(main())
    honest = [s for i, s in enumerate(strategies) if not (attack and i == LIAR)]
    return [evaluate(s.model, val) for s in honest], sum(s.rejected_updates for s in honest)


@pytest.fixture(scope="module")
def clean(corpus) -> float:
    losses, rejected = honest_losses(corpus, None, norm_clip=3.0)
    assert rejected == 0  # the guard never refuses an honest partner in this run
    return statistics.mean(losses)


@pytest.mark.slow  # two 8-peer runs, ~45-60 s; the garbage attack below keeps norm clipping in the default tier
def test_one_peer_of_8_scaling_its_updates_wrecks_the_run_without_norm_clip_and_is_harmless_with_it(
        corpus, clean) -> None:
    unprotected, _ = honest_losses(corpus, "scaled", norm_clip=0.0)
    protected, rejected = honest_losses(corpus, "scaled", norm_clip=3.0)
    assert statistics.mean(unprotected) > 1.5 * clean, (statistics.mean(unprotected), clean)
    assert rejected >= 1
    assert statistics.mean(protected) <= 1.05 * clean, (statistics.mean(protected), clean)
    assert max(protected) <= 1.05 * clean, (max(protected), clean)


def test_one_peer_of_8_sending_garbage_is_harmless_with_norm_clip(corpus, clean) -> None:
    protected, rejected = honest_losses(corpus, "garbage", norm_clip=3.0)
    assert rejected >= 1
    assert max(protected) <= 1.05 * clean, (max(protected), clean)


@pytest.mark.slow
def test_garbage_wrecks_the_run_without_protection(corpus, clean) -> None:
    unprotected, _ = honest_losses(corpus, "garbage", norm_clip=0.0)
    assert statistics.mean(unprotected) > 1.5 * clean, (statistics.mean(unprotected), clean)


@pytest.mark.slow
@pytest.mark.parametrize("options", [dict(norm_clip=3.0), dict(group_size=4, robust="median"),
                                     dict(group_size=4, robust="trimmed_mean", norm_clip=3.0)])
def test_longer_run_under_attack_stays_within_5_percent(corpus, options) -> None:
    base, _ = honest_losses(corpus, None, steps=200, h=25, **options)
    for attack in ("scaled", "garbage"):
        attacked, _ = honest_losses(corpus, attack, steps=200, h=25, **options)
        assert statistics.mean(attacked) <= 1.05 * statistics.mean(base), (attack, attacked, base)
