"""NoLoCo against DiLoCo on simulated peers: same loss at equal tokens, without any collective.

The tiny preset on the built-in stdlib corpus, every peer its own data stream, the same seed
and schedule for both. The in-suite case is short (8 peers); longer ones are marked slow.
The full-size comparison is `bench/algorithms.py`.
"""

import asyncio
import statistics

import pytest
import torch

from hyphae.training import (
    AdamWConfig,
    BatchStream,
    DataConfig,
    DiLoCo,
    DiLoCoConfig,
    SimNetwork,
    build_model,
    evaluate,
    load_corpus,
    model_config,
    run_virtual,
    train,
    validation_batches,
)
from hyphae.training.loop import LoopConfig
from hyphae.training.noloco import InnerAdamConfig, NoLoCo, NoLoCoConfig

BATCH, SEQ = 4, 32


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(DataConfig())


def _final_losses(corpus, algorithm: str, peers: int, steps: int, h: int) -> tuple[list[float], int]:
    cfg = model_config("tiny")
    val = validation_batches(corpus.val, batch_size=8, seq_len=SEQ, n_batches=4)
    net = SimNetwork(latency_s=0.05)
    comms = net.add_peers(peers)
    calls = [0]
    for comm in comms:
        inner_all_reduce = comm.all_reduce

        async def counted(*a, _inner=inner_all_reduce, **kw):
            calls[0] += 1
            return await _inner(*a, **kw)

        comm.all_reduce = counted
    lr = dict(lr=3e-3, warmup_steps=10, decay_steps=steps)  # warm-up then cosine, as the papers
    if algorithm == "diloco":
        strategies = [DiLoCo(build_model(cfg, seed=0), c, DiLoCoConfig(inner=AdamWConfig(**lr), inner_steps=h,
                                                                       norm_clip=0.0),  # the all-reduce
                             precision="fp32") for c in comms]
    else:
        ncfg = NoLoCoConfig(inner=InnerAdamConfig(**lr), inner_steps=h, timeout_s=30.0)
        strategies = [NoLoCo(build_model(cfg, seed=0), c, ncfg, precision="fp32") for c in comms]

    async def main():
        await asyncio.gather(*(
            train(s, BatchStream(corpus.train, batch_size=BATCH, seq_len=SEQ, seed=0, stream=c.peer_id),
                  LoopConfig(max_steps=steps, log_every=steps))
            for s, c in zip(strategies, comms)
        ))

    torch.manual_seed(0)
    run_virtual(main())
    if algorithm == "noloco":
        assert all(s.local_only_steps <= s.outer_steps // 2 for s in strategies)
    return [evaluate(s.model, val) for s in strategies], calls[0]


def _compare(corpus, peers: int, steps: int, h: int) -> None:
    diloco, diloco_calls = _final_losses(corpus, "diloco", peers, steps, h)
    noloco, noloco_calls = _final_losses(corpus, "noloco", peers, steps, h)
    assert diloco_calls == peers * (steps // h)  # the baseline does use the collective
    assert noloco_calls == 0  # NoLoCo never does
    # "Within 3 %" as a target to reach: no more than 3 % worse. Early in training NoLoCo's
    # gentler heavy ball can be ahead of DiLoCo's Nesterov overshoot by a few %, which is fine;
    # a far larger gap either way would mean one of the two is broken.
    ratio = statistics.mean(noloco) / statistics.mean(diloco)
    assert 0.9 <= ratio <= 1.03, (statistics.mean(noloco), statistics.mean(diloco))
    # Each NoLoCo replica keeps its own weights; none strays far from the consensus either.
    assert max(noloco) / statistics.mean(diloco) <= 1.06, (max(noloco), statistics.mean(diloco))


def test_noloco_ends_within_3_percent_of_diloco_on_8_simulated_peers_without_all_reduce(corpus) -> None:
    _compare(corpus, peers=8, steps=30, h=10)


@pytest.mark.slow
def test_noloco_ends_within_3_percent_of_diloco_on_8_simulated_peers_longer_run(corpus) -> None:
    _compare(corpus, peers=8, steps=200, h=25)


@pytest.mark.slow
def test_noloco_ends_within_3_percent_of_diloco_on_32_simulated_peers_without_all_reduce(corpus) -> None:
    _compare(corpus, peers=32, steps=80, h=20)
