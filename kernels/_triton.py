"""Whether Triton is usable, and whether a given tensor should take the Triton path.

Triton is optional (the `[gpu]` extra). Every public kernel dispatches per tensor:

* CUDA tensor and Triton importable -> the Triton kernel;
* anything else -> the torch reference (the CPU path, and the oracle).

The Triton code lives in private `_<op>_tl.py` modules that are imported only on first use
(`module()`), for two reasons: importing `hyphae.kernels` must not import Triton, and Triton
decides at decoration time whether a `@triton.jit` function is compiled or interpreted
(`TRITON_INTERPRET=1`). Importing lazily lets a test process set `TRITON_INTERPRET=1` after
other code already imported `hyphae.kernels`, and still get interpreted kernels.

Tests run the Triton kernels on CPU tensors under the interpreter. That is opt-in twice over:
`TRITON_INTERPRET=1` must be set *and* the call must sit inside `force_triton()`. Setting the
variable alone never reroutes CPU work (a whole-suite run with the variable set must not push
every CPU kernel call through the slow interpreter).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
from collections.abc import Iterator
from types import ModuleType

import torch

__all__ = ["force_triton", "interpreting", "module", "triton_available", "use_triton"]

_FORCED: contextvars.ContextVar[bool] = contextvars.ContextVar("hyphae_force_triton", default=False)
_LOADED_MODE: list[bool] = []  # [interpret flag] once the first Triton module was imported


@functools.cache
def triton_available() -> bool:
    """True when `import triton` works (checked once; a broken install counts as absent)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "no Triton", never a crash
        return False
    return True


def interpreting() -> bool:
    """True when Triton kernels run (or will run) under the CPU interpreter.

    Once a Triton module has been imported the answer is frozen: that is the mode its kernels
    were decorated in, whatever the environment says now.
    """
    if _LOADED_MODE:
        return _LOADED_MODE[0]
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


@contextlib.contextmanager
def force_triton() -> Iterator[None]:
    """Route CPU tensors through the Triton kernels (interpreted) inside this block. For tests.

    Raises:
        RuntimeError: Triton is not importable, or TRITON_INTERPRET=1 was not set before the
            first Triton kernel was loaded (compiled Triton cannot read CPU memory).
    """
    if not triton_available():
        raise RuntimeError("force_triton() needs triton installed: pip install 'hyphae[gpu]'")
    if not interpreting():
        raise RuntimeError(
            "force_triton() needs TRITON_INTERPRET=1 set before the first Triton kernel is "
            "loaded; set it at the top of the test process (tests/unit/kernels/conftest.py does)"
        )
    token = _FORCED.set(True)
    try:
        yield
    finally:
        _FORCED.reset(token)


def use_triton(t: torch.Tensor) -> bool:
    """Whether work on `t` takes the Triton path: CUDA tensor + Triton, or forced under test."""
    if not triton_available():
        return False
    if t.is_cuda:
        return True
    return t.device.type == "cpu" and _FORCED.get() and interpreting()


def module(name: str) -> ModuleType:
    """Import `hyphae.kernels._<name>_tl` (the Triton code for op `name`) on first use.

    Raises:
        RuntimeError: Triton is missing, or TRITON_INTERPRET changed after the first Triton
            module was loaded (kernels would be a mix of compiled and interpreted).
    """
    if not triton_available():
        raise RuntimeError(f"the Triton path of {name!r} needs triton: pip install 'hyphae[gpu]'")
    env_mode = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")
    if not _LOADED_MODE:
        _LOADED_MODE.append(env_mode)
    mod = importlib.import_module(f"{__package__}._{name}_tl")
    if env_mode != _LOADED_MODE[0]:
        raise RuntimeError(
            f"TRITON_INTERPRET changed from {int(_LOADED_MODE[0])} to {int(env_mode)} after Triton "
            "kernels were loaded; set it once, before the first kernel call"
        )
    return mod
