"""Chunked top-k with error feedback: the selection rule, the codes, the residual, paths agree."""

from __future__ import annotations

import pytest
import torch

from hyphae.kernels import Sparse, SparseLayout, sparse_topk_ef_, sparse_topk_ef_ref_, sparse_values
from hyphae.kernels.sparse import sparse_topk_ef_triton_

CASES = [(1, 4096, 41, 8), (257, 16, 16, 2), (1000, 64, 5, 2), (5000, 4096, 41, 8), (300, 100, 7, 8), (77, 8, 3, 2)]


def sample(n: int, seed: int = 0) -> torch.Tensor:
    """Heavy-tailed values with a run of zeros and a run of exact ties: the cases a rule must settle."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.rand(n, generator=g).pow(3)
    if n > 120:
        x[5:40] = 0.0
        x[100:110] = 0.5
        x[110:115] = -0.5
    return x


def brute_force(x: torch.Tensor, chunk: int, k: int) -> list[int]:
    """Per chunk, offsets of the k largest |x|, ties to the lower offset, listed in increasing order."""
    out: list[int] = []
    for start in range(0, x.numel(), chunk):
        seg = x[start : start + chunk].tolist()
        best = sorted(range(len(seg)), key=lambda i: (-abs(seg[i]), i))[: min(k, len(seg))]
        out += sorted(best)
    return out


def dense(sp: Sparse) -> torch.Tensor:
    out = torch.zeros(sp.layout.numel)
    index, values = sparse_values(sp)
    out.index_add_(0, index, values)
    return out


@pytest.mark.parametrize(("n", "chunk", "k", "bits"), CASES)
def test_reference_keeps_the_largest_magnitudes_ties_to_the_lower_index(n: int, chunk: int, k: int, bits: int) -> None:
    x = sample(n, seed=n)
    sp = sparse_topk_ef_ref_(x.clone(), SparseLayout(n, chunk, k, bits))
    assert sp.indices.dtype == torch.int16 and sp.indices.numel() == sp.layout.kept
    assert sp.indices.tolist() == brute_force(x, chunk, k)


@pytest.mark.parametrize(("n", "chunk", "k", "bits"), CASES)
def test_residual_is_exactly_what_was_not_sent(n: int, chunk: int, k: int, bits: int) -> None:
    x = sample(n, seed=n + 1)
    buf = x.clone()
    sp = sparse_topk_ef_ref_(buf, SparseLayout(n, chunk, k, bits))
    assert torch.equal(buf, x - dense(sp))
    kept = torch.zeros(n, dtype=torch.bool)
    kept[sparse_values(sp)[0]] = True
    assert torch.equal(buf[~kept], x[~kept])  # entries not sent are untouched


def test_int8_values_are_within_half_a_step() -> None:
    x = sample(8192, seed=3)
    sp = sparse_topk_ef_ref_(x.clone(), SparseLayout(8192, 4096, 100, 8))
    index, values = sparse_values(sp)
    step = sp.scales[torch.div(torch.arange(index.numel()), 100, rounding_mode="floor")]
    assert ((values - x[index]).abs() <= step / 2 * (1 + 1e-6)).all()
    assert torch.equal(sp.scales, torch.stack([x[:4096].abs().max(), x[4096:].abs().max()]) / 127)


def test_two_bit_codes_pack_four_per_byte_low_bits_first() -> None:
    x = torch.tensor([4.0, -4.0, 1.0, -1.0, 3.5, 0.0, 0.0, 0.0])  # absmax 4: scale 2
    sp = sparse_topk_ef_ref_(x.clone(), SparseLayout(8, 8, 5, 2))
    assert sp.indices.tolist() == [0, 1, 2, 3, 4] and sp.scales.tolist() == [2.0]
    # q = +2, -2, +1 (0.5 -> 1 at least), -1, +2 (1.75 -> 2); codes 3, 0, 2, 1 | 3 (+ padding 0)
    assert sp.codes.tolist() == [3 | 0 << 2 | 2 << 4 | 1 << 6, 3]
    assert sparse_values(sp)[1].tolist() == [4.0, -4.0, 2.0, -2.0, 4.0]


def test_an_all_zero_chunk_sends_zeros_and_keeps_zeros() -> None:
    buf = torch.zeros(64)
    sp = sparse_topk_ef_ref_(buf, SparseLayout(64, 32, 4, 8))
    assert sp.scales.tolist() == [0.0, 0.0] and sp.indices.tolist() == [0, 1, 2, 3] * 2
    assert not buf.any() and not sparse_values(sp)[1].any()


@pytest.mark.parametrize(("n", "chunk", "k", "bits"), CASES)
def test_triton_matches_reference(triton_device: str, n: int, chunk: int, k: int, bits: int) -> None:
    x = sample(n, seed=n + 2)
    lay = SparseLayout(n, chunk, k, bits)
    a, b = x.clone(), x.clone().to(triton_device)
    ref, got = sparse_topk_ef_ref_(a, lay), sparse_topk_ef_triton_(b, lay)
    for field in ("indices", "codes", "scales"):
        assert torch.equal(getattr(ref, field), getattr(got, field).cpu()), field
    assert torch.equal(a, b.cpu())  # the same residual, bit for bit


def test_public_function_takes_the_triton_path_when_forced(forced_triton: None) -> None:
    x = sample(600, seed=9)
    lay = SparseLayout(600, 128, 9, 8)
    a, b = x.clone(), x.clone()
    ref, got = sparse_topk_ef_ref_(a, lay), sparse_topk_ef_(b, lay)
    assert torch.equal(ref.indices, got.indices) and torch.equal(a, b)


@pytest.mark.parametrize(
    ("layout", "message"),
    [(SparseLayout(10, 0, 1, 8), "chunk must be in"), (SparseLayout(10, 1 << 16, 1, 8), "chunk must be in"),
     (SparseLayout(10, 8, 9, 8), "k must be in"), (SparseLayout(10, 8, 0, 8), "k must be in"),
     (SparseLayout(10, 8, 2, 4), "bits must be 8 or 2")],
)
def test_bad_layouts_name_the_field(layout: SparseLayout, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sparse_topk_ef_(torch.zeros(10), layout)


def test_buffer_must_be_flat_fp32_of_the_layout_size() -> None:
    lay = SparseLayout(16, 8, 2, 8)
    with pytest.raises(TypeError, match="float32"):
        sparse_topk_ef_(torch.zeros(16, dtype=torch.float64), lay)
    with pytest.raises(ValueError, match="16 elements"):
        sparse_topk_ef_(torch.zeros(15), lay)
    with pytest.raises(ValueError, match="flat and contiguous"):
        sparse_topk_ef_(torch.zeros(4, 4), lay)
