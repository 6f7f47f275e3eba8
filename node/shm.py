"""Tensors in shared memory between the daemon and its workers (no pickling, no socket copies).

This module has no torch (the daemon never imports it); the worker's torch side is
:mod:`.shm_torch`.

Ownership rule: **the writer owns the segment**. The worker creates the segments it writes call
arguments into; the daemon creates the segments it writes replies into. The reader only
attaches. A segment is busy from the moment its owner writes until the reader says it is done
(the reply for a call segment; a :class:`~.ipc.Release` for a reply segment), then it is
reused for the next transfer that fits.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping
from multiprocessing import resource_tracker, shared_memory

import numpy as np

from .ipc import TensorRef

__all__ = ["SegmentPool", "Attachments", "layout", "numpy_views", "write_numpy", "ITEM_BYTES"]

log = logging.getLogger(__name__)

ALIGN = 64

ITEM_BYTES: dict[str, int] = {
    "float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int64": 8, "int32": 4, "int16": 2,
    "int8": 1, "uint8": 1, "bool": 1,
}
"""The dtypes that may cross between daemon and worker, with their element sizes."""


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class SegmentPool:
    """Segments this process writes into, reused once their reader is done with them."""

    def __init__(self, prefix: str) -> None:
        self._prefix = prefix
        self._free: list[shared_memory.SharedMemory] = []
        self._busy: dict[str, shared_memory.SharedMemory] = {}

    def acquire(self, nbytes: int) -> shared_memory.SharedMemory:
        fits = [s for s in self._free if s.size >= nbytes]
        if fits:
            seg = min(fits, key=lambda s: s.size)
            self._free.remove(seg)
        else:
            name = f"{self._prefix}-{secrets.token_hex(6)}"
            seg = shared_memory.SharedMemory(name=name, create=True, size=max(_aligned(nbytes), ALIGN))
        self._busy[seg.name] = seg
        return seg

    def release(self, name: str) -> None:
        seg = self._busy.pop(name, None)
        if seg is not None:
            self._free.append(seg)

    def close(self) -> None:
        """Unlink every segment (idempotent)."""
        for seg in [*self._free, *self._busy.values()]:
            _close_quietly(seg)
            try:
                seg.unlink()
            except FileNotFoundError:
                pass
        self._free.clear()
        self._busy.clear()


class Attachments:
    """Segments another process owns, attached on first use and kept until :meth:`close`."""

    def __init__(self) -> None:
        self._segs: dict[str, shared_memory.SharedMemory] = {}

    def get(self, name: str) -> shared_memory.SharedMemory:
        seg = self._segs.get(name)
        if seg is None:
            seg = shared_memory.SharedMemory(name=name, create=False)
            # Python < 3.13 registers attached segments with the resource tracker, which would
            # unlink them when *this* process exits: the owner decides their lifetime, not us.
            resource_tracker.unregister(seg._name, "shared_memory")  # type: ignore[attr-defined]
            self._segs[name] = seg
        return seg

    def forget(self, name: str) -> None:
        seg = self._segs.pop(name, None)
        if seg is not None:
            _close_quietly(seg)

    def close(self) -> None:
        for seg in self._segs.values():
            _close_quietly(seg)
        self._segs.clear()


def _close_quietly(seg: shared_memory.SharedMemory) -> None:
    """Unmap ``seg``; if a view of it is still alive, leave the mapping to the garbage collector
    (the name is unlinked either way, so nothing outlives the processes)."""
    try:
        seg.close()
    except BufferError:
        log.debug("segment %s still has live views; it is unmapped when they go", seg.name)


def layout(items: list[tuple[str, str, tuple[int, ...], int]]) -> tuple[list[TensorRef], int]:
    refs, offset = [], 0
    for name, dtype, shape, nbytes in items:
        refs.append(TensorRef(name, dtype, shape, offset, nbytes))
        offset = _aligned(offset + nbytes)
    return refs, offset


def numpy_views(seg: shared_memory.SharedMemory, refs: list[TensorRef]) -> dict[str, np.ndarray]:
    """Zero-copy read-only byte views of each tensor (the daemon moves bytes, not values)."""
    out = {}
    for ref in refs:
        if ref.dtype not in ITEM_BYTES:
            raise ValueError(f"tensor {ref.name!r} has unknown dtype {ref.dtype!r}")
        if ref.offset + ref.nbytes > seg.size:
            raise ValueError(f"tensor {ref.name!r} overruns segment {seg.name}")
        view = np.frombuffer(seg.buf, dtype=np.uint8, count=ref.nbytes, offset=ref.offset)
        view.flags.writeable = False
        out[ref.name] = view
    return out


def write_numpy(blobs: Mapping[str, tuple[str, tuple[int, ...], np.ndarray | bytes | memoryview]],
                pool: SegmentPool) -> tuple[str, list[TensorRef]]:
    """Copy raw tensor bytes ``name -> (dtype, shape, data)`` into a segment (daemon side)."""
    items = []
    for name, (dtype, shape, data) in blobs.items():
        items.append((name, dtype, tuple(shape), memoryview(data).nbytes))
    refs, total = layout(items)
    seg = pool.acquire(total)
    for ref, (_, _, data) in zip(refs, blobs.values()):
        seg.buf[ref.offset:ref.offset + ref.nbytes] = memoryview(data).cast("B")
    return seg.name, refs
