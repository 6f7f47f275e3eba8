"""Llama-style models: presets and sizes, GQA, tying, seeded init, checkpointing, and the algorithms on them."""

from __future__ import annotations

import asyncio
import hashlib
import math

import numpy as np
import pytest
import torch

from hyphae.training import (
    PRESETS,
    AdamWConfig,
    BatchStream,
    DiLoCo,
    DiLoCoConfig,
    LoopConfig,
    ModelConfig,
    SimNetwork,
    build_model,
    model_config,
    parse_expert_name,
    run_virtual,
    train,
)
from hyphae.training._experts import expert_tensors, merge_model_experts_, sync_bytes
from hyphae.training.llama import Llama
from hyphae.training.spes import SPES, SPESConfig
from hyphae.training.upcycle import upcycle

TOKENS = np.random.default_rng(1).integers(0, 256, 50_000).astype(np.uint8)
OPT = AdamWConfig(lr=3e-3, warmup_steps=2)


@pytest.fixture
def llama_config() -> ModelConfig:
    """A Llama with grouped-query attention (4 query heads share 2 k/v heads), a millisecond a step."""
    return ModelConfig(arch="llama", vocab_size=256, context_length=16, n_layer=2, n_head=4, n_kv_head=2, d_model=32)


def _stream(i: int) -> BatchStream:
    return BatchStream([TOKENS], batch_size=4, seq_len=16, seed=0, stream=i)


def _digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize(
    ("preset", "low", "high"),
    [("llama-20m", 15e6, 30e6), ("llama-125m", 110e6, 140e6), ("llama-350m", 320e6, 380e6), ("llama-1b", 0.95e9, 1.15e9)],
)
def test_llama_presets_have_the_size_their_name_says_with_a_32000_vocab(preset: str, low: float, high: float) -> None:
    cfg = PRESETS[preset]
    assert cfg.arch == "llama" and cfg.vocab_size == 32000
    assert low <= cfg.num_parameters() <= high
    twin = PRESETS[f"{preset}-moe"]
    assert twin.is_moe and twin.num_parameters() > cfg.num_parameters()


def test_llama_1b_builds_on_meta_with_gqa_shapes_and_a_tied_head() -> None:
    cfg = model_config("llama-1b")
    model = build_model(cfg, device="meta")
    assert isinstance(model, Llama) and all(p.is_meta for p in model.parameters())
    assert model.num_parameters() == cfg.num_parameters()
    attn = model.blocks[0].attn
    assert attn.q.weight.shape == (32 * 64, 2048)
    assert attn.k.weight.shape == attn.v.weight.shape == (8 * 64, 2048)  # 8 k/v heads serve 32 query heads
    assert model.blocks[0].mlp.gate.weight.shape == (8192, 2048)
    assert model.lm_head.weight is model.wte.weight
    assert "lm_head.weight" not in dict(model.named_parameters())


def test_an_untied_head_is_its_own_parameter_counted_in_the_size(llama_config: ModelConfig) -> None:
    tied, untied = build_model(llama_config), build_model(llama_config.replace(tie_embeddings=False))
    assert untied.lm_head.weight is not untied.wte.weight
    assert untied.num_parameters() - tied.num_parameters() == 256 * 32
    assert untied.num_parameters() == untied.config.num_parameters()
    assert not torch.equal(untied.lm_head.weight, untied.wte.weight)


def test_forward_gives_logits_and_a_loss_near_uniform(llama_config: ModelConfig) -> None:
    model = build_model(llama_config, seed=0)
    x, y = _stream(0).next()
    out = model(x, y)
    assert out.logits.shape == (4, 16, 256)
    assert abs(out.ce.item() - math.log(256)) < 0.1
    assert out.aux == {} and out.loss is out.ce
    with pytest.raises(ValueError, match="context_length 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_grouped_query_attention_equals_full_attention_with_each_kv_head_repeated(llama_config: ModelConfig) -> None:
    gqa = build_model(llama_config, seed=1)
    mha = build_model(llama_config.replace(n_kv_head=None), seed=1)
    state = gqa.state_dict()
    for name, value in state.items():
        if name.endswith(("attn.k.weight", "attn.v.weight")):  # (2 heads * 8, d) -> (4 heads * 8, d)
            state[name] = value.view(2, 8, 32).repeat_interleave(2, dim=0).reshape(32, 32)
    mha.load_state_dict(state)
    x, _ = _stream(0).next()
    torch.testing.assert_close(mha(x).logits, gqa(x).logits, rtol=1e-5, atol=1e-6)


def test_attention_is_causal(llama_config: ModelConfig) -> None:
    model = build_model(llama_config, seed=0)
    x, _ = _stream(0).next()
    y = x.clone()
    y[:, 10:] = (y[:, 10:] + 1) % 256
    a, b = model(x).logits, model(y).logits
    assert torch.equal(a[:, :10], b[:, :10])
    assert not torch.equal(a[:, 10:], b[:, 10:])


def test_same_seed_gives_identical_weights_and_another_seed_differs(llama_config: ModelConfig) -> None:
    a, b, c = (build_model(llama_config.replace(n_experts=2, qkv_bias=True), seed=s) for s in (7, 7, 8))
    assert _digest(a) == _digest(b) != _digest(c)
    assert torch.equal(a.blocks[0].ln_1.weight, torch.ones(32)) and torch.equal(a.blocks[0].attn.q.bias, torch.zeros(32))
    o, q = a.blocks[0].attn.o.weight.std().item(), a.blocks[0].attn.q.weight.std().item()
    assert o < q  # residual projections get the scaled-down init


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_activation_checkpointing_recomputes_blocks_in_backward_and_gives_the_same_gradients(arch: str) -> None:
    cfg = ModelConfig(arch=arch, vocab_size=256, context_length=16, n_layer=2, n_head=4, d_model=32, n_experts=4)
    grads, calls = [], []
    for remat in (False, True):
        model = build_model(cfg.replace(activation_checkpointing=remat), seed=0)
        count, block = [0], model.blocks[0]
        forward = block.forward

        def counted(*args, forward=forward, count=count):
            count[0] += 1
            return forward(*args)

        block.forward = counted
        x, y = _stream(0).next()
        model(x, y).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        calls.append(count[0])
    assert calls == [1, 2]  # the checkpointed block ran again during backward
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])


def test_bf16_autocast_keeps_losses_router_and_gradients_fp32(llama_config: ModelConfig) -> None:
    model = build_model(llama_config.replace(n_experts=4), seed=0)
    x, y = _stream(0).next()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, y)
    assert out.logits.dtype == torch.bfloat16 and out.ce.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in out.aux.values())
    out.loss.backward()
    assert all(p.grad is None or (p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()) for p in model.parameters())


def test_llama_moe_experts_are_addressable_swiglu_triples(llama_config: ModelConfig) -> None:
    cfg = llama_config.replace(n_experts=4, top_k=2)
    model = build_model(cfg, seed=0)
    params = model.expert_parameters(1, 3)
    assert set(params) == {f"blocks.1.mlp.experts.3.{w}" for w in ("w1", "w2", "w3")}
    assert params["blocks.1.mlp.experts.3.w1"].shape == (cfg.expert_hidden, 32)  # gate
    assert params["blocks.1.mlp.experts.3.w2"].shape == (32, cfg.expert_hidden)  # down
    assert all(parse_expert_name(n) == (1, 3) for n in params)
    assert not any(parse_expert_name(n) for n in model.shared_parameters())
    x, y = _stream(0).next()
    out = model(x, y)
    assert set(out.aux) == {"load_balance", "router_z"}
    expert_numel = sum(p.numel() for p in expert_tensors(model, 0).values())
    assert sync_bytes(cfg, n_nodes=2, owned=2).expert_bytes == 4 * expert_numel
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    merge_model_experts_(model, 0.5, top_k=2)
    assert not torch.equal(model.blocks[0].mlp.experts[0].w3, before["blocks.0.mlp.experts.0.w3"])


def test_upcycled_llama_without_noise_computes_the_dense_function(llama_config: ModelConfig) -> None:
    dense = build_model(llama_config, seed=3)
    moe = upcycle(dense, n_experts=4, top_k=2, noise_std=0.0)
    assert torch.equal(moe.blocks[1].mlp.experts[2].w3, dense.blocks[1].mlp.up.weight)
    assert torch.equal(moe.blocks[1].mlp.experts[2].w2, dense.blocks[1].mlp.down.weight)
    x, y = _stream(0).next()
    with torch.no_grad():
        torch.testing.assert_close(moe(x, y).logits, dense(x, y).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"n_kv_head": 2}, "apply to arch='llama' only"),
        ({"tie_embeddings": False}, "apply to arch='llama' only"),
        ({"arch": "llama", "n_kv_head": 3}, "n_kv_head \\(3\\) must divide n_head \\(4\\)"),
        ({"arch": "llama", "bias": True}, "qkv_bias=True"),
        ({"arch": "llama", "d_model": 24, "n_head": 8}, "must be even for RoPE"),
        ({"arch": "llama", "head_dim": 1}, "head_dim must be >= 2"),
        ({"arch": "mamba"}, "arch must be one of"),
        ({"arch": "llama", "rope_theta": 0.0}, "rope_theta must be > 0"),
    ],
)
def test_llama_config_validation_names_the_field_and_the_fix(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{"n_head": 4, "d_model": 32, **changes})


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_round_trips_through_its_dict(preset: str) -> None:
    assert ModelConfig.from_dict(PRESETS[preset].to_dict()) == PRESETS[preset]


def test_diloco_replicas_of_a_llama_are_identical_after_each_outer_step(llama_config: ModelConfig) -> None:
    net = SimNetwork(latency_s=0.01)
    cfg = DiLoCoConfig(inner=OPT, inner_steps=3)
    nodes = [DiLoCo(build_model(llama_config, seed=0), c, cfg) for c in net.add_peers(2)]

    async def main():
        await asyncio.gather(*(train(s, _stream(i), LoopConfig(max_steps=6)) for i, s in enumerate(nodes)))

    run_virtual(main())
    assert nodes[0].outer_steps == nodes[1].outer_steps == 2
    assert _digest(nodes[0].model) == _digest(nodes[1].model) != _digest(build_model(llama_config, seed=0))


def test_spes_on_a_llama_moe_syncs_to_identical_nodes_that_own_their_experts(llama_config: ModelConfig) -> None:
    cfg = llama_config.replace(n_experts=4, top_k=2)
    net = SimNetwork(latency_s=0.01)
    spes = SPESConfig(optimizer=OPT, sync_steps=2, merge_interval=2, merge_a0=0.5, merge_until=10, merge_top_k=2)
    nodes = [SPES(build_model(cfg, seed=0), c, spes) for c in net.add_peers(2)]

    async def main():
        await asyncio.gather(*(train(s, _stream(i), LoopConfig(max_steps=4)) for i, s in enumerate(nodes)))

    run_virtual(main())
    assert sorted(nodes[0].owned + nodes[1].owned) == [0, 1, 2, 3]
    assert nodes[0].merges == nodes[1].merges == 2
    assert _digest(nodes[0].model) == _digest(nodes[1].model) != _digest(build_model(cfg, seed=0))
