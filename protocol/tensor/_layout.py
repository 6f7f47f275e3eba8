"""The inputs of an all-reduce as one flat vector of one float dtype, and conversions.

Pure helpers of :mod:`.allreduce`: views (no copies) of the inputs covering a chunk, float64
accumulation of untrusted parts (checked for size and dtype first), and the way back.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import ProtocolViolation
from .codecs import bf16_to_f32, f32_to_bf16
from .spec import FLOAT_DTYPES, Tensor, TensorSpec, check_unique_names, numpy_dtype

__all__ = ["Layout", "flat_tensor", "to_f64", "from_f64"]


class Layout:
    """The inputs seen as one flat vector of one float dtype, and back."""

    def __init__(self, tensors: Sequence[Tensor]) -> None:
        if not tensors:
            raise ValueError("all-reduce needs at least one tensor")
        check_unique_names(t.spec for t in tensors)
        dtypes = {t.spec.dtype for t in tensors}
        if len(dtypes) != 1 or not dtypes <= set(FLOAT_DTYPES):
            raise ValueError(f"all-reduce tensors must share one float dtype ({', '.join(FLOAT_DTYPES)}), got "
                             f"{sorted(dtypes)}: call once per dtype")
        self.tensors = list(tensors)
        self.dtype = dtypes.pop()
        self.offsets = np.cumsum([0] + [t.spec.numel for t in tensors]).tolist()
        self.numel = self.offsets[-1]

    def pieces(self, lo: int, hi: int) -> list[Tensor]:
        """Views of the inputs covering flat elements [lo, hi) (no copy)."""
        out: list[Tensor] = []
        size = self.tensors[0].spec.itemsize
        for i, t in enumerate(self.tensors):
            a, b = max(lo, self.offsets[i]), min(hi, self.offsets[i + 1])
            if a < b:
                start = (a - self.offsets[i]) * size
                out.append(Tensor(TensorSpec(str(len(out)), self.dtype, (b - a,)), t.data[start:start + (b - a) * size]))
        return out

    def unflatten(self, flat: np.ndarray) -> list[Tensor]:
        view = memoryview(flat.view(np.uint8))
        size = self.tensors[0].spec.itemsize
        return [Tensor(t.spec, view[self.offsets[i] * size:self.offsets[i + 1] * size])
                for i, t in enumerate(self.tensors)]


def flat_tensor(name: str, dtype: str, values: np.ndarray) -> Tensor:
    return Tensor.from_buffer(TensorSpec(name, dtype, (values.size,)), values)


def to_f64(tensors: list[Tensor], dtype: str, numel: int) -> np.ndarray:
    """A member's part as float64, checking it is what the chunk needs (peers are untrusted)."""
    if any(t.spec.dtype != dtype for t in tensors) or sum(t.spec.numel for t in tensors) != numel:
        raise ProtocolViolation(f"a part of {sum(t.spec.numel for t in tensors)} elements of "
                                f"{sorted({t.spec.dtype for t in tensors})}, expected {numel} of {dtype}")
    out = np.empty(numel, dtype=np.float64)
    off = 0
    for t in tensors:
        raw = np.frombuffer(t.data, dtype=numpy_dtype(dtype))
        out[off:off + raw.size] = bf16_to_f32(raw) if dtype == "bfloat16" else raw
        off += raw.size
    return out


def from_f64(values: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return f32_to_bf16(values.astype(np.float32))
    return values.astype(numpy_dtype(dtype))

