"""The mixture-of-experts MLP: a top-k router over E separately addressable experts.

Every expert is its own `Expert` module with parameters `w1` (hidden x d) and `w2` (d x hidden),
so in a GPT the parameters of expert e of layer l are exactly
`blocks.{l}.mlp.experts.{e}.w1` and `blocks.{l}.mlp.experts.{e}.w2`. Llama models use SwiGLU
experts with a third matrix `w3` (Mixtral's naming: w1 gate, w2 down, w3 up). SPES (ALGORITHMS.md §1)
freezes or owns experts by those names, and its merge warm-up compares flattened `w1`s.

Routing is dropless (no capacity factor): each token goes to its top-k experts, gated by the
router probabilities renormalised over the chosen k (for k = 1 the raw probability, as in
Switch, so the router still gets a gradient from the task loss). Two auxiliary losses keep the
router healthy; both are returned, weighted by the model:
- load balancing (Switch/GShard): E * sum_e f_e * P_e, f_e = share of routed slots that went to
  e, P_e = mean router probability of e; 1.0 when perfectly balanced;
- router z-loss (ST-MoE): mean over tokens of logsumexp(router logits)^2, keeps logits small.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class Expert(nn.Module):
    """One expert: a GELU MLP d -> hidden -> d without biases (two addressable matrices)."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(hidden, d_model))
        self.w2 = nn.Parameter(torch.empty(d_model, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.gelu(F.linear(x, self.w1)), self.w2)


class SwiGLUExpert(nn.Module):
    """One SwiGLU expert: w2 @ (silu(w1 @ x) * (w3 @ x)), no biases (Mixtral's layout)."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(hidden, d_model))
        self.w2 = nn.Parameter(torch.empty(d_model, hidden))
        self.w3 = nn.Parameter(torch.empty(hidden, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.silu(F.linear(x, self.w1)) * F.linear(x, self.w3), self.w2)


class MoEOutput(NamedTuple):
    """What one MoE MLP returns: the output and its two (unweighted) auxiliary losses."""

    out: torch.Tensor
    load_balance: torch.Tensor
    router_z: torch.Tensor


class MoEMLP(nn.Module):
    """Top-k routed mixture of `n_experts` experts.

    Args:
        d_model: residual width.
        n_experts: number of experts E.
        top_k: experts per token.
        hidden: hidden width of one expert.
        swiglu: SwiGLU experts (Llama) instead of GELU ones (GPT).
    """

    def __init__(self, d_model: int, n_experts: int, top_k: int, hidden: int, *, swiglu: bool = False) -> None:
        super().__init__()
        self.n_experts = n_experts
        self.top_k = top_k
        self.router = nn.Linear(d_model, n_experts, bias=False)
        kind = SwiGLUExpert if swiglu else Expert
        self.experts = nn.ModuleList(kind(d_model, hidden) for _ in range(n_experts))

    def forward(self, x: torch.Tensor) -> MoEOutput:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        # The router runs in fp32 even under autocast: softmax/logsumexp of bf16 logits is noisy.
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(flat.float(), self.router.weight.float())
            router_z = torch.logsumexp(logits, dim=-1).pow(2).mean()
            probs = logits.softmax(dim=-1)
            top_p, top_i = probs.topk(self.top_k, dim=-1)
            gates = top_p / top_p.sum(dim=-1, keepdim=True) if self.top_k > 1 else top_p
            load_balance = self._load_balance(probs, top_i)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token, slot = (top_i == e).nonzero(as_tuple=True)
            if token.numel() == 0:
                continue  # an expert no token chose gets no gradient this step
            y = expert(flat[token]) * gates[token, slot].unsqueeze(-1).to(flat.dtype)
            out.index_add_(0, token, y.to(out.dtype))
        return MoEOutput(out.reshape(shape), load_balance, router_z)

    def _load_balance(self, probs: torch.Tensor, top_i: torch.Tensor) -> torch.Tensor:
        """Switch-style E * sum_e f_e * P_e, with f counted over all k routed slots."""
        counts = torch.bincount(top_i.flatten(), minlength=self.n_experts).to(probs.dtype)
        fraction = counts / max(1, top_i.numel())
        return self.n_experts * (fraction * probs.mean(dim=0)).sum()


def init_experts(moe: MoEMLP, std: float, residual_std: float, generator: torch.Generator) -> None:
    """Normal init: router, w1 (and w3) with `std`, w2 (a residual projection) with `residual_std`."""
    nn.init.normal_(moe.router.weight, 0.0, std, generator=generator)
    for expert in moe.experts:
        nn.init.normal_(expert.w1, 0.0, std, generator=generator)
        nn.init.normal_(expert.w2, 0.0, residual_std, generator=generator)
        if isinstance(expert, SwiGLUExpert):
            nn.init.normal_(expert.w3, 0.0, std, generator=generator)


def residual_init_std(std: float, n_layer: int) -> float:
    """GPT-2's scaled init for projections that add into the residual stream."""
    return std / math.sqrt(2 * n_layer)
