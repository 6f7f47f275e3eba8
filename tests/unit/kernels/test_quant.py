"""Blockwise absmax int8 / 4-bit quantization: error bounds, packing, error feedback, paths agree."""

from __future__ import annotations

import pytest
import torch

from hyphae.kernels import Quantized, dequantize, dequantize_ref, quantize, quantize_ef_, quantize_ef_ref_, quantize_ref
from hyphae.kernels.quant import dequantize_triton, quantize_ef_triton_, quantize_triton

QMAX = {8: 127, 4: 7}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def sample(n: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    """Heavy-tailed values with a zero block and an outlier: what pseudo-gradients look like."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.rand(n, generator=g).pow(4) * 3
    if n > 80:
        x[10:80] = 0
        x[n // 2] = 40.0
    return x.to(dtype)


def bound(q: Quantized, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-element scale and the documented bound s/2 + 2**-21 * absmax."""
    scale = q.scales.repeat_interleave(q.block_size)[:n]
    return scale, scale / 2 + scale * QMAX[q.bits] * 2.0**-21


def same_q(a: Quantized, b: Quantized) -> bool:
    return (
        torch.equal(a.codes.cpu(), b.codes.cpu())
        and torch.equal(a.scales.cpu(), b.scales.cpu())
        and (a.shape, a.bits, a.block_size) == (b.shape, b.bits, b.block_size)
    )


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("block_size", [None, 6, 32, 100])
@pytest.mark.parametrize("n", [1, 7, 257, 1000])
def test_error_is_within_the_documented_bound(bits: int, block_size: int | None, n: int) -> None:
    x = sample(n)
    q = quantize_ref(x, bits=bits, block_size=block_size)
    _, limit = bound(q, n)
    assert ((x - dequantize_ref(q)).abs() <= limit).all()


def test_int8_absmax_bound_is_half_a_step() -> None:
    x = sample(4096)
    q = quantize_ref(x, bits=8)
    scale, _ = bound(q, x.numel())
    err = (x - dequantize_ref(q)).abs()
    assert (err <= scale / 2 * (1 + 2e-4)).all()  # scale = absmax / 127; 2e-4: fp32 rounding
    assert err.max() > scale.max() / 4  # and the bound is not vacuous


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "block_size"), [(1, None), (257, None), (1000, 6), (513, 100)])
def test_triton_matches_reference_codes_scales_and_values(triton_device: str, bits, dtype, n, block_size) -> None:
    x = sample(n, dtype, seed=n)
    ref = quantize_ref(x, bits=bits, block_size=block_size)
    got = quantize_triton(x.to(triton_device), bits=bits, block_size=block_size)
    assert same_q(ref, got)  # the same wire bytes from a CPU and a GPU peer
    for out in (torch.float32, dtype):
        assert torch.equal(dequantize_triton(got, dtype=out).cpu(), dequantize_ref(ref, dtype=out))
    _, limit = bound(got, n)
    assert ((x.float() - dequantize_triton(got).cpu().view(-1)).abs() <= limit).all()


@pytest.mark.parametrize("bits", [8, 4])
def test_triton_error_feedback_matches_reference(triton_device: str, bits: int) -> None:
    a = sample(777, seed=5)
    b = a.clone().to(triton_device)
    qa = quantize_ef_ref_(a, bits=bits, block_size=None)
    qb = quantize_ef_triton_(b, bits=bits, block_size=None)
    assert same_q(qa, qb)
    assert torch.equal(a, b.cpu())


@pytest.mark.parametrize("bits", [8, 4])
def test_error_feedback_leaves_exactly_the_residual(bits: int) -> None:
    x = sample(1000, seed=2)
    buf = x.clone()
    q = quantize_ef_ref_(buf, bits=bits)
    assert same_q(q, quantize_ref(x, bits=bits))
    assert torch.equal(buf, x - dequantize_ref(q))


def test_error_feedback_keeps_the_running_sum_honest() -> None:
    """Over many rounds, what was sent + what is still owed == what came in (up to fp32 sums)."""
    g = torch.Generator().manual_seed(1)
    err = torch.zeros(512)
    sent = torch.zeros(512, dtype=torch.float64)
    total = torch.zeros(512, dtype=torch.float64)
    for _ in range(50):
        delta = torch.randn(512, generator=g) * 1e-2
        total += delta.double()
        err += delta
        sent += dequantize_ref(quantize_ef_ref_(err, bits=4)).double()
    assert torch.allclose(sent + err.double(), total, atol=1e-5)
    assert err.abs().max() < 0.1 * total.abs().max()  # the residual stays bounded


def test_int4_packs_two_values_per_byte_low_nibble_first() -> None:
    x = torch.tensor([7.0, -7.0, 1.0, 0.0, -3.0])  # block of 64 > 5: one block, scale 1
    q = quantize_ref(x, bits=4)
    assert q.scales.tolist() == [1.0]
    assert q.codes.dtype == torch.uint8 and q.codes.numel() == 3
    # codes are q + 8: (15, 1), (9, 8), (5, pad 8)
    assert q.codes.tolist() == [15 | 1 << 4, 9 | 8 << 4, 5 | 8 << 4]
    assert torch.equal(dequantize_ref(q), x)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("n", [1, 2, 63, 64, 65, 1001])
def test_values_on_the_grid_round_trip_exactly(bits: int, n: int) -> None:
    qmax = QMAX[bits]
    g = torch.Generator().manual_seed(n)
    ints = torch.randint(-qmax, qmax + 1, (n,), generator=g).float()
    ints[::16] = qmax  # every block reaches absmax = qmax * 2**-3, so scale = 2**-3 exactly
    x = ints * 0.125
    q = quantize_ref(x, bits=bits, block_size=16)
    assert torch.equal(dequantize_ref(q), x)


@pytest.mark.parametrize("bits", [8, 4])
def test_dequantize_into_a_given_buffer(bits: int) -> None:
    x = sample(333).view(3, 111)
    q = quantize_ref(x, bits=bits)
    out = torch.empty(333, dtype=torch.float16)
    got = dequantize_ref(q, out=out)
    assert got.shape == x.shape and got.data_ptr() == out.data_ptr()
    assert torch.equal(got, dequantize_ref(q, dtype=torch.float16))
    with pytest.raises(ValueError, match="contiguous tensor of 333 elements"):
        dequantize_ref(q, out=torch.empty(332))


def test_zero_blocks_get_zero_scale_and_zero_codes() -> None:
    x = torch.zeros(300)
    x[290] = 1.0
    q = quantize_ref(x, bits=8, block_size=256)
    assert q.scales[0].item() == 0.0
    assert not q.codes[:256].any()
    assert torch.equal(dequantize_ref(q), x)


def test_shape_is_kept_and_dispatch_agrees(forced_triton: object) -> None:
    x = sample(6 * 50).view(6, 50)
    q = quantize(x, bits=4, block_size=10)
    assert q.shape == x.shape and dequantize(q).shape == x.shape
    assert same_q(q, quantize_ref(x, bits=4, block_size=10))
    buf = x.clone()
    assert same_q(quantize_ef_(buf, bits=4, block_size=10), q)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bits": 3}, "bits must be 8 or 4"),
        ({"bits": 4, "block_size": 3}, "multiple of 2"),
        ({"block_size": 0}, r"\[1, 65536\]"),
        ({"block_size": 1 << 17}, r"\[1, 65536\]"),
    ],
)
def test_bad_parameters_are_rejected_with_the_limit(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        quantize(torch.zeros(8), **kwargs)


def test_bad_inputs_are_rejected() -> None:
    with pytest.raises(TypeError, match="float32"):
        quantize(torch.zeros(8, dtype=torch.int64))
    with pytest.raises(TypeError, match="must be float32"):
        quantize_ef_(torch.zeros(8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="contiguous"):
        quantize_ef_(torch.zeros(8, 8).t())
    q = quantize(torch.ones(10))
    with pytest.raises(ValueError, match="scales must be float32 with 1"):
        dequantize(q._replace(scales=torch.ones(2)))
    with pytest.raises(ValueError, match="codes must be torch.int8 with 10"):
        dequantize(q._replace(codes=q.codes[:9]))


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [8, 4])
def test_public_quantize_on_cuda_gives_the_cpu_wire_bytes(bits: int) -> None:
    x = sample(10_001, seed=9)
    got = quantize(x.cuda(), bits=bits)
    want = quantize_ref(x, bits=bits)
    assert same_q(want, got)
    assert torch.equal(dequantize(got).cpu(), dequantize_ref(want))
