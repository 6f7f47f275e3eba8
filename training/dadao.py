"""DADAO, exactly: the continuous-time decentralized algorithm, simulated on convex problems.

ALGORITHMS.md §4 (Nabli & Oyallon, ICML 2023). n nodes minimise Σ_i f_i (each L-smooth and
μ-strongly convex) on a graph. Every node holds six vectors (x, x̃, y, ỹ, z, z̃). Two
independent Poisson processes drive it: gradient events (rate 1 per node) and communication
events (total rate λ_mix, a uniformly random edge each). Between events each node follows the
linear ODE, ν = μ/2,

    ẋ = η(x̃−x)   x̃̇ = η(x−x̃)   ẏ = α(ỹ−y)   ỹ̇ = −θ(νx̃+y+z)   ż = α(z̃−z)   z̃̇ = α̃(z−z̃)

i.e. s' = M s per coordinate with a constant 6×6 M, so a node that last moved at t0 is at
exp(M (t − t0)) s(t0) — solved in closed form, never by ticking. M is diagonalised once
(`Flow`), so each event costs one 6×6 product per node touched. At a gradient event on i
(after flowing i to now), g = ∇f_i(x_i) − νx_i − ỹ_i and x_i −= γg, x̃_i −= γ̃g,
ỹ_i += (δ + δ̃)g. At a communication event on (i, j) (after flowing both),
m = (y_i + z_i) − (y_j + z_j); z_i −= βm, z_j += βm, z̃_i −= β̃m, z̃_j += β̃m — only y + z
travels, and Σz, Σz̃ are conserved.

This is a numerical experiment (no Comm, no torch): it checks the constants, the rates and the
closed-form mixing that the practical deep-net form, A²CiD² (acid.py), builds on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from hyphae.training._graph import chis

__all__ = ["Constants", "Flow", "Quadratics", "Trace", "communicate", "ode_matrix", "simulate"]

X, XT, Y, YT, Z, ZT = range(6)
"""Row of each state vector in a node's (6, d) state."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Constants:
    """DADAO's constants for a problem (μ, L) and a graph (ALGORITHMS.md §4)."""

    mu: float
    L: float
    nu: float
    alpha: float
    alpha_tilde: float
    eta: float
    theta: float
    beta: float
    beta_tilde: float
    delta: float
    delta_tilde: float
    gamma: float
    gamma_tilde: float
    chi1: float
    chi2: float
    lambda_mix: float
    chi1_star: float

    @classmethod
    def for_graph(
        cls, *, mu: float, L: float, n: int, edges: Sequence[tuple[int, int]], lambda_mix: float | None = None
    ) -> Constants:
        """Constants with χ₁, χ₂ from Λ = L_G/|E| and, unless given, λ_mix = √(2χ₁χ₂).

        Raises:
            ValueError: not 0 < μ <= L, a disconnected graph, or lambda_mix < 0.
        """
        if not (0 < mu <= L):
            raise ValueError(f"need 0 < mu <= L, got mu={mu}, L={L}")
        chi1, chi2 = chis(n, edges)
        lam = math.sqrt(2 * chi1 * chi2) if lambda_mix is None else float(lambda_mix)
        if lam < 0:
            raise ValueError(f"lambda_mix must be >= 0, got {lam}")
        nu = mu / 2
        r = math.sqrt(nu / L)
        chi1_star = chi1 / lam if lam > 0 else math.inf
        return cls(
            mu=mu, L=L, nu=nu, alpha=r / 4, alpha_tilde=r / 8, eta=r / 8, theta=1 / (2 * r),
            beta=0.5, beta_tilde=2 * chi1_star / r if lam > 0 else 0.0, delta=r / 4, delta_tilde=1.0,
            gamma=1 / (4 * L), gamma_tilde=1 / (4 * math.sqrt(L * nu)),
            chi1=chi1, chi2=chi2, lambda_mix=lam, chi1_star=chi1_star,
        )


def ode_matrix(c: Constants) -> np.ndarray:
    """The 6×6 M of s' = M s, rows/columns in the order (x, x̃, y, ỹ, z, z̃)."""
    m = np.zeros((6, 6))
    m[X, X], m[X, XT] = -c.eta, c.eta
    m[XT, X], m[XT, XT] = c.eta, -c.eta
    m[Y, Y], m[Y, YT] = -c.alpha, c.alpha
    m[YT, XT], m[YT, Y], m[YT, Z] = -c.theta * c.nu, -c.theta, -c.theta
    m[Z, Z], m[Z, ZT] = -c.alpha, c.alpha
    m[ZT, Z], m[ZT, ZT] = c.alpha_tilde, -c.alpha_tilde
    return m


class Flow:
    """exp(M Δt) for one fixed M, from an eigendecomposition computed once.

    M = V diag(w) V⁻¹ ⇒ exp(M Δt) = V diag(e^{w Δt}) V⁻¹ (complex in general, real up to
    rounding). DADAO's M is diagonalisable with a well-conditioned V (cond ≈ 11 at μ=1, L=10);
    if another M is not (defective or ill-conditioned), every call falls back to scaling and
    squaring (torch.linalg.matrix_exp). Δt = 0 returns the identity exactly.
    """

    def __init__(self, m: np.ndarray) -> None:
        self.m = np.asarray(m, dtype=np.float64)
        w, v = np.linalg.eig(self.m)
        self._w, self._v = w, v
        self._vinv: np.ndarray | None = None
        if np.linalg.cond(v) < 1e8:
            vinv = np.linalg.inv(v)
            if np.abs((v * w) @ vinv - self.m).max() <= 1e-10 * max(1.0, np.abs(self.m).max()):
                self._vinv = vinv

    def matrix(self, dt: float) -> np.ndarray:
        """exp(M dt) as a real (6, 6) array."""
        if dt == 0:
            return np.eye(self.m.shape[0])
        if self._vinv is None:
            import torch  # only for the rare defective M

            return torch.linalg.matrix_exp(torch.from_numpy(self.m * dt)).numpy()
        return ((self._v * np.exp(self._w * dt)) @ self._vinv).real


@dataclass
class Quadratics:
    """f_i(x) = ½ (x − b_i)ᵀ A_i (x − b_i): every f_i is μ-strongly convex and L-smooth.

    Attributes:
        a: (n, d, d) symmetric A_i with eigenvalues in [μ, L] (μ and L both attained by f_0).
        b: (n, d) centres.
    """

    a: np.ndarray
    b: np.ndarray
    mu: float
    L: float

    @classmethod
    def random(cls, n: int, d: int, *, mu: float = 1.0, L: float = 10.0, seed: int = 0) -> Quadratics:
        """n random quadratics in dimension d with spectra in [μ, L] and spread-out centres."""
        rng = np.random.default_rng(seed)
        a = np.empty((n, d, d))
        for i in range(n):
            q, _ = np.linalg.qr(rng.standard_normal((d, d)))
            spectrum = rng.uniform(mu, L, d)
            spectrum[0], spectrum[-1] = mu, L
            a[i] = (q * spectrum) @ q.T
        return cls(a=a, b=rng.standard_normal((n, d)) * 3.0, mu=mu, L=L)

    @property
    def n(self) -> int:
        return self.a.shape[0]

    def grad(self, i: int, x: np.ndarray) -> np.ndarray:
        return self.a[i] @ (x - self.b[i])

    def minimiser(self) -> np.ndarray:
        """x* of Σ_i f_i: (Σ A_i)⁻¹ Σ A_i b_i."""
        return np.linalg.solve(self.a.sum(0), np.einsum("nij,nj->i", self.a, self.b))


@dataclass
class Trace:
    """What `simulate` recorded."""

    times: list[float] = field(default_factory=list)
    """Times of the records (every `record_every` units and at the end)."""
    errors: list[float] = field(default_factory=list)
    """mean_i ‖x_i − x*‖² at those times (every node flowed to that time first)."""
    grad_events: int = 0
    comm_events: int = 0
    z_sums: list[float] = field(default_factory=list)
    """max(‖Σ_i z_i‖_∞, ‖Σ_i z̃_i‖_∞) at the record times (conserved from 0: stays ~0)."""
    state: np.ndarray | None = None
    """Final (n, 6, d) state, flowed to t_max."""
    constants: Constants | None = None


def simulate(
    problem: Quadratics,
    edges: Sequence[tuple[int, int]],
    *,
    t_max: float,
    seed: int = 0,
    lambda_mix: float | None = None,
    record_every: float = 1.0,
    x0: np.ndarray | None = None,
) -> Trace:
    """Run DADAO on `problem` over the graph `edges` from t = 0 to `t_max`.

    Args:
        problem: the n local functions.
        edges: the communication graph on range(n).
        t_max: simulated time (one unit = one expected gradient event per node).
        seed: seeds the event times, the chosen nodes/edges and (unless x0) the start point.
        lambda_mix: total communication rate; None = √(2χ₁χ₂) (the paper's choice).
        record_every: time between two error records.
        x0: (n, d) start points; x̃, y, ỹ, z, z̃ start at 0 (as in the reference code).

    Returns:
        The error curve, the event counts and the final state.
    """
    n, d = problem.b.shape
    c = Constants.for_graph(mu=problem.mu, L=problem.L, n=n, edges=edges, lambda_mix=lambda_mix)
    flow = Flow(ode_matrix(c))
    rng = np.random.default_rng(seed)
    state = np.zeros((n, 6, d))
    state[:, X] = rng.standard_normal((n, d)) if x0 is None else x0
    last = np.zeros(n)
    x_star = problem.minimiser()
    trace = Trace(constants=c)
    edge_array = np.asarray(edges)

    def move(i: int, t: float) -> None:
        state[i] = flow.matrix(t - last[i]) @ state[i]
        last[i] = t

    def record(t: float) -> None:
        for i in range(n):
            move(i, t)
        trace.times.append(t)
        trace.errors.append(float(np.mean(np.sum((state[:, X] - x_star) ** 2, axis=1))))
        trace.z_sums.append(float(np.abs(state[:, (Z, ZT)].sum(0)).max()))

    total_rate = n + c.lambda_mix
    t, next_record = 0.0, 0.0
    while True:
        t += rng.exponential(1.0 / total_rate)
        while next_record <= min(t, t_max):
            record(next_record)
            next_record += record_every
        if t > t_max:
            break
        if rng.random() * total_rate < n:  # a gradient event, at a uniform node
            i = int(rng.integers(n))
            move(i, t)
            s = state[i]
            g = problem.grad(i, s[X]) - c.nu * s[X] - s[YT]
            s[X] -= c.gamma * g
            s[XT] -= c.gamma_tilde * g
            s[YT] += (c.delta + c.delta_tilde) * g
            trace.grad_events += 1
        else:  # a communication event, on a uniform edge
            i, j = (int(v) for v in edge_array[rng.integers(len(edge_array))])
            move(i, t)
            move(j, t)
            communicate(state, i, j, c)
            trace.comm_events += 1
    if not trace.times or trace.times[-1] < t_max:
        record(t_max)
    trace.state = state
    return trace


def communicate(state: np.ndarray, i: int, j: int, c: Constants) -> None:
    """The communication jump on edge (i, j), in place on the (n, 6, d) state (both flowed)."""
    m = (state[i, Y] + state[i, Z]) - (state[j, Y] + state[j, Z])
    state[i, Z] -= c.beta * m
    state[j, Z] += c.beta * m
    state[i, ZT] -= c.beta_tilde * m
    state[j, ZT] += c.beta_tilde * m
