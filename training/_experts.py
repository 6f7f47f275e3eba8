"""SPES's pure pieces: who owns which expert, the merge warm-up, and the bytes a sync moves.

No communication here (STYLE.md §2.11): `spes.py` wires these to a `Comm`. Everything is a
deterministic function of its arguments, so every node computes the same answer from the same
inputs (the sorted live members, the same synced weights) without asking anyone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from hyphae.training._decoder import CausalLM
from hyphae.training.model_config import ModelConfig

__all__ = [
    "SyncBytes",
    "assign_experts",
    "expert_tensors",
    "merge_coefficient",
    "merge_experts",
    "merge_model_experts_",
    "sync_bytes",
]


def assign_experts(members: Sequence[str], n_experts: int) -> dict[int, str]:
    """Expert index -> owner: node p of the sorted members owns a contiguous block (§1).

    With N members and E experts, k = E / N and node p owns [p·k, (p+1)·k). When N does not
    divide E the first E mod N nodes own one expert more (blocks stay contiguous and differ by
    at most one); with N > E the first E nodes own one expert each and the rest none.

    Raises:
        ValueError: no members, or n_experts < 1.
    """
    if n_experts < 1:
        raise ValueError(f"n_experts must be >= 1, got {n_experts}")
    ordered = sorted(set(members))
    if not ordered:
        raise ValueError("cannot assign experts to an empty member list")
    base, extra = divmod(n_experts, len(ordered))
    owner: dict[int, str] = {}
    start = 0
    for p, member in enumerate(ordered):
        size = base + (1 if p < extra else 0)
        for e in range(start, start + size):
            owner[e] = member
        start += size
    return owner


def merge_coefficient(t: int, *, a0: float, until: int) -> float:
    """The merge strength a_t = a0 · max(0, 1 − t / T) of the warm-up schedule (T = `until`)."""
    return a0 * max(0.0, 1.0 - t / until)


@torch.no_grad()
def merge_experts(
    experts: Sequence[Mapping[str, torch.Tensor]], a: float, *, top_k: int = 4
) -> list[dict[str, torch.Tensor]]:
    """One layer's merge step, all experts at once from the given (pre-merge) tensors.

    For each expert e: D_e = the `top_k` other experts whose flattened `w1` is most
    cosine-similar to e's (self excluded); v_e ← v_e + a · mean_{d∈D_e}(v_d − v_e) over all of
    e's tensors. Every result reads only the inputs, so the processing order does not matter;
    the neighbours are summed in similarity order (not by index), so relabelling the experts
    relabels the result and nothing else.

    Args:
        experts: per expert, its tensors by name; each must have "w1".
        a: merge strength (0 = identity).
        top_k: neighbours per expert; capped at E − 1.

    Returns:
        New tensors, one dict per expert, same names, dtypes and shapes.

    Raises:
        ValueError: fewer than two experts, or top_k < 1.
    """
    n = len(experts)
    if n < 2:
        raise ValueError(f"merging needs at least two experts, got {n}")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    w1 = torch.stack([ex["w1"].detach().reshape(-1).double() for ex in experts])
    unit = w1 / w1.norm(dim=1, keepdim=True).clamp_min(1e-300)
    similarity = unit @ unit.T
    similarity.fill_diagonal_(-math.inf)
    neighbours = similarity.topk(min(top_k, n - 1), dim=1).indices.tolist()
    merged: list[dict[str, torch.Tensor]] = []
    for e, ex in enumerate(experts):
        out = {}
        for name, v in ex.items():
            v = v.detach()
            delta = torch.stack([experts[d][name].detach() - v for d in neighbours[e]]).mean(dim=0)
            out[name] = v + a * delta
        merged.append(out)
    return merged


@torch.no_grad()
def merge_model_experts_(model: CausalLM, a: float, *, top_k: int = 4) -> None:
    """`merge_experts` on every MoE layer of `model`, in place."""
    cfg = model.config
    for layer in range(cfg.n_layer):
        params = [model.expert_parameters(layer, e) for e in range(cfg.n_experts)]
        short = [{name.rsplit(".", 1)[1]: p for name, p in ps.items()} for ps in params]
        merged = merge_experts(short, a, top_k=top_k)
        for ps, new in zip(short, merged):
            for name, p in ps.items():
                p.copy_(new[name])


def expert_tensors(model: CausalLM, expert: int) -> dict[str, torch.nn.Parameter]:
    """Every layer's parameters of expert index `expert`, by full name (one SPES blob)."""
    out: dict[str, torch.nn.Parameter] = {}
    for layer in range(model.config.n_layer):
        out.update(model.expert_parameters(layer, expert))
    return out


@dataclass(frozen=True, kw_only=True, slots=True)
class SyncBytes:
    """Payload bytes of one SPES sync for one node (tensor bytes; blob headers not counted).

    Attributes:
        shared_bytes: S, every non-expert tensor.
        expert_bytes: X, one expert index over all layers (w1 and w2, and w3 for Llama, of each layer).
        allreduce_each_way: what the bandwidth-optimal (ring) all-reduce of the shared tensors
            sends and receives per node: 2(N − 1)/N · S.
        expert_download: the experts a node fetches: (E − owned) · X.
        server_upload, server_download: the paper's parameter-server accounting (upload shared
            + own experts, download shared + the others' experts); no server here, but it is
            the number the paper reports.
    """

    shared_bytes: int
    expert_bytes: int
    allreduce_each_way: int
    expert_download: int
    server_upload: int
    server_download: int


def sync_bytes(config: ModelConfig, *, n_nodes: int, owned: int, bytes_per_value: int = 4) -> SyncBytes:
    """The payload formula of §1 for `config` (bf16 transfers: bytes_per_value = 2).

    Raises:
        ValueError: a dense config, n_nodes < 1, or owned outside [0, n_experts].
    """
    if not config.is_moe:
        raise ValueError("sync_bytes needs an MoE config (n_experts > 0)")
    if n_nodes < 1:
        raise ValueError(f"n_nodes must be >= 1, got {n_nodes}")
    if not 0 <= owned <= config.n_experts:
        raise ValueError(f"owned must be in [0, {config.n_experts}], got {owned}")
    expert_numel = config.n_layer * config.expert_numel
    shared_numel = config.num_parameters() - config.n_experts * expert_numel
    s, x = shared_numel * bytes_per_value, expert_numel * bytes_per_value
    return SyncBytes(
        shared_bytes=s,
        expert_bytes=x,
        allreduce_each_way=2 * (n_nodes - 1) * s // n_nodes,
        expert_download=(config.n_experts - owned) * x,
        server_upload=s + owned * x,
        server_download=s + (config.n_experts - owned) * x,
    )
