"""GPT and MoE GPT: sizes per preset, losses, addressable experts, seeded init, config checks."""

import math

import pytest
import torch

from hyphae.training import PRESETS, ModelConfig, build_model, model_config, parse_expert_name


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_builds_on_meta_with_the_advertised_parameter_count(preset: str) -> None:
    cfg = PRESETS[preset]
    model = build_model(cfg, device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert model.num_parameters() == cfg.num_parameters()


@pytest.mark.parametrize(
    ("preset", "low", "high"),
    [("tiny", 0.2e6, 1.0e6), ("small", 5e6, 20e6), ("medium", 100e6, 150e6), ("large", 0.9e9, 1.2e9)],
)
def test_dense_preset_sizes_span_tiny_to_one_billion(preset: str, low: float, high: float) -> None:
    assert low <= PRESETS[preset].num_parameters() <= high


def test_every_dense_preset_has_an_moe_twin_with_the_same_attention_stack() -> None:
    for name, cfg in PRESETS.items():
        if name.endswith("-moe"):
            continue
        twin = PRESETS[f"{name}-moe"]
        assert twin.is_moe and not cfg.is_moe
        assert (twin.n_layer, twin.d_model, twin.n_head) == (cfg.n_layer, cfg.d_model, cfg.n_head)


def test_tiny_forward_gives_logits_and_a_loss_near_uniform() -> None:
    model = build_model(model_config("tiny"), seed=0)
    x, y = torch.randint(0, 256, (2, 2, 128), generator=torch.Generator().manual_seed(0))
    out = model(x, y)
    assert out.logits.shape == (2, 128, 256)
    assert abs(out.ce.item() - math.log(256)) < 0.2
    assert out.aux == {} and out.loss is out.ce


def test_moe_losses_present_finite_and_weighted_into_the_loss(micro_moe_config: ModelConfig) -> None:
    model = build_model(micro_moe_config, seed=0)
    x = torch.randint(0, 256, (4, 16))
    out = model(x, x)
    assert set(out.aux) == {"load_balance", "router_z"}
    assert all(torch.isfinite(v) for v in out.aux.values())
    assert out.aux["load_balance"].item() >= 1.0 - 1e-4  # E * sum f*P >= 1, equality when balanced
    expected = out.ce + 0.01 * out.aux["load_balance"] + 0.001 * out.aux["router_z"]
    assert torch.allclose(out.loss, expected)
    out.loss.backward()
    assert model.blocks[0].mlp.router.weight.grad is not None


def test_expert_parameters_are_distinct_and_addressable_by_layer_and_index(
    micro_moe_config: ModelConfig,
) -> None:
    model = build_model(micro_moe_config, seed=0)
    names = dict(model.named_parameters())
    pointers = set()
    for layer in range(micro_moe_config.n_layer):
        for e in range(micro_moe_config.n_experts):
            params = model.expert_parameters(layer, e)
            assert set(params) == {f"blocks.{layer}.mlp.experts.{e}.w1", f"blocks.{layer}.mlp.experts.{e}.w2"}
            for name, p in params.items():
                assert names[name] is p
                assert parse_expert_name(name) == (layer, e)
                pointers.add(p.data_ptr())
    assert len(pointers) == 2 * micro_moe_config.n_layer * micro_moe_config.n_experts
    shared = model.shared_parameters()
    assert "blocks.0.mlp.router.weight" in shared and "wte.weight" in shared
    assert not any(parse_expert_name(n) for n in shared)
    assert len(shared) + 2 * micro_moe_config.n_layer * micro_moe_config.n_experts == len(names)


def test_expert_lookup_out_of_range_or_on_dense_model_says_why(micro_config: ModelConfig) -> None:
    with pytest.raises(ValueError, match="dense"):
        build_model(micro_config).expert_parameters(0, 0)
    moe = build_model(micro_config.replace(n_experts=2, top_k=1))
    with pytest.raises(ValueError, match="out of range"):
        moe.expert_parameters(0, 2)


def test_same_seed_gives_identical_weights_and_another_seed_differs(micro_config: ModelConfig) -> None:
    a, b, c = (build_model(micro_config, seed=s) for s in (7, 7, 8))
    for (n, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), n
    assert not torch.equal(a.wte.weight, c.wte.weight)


def test_sequence_longer_than_context_is_rejected_with_the_fix(micro_config: ModelConfig) -> None:
    model = build_model(micro_config)
    with pytest.raises(ValueError, match="context_length 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_model_config_round_trips_through_a_dict_and_rejects_unknown_keys() -> None:
    cfg = model_config("small-moe")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="n_layers.*valid keys"):
        ModelConfig.from_dict({"n_layers": 3})
    with pytest.raises(ValueError, match="unknown model preset"):
        model_config("huge")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"d_model": 30, "n_head": 4}, "multiple of n_head"),
        ({"n_experts": 2, "top_k": 3}, "top_k"),
        ({"dropout": 1.5}, "dropout"),
        ({"n_layer": 0}, "n_layer must be >= 1"),
    ],
)
def test_model_config_validation_names_the_field_and_the_fix(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig(**changes)


def test_moe_router_and_aux_losses_stay_fp32_under_bf16_autocast(micro_moe_config: ModelConfig) -> None:
    model = build_model(micro_moe_config, seed=0)
    x = torch.randint(0, 256, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, x)
    assert out.ce.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in out.aux.values())
    out.loss.backward()
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())
