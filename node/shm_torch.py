"""The worker's torch side of :mod:`.shm`: tensors into and out of shared-memory segments."""

from __future__ import annotations

from collections.abc import Mapping
from multiprocessing import shared_memory

import numpy as np
import torch

from .ipc import TensorRef
from .shm import ITEM_BYTES, SegmentPool, layout

__all__ = ["pack_torch", "unpack_torch", "DTYPES"]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8,
    "bool": torch.bool,
}
_NAMES = {v: k for k, v in DTYPES.items()}


def pack_torch(tensors: Mapping[str, torch.Tensor], pool: SegmentPool) -> tuple[str, list[TensorRef]]:
    """Copy ``tensors`` into one segment from ``pool``; return its name and the layout."""
    items = []
    for name, t in tensors.items():
        if t.dtype not in _NAMES:
            raise ValueError(f"tensor {name!r} has dtype {t.dtype}, which cannot cross to the daemon")
        items.append((name, _NAMES[t.dtype], tuple(t.shape), t.numel() * t.element_size()))
    refs, total = layout(items)
    seg = pool.acquire(total)
    for ref, t in zip(refs, tensors.values()):
        if ref.nbytes:
            dst = torch.frombuffer(seg.buf, dtype=t.dtype, count=t.numel(), offset=ref.offset)
            dst.copy_(t.detach().reshape(-1))
    return seg.name, refs


def unpack_torch(seg: shared_memory.SharedMemory, refs: list[TensorRef]) -> dict[str, torch.Tensor]:
    """Fresh tensors copied out of ``seg`` (the segment may be reused right after)."""
    out = {}
    for ref in refs:
        dtype = DTYPES[ref.dtype]
        numel = int(np.prod(ref.shape)) if ref.shape else 1
        _check_bounds(seg, ref, numel * ITEM_BYTES[ref.dtype])
        if numel == 0:
            out[ref.name] = torch.empty(ref.shape, dtype=dtype)
            continue
        view = torch.frombuffer(seg.buf, dtype=dtype, count=numel, offset=ref.offset)
        out[ref.name] = view.reshape(ref.shape).clone()
    return out


def _check_bounds(seg: shared_memory.SharedMemory, ref: TensorRef, expected: int) -> None:
    if ref.nbytes != expected or ref.offset + ref.nbytes > seg.size:
        raise ValueError(f"tensor {ref.name!r} ({ref.dtype}{list(ref.shape)}) at {ref.offset}+{ref.nbytes} "
                         f"does not fit segment {seg.name} of {seg.size} bytes")
