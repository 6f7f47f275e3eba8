"""Our dense GPT as a Hugging Face GPT-2 (`GPT2LMHeadModel`) directory: names, layout, config.json.

Our GPT is GPT-2's architecture with exact GELU, optional biases and tied embeddings, so it maps
onto `GPT2LMHeadModel` with `activation_function="gelu"`: GPT-2's Conv1D layers store their
weights transposed (in x out), and a bias-free model gets zero biases (GPT-2 always has them).
hf.py's `export_hf` uses this for `arch="gpt"`; fp32 logits match transformers bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from hyphae.training.model_config import ModelConfig

__all__ = ["gpt2_config", "gpt2_tensors"]

# our name -> (GPT-2 name, transposed?, length of the zero bias to write when ours has none)
_GLOBAL = {
    "wte.weight": ("transformer.wte.weight", False),
    "wpe.weight": ("transformer.wpe.weight", False),
    "ln_f.weight": ("transformer.ln_f.weight", False),
    "ln_f.bias": ("transformer.ln_f.bias", False),
}
_LAYER = {
    "ln_1.weight": ("ln_1.weight", False),
    "ln_1.bias": ("ln_1.bias", False),
    "attn.qkv.weight": ("attn.c_attn.weight", True),
    "attn.qkv.bias": ("attn.c_attn.bias", False),
    "attn.proj.weight": ("attn.c_proj.weight", True),
    "attn.proj.bias": ("attn.c_proj.bias", False),
    "ln_2.weight": ("ln_2.weight", False),
    "ln_2.bias": ("ln_2.bias", False),
    "mlp.fc.weight": ("mlp.c_fc.weight", True),
    "mlp.fc.bias": ("mlp.c_fc.bias", False),
    "mlp.proj.weight": ("mlp.c_proj.weight", True),
    "mlp.proj.bias": ("mlp.c_proj.bias", False),
}


def _check(config: ModelConfig) -> None:
    if config.is_moe:
        raise ValueError(
            "mixture-of-experts GPTs (n_experts > 0) have no Hugging Face equivalent; export a dense model"
        )


def gpt2_tensors(state_dict: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """The GPT-2 safetensors content for our dense GPT's state_dict (tied head left out).

    Raises:
        ValueError: an MoE config, or a state_dict that does not fit the config.
    """
    _check(config)
    d, ff = config.d_model, config.mlp_hidden
    bias_len = {"ln_1.bias": d, "ln_2.bias": d, "ln_f.bias": d, "attn.qkv.bias": 3 * d, "attn.proj.bias": d,
                "mlp.fc.bias": ff, "mlp.proj.bias": d}
    expected: dict[str, tuple[str, bool, str]] = {}  # ours -> (theirs, transposed, short name)
    for ours, (theirs, t) in _GLOBAL.items():
        expected[ours] = (theirs, t, ours)
    for layer in range(config.n_layer):
        for ours, (theirs, t) in _LAYER.items():
            expected[f"blocks.{layer}.{ours}"] = (f"transformer.h.{layer}.{theirs}", t, ours)
    present = {k for k in expected if not k.endswith(".bias") or config.bias}
    extra = sorted(set(state_dict) - present - {"lm_head.weight"})
    missing = sorted(present - set(state_dict))
    if extra or missing:
        raise ValueError(
            f"state_dict does not fit the config: missing {missing[:5]}, unexpected {extra[:5]}; "
            "pass the state_dict of the model this config built"
        )
    dtype = state_dict["wte.weight"].dtype
    out: dict[str, torch.Tensor] = {}
    for ours, (theirs, transposed, short) in expected.items():
        if ours in present:
            value = state_dict[ours].detach().to("cpu")
            out[theirs] = (value.t() if transposed else value).contiguous().clone()
        else:
            out[theirs] = torch.zeros(bias_len[short], dtype=dtype)
    return out


def gpt2_config(config: ModelConfig, *, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The `config.json` of the GPT-2 our dense GPT `config` maps onto.

    Raises:
        ValueError: an MoE config.
    """
    _check(config)
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.context_length,
        "n_embd": config.d_model,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": config.mlp_hidden,
        "activation_function": "gelu",  # exact GELU, as ours (GPT-2's own is the tanh "gelu_new")
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": config.norm_eps,
        "initializer_range": config.init_std,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "bos_token_id": None,
        "eos_token_id": None,
        "dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
    }
