"""Spectral constants of a gossip graph, for DADAO and A²CiD² (ALGORITHMS.md §4).

A communication process that fires edge (i, j) at rate λ_ij has the weighted Laplacian

    Λ = Σ_{(i,j)∈E} λ_ij (e_i − e_j)(e_i − e_j)ᵀ

and the two numbers both papers tune by:

    χ₁ = 1 / λ_min⁺(Λ)                                  (slowest mixing mode)
    χ₂ = ½ max_{(i,j)∈E} (e_i − e_j)ᵀ Λ⁺ (e_i − e_j)    (worst edge effective resistance)

The ½ in χ₂ is the papers' normalization (the DADAO reference code's `compute_graph_resistance`);
ALGORITHMS.md calls χ₂ "max edge effective resistance". With uniform edge probabilities
(λ_ij = 1/|E|, i.e. Λ = L_G/|E|) these are DADAO's χ₁, χ₂ and λ_mix = √(2χ₁χ₂). Pure numpy
(eigvalsh, pinv), meant for graphs of up to a few hundred nodes; the complete graph, which
A²CiD² uses for N up to thousands, has a closed form.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["chis", "complete_edges", "complete_graph_chis", "laplacian", "ring_edges"]

Edge = tuple[int, int]


def ring_edges(n: int) -> list[Edge]:
    """Edges of the cycle 0-1-...-(n-1)-0 (n >= 3; n = 2 is the single edge)."""
    if n < 2:
        raise ValueError(f"a ring needs n >= 2 nodes, got {n}")
    if n == 2:
        return [(0, 1)]
    return [(i, (i + 1) % n) for i in range(n)]


def complete_edges(n: int) -> list[Edge]:
    """Every pair (i, j), i < j."""
    if n < 2:
        raise ValueError(f"a graph needs n >= 2 nodes, got {n}")
    return [(i, j) for i in range(n) for j in range(i + 1, n)]


def laplacian(n: int, edges: Sequence[Edge], rates: Sequence[float] | None = None) -> np.ndarray:
    """Λ = Σ λ_ij (e_i − e_j)(e_i − e_j)ᵀ; uniform rates 1/|E| when `rates` is None.

    Raises:
        ValueError: an edge out of range or a self-loop, a negative rate, or lengths differ.
    """
    if not edges:
        raise ValueError("the graph has no edges; gossip needs at least one")
    if rates is None:
        rates = [1.0 / len(edges)] * len(edges)
    if len(rates) != len(edges):
        raise ValueError(f"got {len(rates)} rates for {len(edges)} edges; give one per edge")
    lap = np.zeros((n, n))
    for (i, j), rate in zip(edges, rates):
        if not (0 <= i < n and 0 <= j < n) or i == j:
            raise ValueError(f"edge ({i}, {j}) is not a pair of distinct nodes in range({n})")
        if rate < 0:
            raise ValueError(f"edge ({i}, {j}) has negative rate {rate}; rates are >= 0")
        lap[i, i] += rate
        lap[j, j] += rate
        lap[i, j] -= rate
        lap[j, i] -= rate
    return lap


def chis(n: int, edges: Sequence[Edge], rates: Sequence[float] | None = None) -> tuple[float, float]:
    """(χ₁, χ₂) of the communication process; see the module docstring.

    Raises:
        ValueError: the graph (restricted to edges of positive rate) is not connected.
    """
    lap = laplacian(n, edges, rates)
    eig = np.linalg.eigvalsh(lap)
    scale = max(float(eig[-1]), 1e-300)
    if n > 1 and eig[1] <= 1e-10 * scale:
        raise ValueError(f"the gossip graph on {n} nodes is not connected; add edges between its parts")
    chi1 = 1.0 / float(eig[1])
    pinv = np.linalg.pinv(lap, hermitian=True)
    chi2 = 0.5 * max(float(pinv[i, i] + pinv[j, j] - 2 * pinv[i, j]) for i, j in edges)
    return chi1, chi2


def complete_graph_chis(n: int, edge_rate: float) -> tuple[float, float]:
    """(χ₁, χ₂) of the complete graph on n nodes with every edge at rate `edge_rate`.

    Λ = λ(nI − 11ᵀ): its positive eigenvalue is nλ (χ₁ = 1/(nλ)) and every edge's effective
    resistance is 2/(nλ) (χ₂ = 1/(nλ)).
    """
    if n < 2 or edge_rate <= 0:
        raise ValueError(f"need n >= 2 and edge_rate > 0, got n={n}, edge_rate={edge_rate}")
    value = 1.0 / (n * edge_rate)
    return value, value
