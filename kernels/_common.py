"""Helpers shared by the kernels: argument checks, fp32 scalars, per-thread scratch buffers."""

from __future__ import annotations

import operator
import threading
from collections.abc import Sequence

import numpy as np
import torch

MAX_INDEX = 1 << 62  # global element indices stay below this (int64 index math everywhere)


def u64(name: str, value: object) -> int:
    """`value` as an int in [0, 2**64).

    Raises:
        TypeError: not an int (bool counts as not an int).
        ValueError: out of range.
    """
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if not 0 <= v < 1 << 64:
        raise ValueError(f"{name} must be in [0, 2**64), got {v}")
    return v


def fp32_scalar(name: str, value: float) -> float:
    """`value` rounded once to fp32 (nearest-even), as the kernels use it.

    Raises:
        ValueError: the rounded value is not finite (|value| >= ~3.4e38, inf or NaN).
    """
    with np.errstate(over="ignore"):
        r = float(np.float32(value))
    if not np.isfinite(r):
        raise ValueError(f"{name} must be finite in fp32 (|x| < 3.4e38), got {value}")
    return r


def storage_kind(dtype: torch.dtype) -> int:
    """The kernels' code for a parameter dtype: 0 fp32, 1 bf16, 2 fp16.

    Raises:
        TypeError: any other dtype (updates are defined as one fp32 add rounded once to
            storage; fp64 or integer parameters have no such definition here).
    """
    kinds = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
    if dtype not in kinds:
        raise TypeError(f"dtype must be float32, bfloat16 or float16, got {dtype}; cast the tensor")
    return kinds[dtype]


def check_params(params: Sequence[torch.Tensor], offset: int) -> list[int]:
    """Validate a parameter list and return each tensor's global start index.

    Raises:
        TypeError: an entry is not a tensor or has an unsupported dtype.
        ValueError: a tensor is not contiguous, or offset + total numel >= 2**62.
    """
    starts: list[int] = []
    pos = u64("offset", offset)
    for k, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"params[{k}] must be a torch.Tensor, got {type(p).__name__}")
        storage_kind(p.dtype)
        if not p.is_contiguous():
            raise ValueError(f"params[{k}] must be contiguous (in-place update); call .contiguous()")
        starts.append(pos)
        pos += p.numel()
    if pos >= MAX_INDEX:
        raise ValueError(f"offset + total numel must be < 2**62, got {pos}")
    return starts


_local = threading.local()


def scratch(name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A per-thread reusable 1-D buffer of at least `numel` elements (contents undefined).

    Large fresh allocations cost page faults on every call (glibc hands big blocks back to the
    OS), which at these sizes is as slow as the kernel itself; keeping one buffer per purpose
    per thread avoids that. Valid until the next `scratch(name, ...)` call on the same thread.
    """
    pool: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = _local.__dict__.setdefault("pool", {})
    key = (name, dtype, device)
    buf = pool.get(key)
    if buf is None or buf.numel() < numel:
        buf = pool[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]
