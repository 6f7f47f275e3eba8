"""`ModelConfig`: the size and shape of a GPT or MoE GPT, and the named presets.

The presets run from "tiny" (byte-level, trains visibly in about a minute on one CPU core) to
"large" (about 1B parameters, for GPUs). Every dense preset has an MoE twin ("tiny-moe", ...)
with the same attention stack and an 8-expert top-2 MLP whose experts are half as wide as the
dense MLP, so the active MLP compute per token matches the dense model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hyphae.training._config import check_int, check_positive, check_range, from_dict, to_dict


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelConfig:
    """Shape of a decoder-only transformer; `n_experts > 0` makes every MLP a mixture of experts."""

    vocab_size: int = 256
    """Number of token ids. 256 for the byte-level built-in corpora; 50304 for GPT-2 BPE shards
    (50257 rounded up to a multiple of 64 for fast matmuls)."""

    context_length: int = 128
    """Longest sequence the model sees (learned position embeddings of this length)."""

    n_layer: int = 4
    """Number of transformer blocks."""

    n_head: int = 4
    """Attention heads per block; must divide `d_model`."""

    d_model: int = 128
    """Width of the residual stream."""

    d_ff: int | None = None
    """Hidden width of the dense MLP; None means 4 * d_model (GPT-2)."""

    dropout: float = 0.0
    """Dropout probability on attention and residual outputs (0 for pretraining)."""

    bias: bool = False
    """Whether Linear and LayerNorm layers carry a bias (False is slightly faster and better)."""

    n_experts: int = 0
    """Experts per MoE MLP; 0 makes a dense model. Each expert e of layer l is its own pair of
    parameters `blocks.{l}.mlp.experts.{e}.w1` / `.w2`, so SPES can own or freeze it."""

    top_k: int = 2
    """Experts each token is routed to (MoE only); <= n_experts."""

    expert_d_ff: int | None = None
    """Hidden width of one expert; None means 4 * d_model / top_k (same active FLOPs as dense)."""

    load_balance_coef: float = 0.01
    """Weight of the Switch/GShard load-balancing loss E * sum_e f_e * P_e (MoE only)."""

    router_z_coef: float = 0.001
    """Weight of the router z-loss mean(logsumexp(router logits)^2) (MoE only, ST-MoE)."""

    init_std: float = 0.02
    """Standard deviation of the normal init; residual projections get init_std / sqrt(2 * n_layer)."""

    def __post_init__(self) -> None:
        check_int("vocab_size", self.vocab_size, minimum=2)
        check_int("context_length", self.context_length, minimum=1)
        check_int("n_layer", self.n_layer, minimum=1)
        check_int("n_head", self.n_head, minimum=1)
        check_int("d_model", self.d_model, minimum=1)
        if self.d_model % self.n_head:
            raise ValueError(
                f"d_model ({self.d_model}) must be a multiple of n_head ({self.n_head}); "
                f"pick d_model = {self.n_head * max(1, round(self.d_model / self.n_head))}"
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

    @property
    def is_moe(self) -> bool:
        """True when every block's MLP is a mixture of experts."""
        return self.n_experts > 0

    @property
    def mlp_hidden(self) -> int:
        """Hidden width of the dense MLP."""
        return self.d_ff if self.d_ff is not None else 4 * self.d_model

    @property
    def expert_hidden(self) -> int:
        """Hidden width of one expert."""
        if self.expert_d_ff is not None:
            return self.expert_d_ff
        return max(1, 4 * self.d_model // max(1, self.top_k))

    def num_parameters(self) -> int:
        """Parameter count of the model this config builds (embeddings tied to the head)."""
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
}

PRESETS: dict[str, ModelConfig] = dict(_DENSE)
PRESETS.update(
    {f"{name}-moe": cfg.replace(n_experts=8, top_k=2) for name, cfg in _DENSE.items()}
)
"""Named model sizes; "<name>-moe" is the 8-expert top-2 twin of "<name>"."""


def model_config(preset: str, **overrides: Any) -> ModelConfig:
    """The preset named `preset`, with some fields overridden.

    Args:
        preset: one of `PRESETS` ("tiny", "small", "medium", "large" and their "-moe" twins).
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
