"""Receive buffers whose pages are already mapped, reused once nothing references them.

Decrypting into freshly allocated memory runs at half speed (measured here: 5.1 against
10 GB/s for AES-GCM into reused memory), because every first touch of a 4 KiB page faults and
the kernel zeroes it. A daemon receives transfers of the same sizes again and again
(pseudo-gradients, exchanges), so the plane keeps the large buffers it handed out and takes
one back when the tensors made from it are gone: an ``mmap`` whose only references are this
pool's is free (CPython reference counting says so exactly; numpy arrays and memoryviews of
it hold references). Old contents never leak: a buffer is delivered only after every byte of
it was written by the transfer that filled it.
"""

from __future__ import annotations

import mmap
import sys
import time
from dataclasses import dataclass

import numpy as np

__all__ = ["BufferPool"]

_ROUND = 1 << 20
_IDLE_REFS = 2  # the slot's attribute and getrefcount's argument: nothing else holds it


@dataclass
class _Slot:
    memory: mmap.mmap
    used_at: float


class BufferPool:
    """Large receive buffers (>= ``min_bytes``), at most ``max_bytes`` of them kept."""

    def __init__(self, max_bytes: int, *, min_bytes: int = 1 << 20, idle_s: float = 60.0) -> None:
        self.max_bytes = max_bytes
        self.min_bytes = min_bytes
        self.idle_s = idle_s
        self._slots: list[_Slot] = []
        self.kept_bytes = 0
        self.reused = 0

    def take(self, nbytes: int) -> np.ndarray:
        """A writable uint8 array of exactly ``nbytes`` (contents undefined)."""
        if nbytes < self.min_bytes or self.max_bytes <= 0:
            return np.empty(nbytes, dtype=np.uint8)
        size = -(-nbytes // _ROUND) * _ROUND
        for slot in self._slots:
            if size <= len(slot.memory) <= 2 * size and _idle(slot):
                slot.used_at = time.monotonic()
                self.reused += 1
                return np.frombuffer(slot.memory, dtype=np.uint8, count=nbytes)
        memory = mmap.mmap(-1, size)
        self._slots.append(_Slot(memory, time.monotonic()))
        self.kept_bytes += size
        self.trim()
        return np.frombuffer(memory, dtype=np.uint8, count=nbytes)

    def trim(self, now: float | None = None) -> None:
        """Forget the least recently used buffers beyond ``max_bytes``, and idle ones.

        A forgotten buffer still in use stays alive with its tensors and is unmapped with them.
        """
        now = time.monotonic() if now is None else now
        self._slots.sort(key=lambda s: s.used_at)
        keep: list[_Slot] = []
        total = sum(len(s.memory) for s in self._slots)
        for slot in self._slots:
            idle = _idle(slot)
            if total > self.max_bytes or (idle and now - slot.used_at > self.idle_s):
                total -= len(slot.memory)
                if idle:
                    slot.memory.close()
                continue
            keep.append(slot)
        self._slots = keep
        self.kept_bytes = total


def _idle(slot: _Slot) -> bool:
    return sys.getrefcount(slot.memory) <= _IDLE_REFS
