"""What every decoder-only model shares: the output type, expert addressing, losses, checkpointing.

`GPT` (model.py) and `Llama` (llama.py) both subclass `CausalLM`, so the algorithms see one API
(`.config`, `forward(idx, targets) -> ModelOutput`, `num_parameters()`,
`expert_parameters(layer, expert)`, `shared_parameters()`) whatever the architecture.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from hyphae.training.model_config import ModelConfig

__all__ = ["CausalLM", "ModelOutput", "parse_expert_name"]

_EXPERT_NAME = re.compile(r"^blocks\.(\d+)\.mlp\.experts\.(\d+)\.(\w+)$")

BlockResult = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]
"""What a block returns: the residual stream and its MoE losses (None for a dense MLP)."""


class ModelOutput(NamedTuple):
    """Result of a model's `forward`.

    Attributes:
        logits: (batch, time, vocab) next-token logits.
        loss: scalar to backpropagate (ce + MoE auxiliary terms); None without targets.
        ce: scalar language-model cross-entropy in nats/token; None without targets.
        aux: unweighted MoE losses averaged over layers ("load_balance", "router_z"); empty for
            dense models.
    """

    logits: torch.Tensor
    loss: torch.Tensor | None
    ce: torch.Tensor | None
    aux: dict[str, torch.Tensor]


def parse_expert_name(name: str) -> tuple[int, int] | None:
    """(layer, expert) if `name` is an expert parameter's name, else None."""
    m = _EXPERT_NAME.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


class CausalLM(nn.Module):
    """Base of the decoder-only models: subclasses set `config` and `blocks` (an nn.ModuleList
    whose blocks return a `BlockResult`, MoE MLPs under `.mlp.experts`)."""

    config: ModelConfig
    blocks: nn.ModuleList

    def check_length(self, t: int) -> None:
        """Raise ValueError when a sequence of length `t` exceeds the context."""
        if t > self.config.context_length:
            raise ValueError(
                f"sequence length {t} exceeds context_length {self.config.context_length}; "
                "feed shorter sequences or build the model with a longer context_length"
            )

    def run_blocks(self, x: torch.Tensor, *args: Any) -> tuple[torch.Tensor, list, list]:
        """Run every block on `x` (with extra inputs `args`), collecting the MoE losses.

        With `config.activation_checkpointing` in training with grad enabled, each block is run
        under non-reentrant `torch.utils.checkpoint`: its activations are recomputed in backward.
        """
        remat = self.config.activation_checkpointing and self.training and torch.is_grad_enabled()
        lb_terms, z_terms = [], []
        for block in self.blocks:
            if remat:
                x, lb, z = checkpoint(block, x, *args, use_reentrant=False)
            else:
                x, lb, z = block(x, *args)
            if lb is not None:
                lb_terms.append(lb)
                z_terms.append(z)
        return x, lb_terms, z_terms

    def finish(self, logits: torch.Tensor, targets: torch.Tensor | None, lb_terms: list, z_terms: list) -> ModelOutput:
        """The `ModelOutput` for `logits`: cross-entropy plus the weighted MoE losses."""
        if targets is None:
            return ModelOutput(logits, None, None, {})
        b, t = targets.shape[0], targets.shape[-1]
        ce = F.cross_entropy(logits.float().view(b * t, -1), targets.reshape(b * t))
        if not lb_terms:
            return ModelOutput(logits, ce, ce, {})
        aux = {
            "load_balance": torch.stack(lb_terms).mean(),
            "router_z": torch.stack(z_terms).mean(),
        }
        loss = (
            ce
            + self.config.load_balance_coef * aux["load_balance"]
            + self.config.router_z_coef * aux["router_z"]
        )
        return ModelOutput(logits, loss, ce, aux)

    def num_parameters(self) -> int:
        """Number of distinct parameters (a tied head counted once)."""
        return sum(p.numel() for p in self.parameters())

    def expert_parameters(self, layer: int, expert: int) -> dict[str, nn.Parameter]:
        """The parameters of expert `expert` of block `layer`, by full name.

        Raises:
            ValueError: dense model, or layer/expert out of range.
        """
        cfg = self.config
        if not cfg.is_moe:
            raise ValueError("this model is dense (n_experts = 0); it has no experts")
        if not (0 <= layer < cfg.n_layer and 0 <= expert < cfg.n_experts):
            raise ValueError(
                f"expert ({layer}, {expert}) out of range: layer < {cfg.n_layer}, "
                f"expert < {cfg.n_experts}"
            )
        module = self.blocks[layer].mlp.experts[expert]
        prefix = f"blocks.{layer}.mlp.experts.{expert}."
        return {prefix + n: p for n, p in module.named_parameters()}

    def shared_parameters(self) -> dict[str, nn.Parameter]:
        """Every parameter that is not part of an expert (embeddings, attention, norms, routers)."""
        return {n: p for n, p in self.named_parameters() if parse_expert_name(n) is None}
