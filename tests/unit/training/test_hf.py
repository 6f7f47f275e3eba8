"""Hugging Face interop: HF Llama/Qwen2/Mistral dirs load bit-exactly; our Llamas export loadably.

`transformers` is the reference: the random configs are built and saved by transformers itself,
and every comparison of fp32 logits is torch.equal (bit-identical), not allclose.
"""

from __future__ import annotations

import json
from pathlib import Path

import _hf_import
import pytest
import torch
from safetensors.torch import load_file, save_file

from hyphae.training import build_model
from hyphae.training.hf import (
    export_hf,
    hf_config_to_model_config,
    hf_names,
    load_hf_model,
    model_config_to_hf_config,
)
from hyphae.training.model_config import ModelConfig

transformers = _hf_import.import_transformers()

SMALL = dict(
    vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=48,
)


def _hf_model(kind: str, **changes):
    """A random HF model of family `kind` whose norms and biases are not at their init values."""
    config_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
                  "mistral": transformers.MistralConfig}[kind]
    model_cls = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
                 "mistral": transformers.MistralForCausalLM}[kind]
    torch.manual_seed(0)
    model = model_cls(config_cls(**{**SMALL, **changes})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _tokens(t: int = 40, vocab: int = 96) -> torch.Tensor:
    return torch.randint(0, vocab, (3, t), generator=torch.Generator().manual_seed(1))


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


CASES = {
    "llama-gqa-untied": ("llama", {}),
    "llama-mha-tied": ("llama", {"tie_word_embeddings": True, "num_key_value_heads": 4}),
    "llama-theta-eps": ("llama", {"rope_theta": 500000.0, "rms_norm_eps": 1e-5}),
    "llama3-rope-scaling": ("llama", {"rope_parameters": {  # wavelengths in all three bands of the rule
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
    "qwen2-qkv-bias": ("qwen2", {}),
    "qwen2-tied": ("qwen2", {"tie_word_embeddings": True}),
    "mistral-wide-heads": ("mistral", {"head_dim": 32}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hf_model_loads_with_bit_identical_logits_and_exports_back_bit_identical(case: str, tmp_path: Path) -> None:
    kind, changes = CASES[case]
    reference = _hf_model(kind, **changes)
    reference.save_pretrained(tmp_path / "hf", safe_serialization=True)
    ours, config = load_hf_model(tmp_path / "hf")
    x = _tokens()
    expected = _logits(reference, x)
    assert torch.equal(_logits(ours, x), expected)
    assert ours.num_parameters() == config.num_parameters() == reference.num_parameters()

    out = export_hf(ours.state_dict(), config, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.equal(_logits(back, x), expected)
    reloaded, again = load_hf_model(out)
    assert again == config


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_bf16_loads_match_transformers_in_bf16_too(kind: str, tmp_path: Path) -> None:
    _hf_model(kind).save_pretrained(tmp_path, safe_serialization=True)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    ours, _ = load_hf_model(tmp_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())
    x = _tokens()
    assert torch.equal(_logits(ours, x), _logits(reference, x))


def test_sharded_safetensors_load_like_a_single_file(tmp_path: Path) -> None:
    reference = _hf_model("llama")
    reference.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    ours, _ = load_hf_model(tmp_path)
    x = _tokens()
    assert torch.equal(_logits(ours, x), _logits(reference, x))


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("qkv_bias", [True, False])
def test_our_trained_llama_exports_to_a_dir_transformers_loads_with_equal_logits(
    tie: bool, qkv_bias: bool, tmp_path: Path
) -> None:
    config = ModelConfig(arch="llama", vocab_size=80, context_length=32, n_layer=2, n_head=4, n_kv_head=2,
                         d_model=32, tie_embeddings=tie, qkv_bias=qkv_bias)
    model = build_model(config, seed=3).eval()
    with torch.no_grad():  # norms and biases away from 1 and 0, as after training
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    (tmp_path / "tok.json").write_text('{"model": {}}')
    out = export_hf(model.state_dict(), config, tmp_path / "out", tokenizer_file=tmp_path / "tok.json")
    assert (out / "tokenizer.json").read_text() == '{"model": {}}'
    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["model_type"] == ("qwen2" if qkv_bias else "llama")
    tensors = load_file(out / "model.safetensors")
    assert ("lm_head.weight" in tensors) is not tie
    assert set(tensors) == set(hf_names(config).values())
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    x = _tokens(32, 80)
    assert torch.equal(_logits(back, x), _logits(model, x))


def test_sliding_window_caps_the_context_where_attention_is_still_exact(tmp_path: Path) -> None:
    reference = _hf_model("mistral", sliding_window=16)
    reference.save_pretrained(tmp_path, safe_serialization=True)
    ours, config = load_hf_model(tmp_path)
    assert config.context_length == 16
    x = _tokens(16)
    assert torch.equal(_logits(ours, x), _logits(reference, x))
    with pytest.raises(ValueError, match="exceeds context_length 16"):
        ours(_tokens(17))


def _config_json(**changes) -> dict:
    base = {**SMALL, "model_type": "llama", "hidden_act": "silu", "rms_norm_eps": 1e-6,
            "tie_word_embeddings": False, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
    return {k: v for k, v in {**base, **changes}.items() if v is not ...}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
        ({"model_type": None}, "model_type None is not supported"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 5e5, "factor": 8.0}}, "rope_type 'yarn'.*not implement"),
        ({"rope_parameters": ..., "rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_type 'linear'"),
        ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0}}, "'llama3' needs 'low_freq_factor'"),
        ({"attention_bias": True}, "attention_bias=true is not supported"),
        ({"mlp_bias": True}, "mlp_bias=true"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
        ({"num_hidden_layers": ...}, "lacks 'num_hidden_layers'"),
        ({"num_key_value_heads": 3}, "n_kv_head \\(3\\) must divide n_head \\(4\\)"),
    ],
)
def test_unsupported_configs_are_refused_naming_the_key(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        hf_config_to_model_config(_config_json(**changes))


def test_old_style_rope_theta_and_absent_optional_keys_use_hf_defaults() -> None:
    config = hf_config_to_model_config(
        _config_json(rope_parameters=..., rope_theta=1e6, rms_norm_eps=..., tie_word_embeddings=..., num_key_value_heads=...)
    )
    assert (config.rope_theta, config.norm_eps, config.tie_embeddings, config.kv_heads) == (1e6, 1e-6, False, 4)


def test_transformers_4_style_llama3_rope_scaling_is_read() -> None:
    config = hf_config_to_model_config(_config_json(
        rope_parameters=..., rope_theta=5e5, original_max_position_embeddings=8192,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}))
    assert (config.rope_scaling, config.rope_theta, config.rope_factor, config.rope_original_context) == ("llama3", 5e5, 32.0, 8192)
    assert hf_config_to_model_config(model_config_to_hf_config(config)) == config


def test_directories_without_safetensors_or_with_wrong_tensors_are_refused(tmp_path: Path) -> None:
    reference = _hf_model("llama")
    reference.save_pretrained(tmp_path, safe_serialization=True)
    weights = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="neither model.safetensors.*pickled pytorch_model.bin"):
        load_hf_model(tmp_path)

    save_file({k: v for k, v in weights.items() if "layers.1.mlp.up_proj" not in k}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="1 tensor\\(s\\) missing.*layers.1.mlp.up_proj"):
        load_hf_model(tmp_path)

    save_file({**weights, "model.layers.0.self_attn.o_proj.bias": torch.zeros(64)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="no place for.*o_proj.bias"):
        load_hf_model(tmp_path)

    bad = dict(weights, **{"model.norm.weight": torch.ones(63)})
    save_file(bad, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="model.norm.weight has shape \\(63,\\)"):
        load_hf_model(tmp_path)

    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "../evil.safetensors"}}))
    with pytest.raises(ValueError, match="plain file name"):
        load_hf_model(tmp_path)


@pytest.mark.parametrize("bias", [False, True])
def test_our_gpt_exports_as_a_gpt2_transformers_loads_with_equal_logits(bias: bool, tmp_path: Path) -> None:
    config = ModelConfig(vocab_size=80, context_length=32, n_layer=2, n_head=4, d_model=32, bias=bias)
    model = build_model(config, seed=3).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    out = export_hf(model.state_dict(), config, tmp_path)
    assert json.loads((out / "config.json").read_text())["model_type"] == "gpt2"
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(back).__name__ == "GPT2LMHeadModel"
    x = _tokens(32, 80)
    assert torch.equal(_logits(back, x), _logits(model, x))


def test_export_refuses_moe_models_and_mismatched_weights(tmp_path: Path) -> None:
    gpt = ModelConfig(vocab_size=64, context_length=16, n_layer=1, n_head=2, d_model=16)
    for moe in (gpt.replace(n_experts=4), gpt.replace(arch="llama", n_experts=4)):
        with pytest.raises(ValueError, match="mixture-of-experts"):
            export_hf(build_model(moe).state_dict(), moe, tmp_path)
    for config, name in ((gpt.replace(arch="llama"), "blocks.0.attn.q.weight"), (gpt, "blocks.0.attn.qkv.weight")):
        weights = build_model(config).state_dict()
        del weights[name]
        with pytest.raises(ValueError, match=f"missing \\['{name}'\\]"):
            export_hf(weights, config, tmp_path)
    assert not (tmp_path / "config.json").exists()
    with pytest.raises(ValueError, match="arch='llama'"):
        hf_names(gpt)


def test_exported_config_round_trips_to_the_same_model_config() -> None:
    for config in (
        ModelConfig(arch="llama", vocab_size=300, context_length=64, n_layer=3, n_head=6, n_kv_head=2, d_model=96,
                    d_ff=200, rope_theta=5e5, norm_eps=1e-6, tie_embeddings=False),
        ModelConfig(arch="llama", vocab_size=300, context_length=64, n_layer=1, n_head=4, d_model=64, head_dim=32,
                    qkv_bias=True),
    ):
        assert hf_config_to_model_config(model_config_to_hf_config(config)) == config
