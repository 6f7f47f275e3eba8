"""Kernel tests: run the Triton kernels under Triton's CPU interpreter where there is no GPU.

TRITON_INTERPRET=1 is set here, at collection time, unless CUDA is available (there the
compiled kernels run on the GPU in the `gpu`-marked tests) or the variable is already set.
hyphae.kernels imports its Triton modules lazily, so this works even when other tests imported
hyphae.kernels first. Setting it only routes CPU tensors to Triton inside `force_triton()`;
every other CPU caller in the session keeps the torch reference path.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from hyphae.kernels import _triton  # noqa: E402  (after the variable is set)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def triton_device(request: pytest.FixtureRequest) -> str:
    """The device whose tensors the Triton kernels get: CPU (interpreter) or CUDA (compiled)."""
    if not _triton.triton_available():
        pytest.skip("triton is not installed (pip install -e '.[test]' brings it); reference-only here")
    if request.param == "cpu" and not _triton.interpreting():
        pytest.skip("Triton runs compiled in this process (CUDA present): the gpu tests cover the kernels")
    if request.param == "cuda" and _triton.interpreting():
        pytest.skip("TRITON_INTERPRET=1 is set: unset it to run the compiled kernels on the GPU")
    return request.param


@pytest.fixture
def forced_triton() -> Iterator[None]:
    """Route CPU tensors through the (interpreted) Triton kernels via the public functions."""
    if not _triton.triton_available():
        pytest.skip("triton is not installed (pip install -e '.[test]' brings it)")
    if not _triton.interpreting():
        pytest.skip("Triton runs compiled in this process: CPU tensors cannot take the Triton path")
    with _triton.force_triton():
        yield
