"""`ModelConfig`: the size and shape of a GPT or Llama-style model (dense or MoE), and the presets.

Two architectures (`arch`):
- "gpt": nanoGPT/GPT-2 (learned positions, LayerNorm, GELU MLP, tied embeddings);
- "llama": the Llama/Qwen2/Mistral family (RoPE, RMSNorm, SwiGLU, grouped-query attention,
  tied or untied embeddings, optional q/k/v bias), which Hugging Face checkpoints load into
  bit-exactly (hf.py).

The GPT presets run from "tiny" (byte-level, trains visibly in about a minute on one CPU core)
to "large" (about 1B parameters, for GPUs); the Llama presets "llama-20m" ... "llama-1b" are
counted with a 32000-token BPE vocabulary (the Llama-2/Mistral tokenizer's size). Every dense
preset has an MoE twin ("tiny-moe", "llama-125m-moe", ...) with the same attention stack and
an 8-expert top-2 MLP whose experts are half as wide as the dense MLP, so the active MLP
compute per token matches the dense model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hyphae.training._config import (
    check_choice,
    check_int,
    check_positive,
    check_range,
    from_dict,
    to_dict,
)

ARCHS = ("gpt", "llama")
"""Architectures `build_model` knows."""

_LLAMA_ONLY_DEFAULTS = {
    "n_kv_head": None, "head_dim": None, "tie_embeddings": True, "qkv_bias": False, "rope_scaling": "none",
}
ROPE_SCALINGS = ("none", "llama3")
"""RoPE frequency scalings `rope_scaling` may name."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelConfig:
    """Shape of a decoder-only transformer; `n_experts > 0` makes every MLP a mixture of experts."""

    arch: str = "gpt"
    """"gpt" (GPT-2 style) or "llama" (RoPE, RMSNorm, SwiGLU, GQA; what HF Llama/Qwen2/Mistral
    checkpoints load into)."""

    vocab_size: int = 256
    """Number of token ids. 256 for the byte-level built-in corpora; 50304 for GPT-2 BPE shards
    (50257 rounded up to a multiple of 64 for fast matmuls)."""

    context_length: int = 128
    """Longest sequence the model sees (GPT: learned position embeddings of this length; Llama:
    RoPE positions, HF's max_position_embeddings)."""

    n_layer: int = 4
    """Number of transformer blocks."""

    n_head: int = 4
    """Attention (query) heads per block; must divide `d_model` unless `head_dim` is set."""

    n_kv_head: int | None = None
    """Key/value heads (grouped-query attention, Llama only); None means n_head (plain
    multi-head attention). Must divide n_head."""

    head_dim: int | None = None
    """Width of one attention head (Llama only); None means d_model // n_head. Must be even (RoPE)."""

    d_model: int = 128
    """Width of the residual stream."""

    d_ff: int | None = None
    """Hidden width of the dense MLP; None means 4 * d_model (GPT-2) or, for Llama's SwiGLU,
    8/3 * d_model rounded up to a multiple of 256 (Llama's rule)."""

    dropout: float = 0.0
    """Dropout probability on attention and residual outputs (0 for pretraining)."""

    bias: bool = False
    """Whether Linear and LayerNorm layers carry a bias (GPT only; False is slightly faster and
    better). Llama models have none; see `qkv_bias`."""

    qkv_bias: bool = False
    """Whether the q/k/v projections carry a bias (Llama only; True for Qwen2)."""

    tie_embeddings: bool = True
    """Whether the output head shares the token embedding's weight (GPT: always)."""

    rope_theta: float = 10000.0
    """RoPE base (Llama only; Llama-3 uses 500000)."""

    rope_scaling: str = "none"
    """RoPE frequency scaling (Llama only): "none", or "llama3" (Llama 3.1+'s long-context
    rule, parameterised by the four rope_* fields below; HF's rope_type "llama3")."""

    rope_factor: float = 8.0
    """llama3 scaling: low frequencies are divided by this."""

    rope_low_freq_factor: float = 1.0
    """llama3 scaling: wavelengths above original_context / this are fully scaled."""

    rope_high_freq_factor: float = 4.0
    """llama3 scaling: wavelengths below original_context / this are left alone (between the
    two bounds they are interpolated)."""

    rope_original_context: int = 8192
    """llama3 scaling: the context length the model was pretrained with."""

    norm_eps: float = 1e-5
    """Epsilon of LayerNorm (GPT) or RMSNorm (Llama)."""

    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass instead of storing them
    (torch.utils.checkpoint, non-reentrant): less memory for about one more forward of compute.
    Does not change the results."""

    n_experts: int = 0
    """Experts per MoE MLP; 0 makes a dense model. Each expert e of layer l owns its own
    parameters `blocks.{l}.mlp.experts.{e}.w1` / `.w2` (Llama: also `.w3`; w1 is the gate
    projection), so SPES can own or freeze it."""

    top_k: int = 2
    """Experts each token is routed to (MoE only); <= n_experts."""

    expert_d_ff: int | None = None
    """Hidden width of one expert; None means the dense MLP's width / top_k (same active FLOPs as
    dense; GPT: 4 * d_model / top_k whatever d_ff is)."""

    load_balance_coef: float = 0.01
    """Weight of the Switch/GShard load-balancing loss E * sum_e f_e * P_e (MoE only)."""

    router_z_coef: float = 0.001
    """Weight of the router z-loss mean(logsumexp(router logits)^2) (MoE only, ST-MoE)."""

    init_std: float = 0.02
    """Standard deviation of the normal init; residual projections get init_std / sqrt(2 * n_layer)."""

    def __post_init__(self) -> None:
        check_choice("arch", self.arch, ARCHS)
        check_int("vocab_size", self.vocab_size, minimum=2)
        check_int("context_length", self.context_length, minimum=1)
        check_int("n_layer", self.n_layer, minimum=1)
        check_int("n_head", self.n_head, minimum=1)
        check_int("d_model", self.d_model, minimum=1)
        for name in ("qkv_bias", "tie_embeddings", "activation_checkpointing", "bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        check_positive("rope_theta", self.rope_theta)
        check_choice("rope_scaling", self.rope_scaling, ROPE_SCALINGS)
        if self.rope_scaling == "llama3":
            check_positive("rope_factor", self.rope_factor)
            check_positive("rope_low_freq_factor", self.rope_low_freq_factor)
            check_int("rope_original_context", self.rope_original_context, minimum=1)
            if not self.rope_high_freq_factor > self.rope_low_freq_factor:
                raise ValueError(
                    f"rope_high_freq_factor ({self.rope_high_freq_factor!r}) must exceed rope_low_freq_factor "
                    f"({self.rope_low_freq_factor!r}); Llama 3 uses 4.0 and 1.0"
                )
        check_positive("norm_eps", self.norm_eps)
        if self.head_dim is None and self.d_model % self.n_head:
            raise ValueError(
                f"d_model ({self.d_model}) must be a multiple of n_head ({self.n_head}); "
                f"pick d_model = {self.n_head * max(1, round(self.d_model / self.n_head))}"
            )
        if self.arch == "llama":
            self._check_llama()
        else:
            changed = [k for k, v in _LLAMA_ONLY_DEFAULTS.items() if getattr(self, k) != v]
            if changed:
                raise ValueError(
                    f"{changed} apply to arch='llama' only; set arch='llama' or leave them at "
                    f"their defaults {[_LLAMA_ONLY_DEFAULTS[k] for k in changed]}"
                )
        if self.d_ff is not None:
            check_int("d_ff", self.d_ff, minimum=1)
        check_range("dropout", self.dropout, 0.0, 1.0)
        check_int("n_experts", self.n_experts, minimum=0)
        if self.n_experts:
            check_int("top_k", self.top_k, minimum=1)
            if self.top_k > self.n_experts:
                raise ValueError(
                    f"top_k ({self.top_k}) must be <= n_experts ({self.n_experts}); "
                    "lower top_k or add experts"
                )
            if self.expert_d_ff is not None:
                check_int("expert_d_ff", self.expert_d_ff, minimum=1)
        check_positive("load_balance_coef", self.load_balance_coef, allow_zero=True)
        check_positive("router_z_coef", self.router_z_coef, allow_zero=True)
        check_positive("init_std", self.init_std)

    def _check_llama(self) -> None:
        if self.bias:
            raise ValueError("Llama models have no Linear/norm biases: set bias=False (qkv_bias=True for Qwen2-style q/k/v biases)")
        if self.n_kv_head is not None:
            check_int("n_kv_head", self.n_kv_head, minimum=1)
            if self.n_head % self.n_kv_head:
                raise ValueError(
                    f"n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head}); "
                    "each key/value head serves a whole group of query heads"
                )
        if self.head_dim is not None:
            check_int("head_dim", self.head_dim, minimum=2)
        if self.attn_head_dim % 2:
            raise ValueError(f"the head width ({self.attn_head_dim}) must be even for RoPE; change d_model, n_head or head_dim")

    @property
    def kv_heads(self) -> int:
        """Key/value heads per block (n_head unless grouped-query attention)."""
        return self.n_kv_head if self.n_kv_head is not None else self.n_head

    @property
    def attn_head_dim(self) -> int:
        """Width of one attention head."""
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_head

    @property
    def expert_matrices(self) -> int:
        """Weight matrices per expert: 2 (GELU: w1, w2) or 3 (SwiGLU: w1 gate, w2 down, w3 up)."""
        return 3 if self.arch == "llama" else 2

    @property
    def expert_numel(self) -> int:
        """Values of one expert in one layer."""
        return self.expert_matrices * self.d_model * self.expert_hidden

    @property
    def is_moe(self) -> bool:
        """True when every block's MLP is a mixture of experts."""
        return self.n_experts > 0

    @property
    def mlp_hidden(self) -> int:
        """Hidden width of the dense MLP."""
        if self.d_ff is not None:
            return self.d_ff
        if self.arch == "llama":
            return 256 * -(-int(8 * self.d_model / 3) // 256)
        return 4 * self.d_model

    @property
    def expert_hidden(self) -> int:
        """Hidden width of one expert."""
        if self.expert_d_ff is not None:
            return self.expert_d_ff
        dense = self.mlp_hidden if self.arch == "llama" else 4 * self.d_model
        return max(1, dense // max(1, self.top_k))

    def num_parameters(self) -> int:
        """Parameter count of the model this config builds (a tied head counted once)."""
        if self.arch == "llama":
            return self._llama_parameters()
        d = self.d_model
        ln = d * (2 if self.bias else 1)
        attn = 4 * d * d + (4 * d if self.bias else 0)
        if self.is_moe:
            mlp = d * self.n_experts + self.n_experts * 2 * d * self.expert_hidden
        else:
            mlp = 2 * d * self.mlp_hidden + ((self.mlp_hidden + d) if self.bias else 0)
        block = 2 * ln + attn + mlp
        embed = self.vocab_size * d + self.context_length * d
        return embed + self.n_layer * block + ln

    def _llama_parameters(self) -> int:
        d, q, kv = self.d_model, self.n_head * self.attn_head_dim, self.kv_heads * self.attn_head_dim
        attn = 2 * d * q + 2 * d * kv + ((q + 2 * kv) if self.qkv_bias else 0)
        if self.is_moe:
            mlp = d * self.n_experts + self.n_experts * self.expert_numel
        else:
            mlp = 3 * d * self.mlp_hidden
        embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return embed + self.n_layer * (2 * d + attn + mlp) + d

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for manifests and the run state); `ModelConfig.from_dict` reads it back."""
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        """Build from a dict; unknown keys raise ValueError naming the valid ones."""
        return from_dict(cls, data)

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


_DENSE: dict[str, ModelConfig] = {
    # ~0.8M params: byte-level, context 128; ~5-10 steps/s at batch 8 on one CPU core.
    "tiny": ModelConfig(vocab_size=256, context_length=128, n_layer=4, n_head=4, d_model=128),
    # ~10.7M params: byte-level, context 256; a few minutes of CPU or seconds of GPU.
    "small": ModelConfig(vocab_size=256, context_length=256, n_layer=6, n_head=6, d_model=384),
    # ~124M params: GPT-2 small with a GPT-2 BPE vocabulary (pre-tokenized .bin shards).
    "medium": ModelConfig(
        vocab_size=50304, context_length=1024, n_layer=12, n_head=12, d_model=768
    ),
    # ~1.0B params: for GPUs.
    "large": ModelConfig(
        vocab_size=50304, context_length=2048, n_layer=18, n_head=16, d_model=2048
    ),
    # Llama-style presets, counted with a 32000-token BPE vocabulary (Llama-2/Mistral size; set
    # vocab_size to your tokenizer's) and tied embeddings; 64-wide heads, grouped-query attention.
    # ~21.7M params: a BPE model that a CPU can still train a little.
    "llama-20m": ModelConfig(
        arch="llama", vocab_size=32000, context_length=1024, n_layer=6, n_head=6, n_kv_head=2,
        d_model=384,
    ),
    # ~125M params (GPT-2-small class), SwiGLU width 2048.
    "llama-125m": ModelConfig(
        arch="llama", vocab_size=32000, context_length=2048, n_layer=16, n_head=12, n_kv_head=4,
        d_model=768,
    ),
    # ~348M params.
    "llama-350m": ModelConfig(
        arch="llama", vocab_size=32000, context_length=2048, n_layer=28, n_head=16, n_kv_head=4,
        d_model=1024,
    ),
    # ~1.04B params: the Llama-3.2-1B shape (d 2048, 16 layers, 32/8 heads, SwiGLU 8192, RoPE
    # base 500000) with a 32000 vocabulary; for GPUs.
    "llama-1b": ModelConfig(
        arch="llama", vocab_size=32000, context_length=2048, n_layer=16, n_head=32, n_kv_head=8,
        d_model=2048, d_ff=8192, rope_theta=500000.0,
    ),
}

PRESETS: dict[str, ModelConfig] = dict(_DENSE)
PRESETS.update(
    {f"{name}-moe": cfg.replace(n_experts=8, top_k=2) for name, cfg in _DENSE.items()}
)
"""Named model sizes; "<name>-moe" is the 8-expert top-2 twin of "<name>"."""


def model_config(preset: str, **overrides: Any) -> ModelConfig:
    """The preset named `preset`, with some fields overridden.

    Args:
        preset: one of `PRESETS` ("tiny", "small", "medium", "large", "llama-20m",
            "llama-125m", "llama-350m", "llama-1b" and their "-moe" twins).
        **overrides: ModelConfig fields to change, e.g. `vocab_size=50304`.

    Returns:
        A validated ModelConfig.

    Raises:
        ValueError: unknown preset or field, or an invalid value.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    base = PRESETS[preset].to_dict()
    unknown = sorted(set(overrides) - set(base))
    if unknown:
        raise ValueError(f"unknown ModelConfig key(s) {unknown}; valid keys are {sorted(base)}")
    return ModelConfig.from_dict({**base, **overrides})
