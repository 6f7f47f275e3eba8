"""Hugging Face interop without a hub: local Llama/Qwen2/Mistral directories in, HF directories out.

A Hugging Face model directory is `config.json` plus `model.safetensors` (or shards listed in
`model.safetensors.index.json`). `load_hf_model` reads one into our `Llama` (llama.py), whose
ops mirror `transformers`' order, so fp32 logits are bit-identical to `transformers` on the same
weights. `export_hf` writes our weights back as such a directory (a Llama as "llama", or
"qwen2" with q/k/v biases; a dense GPT as "gpt2", see _hf_gpt2.py), which
`transformers.AutoModelForCausalLM.from_pretrained` loads with equal logits.

Only `json` and `safetensors` are used: safetensors never executes code (pickled
`pytorch_model.bin` files are refused), and nothing is downloaded. What we do not implement
exactly (RoPE scalings but Llama 3's, o_proj/MLP biases, other activations, unknown model types) is refused
with a ValueError naming the config key, rather than loaded approximately. A sliding attention
window is exact for sequences no longer than the window, so the loaded model's context_length
is capped at it (longer inputs are refused by `forward`).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hyphae.training._hf_gpt2 import gpt2_config, gpt2_tensors
from hyphae.training.llama import Llama
from hyphae.training.model import build_model
from hyphae.training.model_config import ModelConfig

__all__ = ["export_hf", "hf_config_to_model_config", "hf_names", "load_hf_model", "model_config_to_hf_config"]

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")

# The one name table: our parameter name -> the HF name, "{l}" standing for the layer index.
_GLOBAL_NAMES = {
    "wte.weight": "model.embed_tokens.weight",
    "ln_f.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",  # untied models only
}
_LAYER_NAMES = {
    "blocks.{l}.ln_1.weight": "model.layers.{l}.input_layernorm.weight",
    "blocks.{l}.attn.q.weight": "model.layers.{l}.self_attn.q_proj.weight",
    "blocks.{l}.attn.k.weight": "model.layers.{l}.self_attn.k_proj.weight",
    "blocks.{l}.attn.v.weight": "model.layers.{l}.self_attn.v_proj.weight",
    "blocks.{l}.attn.q.bias": "model.layers.{l}.self_attn.q_proj.bias",  # qkv_bias only
    "blocks.{l}.attn.k.bias": "model.layers.{l}.self_attn.k_proj.bias",
    "blocks.{l}.attn.v.bias": "model.layers.{l}.self_attn.v_proj.bias",
    "blocks.{l}.attn.o.weight": "model.layers.{l}.self_attn.o_proj.weight",
    "blocks.{l}.ln_2.weight": "model.layers.{l}.post_attention_layernorm.weight",
    "blocks.{l}.mlp.gate.weight": "model.layers.{l}.mlp.gate_proj.weight",
    "blocks.{l}.mlp.up.weight": "model.layers.{l}.mlp.up_proj.weight",
    "blocks.{l}.mlp.down.weight": "model.layers.{l}.mlp.down_proj.weight",
}
_IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)
"""Non-persistent buffers some older exports saved; recomputed, never read."""

# What HF's config classes assume for keys a config.json may leave out.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"rms_norm_eps": 1e-6, "tie_word_embeddings": False, "hidden_act": "silu"},
    "qwen2": {"rms_norm_eps": 1e-6, "tie_word_embeddings": False, "hidden_act": "silu"},
    "mistral": {"rms_norm_eps": 1e-6, "tie_word_embeddings": False, "hidden_act": "silu", "sliding_window": 4096},
}


def hf_names(config: ModelConfig) -> dict[str, str]:
    """Our parameter name -> HF name for every distinct parameter of a dense Llama of `config`.

    Raises:
        ValueError: not a dense Llama config (see `_check_exportable`).
    """
    _check_exportable(config)
    names = {k: v for k, v in _GLOBAL_NAMES.items() if k != "lm_head.weight" or not config.tie_embeddings}
    for layer in range(config.n_layer):
        for ours, theirs in _LAYER_NAMES.items():
            if ours.endswith(".bias") and not config.qkv_bias:
                continue
            names[ours.format(l=layer)] = theirs.format(l=layer)
    return names


def _check_exportable(config: ModelConfig) -> None:
    if config.arch != "llama":
        raise ValueError(
            f"only arch='llama' models map onto Hugging Face's Llama family; this is arch={config.arch!r} "
            "(export_hf writes a GPT as GPT-2 instead)"
        )
    if config.is_moe:
        raise ValueError(
            "mixture-of-experts Llama models (n_experts > 0) have no HF mapping here yet (Mixtral's router "
            "differs in its auxiliary losses and layout); export a dense llama-* model"
        )


def hf_config_to_model_config(config_json: Mapping[str, Any]) -> ModelConfig:
    """Our `ModelConfig` for a Hugging Face `config.json` of a Llama, Qwen2 or Mistral model.

    Raises:
        ValueError: an unknown model_type, a missing key, or a feature we do not compute
            exactly (the message names the key and what to do).
    """
    cfg = dict(config_json)
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"config.json model_type {model_type!r} is not supported; hyphae loads {list(SUPPORTED_MODEL_TYPES)} "
            "(Llama/Qwen2/Mistral-family decoders). Convert the checkpoint to one of them or use transformers"
        )
    cfg = {**_DEFAULTS[model_type], **{k: v for k, v in cfg.items() if v is not None or k == "sliding_window"}}

    def need(key: str) -> Any:
        if key not in cfg:
            raise ValueError(f"config.json lacks {key!r}, which a {model_type} config must have; is this file complete?")
        return cfg[key]

    if cfg["hidden_act"] != "silu":
        raise ValueError(f"config.json hidden_act {cfg['hidden_act']!r} is not supported; hyphae's SwiGLU uses 'silu'")
    for key in ("attention_bias", "mlp_bias"):
        if model_type == "llama" and cfg.get(key):
            raise ValueError(
                f"config.json {key}=true is not supported (hyphae's Llama has no o_proj/MLP biases; Qwen2-style "
                f"q/k/v biases are); use a checkpoint with {key}=false"
            )
    rope = _rope(cfg)
    heads = need("num_attention_heads")
    hidden = need("hidden_size")
    kv = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim")
    context = need("max_position_embeddings")
    window = _sliding_window(cfg, model_type)
    if window is not None and window < context:
        logger.info("sliding window %d < max_position_embeddings %d: context_length capped at %d", window, context, window)
        context = window
    config = ModelConfig(
        arch="llama",
        vocab_size=need("vocab_size"),
        context_length=context,
        n_layer=need("num_hidden_layers"),
        n_head=heads,
        n_kv_head=None if kv == heads else kv,
        head_dim=None if head_dim in (None, hidden // heads) and hidden % heads == 0 else head_dim,
        d_model=hidden,
        d_ff=need("intermediate_size"),
        qkv_bias=model_type == "qwen2",
        tie_embeddings=bool(cfg["tie_word_embeddings"]),
        **rope,
        norm_eps=float(cfg["rms_norm_eps"]),
        init_std=float(cfg.get("initializer_range", 0.02)),
    )
    # Canonical form: a default width reads back as None, so export -> load gives an equal config.
    default = config.replace(d_ff=None)
    return default if default.mlp_hidden == config.d_ff else config


def _rope(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Our RoPE fields for an HF config (5.x `rope_parameters` or 4.x `rope_theta` +
    `rope_scaling`); refuses the RoPE variants we do not implement."""
    params: dict[str, Any] = {}
    for key in ("rope_scaling", "rope_parameters"):  # the newer key wins
        rope = cfg.get(key) or {}
        if not isinstance(rope, Mapping):
            raise ValueError(f"config.json {key} must be an object, got {rope!r}")
        params.update(rope)
    if {params.get("partial_rotary_factor", 1.0), cfg.get("partial_rotary_factor", 1.0)} != {1.0}:
        raise ValueError("config.json partial_rotary_factor must be 1.0 (hyphae rotates whole heads)")
    kind = params.get("rope_type", params.get("type", "default"))
    out: dict[str, Any] = {"rope_theta": float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))}
    if kind == "llama3":
        original = cfg.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
        try:
            out.update(
                rope_scaling="llama3", rope_factor=float(params["factor"]),
                rope_low_freq_factor=float(params["low_freq_factor"]),
                rope_high_freq_factor=float(params["high_freq_factor"]),
                rope_original_context=int(original or cfg["max_position_embeddings"]),
            )
        except KeyError as exc:
            raise ValueError(f"config.json rope_type 'llama3' needs {exc.args[0]!r} in rope_parameters") from None
    elif kind != "default":
        raise ValueError(
            f"config.json rope_parameters/rope_scaling has rope_type {kind!r}, which hyphae does not implement "
            "(only the default RoPE and 'llama3'); use another checkpoint or load it with transformers"
        )
    return out


def _sliding_window(cfg: Mapping[str, Any], model_type: str) -> int | None:
    """The attention window some layers use, or None when every layer attends to the whole context."""
    if model_type == "llama":
        return None
    window = cfg.get("sliding_window")
    if model_type == "qwen2":
        slides = cfg.get("use_sliding_window") or "sliding_attention" in (cfg.get("layer_types") or ())
        if not slides:
            return None
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"config.json sliding_window must be a positive integer or null, got {window!r}")
    return window


def model_config_to_hf_config(config: ModelConfig, *, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The `config.json` for our dense Llama `config`: "qwen2" when it has q/k/v biases, else "llama".

    Raises:
        ValueError: not a dense Llama config.
    """
    _check_exportable(config)
    qwen = config.qkv_bias
    out: dict[str, Any] = {
        "architectures": ["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
        "model_type": "qwen2" if qwen else "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.mlp_hidden,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.attn_head_dim,
        "max_position_embeddings": config.context_length,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,  # what transformers 4.x reads
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},  # 5.x
        "rope_scaling": None,
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "initializer_range": config.init_std,
        "dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
    }
    if config.rope_scaling == "llama3":
        scaling = {"rope_type": "llama3", "factor": config.rope_factor, "low_freq_factor": config.rope_low_freq_factor,
                   "high_freq_factor": config.rope_high_freq_factor,
                   "original_max_position_embeddings": config.rope_original_context}
        out["rope_parameters"].update(scaling)
        out["rope_scaling"] = scaling  # 4.x
    if qwen:
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.n_layer,
                   layer_types=["full_attention"] * config.n_layer)
    else:
        out.update(attention_bias=False, mlp_bias=False)
    return out


def load_hf_model(
    directory: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[Llama, ModelConfig]:
    """Load a local Hugging Face Llama/Qwen2/Mistral directory into our `Llama`, in eval mode.

    Args:
        directory: holds `config.json` and `model.safetensors` or `model.safetensors.index.json`
            with its shards.
        device: where the weights go.
        dtype: parameter dtype (fp32 gives logits bit-identical to transformers in fp32).

    Returns:
        The model and its config.

    Raises:
        ValueError: an unsupported config (see `hf_config_to_model_config`), missing,
            unexpected or misshapen tensors, or no safetensors weights in the directory.
    """
    root = Path(directory)
    config_path = root / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{root} has no config.json; pass a Hugging Face model directory")
    config = hf_config_to_model_config(json.loads(config_path.read_text()))
    names = {theirs: ours for ours, theirs in hf_names(config).items()}
    model = build_model(config, device="meta")
    model.to_empty(device=device).to(dtype)
    model.tie_weights()  # to_empty gives each module its own tensor
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    unexpected: list[str] = []
    with torch.no_grad():
        for shard in _shards(root):
            with safe_open(shard, framework="pt", device="cpu") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                    ours = names.get(key)
                    if ours is None:
                        if key.endswith(_IGNORED_HF_SUFFIXES) or (key == "lm_head.weight" and config.tie_embeddings):
                            continue  # a recomputed buffer, or a tied head saved twice
                        unexpected.append(key)
                        continue
                    tensor = f.get_tensor(key)
                    if tensor.shape != params[ours].shape:
                        raise ValueError(
                            f"{shard.name}: {key} has shape {tuple(tensor.shape)}, config.json implies "
                            f"{tuple(params[ours].shape)}; the weights do not match the config"
                        )
                    params[ours].copy_(tensor)
                    loaded.add(key)
    if unexpected:
        raise ValueError(
            f"{root}: {len(unexpected)} tensor(s) this architecture has no place for, e.g. {sorted(unexpected)[:5]}; "
            "the checkpoint is not a plain Llama/Qwen2/Mistral model"
        )
    missing = sorted(set(names) - loaded)
    if missing:
        raise ValueError(f"{root}: {len(missing)} tensor(s) missing, e.g. {missing[:5]}; is a shard absent?")
    return model.eval(), config


def _shards(root: Path) -> list[Path]:
    """The safetensors files of a model directory (one file, or the shards its index names)."""
    single = root / "model.safetensors"
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{index}: not a safetensors index (need a 'weight_map' object): {exc}") from exc
        for name in files:
            if not isinstance(name, str) or Path(name).name != name:
                raise ValueError(f"{index}: shard name {name!r} must be a plain file name in {root}")
            if not (root / name).is_file():
                raise ValueError(f"{index} names shard {name}, which is not in {root}")
        return [root / name for name in files]
    if single.is_file():
        return [single]
    raise ValueError(
        f"{root} has neither model.safetensors nor model.safetensors.index.json; hyphae reads safetensors only "
        "(pickled pytorch_model.bin files can run code: convert them with transformers' save_pretrained)"
    )


def export_hf(
    state_dict: Mapping[str, torch.Tensor],
    config: ModelConfig,
    out_dir: str | Path,
    *,
    tokenizer_file: str | Path | None = None,
) -> Path:
    """Write our dense Llama or GPT weights as a Hugging Face model directory.

    Args:
        state_dict: the model's `state_dict()` (a tied head's duplicate entry is dropped).
        config: its config (dense; a GPT becomes a GPT-2 with exact GELU).
        out_dir: created if missing; config.json and model.safetensors are (over)written.
        tokenizer_file: a `tokenizer.json` to copy next to the weights.

    Returns:
        `out_dir`.

    Raises:
        ValueError: an MoE config, or a state_dict that does not fit the config.
    """
    if config.arch == "gpt":
        tensors = gpt2_tensors(state_dict, config)
        hf_config = gpt2_config(config, dtype=tensors["transformer.wte.weight"].dtype)
    else:
        names = hf_names(config)
        extra = sorted(set(state_dict) - set(names) - {"lm_head.weight"})
        missing = sorted(set(names) - set(state_dict))
        if extra or missing:
            raise ValueError(
                f"state_dict does not fit the config: missing {missing[:5]}, unexpected {extra[:5]}; "
                "pass the state_dict of the model this config built"
            )
        tensors = {theirs: state_dict[ours].detach().to("cpu").contiguous().clone() for ours, theirs in names.items()}
        hf_config = model_config_to_hf_config(config, dtype=tensors["model.embed_tokens.weight"].dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, out / "tokenizer.json")
    logger.info("exported %s (%d tensors) to %s", hf_config["model_type"], len(tensors), out)
    return out
