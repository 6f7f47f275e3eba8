"""z(seed, i): Philox-4x32-10 Rademacher perturbations, the same bits everywhere (ALGORITHMS §3)."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest
import torch

from hyphae.kernels import _triton, derive_seed, rademacher, rademacher_like, rademacher_ref
from hyphae.kernels.perturb import philox4x32_10_ref, rademacher_triton

M32 = 0xFFFFFFFF

# Random123 kat_vectors: philox4x32 10 <ctr x4> <key x2> -> <out x4>
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((M32,) * 4, (M32, M32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


def philox_py(ctr: tuple[int, ...], key: tuple[int, int]) -> tuple[int, ...]:
    """Textbook Philox-4x32-10 on Python ints: the independent oracle."""
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & M32, (p0 >> 32) ^ c3 ^ k1, p0 & M32
        k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
    return c0, c1, c2, c3


def z_py(seed: int, i: int) -> float:
    """The documented definition of z(seed, i), one element at a time."""
    block = i >> 7
    words = philox_py((block & M32, block >> 32, 0, 0), (seed & M32, seed >> 32))
    return -1.0 if (words[(i >> 5) & 3] >> (i & 31)) & 1 else 1.0


@pytest.mark.parametrize(("ctr", "key", "out"), KAT)
def test_reference_philox_matches_random123_known_answers(ctr, key, out) -> None:
    t = [torch.tensor([v], dtype=torch.int64) for v in (*ctr, *key)]
    assert tuple(int(w) for w in philox4x32_10_ref(*t)) == out
    assert philox_py(ctr, key) == out


@pytest.mark.parametrize("seed", [0, 1, 0x0123456789ABCDEF, 2**64 - 1])
def test_reference_z_matches_the_elementwise_definition(seed: int) -> None:
    indices = [0, 1, 31, 32, 127, 128, 129, 1000, 4095, 2**33 + 5, 2**40 + 77]
    for i in indices:
        assert rademacher_ref(seed, 1, offset=i).item() == z_py(seed, i), (seed, i)


def test_z_is_pinned_so_old_logs_replay() -> None:
    # Changing the generator silently would make every stored ZO log replay to other weights.
    z = rademacher_ref(0x0123456789ABCDEF, 64)
    assert "".join("1" if v < 0 else "0" for v in z.tolist()) == (
        "0111010001000100000010100001110111010010000011010011000110100011"
    )


def test_z_values_are_exactly_plus_minus_one_and_balanced() -> None:
    n = 200_003
    z = rademacher_ref(7, n)
    assert set(z.unique().tolist()) == {-1.0, 1.0}
    assert abs(z.sum().item()) < 5 * n**0.5  # mean within 5 sigma of 0


def test_different_seeds_give_different_z() -> None:
    n = 10_000
    zs = [rademacher_ref(s, n) for s in (1, 2, 2**32 + 1, 2**63 + 1)]  # also differ only in hi key
    for a in range(len(zs)):
        for b in range(a + 1, len(zs)):
            agree = (zs[a] == zs[b]).float().mean().item()
            assert 0.45 < agree < 0.55, (a, b, agree)


def test_z_depends_only_on_the_global_index() -> None:
    full = rademacher_ref(99, 1500)
    for offset, n in [(0, 1), (3, 250), (127, 2), (128, 300), (1001, 499)]:
        assert torch.equal(rademacher_ref(99, n, offset=offset), full[offset : offset + n])


def test_rademacher_like_covers_the_flattened_list_in_order() -> None:
    params = [torch.zeros(3, 5), torch.zeros(7, dtype=torch.bfloat16), torch.zeros(2, 2, 2, dtype=torch.float16)]
    zs = rademacher_like(params, 5, offset=10)
    flat = torch.cat([z.float().reshape(-1) for z in zs])
    assert [z.shape for z in zs] == [p.shape for p in params]
    assert [z.dtype for z in zs] == [p.dtype for p in params]
    assert torch.equal(flat, rademacher_ref(5, 30, offset=10))


_CHILD = """
import hashlib, sys, torch
from hyphae.kernels import rademacher_like
params = [torch.zeros(1000), torch.zeros(33, 7, dtype=torch.bfloat16), torch.zeros(5)]
zs = rademacher_like(params, int(sys.argv[1]), offset=3)
print(hashlib.sha256(b"".join(z.float().numpy().tobytes() for z in zs)).hexdigest())
"""


def test_a_second_process_regenerates_identical_z() -> None:
    """ALGORITHMS §3 oracle 1: z regenerated in another process is bit-identical."""
    seed = derive_seed("run", 12, "peer", 3)
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(seed)], capture_output=True, text=True, timeout=120, check=True
    )
    params = [torch.zeros(1000), torch.zeros(33, 7, dtype=torch.bfloat16), torch.zeros(5)]
    zs = rademacher_like(params, seed, offset=3)
    here = hashlib.sha256(b"".join(z.float().numpy().tobytes() for z in zs)).hexdigest()
    assert out.stdout.strip() == here


def test_derive_seed_is_stable_and_separates_its_inputs() -> None:
    assert derive_seed("run-0", 0, "peer-a", 0) == 3860950137565433376  # pinned: logs depend on it
    seeds = {
        derive_seed("run-0", 0, "peer-a", 0),
        derive_seed("run-0", 1, "peer-a", 0),
        derive_seed("run-0", 0, "peer-b", 0),
        derive_seed("run-0", 0, "peer-a", 1),
        derive_seed("run-1", 0, "peer-a", 0),
        derive_seed("run-0a", 0, "peer-", 0),  # length prefixes: no ambiguity at the seams
    }
    assert len(seeds) == 6
    assert all(0 <= s < 2**64 for s in seeds)


@pytest.mark.parametrize(
    ("args", "exc"),
    [
        (("run", -1, "peer", 0), ValueError),
        (("run", 0, "peer", 2**64), ValueError),
        ((b"run", 0, "peer", 0), TypeError),
        (("run", 1.5, "peer", 0), TypeError),
        (("run", True, "peer", 0), TypeError),
    ],
)
def test_derive_seed_rejects_bad_inputs(args, exc) -> None:
    with pytest.raises(exc):
        derive_seed(*args)


def test_bad_seed_or_range_is_rejected_with_the_limit() -> None:
    with pytest.raises(ValueError, match=r"\[0, 2\*\*64\)"):
        rademacher_ref(2**64, 4)
    with pytest.raises(ValueError, match="numel must be >= 0"):
        rademacher_ref(1, -1)
    with pytest.raises(ValueError, match="2\\*\\*62"):
        rademacher_ref(1, 4, offset=2**62)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        rademacher_ref(1, 4, dtype=torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("numel", "offset"), [(1, 0), (129, 0), (1000, 61), (4097, 128), (9000, 2**35 + 3), (300, 2**40 + 5)]
)
def test_triton_z_matches_reference_bit_exact(triton_device: str, dtype, numel: int, offset: int) -> None:
    seed = 0xFEDCBA9876543210
    got = rademacher_triton(seed, numel, offset=offset, dtype=dtype, device=triton_device)
    assert torch.equal(got.cpu(), rademacher_ref(seed, numel, offset=offset, dtype=dtype))


def test_rademacher_fills_a_given_buffer() -> None:
    out = torch.full((3, 100), 7.0, dtype=torch.bfloat16)
    got = rademacher_ref(11, 300, offset=9, out=out)
    assert got is out
    assert torch.equal(out.view(-1), rademacher_ref(11, 300, offset=9, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="contiguous tensor of 301 elements"):
        rademacher_ref(11, 301, out=out)


def test_public_rademacher_dispatches_and_agrees(forced_triton: object) -> None:
    assert _triton.use_triton(torch.empty(1))
    assert torch.equal(rademacher(3, 777, offset=5), rademacher_ref(3, 777, offset=5))


def test_cpu_tensors_take_the_reference_unless_forced() -> None:
    assert not _triton.use_triton(torch.empty(1))


def test_importing_the_kernels_does_not_import_triton() -> None:
    """Triton is optional and loaded on first GPU use (and decides interpret mode only then)."""
    code = "import sys, hyphae.kernels; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"
