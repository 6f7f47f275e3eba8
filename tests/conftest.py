"""Shared test configuration: markers that skip with a clear reason where they cannot run."""

import os
import shutil

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    is_root = hasattr(os, "geteuid") and os.geteuid() == 0
    has_ip = shutil.which("ip") is not None
    for item in items:
        if "root" in item.keywords and not (is_root and has_ip):
            item.add_marker(pytest.mark.skip(reason="needs root and iproute2 (network namespaces)"))
        if "gpu" in item.keywords:
            try:
                import torch

                ok = torch.cuda.is_available()
            except ImportError:
                ok = False
            if not ok:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU (run bench/gpu_check.sh on one)"))
