"""Shared-memory tensor transfer: bit-exact both ways, reused segments, bounds checked."""

import numpy as np
import pytest
import torch

from hyphae.node.ipc import TensorRef
from hyphae.node.shm import ITEM_BYTES, Attachments, SegmentPool, numpy_views, write_numpy
from hyphae.node.shm_torch import DTYPES, pack_torch, unpack_torch
from hyphae.node.tensor_bytes import from_float64, to_float64


def test_dtype_tables_agree() -> None:
    assert set(DTYPES) == set(ITEM_BYTES)
    for name, dtype in DTYPES.items():
        assert torch.empty((), dtype=dtype).element_size() == ITEM_BYTES[name]


def test_worker_to_daemon_to_worker_is_bit_exact() -> None:
    worker_pool, daemon_pool = SegmentPool("hytest-w"), SegmentPool("hytest-d")
    daemon_side, worker_side = Attachments(), Attachments()
    try:
        tensors = {
            "w": torch.randn(3, 5),
            "b": torch.randn(7, dtype=torch.float64),
            "h": torch.randn(4, 4).to(torch.bfloat16),
            "i": torch.arange(5, dtype=torch.int64),
            "empty": torch.empty(0, 3),
        }
        name, refs = pack_torch(tensors, worker_pool)
        views = numpy_views(daemon_side.get(name), refs)
        echoed = {r.name: (r.dtype, r.shape, views[r.name].copy()) for r in refs}
        del views
        reply, reply_refs = write_numpy(echoed, daemon_pool)
        out = unpack_torch(worker_side.get(reply), reply_refs)
        for key, t in tensors.items():
            assert out[key].dtype == t.dtype and out[key].shape == t.shape
            assert torch.equal(out[key].view(torch.uint8) if t.numel() else out[key], t.view(torch.uint8) if t.numel() else t)
        worker_pool.release(name)
        again, _ = pack_torch({"w": torch.zeros(2)}, worker_pool)
        assert again == name  # a released segment that fits is reused
    finally:
        daemon_side.close()
        worker_side.close()
        worker_pool.close()
        daemon_pool.close()


def test_refs_outside_the_segment_are_refused() -> None:
    pool, att = SegmentPool("hytest-b"), Attachments()
    try:
        name, _ = pack_torch({"w": torch.zeros(4)}, pool)
        seg = att.get(name)
        with pytest.raises(ValueError, match="overruns"):
            numpy_views(seg, [TensorRef("w", "float32", (4,), seg.size, 16)])
        with pytest.raises(ValueError, match="does not fit"):
            unpack_torch(seg, [TensorRef("w", "float32", (5,), 0, 16)])
    finally:
        att.close()
        pool.close()


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_float64_round_trip_matches_torch_casting(dtype: str) -> None:
    values = torch.randn(1000, dtype=torch.float64) * 100
    expected = values.to(DTYPES[dtype])
    raw = from_float64(values.numpy(), dtype)
    assert bytes(raw) == expected.view(torch.uint8).numpy().tobytes()
    back = to_float64(raw, dtype)
    assert np.array_equal(back, expected.to(torch.float64).numpy())
