"""A small decoder-only GPT (nanoGPT-like) and its mixture-of-experts twin; `build_model` for every arch.

`GPT(config)` builds either: with `config.n_experts == 0` every block has a dense GELU MLP, else
an `MoEMLP` (see moe.py). Parameter names are stable and predictable because algorithms address
them by name across machines:

    wte.weight                      token embedding (tied to the output head)
    wpe.weight                      position embedding
    blocks.{l}.ln_1.weight          ...
    blocks.{l}.attn.qkv.weight      attention in/out projections
    blocks.{l}.attn.proj.weight
    blocks.{l}.mlp.fc.weight        dense MLP            (dense models)
    blocks.{l}.mlp.proj.weight
    blocks.{l}.mlp.router.weight    MoE router           (MoE models)
    blocks.{l}.mlp.experts.{e}.w1   expert e of layer l  (MoE models)
    blocks.{l}.mlp.experts.{e}.w2
    ln_f.weight

`forward(idx, targets)` returns a `ModelOutput` whose `loss` is what to backpropagate
(cross-entropy + weighted MoE auxiliary losses) and whose `ce` is the language-model loss to
log and compare across models. Mixed precision is the caller's business (`torch.autocast`);
see strategy.py for the policy (bf16 on CUDA, fp32 on CPU). `build_model` builds a GPT or, for
`config.arch == "llama"`, a `Llama` (llama.py) with the same API.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hyphae.training._decoder import CausalLM, ModelOutput, parse_expert_name
from hyphae.training.llama import Llama, init_llama_weights
from hyphae.training.model_config import ModelConfig
from hyphae.training.moe import MoEMLP, init_experts, residual_init_std

__all__ = ["GPT", "CausalLM", "Llama", "ModelOutput", "build_model", "init_weights", "parse_expert_name"]

class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention through `F.scaled_dot_product_attention`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d = config.d_model
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.qkv = nn.Linear(d, 3 * d, bias=config.bias)
        self.proj = nn.Linear(d, d, bias=config.bias)
        self.resid_drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).contiguous().view(b, t, d)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    """The dense GPT-2 MLP: d -> d_ff -> d with GELU."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.d_model, config.mlp_hidden, bias=config.bias)
        self.proj = nn.Linear(config.mlp_hidden, config.d_model, bias=config.bias)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block; the MLP is dense or MoE depending on the config."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)
        self.mlp: nn.Module
        if config.is_moe:
            self.mlp = MoEMLP(config.d_model, config.n_experts, config.top_k, config.expert_hidden)
        else:
            self.mlp = MLP(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        x = x + self.attn(self.ln_1(x))
        if isinstance(self.mlp, MoEMLP):
            moe = self.mlp(self.ln_2(x))
            return x + self.drop(moe.out), moe.load_balance, moe.router_z
        return x + self.mlp(self.ln_2(x)), None, None


class GPT(CausalLM):
    """Decoder-only transformer with tied input/output embeddings.

    Args:
        config: the model's shape. Parameters are created on the current default device
            (use `build_model` for a seeded init on a chosen device, including `meta`).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.wpe = nn.Embedding(config.context_length, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying (GPT-2); one parameter, named wte

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> ModelOutput:
        """Logits for `idx` (batch, time) and, with `targets`, the losses.

        Raises:
            ValueError: the sequence is longer than `config.context_length`.
        """
        t = idx.shape[1]
        self.check_length(t)
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        x, lb_terms, z_terms = self.run_blocks(x)
        return self.finish(self.lm_head(self.ln_f(x)), targets, lb_terms, z_terms)


def init_weights(model: GPT, seed: int) -> None:
    """Seeded GPT-2 init, identical on every machine for the same seed and config.

    Draws on a CPU generator in a fixed parameter order, so a CUDA peer and a CPU peer given the
    same seed start from bit-identical weights (build on CPU, then move).
    """
    cfg = model.config
    gen = torch.Generator(device="cpu").manual_seed(seed)
    std, rstd = cfg.init_std, residual_init_std(cfg.init_std, cfg.n_layer)
    for name, module in model.named_modules():
        if isinstance(module, MoEMLP):
            init_experts(module, std, rstd, gen)
        elif isinstance(module, nn.Linear) and name != "lm_head":
            nn.init.normal_(module.weight, 0.0, rstd if name.endswith("proj") else std, generator=gen)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, std, generator=gen)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def build_model(
    config: ModelConfig, *, seed: int = 0, device: torch.device | str = "cpu"
) -> GPT | Llama:
    """Build a GPT or Llama (dense or MoE, by `config.arch`) with a seeded init on `device`.

    Args:
        config: model shape.
        seed: init seed; every replica of a run uses the run's seed so all start identical.
        device: target device. "meta" allocates nothing (for shape and size checks of big
            presets); otherwise weights are drawn on the CPU and moved, so they do not depend
            on the device.

    Returns:
        The model in train mode.
    """
    device = torch.device(device)
    kind = Llama if config.arch == "llama" else GPT
    if device.type == "meta":
        with torch.device("meta"):
            return kind(config)
    model = kind(config)
    if isinstance(model, Llama):
        init_llama_weights(model, seed)
    else:
        init_weights(model, seed)
    return model.to(device)
