"""Import `transformers` (a test-only reference) offline, past this repository's `kernels/` folder.

`python -m pytest` puts the repository root first on sys.path, and there our `kernels/` folder
(installed as `hyphae.kernels`) shadows the `kernels` distribution that transformers imports,
which then fails. The root is taken off sys.path while transformers and the model classes the
tests use are imported; once imported they stay in sys.modules.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


def import_transformers() -> ModuleType:
    """transformers with its Llama, Qwen2 and Mistral classes loaded; skips the test if absent."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may be downloaded, ever
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    shadow = sys.modules.get("kernels")
    if shadow is not None and Path(getattr(shadow, "__file__", None) or ROOT).resolve().parent == ROOT / "kernels":
        del sys.modules["kernels"]
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
    try:
        transformers = pytest.importorskip("transformers", reason="transformers is the reference (pip install -e .[test])")
        pytest.importorskip("kernels")  # the distribution transformers imports (from kernels import Mode, ...)
        for name in ("AutoModelForCausalLM", "LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"):
            getattr(transformers, name)  # the lazy modules import `kernels` now, while it resolves
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    finally:
        sys.path[:] = saved
    return transformers
