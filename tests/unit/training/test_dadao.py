"""DADAO, the exact continuous-time algorithm: the oracles of ALGORITHMS.md §4, the constants."""

import math

import numpy as np
import pytest
import torch

from hyphae.training._graph import chis, complete_edges, complete_graph_chis, laplacian, ring_edges
from hyphae.training.dadao import Constants, Flow, Quadratics, communicate, ode_matrix, simulate

MU, L, D, T_MAX = 1.0, 10.0, 5, 400.0


def _constants(n: int = 8, **kw) -> Constants:
    return Constants.for_graph(mu=MU, L=L, n=n, edges=ring_edges(n), **kw)


def _log_slope(times: list[float], errors: list[float]) -> float:
    return float(np.polyfit(np.asarray(times), np.log(np.asarray(errors)), 1)[0])


@pytest.fixture(scope="module")
def rings() -> dict[int, tuple[Quadratics, object]]:
    """DADAO on rings of 8 and 16 quadratics (μ = 1, L = 10, d = 5) up to t = 400."""
    out = {}
    for n in (8, 16):
        problem = Quadratics.random(n, D, mu=MU, L=L, seed=n)
        out[n] = (problem, simulate(problem, ring_edges(n), t_max=T_MAX, seed=100 + n))
    return out


# --- oracle 1: the closed-form flow ---------------------------------------------------------


@pytest.mark.parametrize(("a", "b"), [(0.3, 1.7), (5.0, 0.001), (40.0, 60.0), (1e-6, 2.5)])
def test_flow_is_a_semigroup(a: float, b: float) -> None:
    flow = Flow(ode_matrix(_constants()))
    np.testing.assert_allclose(flow.matrix(a) @ flow.matrix(b), flow.matrix(a + b), atol=1e-12, rtol=1e-10)


def test_flow_over_zero_time_is_exactly_the_identity() -> None:
    flow = Flow(ode_matrix(_constants()))
    assert np.array_equal(flow.matrix(0.0), np.eye(6))


@pytest.mark.parametrize("dt", [0.01, 1.0, 37.5, 400.0])
def test_flow_matches_scaling_and_squaring(dt: float) -> None:
    m = ode_matrix(_constants())
    reference = torch.linalg.matrix_exp(torch.from_numpy(m * dt)).numpy()
    np.testing.assert_allclose(Flow(m).matrix(dt), reference, atol=1e-12)


def test_flow_of_a_defective_matrix_falls_back_to_scaling_and_squaring() -> None:
    jordan = np.array([[-1.0, 1.0], [0.0, -1.0]])  # not diagonalisable
    expected = math.exp(-2.0) * np.array([[1.0, 2.0], [0.0, 1.0]])
    np.testing.assert_allclose(Flow(jordan).matrix(2.0), expected, atol=1e-12)


def test_ode_matrix_is_the_system_of_algorithms_md() -> None:
    c = _constants()
    s = np.arange(1.0, 7.0)  # (x, x̃, y, ỹ, z, z̃)
    x, xt, y, yt, z, zt = s
    expected = [c.eta * (xt - x), c.eta * (x - xt), c.alpha * (yt - y), -c.theta * (c.nu * xt + y + z),
                c.alpha * (zt - z), c.alpha_tilde * (z - zt)]
    np.testing.assert_allclose(ode_matrix(c) @ s, expected)


# --- oracle 2: communication conserves Σz and Σz̃ ---------------------------------------------


def test_communication_jump_conserves_the_sums_of_z_and_z_tilde() -> None:
    c = _constants()
    state = np.random.default_rng(0).standard_normal((8, 6, D))
    before = state.copy()
    communicate(state, 2, 5, c)
    np.testing.assert_allclose(state[:, 4].sum(0), before[:, 4].sum(0), atol=1e-12)
    np.testing.assert_allclose(state[:, 5].sum(0), before[:, 5].sum(0), atol=1e-12)
    untouched = [k for k in range(8) if k not in (2, 5)]
    assert np.array_equal(state[untouched], before[untouched])
    assert np.array_equal(state[:, :4], before[:, :4])  # only z and z̃ jump


def test_sums_of_z_stay_zero_through_a_whole_run(rings) -> None:
    for _, trace in rings.values():
        assert trace.comm_events > 1000
        assert max(trace.z_sums) < 1e-9


# --- oracle 3: linear convergence on rings, not slower at n = 16 -----------------------------


def test_ring_of_quadratics_converges_linearly_and_does_not_slow_down_from_8_to_16(rings) -> None:
    slopes = {}
    for n, (_, trace) in rings.items():
        drop = trace.errors[0] / trace.errors[-1]
        slopes[n] = _log_slope(trace.times, trace.errors)
        assert trace.times[-1] == T_MAX
        assert drop > 1e5, (n, drop)
        assert slopes[n] <= -0.02, (n, slopes[n])
    assert slopes[16] <= 0.8 * slopes[8], slopes  # at least 80 % as steep (measured: ~equal)


def test_nodes_reach_the_global_minimiser_not_their_own(rings) -> None:
    problem, trace = rings[8]
    x = trace.state[:, 0]
    np.testing.assert_allclose(x, np.broadcast_to(problem.minimiser(), x.shape), atol=1e-3)


# --- oracle 4: event ratio -------------------------------------------------------------------


def test_communication_per_gradient_event_is_lambda_mix_over_n(rings) -> None:
    for n, (_, trace) in rings.items():
        expected = trace.constants.lambda_mix / n
        ratio = trace.comm_events / trace.grad_events
        assert ratio == pytest.approx(expected, rel=0.06), (n, ratio, expected)
        assert trace.grad_events == pytest.approx(n * T_MAX, rel=0.05)  # rate 1 per node


# --- oracle 5: no communication, no consensus ------------------------------------------------


def test_without_communication_each_node_solves_only_its_own_problem() -> None:
    problem = Quadratics.random(8, D, seed=1)
    trace = simulate(problem, ring_edges(8), t_max=400.0, seed=2, lambda_mix=0.0)
    x = trace.state[:, 0]
    assert trace.comm_events == 0
    np.testing.assert_allclose(x, problem.b, atol=1e-4)  # argmin f_i, each alone
    spread = np.mean(np.sum((x - x.mean(0)) ** 2, axis=1))
    assert spread > 1.0 and trace.errors[-1] > 1.0
    assert np.array_equal(trace.state[:, 4:], np.zeros_like(trace.state[:, 4:]))


# --- the constants ---------------------------------------------------------------------------


def test_constants_follow_algorithms_md() -> None:
    c = _constants(8)
    r = math.sqrt((MU / 2) / L)
    assert (c.nu, c.alpha, c.alpha_tilde, c.eta, c.theta) == pytest.approx((MU / 2, r / 4, r / 8, r / 8, 1 / (2 * r)))
    assert (c.beta, c.delta, c.delta_tilde) == pytest.approx((0.5, r / 4, 1.0))
    assert (c.gamma, c.gamma_tilde) == pytest.approx((1 / (4 * L), 1 / (4 * math.sqrt(L * MU / 2))))
    assert c.lambda_mix == pytest.approx(math.sqrt(2 * c.chi1 * c.chi2))
    assert c.chi1_star == pytest.approx(c.chi1 / c.lambda_mix)
    assert c.beta_tilde == pytest.approx(2 * c.chi1_star / r)


@pytest.mark.parametrize("n", [3, 8, 16])
def test_ring_chi1_is_the_inverse_smallest_positive_eigenvalue_of_the_normalised_laplacian(n: int) -> None:
    chi1, chi2 = chis(n, ring_edges(n))
    assert chi1 == pytest.approx(n / (2 - 2 * math.cos(2 * math.pi / n)))  # λ₁⁺(L_ring) / |E|
    assert chi2 == pytest.approx(0.5 * n * (n - 1) / n)  # ½ · |E| · (n-1)/n, every edge alike


@pytest.mark.parametrize("n", [2, 5, 9])
def test_complete_graph_closed_form_matches_the_spectral_computation(n: int) -> None:
    rate = 0.37
    assert chis(n, complete_edges(n), [rate] * (n * (n - 1) // 2)) == pytest.approx(complete_graph_chis(n, rate))


def test_graph_helpers_reject_bad_graphs() -> None:
    with pytest.raises(ValueError, match="not connected"):
        chis(4, [(0, 1), (2, 3)])
    with pytest.raises(ValueError, match="distinct nodes"):
        laplacian(3, [(1, 1)])
    with pytest.raises(ValueError, match="not 0 < mu <= L|need 0 < mu <= L"):
        Constants.for_graph(mu=2.0, L=1.0, n=4, edges=ring_edges(4))


def test_quadratics_have_the_promised_conditioning() -> None:
    problem = Quadratics.random(4, D, mu=MU, L=L, seed=0)
    eig = np.linalg.eigvalsh(problem.a)
    assert eig.min() == pytest.approx(MU) and eig.max() == pytest.approx(L)
    x = np.ones(D)
    np.testing.assert_allclose(sum(problem.grad(i, problem.minimiser()) for i in range(4)), 0, atol=1e-9)
    assert problem.grad(0, x).shape == (D,)
