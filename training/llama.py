"""A Llama-style decoder (RoPE, RMSNorm, SwiGLU, grouped-query attention) and its MoE twin.

This is the architecture of Llama, Qwen2 and Mistral checkpoints. Every op mirrors Hugging Face
`transformers`' order (RMSNorm in fp32 then cast back, rotate-half RoPE with cos/sin built from
an fp32 inverse-frequency table computed on the CPU, SDPA with GQA), so a checkpoint loaded by
hf.py gives bit-identical fp32 logits. Parameter names (the one HF mapping table is in hf.py):

    wte.weight                          token embedding (the head too when tied)
    blocks.{l}.ln_1.weight              RMSNorm before attention
    blocks.{l}.attn.q.weight / .bias    projections (biases only with qkv_bias, Qwen2)
    blocks.{l}.attn.k.weight / .bias
    blocks.{l}.attn.v.weight / .bias
    blocks.{l}.attn.o.weight
    blocks.{l}.ln_2.weight              RMSNorm before the MLP
    blocks.{l}.mlp.gate/up/down.weight  SwiGLU MLP                       (dense models)
    blocks.{l}.mlp.router.weight        MoE router                        (MoE models)
    blocks.{l}.mlp.experts.{e}.w1/w2/w3 SwiGLU expert: gate, down, up     (MoE models)
    ln_f.weight
    lm_head.weight                      output head (its own tensor only when untied)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hyphae.training._decoder import BlockResult, CausalLM, ModelOutput
from hyphae.training.model_config import ModelConfig
from hyphae.training.moe import MoEMLP, init_experts, residual_init_std

__all__ = ["Llama", "RMSNorm", "init_llama_weights", "rope_inv_freq"]


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 and cast back before the weight (HF's order)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """RoPE inverse frequencies, fp32 on the CPU (as HF computes them, whatever the device)."""
    dim = config.attn_head_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))
    if config.rope_scaling == "llama3":
        inv = _llama3_scaling(inv, config)
    return inv


def _llama3_scaling(inv: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """Llama 3.1's frequency rule, in HF's op order: scale long wavelengths down by `factor`,
    keep short ones, interpolate smoothly in between."""
    factor, low, high = config.rope_factor, config.rope_low_freq_factor, config.rope_high_freq_factor
    old = config.rope_original_context
    low_wavelen, high_wavelen = old / low, old / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    """Causal attention with RoPE and grouped-query heads through SDPA."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d, hd = config.d_model, config.attn_head_dim
        self.n_head, self.n_kv, self.head_dim = config.n_head, config.kv_heads, hd
        self.dropout = config.dropout
        self.q = nn.Linear(d, self.n_head * hd, bias=config.qkv_bias)
        self.k = nn.Linear(d, self.n_kv * hd, bias=config.qkv_bias)
        self.v = nn.Linear(d, self.n_kv * hd, bias=config.qkv_bias)
        self.o = nn.Linear(self.n_head * hd, d, bias=False)
        self.resid_drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        shape = (b, t, -1, self.head_dim)
        q = self.q(x).view(shape).transpose(1, 2)
        k = self.k(x).view(shape).transpose(1, 2)
        v = self.v(x).view(shape).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = (q * cos) + (_rotate_half(q) * sin)
        k = (k * cos) + (_rotate_half(k) * sin)
        gqa = {}
        if self.n_kv != self.n_head:
            if self.head_dim <= 256:  # HF's rule for SDPA's native GQA; wider heads repeat k/v
                gqa = {"enable_gqa": True}
            else:
                rep = self.n_head // self.n_kv
                k, v = (z.repeat_interleave(rep, dim=1) for z in (k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, scale=self.head_dim**-0.5,
            is_causal=t > 1, **gqa,
        )
        y = y.transpose(1, 2).contiguous().reshape(b, t, -1).contiguous()
        return self.resid_drop(self.o(y))


class SwiGLU(nn.Module):
    """The dense Llama MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate = nn.Linear(config.d_model, config.mlp_hidden, bias=False)
        self.up = nn.Linear(config.d_model, config.mlp_hidden, bias=False)
        self.down = nn.Linear(config.mlp_hidden, config.d_model, bias=False)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.down(F.silu(self.gate(x)) * self.up(x)))


class Block(nn.Module):
    """Pre-norm Llama block; the MLP is dense SwiGLU or a mixture of SwiGLU experts."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = RMSNorm(config.d_model, config.norm_eps)
        self.attn = Attention(config)
        self.ln_2 = RMSNorm(config.d_model, config.norm_eps)
        self.mlp: nn.Module
        if config.is_moe:
            self.mlp = MoEMLP(config.d_model, config.n_experts, config.top_k, config.expert_hidden, swiglu=True)
        else:
            self.mlp = SwiGLU(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> BlockResult:
        x = x + self.attn(self.ln_1(x), cos, sin)
        if isinstance(self.mlp, MoEMLP):
            moe = self.mlp(self.ln_2(x))
            return x + self.drop(moe.out), moe.load_balance, moe.router_z
        return x + self.mlp(self.ln_2(x)), None, None


class Llama(CausalLM):
    """Llama-style decoder-only transformer; the head is tied to the embedding unless
    `config.tie_embeddings` is False.

    Args:
        config: the model's shape (`arch == "llama"`). Parameters are created on the current
            default device (use `build_model` for a seeded init, including on `meta`).

    Raises:
        ValueError: `config.arch` is not "llama".
    """

    def __init__(self, config: ModelConfig) -> None:
        if config.arch != "llama":
            raise ValueError(f"Llama needs a config with arch='llama', got arch={config.arch!r}")
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.tie_weights()
        # A plain attribute, not a buffer: recomputed on the CPU (never garbage after to_empty)
        # and moved to each device once, as HF moves its CPU-built table.
        self._inv_freq: dict[torch.device, torch.Tensor] = {}

    def tie_weights(self) -> None:
        """Share the embedding with the head when the config ties them (again after `to_empty`)."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.wte.weight

    def rope(self, t: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of shape (1, t, head_dim) in `x`'s dtype, built like HF's rotary embedding."""
        inv = self._inv_freq.get(x.device)
        if inv is None:
            inv = rope_inv_freq(self.config).to(x.device)
            self._inv_freq[x.device] = inv
        pos = torch.arange(t, device=x.device).unsqueeze(0)
        freqs = pos[..., None].float() * inv
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> ModelOutput:
        """Logits for `idx` (batch, time) and, with `targets`, the losses.

        Raises:
            ValueError: the sequence is longer than `config.context_length`.
        """
        t = idx.shape[1]
        self.check_length(t)
        x = self.drop(self.wte(idx))
        cos, sin = self.rope(t, x)
        x, lb_terms, z_terms = self.run_blocks(x, cos, sin)
        return self.finish(self.lm_head(self.ln_f(x)), targets, lb_terms, z_terms)


def init_llama_weights(model: Llama, seed: int) -> None:
    """Seeded init, identical on every machine for the same seed and config.

    Normal(0, init_std) for embeddings, q/k/v, gate/up, routers and expert w1/w3 (and an untied
    head); the residual projections (o, down, expert w2) get init_std / sqrt(2 * n_layer);
    norms start at 1, biases at 0. Drawn on a CPU generator in module order.
    """
    cfg = model.config
    gen = torch.Generator(device="cpu").manual_seed(seed)
    std, rstd = cfg.init_std, residual_init_std(cfg.init_std, cfg.n_layer)
    for name, module in model.named_modules():
        if isinstance(module, MoEMLP):
            init_experts(module, std, rstd, gen)
        elif isinstance(module, nn.Linear):
            if name == "lm_head" and cfg.tie_embeddings:
                continue
            residual = name.endswith((".o", ".down"))
            nn.init.normal_(module.weight, 0.0, rstd if residual else std, generator=gen)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, std, generator=gen)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
