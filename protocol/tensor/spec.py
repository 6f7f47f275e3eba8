"""Tensors as the tensor plane sees them: a :class:`TensorSpec` (name, dtype, shape) and bytes.

``protocol/`` never imports torch, so a tensor crosses this layer as its raw bytes (any
C-contiguous buffer: a numpy array, a ``memoryview`` of a torch tensor's storage, ``bytes``)
plus the spec that says how to read them. Bytes are the machine's native little-endian layout;
``bfloat16`` has no numpy dtype and is carried as its 16-bit patterns (a ``uint16`` view).

Everything here is pure and cheap: the spec is what a receiver checks *before* it allocates.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "DTYPE_BYTES",
    "FLOAT_DTYPES",
    "MAX_DIMS",
    "MAX_NAME_CHARS",
    "Tensor",
    "TensorSpec",
    "numpy_dtype",
]

DTYPE_BYTES: dict[str, int] = {
    "float32": 4, "float16": 2, "bfloat16": 2, "float64": 8,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1, "bool": 1,
}
"""Every dtype the wire knows, with its element size."""

FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
MAX_NAME_CHARS = 256
MAX_DIMS = 8

_NUMPY = {
    "float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2"),
    "float64": np.dtype("<f8"), "int64": np.dtype("<i8"), "int32": np.dtype("<i4"),
    "int16": np.dtype("<i2"), "int8": np.dtype("i1"), "uint8": np.dtype("u1"), "bool": np.dtype("?"),
}
_FROM_NUMPY = {v: k for k, v in _NUMPY.items() if k != "bfloat16"}


def numpy_dtype(dtype: str) -> np.dtype:
    """The numpy dtype that holds ``dtype``'s bytes (``uint16`` for ``bfloat16``)."""
    try:
        return _NUMPY[dtype]
    except KeyError:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {dtype!r}") from None


@dataclass(frozen=True)
class TensorSpec:
    """What a tensor is, without its bytes: enough to check sizes before allocating.

    Raises:
        ValueError: empty or over-long name, unknown dtype, more than :data:`MAX_DIMS` dims, or
            a negative dimension.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not 0 < len(self.name) <= MAX_NAME_CHARS:
            raise ValueError(f"tensor name must be 1-{MAX_NAME_CHARS} characters, got {self.name!r:.80}")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype of {self.name!r} must be one of {', '.join(DTYPE_BYTES)}, got {self.dtype!r}")
        shape = tuple(self.shape)
        if len(shape) > MAX_DIMS:
            raise ValueError(f"{self.name!r} has {len(shape)} dims, limit {MAX_DIMS}")
        for d in shape:
            if isinstance(d, bool) or not isinstance(d, int | np.integer) or d < 0:
                raise ValueError(f"{self.name!r} has dimension {d!r}; dimensions must be ints >= 0")
        object.__setattr__(self, "shape", tuple(int(d) for d in shape))

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    def to_wire(self) -> list[Any]:
        return [self.name, self.dtype, list(self.shape)]


@dataclass(frozen=True)
class Tensor:
    """A named tensor's bytes: ``data`` is a flat unsigned-byte ``memoryview`` of ``spec.nbytes``.

    Build one with :meth:`from_numpy` or :meth:`from_buffer`; both keep a view of the caller's
    memory (no copy), so the caller must not change it while a send is in progress.
    """

    spec: TensorSpec
    data: memoryview

    @classmethod
    def from_buffer(cls, spec: TensorSpec, buffer: Any) -> Tensor:
        """Wrap any C-contiguous buffer holding ``spec.nbytes`` bytes.

        Raises:
            ValueError: the buffer is not C-contiguous or has the wrong size.
        """
        view = memoryview(buffer)
        if not view.c_contiguous:
            raise ValueError(f"{spec.name!r}: buffer is not C-contiguous; pass np.ascontiguousarray(x) or x.contiguous()")
        if view.nbytes == 0:
            view = memoryview(b"")  # memoryview cannot cast a view with a zero in its shape
        elif view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        if view.nbytes != spec.nbytes:
            raise ValueError(f"{spec.name!r}: buffer holds {view.nbytes} bytes, spec {spec.dtype}{list(spec.shape)} "
                             f"needs {spec.nbytes}")
        return cls(spec, view)

    @classmethod
    def from_numpy(cls, name: str, array: np.ndarray, *, dtype: str | None = None) -> Tensor:
        """Wrap a numpy array (no copy). ``dtype="bfloat16"`` reads a ``uint16`` array as bf16.

        Raises:
            ValueError: unsupported or mismatched dtype, or a non-contiguous array.
        """
        if dtype is None:
            dtype = _FROM_NUMPY.get(array.dtype)
            if dtype is None:
                raise ValueError(f"{name!r}: numpy dtype {array.dtype} has no wire dtype; use one of {', '.join(DTYPE_BYTES)}")
        elif array.dtype.itemsize != DTYPE_BYTES.get(dtype, -1):
            raise ValueError(f"{name!r}: array of {array.dtype} cannot hold {dtype!r}")
        return cls.from_buffer(TensorSpec(name, dtype, tuple(array.shape)), array)

    def numpy(self) -> np.ndarray:
        """A typed numpy view of the bytes (``uint16`` for bfloat16), shaped as the spec says."""
        return np.frombuffer(self.data, dtype=numpy_dtype(self.spec.dtype)).reshape(self.spec.shape)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tensor) and self.spec == other.spec and self.data == other.data

    __hash__ = None  # type: ignore[assignment]


def check_unique_names(specs: Iterable[TensorSpec]) -> None:
    """Raise ValueError when two tensors of one transfer share a name."""
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise ValueError(f"tensor name {spec.name!r} appears twice in one transfer; names must be unique")
        seen.add(spec.name)
