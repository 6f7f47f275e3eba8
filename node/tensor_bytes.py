"""Raw tensor bytes <-> float64 arrays, for reductions done in the daemon (no torch here).

bfloat16 has no numpy dtype: its 16 bits are the top half of a float32, so it widens by a shift
and narrows by rounding to nearest even on the dropped half, exactly as torch does.
"""

from __future__ import annotations

import numpy as np

__all__ = ["to_float64", "from_float64", "NUMPY_DTYPES"]

NUMPY_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "float64": np.dtype(np.float64),
    "int64": np.dtype(np.int64), "int32": np.dtype(np.int32), "int16": np.dtype(np.int16),
    "int8": np.dtype(np.int8), "uint8": np.dtype(np.uint8), "bool": np.dtype(np.bool_),
}


def to_float64(raw: np.ndarray | bytes | memoryview, dtype: str) -> np.ndarray:
    """Interpret ``raw`` bytes as ``dtype`` and widen to float64 (flat)."""
    buf = np.frombuffer(raw, dtype=np.uint8)
    if dtype == "bfloat16":
        return (buf.view(np.uint16).astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    if dtype not in NUMPY_DTYPES:
        raise ValueError(f"cannot reduce tensors of dtype {dtype!r}")
    return buf.view(NUMPY_DTYPES[dtype]).astype(np.float64)


def from_float64(values: np.ndarray, dtype: str) -> np.ndarray:
    """Narrow float64 ``values`` to ``dtype`` and return its raw bytes as a uint8 array."""
    if dtype == "bfloat16":
        bits = values.astype(np.float32).view(np.uint32)
        rounded = bits + 0x7FFF + ((bits >> 16) & 1)  # round to nearest, ties to even
        nan = np.isnan(values)
        out = (rounded >> 16).astype(np.uint16)
        out[nan] = 0x7FC0
        return out.view(np.uint8)
    if dtype not in NUMPY_DTYPES:
        raise ValueError(f"cannot reduce tensors of dtype {dtype!r}")
    target = NUMPY_DTYPES[dtype]
    if target.kind in "iub":
        values = np.rint(values)
    return values.astype(target).view(np.uint8)
