"""The shared AdamW: schedule shape, which tensors decay, config checks, precision policy."""

import pytest
import torch

from hyphae.training import AdamWConfig, ModelConfig, build_adamw, build_model, resolve_precision


def test_schedule_warms_up_linearly_then_decays_by_cosine_to_the_floor() -> None:
    cfg = AdamWConfig(lr=1.0, warmup_steps=10, decay_steps=110, min_lr_ratio=0.1)
    assert cfg.lr_at(0) == pytest.approx(0.1) and cfg.lr_at(9) == pytest.approx(1.0)
    assert cfg.lr_at(10) == pytest.approx(1.0)
    assert cfg.lr_at(60) == pytest.approx(0.55)
    assert cfg.lr_at(110) == cfg.lr_at(10_000) == pytest.approx(0.1)
    assert AdamWConfig(lr=0.5, warmup_steps=0).lr_at(123_456) == 0.5


def test_norms_and_biases_get_no_weight_decay(micro_config: ModelConfig) -> None:
    model = build_model(micro_config.replace(bias=True))
    opt = build_adamw(model.named_parameters(), AdamWConfig(weight_decay=0.1))
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decayed["params"]) and all(p.dim() == 1 for p in plain["params"])


def test_frozen_parameters_get_no_optimizer_state(micro_moe_config: ModelConfig) -> None:
    model = build_model(micro_moe_config)
    for p in model.expert_parameters(0, 1).values():
        p.requires_grad_(False)
    opt = build_adamw(model.named_parameters(), AdamWConfig())
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(p) not in held for p in model.expert_parameters(0, 1).values())


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"lr": 0}, "lr must be > 0"),
        ({"betas": (0.9,)}, "betas must be two numbers"),
        ({"warmup_steps": 10, "decay_steps": 5}, "must exceed warmup_steps"),
        ({"grad_clip": -1}, "grad_clip must be >= 0"),
    ],
)
def test_adamw_config_errors_name_the_field_and_limit(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AdamWConfig(**changes)


def test_precision_policy_is_fp32_on_cpu_unless_bf16_is_asked_for() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) is None and resolve_precision("fp32", cpu) is None
    assert resolve_precision("bf16", cpu) is torch.bfloat16
    with pytest.raises(ValueError, match="precision must be"):
        resolve_precision("fp16", cpu)  # type: ignore[arg-type]
