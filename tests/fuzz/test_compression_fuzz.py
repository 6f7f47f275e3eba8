"""Fuzz the SparseLoCo decoder (training/compression.py) with what a hostile peer could send.

Every payload ends in a `Sparse` whose values are finite and whose indices lie inside the buffer
and appear once, or in `CompressedPayloadError`; never another exception, and never an
allocation sized by the sender (the layout comes from this peer's model).
"""

from __future__ import annotations

import os
import tracemalloc

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hyphae.kernels import sparse_values
from hyphae.training.compression import CompressedPayloadError, Compressor, decode, encode

N = int(os.environ.get("HYPHAE_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=N or 300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SHAPES = {"w": torch.Size([40, 25]), "b": torch.Size([37])}  # 1037 elements: 9 chunks of 128, the last short
DTYPES = [torch.int16, torch.int8, torch.uint8, torch.int32, torch.float32, torch.float16, torch.int64]


def _compressor(compression: str) -> Compressor:
    return Compressor(SHAPES, compression=compression, density=0.05, chunk_size=128, error_decay=1.0)


def _tensor(data: bytes, dtype: torch.dtype) -> torch.Tensor:
    size = torch.empty((), dtype=dtype).element_size()
    raw = bytearray(data[: len(data) // size * size])
    if not raw:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).clone()


def _check_outcome(payload: dict, compression: str) -> None:
    lay = _compressor(compression).layout
    tracemalloc.start()
    try:
        sp = decode(payload, lay)
    except CompressedPayloadError:
        return
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < 1 << 20  # torch's own buffers are not traced; Python-side work stays small
    index, values = sparse_values(sp)
    assert torch.isfinite(values).all()
    assert index.numel() == lay.kept and int(index.min()) >= 0 and int(index.max()) < lay.numel
    assert index.unique().numel() == index.numel()


@FUZZ
@given(st.sampled_from(["topk-int8", "topk-2bit"]),
       st.dictionaries(st.sampled_from(["indices", "codes", "scales", "other"]),
                       st.tuples(st.binary(max_size=600), st.sampled_from(DTYPES)), max_size=4))
def test_random_tensors_decode_or_are_refused(compression: str, parts: dict) -> None:
    _check_outcome({k: _tensor(data, dtype) for k, (data, dtype) in parts.items()}, compression)


@FUZZ
@given(st.sampled_from(["topk-int8", "topk-2bit"]), st.integers(0, 2**32 - 1),
       st.lists(st.tuples(st.sampled_from(["indices", "codes", "scales"]), st.integers(0, 400),
                          st.binary(min_size=1, max_size=4)), max_size=6))
def test_mutated_valid_payloads_decode_or_are_refused(compression: str, seed: int, edits: list) -> None:
    g = torch.Generator().manual_seed(seed)
    comp = _compressor(compression)
    payload = {k: v.clone() for k, v in encode(comp.compress({n: torch.randn(s, generator=g) for n, s in
                                                              SHAPES.items()})).items()}
    for name, pos, data in edits:  # overwrite raw bytes anywhere in a tensor
        raw = payload[name].view(torch.uint8)
        for i, byte in enumerate(data):
            if pos + i < raw.numel():
                raw[pos + i] = byte
    _check_outcome(payload, compression)
