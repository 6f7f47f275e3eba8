"""Fused NoLoCo / DiLoCo outer steps: SGD semantics, NoLoCo oracles, Triton agrees (ALGORITHMS §2, §5)."""

from __future__ import annotations

import pytest
import torch

from hyphae.kernels import diloco_outer_, diloco_outer_ref_, noloco_outer_, noloco_outer_ref_
from hyphae.kernels.outer import diloco_outer_triton_, noloco_outer_triton_

SHAPES = [(3,), (17, 5), (2049,)]


def rand(seed: int, scale: float = 1.0, shapes=SHAPES) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) * scale for s in shapes]


def clone(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.clone() for t in ts]


def close(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    """The documented contract between the paths: equal up to fma rounding (a few fp32 ulp)."""
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x.cpu().float(), y.cpu().float(), rtol=4e-7, atol=1e-7)


@pytest.mark.parametrize("nesterov", [True, False])
def test_diloco_reference_is_torch_sgd_bit_for_bit(nesterov: bool) -> None:
    phis = rand(0)
    sgd_params = [torch.nn.Parameter(p.clone()) for p in phis]
    opt = torch.optim.SGD(sgd_params, lr=0.7, momentum=0.9, nesterov=nesterov)
    moms = [torch.zeros_like(p) for p in phis]
    thetas = [torch.empty_like(p) for p in phis]
    for step in range(5):
        grads = rand(100 + step, 1e-2)
        for p, g in zip(sgd_params, grads):
            p.grad = g.clone()
        opt.step()
        diloco_outer_ref_(phis, moms, grads, thetas, lr=0.7, momentum=0.9, nesterov=nesterov)
        for p, mine, theta in zip(sgd_params, phis, thetas):
            assert torch.equal(p.detach(), mine)
            assert torch.equal(theta, mine)


def test_diloco_with_one_replica_lr_one_and_no_momentum_is_the_inner_result() -> None:
    """ALGORITHMS §5 oracle: N = 1, outer lr 1, momentum 0 => phi becomes the local weights."""
    phi = rand(1, shapes=[(64,)])
    theta = [phi[0] + torch.randn(64) * 1e-2]
    delta = [phi[0] - theta[0]]
    want = theta[0].clone()
    diloco_outer_ref_(phi, [torch.zeros(64)], delta, None, lr=1.0, momentum=0.0)
    torch.testing.assert_close(phi[0], want, rtol=0, atol=1e-7)


@pytest.mark.parametrize("theta_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("nesterov", [True, False])
def test_triton_diloco_matches_reference(triton_device: str, theta_dtype, nesterov: bool) -> None:
    ref = {"phi": rand(2), "mom": rand(3, 1e-2)}
    dev = {k: [t.clone().to(triton_device) for t in v] for k, v in ref.items()}
    th_ref = [torch.empty(s, dtype=theta_dtype) for s in SHAPES]
    th_dev = [t.clone().to(triton_device) for t in th_ref]
    for step in range(3):
        grads = rand(10 + step, 1e-2)
        diloco_outer_ref_(ref["phi"], ref["mom"], grads, th_ref, nesterov=nesterov)
        diloco_outer_triton_(dev["phi"], dev["mom"], [g.to(triton_device) for g in grads], th_dev, nesterov=nesterov)
    close(ref["phi"], dev["phi"])
    close(ref["mom"], dev["mom"])
    close(th_ref, th_dev)
    assert all(t.dtype == theta_dtype for t in th_dev)


@pytest.mark.parametrize("consensus", [True, False])
@pytest.mark.parametrize("theta_dtype", [torch.float32, torch.bfloat16])
def test_triton_noloco_matches_reference(triton_device: str, consensus: bool, theta_dtype) -> None:
    phi, delta = rand(4), rand(5, 1e-2)
    dbar, phibar = rand(6, 1e-2), (rand(7) if consensus else None)
    th = [torch.empty(s, dtype=theta_dtype) for s in SHAPES]
    on = lambda ts: None if ts is None else [t.clone().to(triton_device) for t in ts]  # noqa: E731
    phi_d, delta_d, th_d = on(phi), on(delta), on(th)
    noloco_outer_triton_(phi_d, delta_d, on(dbar), on(phibar), th_d)
    noloco_outer_ref_(phi, delta, dbar, phibar, th)
    close(phi, phi_d)
    close(delta, delta_d)
    close(th, th_d)


def test_noloco_matches_its_formula() -> None:
    phi, delta, dbar, phibar = rand(8), rand(9, 1e-2), rand(10, 1e-2), rand(11)
    a, b, c = 0.7, 0.5, 0.7
    want_delta = [b * d + a * g + c * (pb - p) for p, d, g, pb in zip(phi, delta, dbar, phibar)]
    want_phi = [p + d for p, d in zip(phi, want_delta)]
    thetas = [torch.empty_like(p) for p in phi]
    noloco_outer_ref_(phi, delta, dbar, phibar, thetas, a=a, b=b, c=c)
    for got, want in zip(delta + phi, want_delta + want_phi):  # other evaluation order: ~ulp of |phi|
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert all(torch.equal(t, p) for t, p in zip(thetas, phi))


def test_noloco_without_partner_drops_the_consensus_term() -> None:
    phi, delta, dbar = rand(12), rand(13, 1e-2), rand(14, 1e-2)
    p2, d2 = clone(phi), clone(delta)
    noloco_outer_ref_(phi, delta, dbar, None, c=0.7)
    noloco_outer_ref_(p2, d2, dbar, clone(p2), c=0.7)  # phibar == phi: the term is exactly 0
    assert all(torch.equal(x, y) for x, y in zip(phi, p2))


def pair_step(phi_i, phi_j, delta_i, delta_j, theta_i, theta_j):
    """One NoLoCo outer step of a group of two, with the group means computed as a peer would."""
    dbar = [((ti - pi) + (tj - pj)) / 2 for ti, pi, tj, pj in zip(theta_i, phi_i, theta_j, phi_j)]
    phibar = [(pi + pj) / 2 for pi, pj in zip(phi_i, phi_j)]
    noloco_outer_ref_(phi_i, delta_i, dbar, phibar)
    noloco_outer_ref_(phi_j, delta_j, dbar, phibar)
    return dbar


def test_consensus_preserves_the_group_mean() -> None:
    """ALGORITHMS §2 oracle 2: mean(phi') = mean(phi) + b*mean(delta) + a*Dbar."""
    phi_i, phi_j, delta_i, delta_j = rand(20), rand(21), rand(22, 1e-2), rand(23, 1e-2)
    theta_i, theta_j = rand(24), rand(25)
    before = [(pi + pj) / 2 for pi, pj in zip(phi_i, phi_j)]
    mean_delta = [(di + dj) / 2 for di, dj in zip(delta_i, delta_j)]
    dbar = pair_step(phi_i, phi_j, delta_i, delta_j, theta_i, theta_j)
    after = [(pi + pj) / 2 for pi, pj in zip(phi_i, phi_j)]
    want = [m + 0.5 * d + 0.7 * g for m, d, g in zip(before, mean_delta, dbar)]
    for x, y in zip(after, want):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_equal_momenta_shrink_the_gap_by_one_minus_c() -> None:
    """ALGORITHMS §2 oracle 3: n = 2, equal momenta => phi_i' - phi_j' = (1 - c)(phi_i - phi_j)."""
    phi_i, phi_j = rand(30), rand(31)
    delta = rand(32, 1e-2)
    gap = [pi - pj for pi, pj in zip(phi_i, phi_j)]
    pair_step(phi_i, phi_j, clone(delta), clone(delta), rand(33), rand(34))
    for pi, pj, g in zip(phi_i, phi_j, gap):
        torch.testing.assert_close(pi - pj, 0.3 * g, rtol=1e-5, atol=1e-5)


def test_public_functions_dispatch_to_the_same_result(forced_triton: object) -> None:
    phi, mom, grads = rand(40), rand(41, 1e-2), rand(42, 1e-2)
    p2, m2 = clone(phi), clone(mom)
    diloco_outer_(phi, mom, grads)
    diloco_outer_ref_(p2, m2, grads)
    close(phi, p2)
    d, d2, q, q2 = clone(mom), clone(mom), clone(phi), clone(phi)
    noloco_outer_(q, d, grads, p2)
    noloco_outer_ref_(q2, d2, grads, p2)
    close(d, d2)
    close(q, q2)


def test_bad_inputs_are_rejected_with_the_fix() -> None:
    phi, mom, grads = rand(50), rand(51), rand(52)
    with pytest.raises(ValueError, match="same length"):
        diloco_outer_(phi, mom[:2], grads)
    with pytest.raises(TypeError, match="momenta\\[0\\] must be float32"):
        diloco_outer_(phi, [m.bfloat16() for m in mom], grads)
    with pytest.raises(ValueError, match="must match phis\\[1\\]"):
        noloco_outer_(phi, mom, [grads[0], grads[0], grads[2]])
    with pytest.raises(ValueError, match="contiguous"):
        diloco_outer_([torch.zeros(4, 4).t()], [torch.zeros(4, 4)], [torch.zeros(4, 4)])
    with pytest.raises(ValueError, match="lr must be finite"):
        diloco_outer_(phi, mom, grads, lr=float("inf"))


@pytest.mark.gpu
def test_public_outer_steps_on_cuda_match_the_cpu_reference() -> None:
    phi, mom, grads = rand(60), rand(61, 1e-2), rand(62, 1e-2)
    gphi, gmom = [t.cuda() for t in phi], [t.cuda() for t in mom]
    diloco_outer_(gphi, gmom, [g.cuda() for g in grads])
    diloco_outer_ref_(phi, mom, grads)
    close(phi, gphi)
    close(mom, gmom)
    gd, d = [t.cuda() for t in mom], clone(mom)
    noloco_outer_(gphi, gd, [g.cuda() for g in grads], [p.cuda() for p in phi])
    noloco_outer_ref_(phi, d, grads, clone(phi))
    close(phi, gphi)
    close(d, gd)
