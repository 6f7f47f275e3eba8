"""NoLoCo with SparseLoCo-compressed progress: both ends of a pair apply the same D̄, it trains,
it moves fewer bytes, a payload that does not fit is a bad reply, the error buffer is saved."""

from __future__ import annotations

import asyncio
import hashlib

import numpy as np
import pytest
import torch

from hyphae.training import BatchStream, LoopConfig, ModelConfig, SimNetwork, build_model, evaluate, run_virtual, train
from hyphae.training.noloco import InnerAdamConfig, NoLoCo, NoLoCoConfig

INNER = InnerAdamConfig(lr=3e-3, warmup_steps=2, grad_clip=1.0)
TOKENS = np.random.default_rng(1).integers(0, 64, 50_000).astype(np.uint8)
SPARSE = {"compression": "topk-int8", "density": 0.05, "chunk_size": 256}


def _stream(i: int | str) -> BatchStream:
    return BatchStream([TOKENS], batch_size=4, seq_len=16, seed=0, stream=i)


def _digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def _run(config: ModelConfig, cfg: NoLoCoConfig, n: int, steps: int, net: SimNetwork | None = None) -> list[NoLoCo]:
    net = net or SimNetwork()
    comms = net.add_peers(n)
    strategies = [NoLoCo(build_model(config, seed=0), c, cfg) for c in comms]

    async def main():
        await asyncio.gather(*(train(s, _stream(c.peer_id), LoopConfig(max_steps=steps))
                               for s, c in zip(strategies, comms)))

    torch.manual_seed(0)
    run_virtual(main())
    return strategies


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_a_pair_applies_the_same_compressed_progress(micro_config: ModelConfig, quantize: str) -> None:
    """Same start, first outer step: φ' = φ + a·D̄ on both ends, so they agree iff D̄ does."""
    cfg = NoLoCoConfig(inner=INNER, inner_steps=3, quantize=quantize, **SPARSE)
    a, b = _run(micro_config, cfg, 2, 3)
    assert a.local_only_steps == b.local_only_steps == 0
    assert _digest(a.slow.values()) == _digest(b.slow.values())
    assert a.compressor.error.abs().sum() > 0  # the rest is owed, not lost


def test_compressed_noloco_trains_on_fewer_bytes(micro_config: ModelConfig) -> None:
    val = [_stream("val").next() for _ in range(2)]
    before = evaluate(build_model(micro_config, seed=0), val)
    nets = {"dense": SimNetwork(), "sparse": SimNetwork()}
    configs = {"dense": NoLoCoConfig(inner=INNER, inner_steps=4),
               "sparse": NoLoCoConfig(inner=INNER, inner_steps=4, quantize="int8", **SPARSE)}
    runs = {k: _run(micro_config, configs[k], 4, 24, nets[k]) for k in nets}
    sent = {k: sum(net.traffic(p).sent_bytes for p in net.members()) for k, net in nets.items()}
    assert sent["dense"] / sent["sparse"] > 3.5  # φ as int8 bounds the saving
    assert all(s.local_only_steps == 0 for s in runs["sparse"])
    assert evaluate(runs["sparse"][0].model, val) < before - 0.5


def test_a_progress_payload_that_does_not_fit_is_a_bad_reply(micro_config: ModelConfig) -> None:
    net = SimNetwork()
    comms = net.add_peers(2)
    cfg = NoLoCoConfig(inner=INNER, inner_steps=2, **SPARSE)
    strategies = [NoLoCo(build_model(micro_config, seed=0), c, cfg) for c in comms]
    exchange = comms[0].exchange

    async def bad(peer, tensors, **kw):  # an offset past its chunk
        out = dict(tensors)
        out["progress/indices"] = tensors["progress/indices"].clone().fill_(300)
        return await exchange(peer, out, **kw)

    comms[0].exchange = bad

    async def main():
        await asyncio.gather(*(train(s, _stream(c.peer_id), LoopConfig(max_steps=4))
                               for s, c in zip(strategies, comms)))

    run_virtual(main())
    assert strategies[1].local_only_steps == 2  # refused both times: a local-only step instead
    assert all(torch.isfinite(t).all() for t in strategies[1].slow.values())


def test_the_progress_error_buffer_is_saved(micro_config: ModelConfig) -> None:
    cfg = NoLoCoConfig(inner=INNER, inner_steps=2, **SPARSE)
    a = _run(micro_config, cfg, 2, 4)[0]
    b = NoLoCo(build_model(micro_config, seed=0), SimNetwork().add_peer(), cfg)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.compressor.error, b.compressor.error)


def test_compression_options_are_checked() -> None:
    with pytest.raises(ValueError, match="density"):
        NoLoCoConfig(compression="topk-int8", density=2.0)
