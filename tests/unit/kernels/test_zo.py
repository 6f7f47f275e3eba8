"""Fused shared-seed ZO updates: bit-exact across paths, batch == sequential (ALGORITHMS §3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hyphae.kernels import rademacher_like, rademacher_ref, zo_apply_, zo_apply_ref_, zo_perturb_, zo_unperturb_
from hyphae.kernels.zo import zo_apply_triton_

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = {
    "one": [(1,)],
    "odd": [(37,), (5, 129)],  # crosses 128-element hash blocks at odd places
    "mixed": [(3, 3), (1000,), (2,), (4097,)],
}
SEEDS = [11, 2**63 + 5, 0xDEADBEEFCAFEF00D]
COEFS = [1e-3, -2.5e-3, 7.0e-4]


def make(shapes: list[tuple[int, ...]], dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype) for s in shapes]


def clone(ps: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.clone() for p in ps]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x.cpu(), y.cpu()) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shapes", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("offset", [0, 45])
@pytest.mark.parametrize("k", [1, 3])
def test_triton_apply_matches_reference_bit_exact(triton_device: str, dtype, shapes: str, offset: int, k: int) -> None:
    ref = make(SHAPES[shapes], dtype)
    dev = [p.clone().to(triton_device) for p in ref]
    zo_apply_ref_(ref, SEEDS[:k], COEFS[:k], offset=offset)
    zo_apply_triton_(dev, SEEDS[:k], COEFS[:k], offset=offset)
    assert same(ref, dev)


@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_apply_equals_sequential_apply_bit_exact(dtype) -> None:
    batch = make(SHAPES["mixed"], dtype)
    seq = clone(batch)
    zo_apply_ref_(batch, SEEDS, COEFS)
    for s, c in zip(SEEDS, COEFS):
        zo_apply_ref_(seq, [s], [c])
    assert same(batch, seq)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_batch_equals_sequential_bit_exact(triton_device: str, dtype) -> None:
    batch = [p.to(triton_device) for p in make(SHAPES["odd"], dtype)]
    seq = clone(batch)
    zo_apply_triton_(batch, SEEDS, COEFS)
    for s, c in zip(SEEDS, COEFS):
        zo_apply_triton_(seq, [s], [c])
    assert same(batch, seq)


@pytest.mark.parametrize("dtype", DTYPES)
def test_update_is_one_ieee_add_per_element(dtype) -> None:
    """theta + (+-c) in fp32, rounded once to storage: the definition, written out."""
    params = make(SHAPES["odd"], dtype)
    c = float(np.float32(-3.3e-3))
    want = [
        (p.float() + torch.where(z.float() < 0, -c, c)).to(dtype)
        for p, z in zip(params, rademacher_like(params, 42, offset=7))
    ]
    zo_apply_ref_(params, [42], [c], offset=7)
    assert same(params, want)


def test_coefficients_are_rounded_once_to_fp32_on_the_host() -> None:
    c64 = 1.0e-3 + 1e-12  # not an fp32 value
    a, b = make(SHAPES["mixed"], torch.float32), make(SHAPES["mixed"], torch.float32)
    zo_apply_ref_(a, [5], [c64])
    zo_apply_ref_(b, [5], [float(np.float32(c64))])
    assert same(a, b)


def test_perturb_then_unperturb_does_not_restore_theta_exactly() -> None:
    """ALGORITHMS §3 oracle 2: the +eps, -2eps, +eps walk is not an identity in float."""
    theta0 = make([(4096,)], torch.float32, seed=3)
    theta = clone(theta0)
    eps = 1e-3
    zo_perturb_(theta, 9, eps)
    zo_perturb_(theta, 9, -2 * eps)
    zo_perturb_(theta, 9, eps)
    moved = (theta[0] != theta0[0]).sum().item()
    assert moved > 0, "expected rounding to leave some elements changed"
    ulp = torch.finfo(torch.float32).eps * theta0[0].abs().clamp_min(eps)
    assert ((theta[0] - theta0[0]).abs() <= 4 * ulp).all()  # ... but only by rounding
    # The same holds for the plain inverse: x + c - c != x for some x.
    one = [torch.tensor([0.1, 1.0 / 3.0, 123.456, 1e-4], dtype=torch.float32)]
    before = clone(one)
    zo_perturb_(one, 1, 0.3)
    zo_unperturb_(one, 1, 0.3)
    assert not same(one, before)


def test_replaying_the_same_log_in_the_same_order_gives_identical_weights() -> None:
    """ALGORITHMS §3 oracle 3."""
    log = [(s, c) for s, c in zip(SEEDS * 3, COEFS * 3)]
    a, b = make(SHAPES["mixed"], torch.bfloat16), make(SHAPES["mixed"], torch.bfloat16)
    for s, c in log:
        zo_apply_ref_(a, [s], [c])
    zo_apply_ref_(b, [s for s, _ in log], [c for _, c in log])
    assert same(a, b)


def test_update_touches_every_element_by_exactly_the_coefficient() -> None:
    params = [torch.zeros(300), torch.zeros(7, 9)]
    zo_apply_ref_(params, [17], [0.5], offset=3)
    flat = torch.cat([p.reshape(-1) for p in params])
    assert torch.equal(flat, 0.5 * rademacher_ref(17, 363, offset=3))


def test_leaf_parameters_that_require_grad_are_updated() -> None:
    p = torch.nn.Parameter(torch.zeros(10))
    zo_apply_([p], [1], [1.0])
    assert p.abs().eq(1).all()


def test_public_apply_on_cpu_equals_reference_and_forced_triton(forced_triton: object) -> None:
    a = make(SHAPES["mixed"], torch.float32)
    b = clone(a)
    zo_apply_(a, SEEDS, COEFS, offset=9)  # forced: CPU tensors go through the interpreter
    zo_apply_ref_(b, SEEDS, COEFS, offset=9)
    assert same(a, b)


def test_empty_lists_and_empty_tensors_are_no_ops() -> None:
    params = [torch.zeros(0), torch.ones(4)]
    zo_apply_ref_(params, [], [])
    zo_apply_ref_([], [1], [1.0])
    assert torch.equal(params[1], torch.ones(4))
    zo_apply_ref_(params, [1], [1.0])
    assert set(params[1].tolist()) <= {0.0, 2.0}


@pytest.mark.parametrize(
    ("params", "seeds", "coefs", "exc", "match"),
    [
        ([torch.zeros(4, 4).t()], [1], [1.0], ValueError, "contiguous"),
        ([torch.zeros(4, dtype=torch.int32)], [1], [1.0], TypeError, "float32, bfloat16 or float16"),
        ([torch.zeros(4, dtype=torch.float64)], [1], [1.0], TypeError, "cast the tensor"),
        ([torch.zeros(4)], [1, 2], [1.0], ValueError, "same length"),
        ([torch.zeros(4)], [1], [float("nan")], ValueError, "finite"),
        ([torch.zeros(4)], [1], [1e39], ValueError, "finite"),
        ([torch.zeros(4)], [-1], [1.0], ValueError, r"\[0, 2\*\*64\)"),
        (["not a tensor"], [1], [1.0], TypeError, "torch.Tensor"),
    ],
)
def test_bad_inputs_are_rejected_with_the_fix(params, seeds, coefs, exc, match) -> None:
    with pytest.raises(exc, match=match):
        zo_apply_(params, seeds, coefs)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_public_apply_on_cuda_matches_the_cpu_reference(dtype) -> None:
    """A GPU worker and a CPU worker replaying the same log hold the same bits (Triton or not)."""
    cpu = make(SHAPES["mixed"], dtype)
    gpu = [p.cuda() for p in cpu]
    zo_apply_(gpu, SEEDS, COEFS, offset=3)
    zo_perturb_(gpu, 5, 1e-3)
    zo_apply_ref_(cpu, SEEDS, COEFS, offset=3)
    zo_apply_ref_(cpu, [5], [1e-3])
    assert same(cpu, gpu)
