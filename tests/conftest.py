"""Shared test configuration: the two tiers, and markers that skip with a clear reason.

* Tiers: ``python -m pytest`` runs the default tier; tests marked ``slow`` are deselected unless
  asked for (``-m slow``, any other ``-m``, ``--all``, or a test named by its node id).
* ``@pytest.mark.tools("iptables", ...)``: skipped, naming the ``apt-get install`` that brings
  them, where a system tool is missing (the table is ``tests/_requires.py``).
* ``root``: skipped unless root; ``gpu``: skipped without CUDA.
* ``HYPHAE_SKIP_REPORT=FILE``: every skipped test is written there as a JSON line (node id, its
  markers, the reason), so ``.ci/run`` can fail when, as root, a root or tool test was skipped.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/_requires.py, imported by name


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


# Triton fixes interpreted-or-compiled when a kernel is decorated. tests/unit/kernels/conftest.py
# sets this too, but only when its folder is collected: modules collected before it (the
# integration tests come first) could load Triton code compiled-mode, and then 85 kernel tests
# failed with "Cannot call @triton.jit'd outside of the scope of a kernel". So set it here, first.
if "TRITON_INTERPRET" not in os.environ and not _cuda_available():
    os.environ["TRITON_INTERPRET"] = "1"

import _requires  # noqa: E402

pytest_plugins = ["pytester"]  # tests/unit/test_environment.py runs this conftest on scratch tests

REQUIRED_IN_CI = ("root", "tools")
"""Markers of tests that ``.ci/run`` as root installs everything for: a skip there is a failure."""


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--all", action="store_true", dest="all_tiers",
                     help="run the slow tier too (same as adding the tests of `-m slow`)")


def _run_slow(config: pytest.Config) -> bool:
    return bool(config.getoption("all_tiers") or config.getoption("markexpr")
                or any("::" in str(arg) for arg in config.args))


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto`` (the default, see pyproject): one worker per core, at least 4. Most tests
    wait on daemons and timers, so 4 workers on 2 cores finish sooner than 2."""
    return max(4, os.cpu_count() or 1)


TRAINING_DAEMONS = ("test_training_daemon.py", "test_local_workers.py", "test_dashboard.py", "test_real_model_daemon.py",
                    "test_worker_ipc_spoof.py", "test_algorithms_daemons.py", "test_poisoned_aggregation.py",
                    "test_crash_safety.py")
"""Integration modules whose daemons train. Their tests share one xdist worker (one at a time): side
by side, with CPU load on 2 cores, their daemons' APIs missed the 5 s deadline of the test helper."""


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the xdist_group marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in TRAINING_DAEMONS and item.path.parent.name == "integration":
            item.add_marker(pytest.mark.xdist_group("training-daemons"))
    if not _run_slow(config):
        slow = [item for item in items if "slow" in item.keywords]
        if slow:
            config.hook.pytest_deselected(items=slow)
            items[:] = [item for item in items if "slow" not in item.keywords]
    is_root = hasattr(os, "geteuid") and os.geteuid() == 0
    cuda: bool | None = None
    lacking: dict[tuple[str, ...], list[_requires.Tool]] = {}
    for item in items:
        if "root" in item.keywords and not is_root:
            item.add_marker(pytest.mark.skip(reason="needs root (network namespaces, iptables): run as root"))
        names = tuple(n for mark in item.iter_markers("tools") for n in mark.args)
        if names:
            if names not in lacking:
                lacking[names] = _requires.missing(names)
            if lacking[names]:
                item.add_marker(pytest.mark.skip(reason=_requires.skip_reason(lacking[names])))
        if "gpu" in item.keywords:
            if cuda is None:
                cuda = _cuda_available()
            if not cuda:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU (run bench/gpu_check.sh on one)"))


_skipped: list[dict[str, object]] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and os.environ.get("HYPHAE_SKIP_REPORT"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        markers = sorted(k for k in ("root", "tools", "gpu", "slow") if k in report.keywords)
        _skipped.append({"nodeid": report.nodeid, "markers": markers, "reason": reason,
                         "required_in_ci": any(m in markers for m in REQUIRED_IN_CI)})


def pytest_sessionfinish(session: pytest.Session) -> None:
    path = os.environ.get("HYPHAE_SKIP_REPORT")
    if path and not hasattr(session.config, "workerinput"):  # the xdist controller gets every report
        with open(path, "a", encoding="utf-8") as f:
            for row in _skipped:
                f.write(json.dumps(row) + "\n")
