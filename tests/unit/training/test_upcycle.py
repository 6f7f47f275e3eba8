"""Upcycling a dense GPT into an MoE GPT: copies, noise on half the weights, same function at zero noise."""

import numpy as np
import pytest
import torch

from hyphae.training import BatchStream, CheckpointStore, ModelConfig, build_model
from hyphae.training.upcycle import upcycle, upcycle_checkpoint, upcycled_config

TOKENS = np.random.default_rng(0).integers(0, 256, 10_000).astype(np.uint8)


def test_without_noise_the_upcycled_moe_computes_the_dense_function(micro_config: ModelConfig) -> None:
    dense = build_model(micro_config, seed=3)
    moe = upcycle(dense, n_experts=4, top_k=2, noise_std=0.0)
    x, y = BatchStream([TOKENS], batch_size=2, seq_len=16, seed=0).next()
    with torch.no_grad():
        torch.testing.assert_close(moe(x, y).logits, dense(x, y).logits, rtol=1e-5, atol=1e-5)


def test_each_expert_is_the_dense_mlp_with_noise_on_half_of_its_weights(micro_config: ModelConfig) -> None:
    cfg = micro_config.replace(d_model=64, n_head=2)
    dense = build_model(cfg, seed=3)
    moe = upcycle(dense, n_experts=4, top_k=2, seed=5)
    assert moe.config == upcycled_config(cfg, n_experts=4, top_k=2)
    for name, p in dense.named_parameters():
        if ".mlp." not in name:
            assert torch.equal(moe.get_parameter(name), p), name
    fc = dense.blocks[1].mlp.fc.weight
    experts = [moe.blocks[1].mlp.experts[e].w1 for e in range(4)]
    for w in experts:
        diff = (w - fc).detach()
        changed = diff != 0
        assert 0.45 < changed.float().mean().item() < 0.55
        assert diff[changed].std().item() == pytest.approx(0.02, rel=0.1)
    assert not torch.equal(experts[0], experts[1])  # independent noise per expert
    again = upcycle(dense, n_experts=4, top_k=2, seed=5)
    assert all(torch.equal(p, q) for p, q in zip(moe.parameters(), again.parameters()))  # seeded


def test_a_dense_checkpoint_can_be_upcycled(micro_config: ModelConfig, tmp_path) -> None:
    dense = build_model(micro_config, seed=1)
    CheckpointStore(tmp_path).save(step=7, algorithm="ddp", model_config=micro_config.to_dict(),
                                   weights=dense.state_dict(), state={})
    moe = upcycle_checkpoint(tmp_path, n_experts=2, top_k=2, noise_std=0.0)
    assert torch.equal(moe.blocks[0].mlp.experts[1].w2, dense.blocks[0].mlp.proj.weight)


def test_upcycling_refuses_what_it_cannot_copy(micro_config: ModelConfig) -> None:
    with pytest.raises(ValueError, match="bias-free"):
        upcycled_config(micro_config.replace(bias=True))
    with pytest.raises(ValueError, match="already a mixture"):
        upcycled_config(micro_config.replace(n_experts=4))
    with pytest.raises(ValueError, match="dense_config"):
        upcycle(build_model(micro_config).state_dict())
