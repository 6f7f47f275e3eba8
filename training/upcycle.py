"""Upcycling: turn a trained dense model into an MoE twin that starts where the dense one was.

SPES's 9B run (ALGORITHMS.md §1) starts from a dense checkpoint: every expert of layer l is a
copy of layer l's dense MLP (GPT: w1 = fc.weight, w2 = proj.weight; Llama: w1 = gate.weight,
w2 = down.weight, w3 = up.weight) with N(0, 0.02²) noise added to
a random 50% of its weights, so the experts start equal in function but not identical and the
router (freshly initialised) can tell them apart as they diverge. Everything that is not an MLP
(embeddings, attention, norms) is copied unchanged.

With zero noise and top_k > 1 the gates of a token sum to 1 and every expert is the dense MLP,
so the upcycled model computes exactly the dense function (up to float rounding).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from hyphae.training._decoder import CausalLM
from hyphae.training.checkpoint import CheckpointStore
from hyphae.training.model import build_model
from hyphae.training.model_config import ModelConfig

__all__ = ["upcycle", "upcycle_checkpoint", "upcycled_config"]

_EXPERT_SOURCES = {
    "gpt": (("w1", "fc"), ("w2", "proj")),
    "llama": (("w1", "gate"), ("w2", "down"), ("w3", "up")),
}
"""Per arch: expert matrix <- the dense MLP Linear it copies (in the order noise is drawn)."""


def upcycled_config(dense: ModelConfig, *, n_experts: int = 8, top_k: int = 2) -> ModelConfig:
    """The MoE twin of `dense` whose experts are as wide as its MLP (so they can copy it).

    Raises:
        ValueError: `dense` is already an MoE, has biases, or n_experts/top_k are invalid.
    """
    if dense.is_moe:
        raise ValueError("the model to upcycle is already a mixture of experts; pass a dense one")
    if dense.bias:
        raise ValueError("upcycling needs a bias-free dense model (bias=False): MoE experts have no biases")
    return dense.replace(n_experts=n_experts, top_k=top_k, expert_d_ff=dense.mlp_hidden)


@torch.no_grad()
def upcycle(
    dense: CausalLM | Mapping[str, torch.Tensor],
    dense_config: ModelConfig | None = None,
    *,
    n_experts: int = 8,
    top_k: int = 2,
    seed: int = 0,
    noise_std: float = 0.02,
    noise_fraction: float = 0.5,
) -> CausalLM:
    """An MoE model initialised from a dense GPT or Llama (or its state_dict), on the CPU.

    Args:
        dense: the dense model, or its state_dict (then `dense_config` is required).
        dense_config: the dense model's config when `dense` is a state_dict.
        n_experts, top_k: shape of the MoE layers.
        seed: seeds the router init and the noise (every peer that upcycles the same
            checkpoint with the same seed gets the same bits).
        noise_std: standard deviation of the noise added to each expert copy.
        noise_fraction: share of each expert's weights that get noise.

    Raises:
        ValueError: see `upcycled_config`; a state_dict without `dense_config`, missing
            tensors, or a noise setting out of range.
    """
    if isinstance(dense, CausalLM):
        config, weights = dense.config, {k: v.detach().cpu() for k, v in dense.state_dict().items()}
    else:
        if dense_config is None:
            raise ValueError("pass dense_config with a state_dict (the dense model's ModelConfig)")
        config, weights = dense_config, {k: v.detach().cpu() for k, v in dense.items()}
    if noise_std < 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")
    if not 0.0 <= noise_fraction <= 1.0:
        raise ValueError(f"noise_fraction must be in [0, 1], got {noise_fraction}")
    moe = build_model(upcycled_config(config, n_experts=n_experts, top_k=top_k), seed=seed)
    target = moe.state_dict()
    sources = _EXPERT_SOURCES[config.arch]
    dense_mlp = tuple(f".mlp.{src}." for _, src in sources)
    for name, value in weights.items():
        if any(part in name for part in dense_mlp) or (name == "lm_head.weight" and config.tie_embeddings):
            continue  # MLPs become experts below; a tied head is wte
        if name not in target:
            raise ValueError(f"dense tensor {name!r} has no place in the MoE model; is it a hyphae model?")
        target[name].copy_(value)
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)  # not the init's stream
    for layer in range(config.n_layer):
        mats = {short: weights.get(f"blocks.{layer}.mlp.{src}.weight") for short, src in sources}
        if any(m is None for m in mats.values()):
            names = "/".join(src for _, src in sources)
            raise ValueError(f"dense weights lack blocks.{layer}.mlp.{names}; is this the dense model's state_dict?")
        for e in range(n_experts):
            for short, src in mats.items():
                noise = torch.randn(src.shape, generator=gen) * noise_std
                mask = torch.rand(src.shape, generator=gen) < noise_fraction
                target[f"blocks.{layer}.mlp.experts.{e}.{short}"].copy_(src + noise * mask)
    return moe


def upcycle_checkpoint(directory: str | Path, step: int | None = None, **kwargs: object) -> CausalLM:
    """`upcycle` the dense model of a checkpoint (the newest when `step` is None).

    Keyword arguments are those of `upcycle` (n_experts, top_k, seed, noise_std, noise_fraction).

    Raises:
        CheckpointError: no loadable checkpoint; ValueError: see `upcycle`.
    """
    ckpt = CheckpointStore(directory).load(step)
    config = ModelConfig.from_dict(ckpt.manifest.model_config)
    return upcycle(ckpt.weights, config, **kwargs)  # type: ignore[arg-type]
