"""Which workers a node starts: ``--workers N`` CPU workers, ``--gpus`` one per GPU, and the checks."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from hyphae.node import ipc
from hyphae.node.training_config import ConfigError, TrainConfig, parse_gpus
from hyphae.node.worker_group import AUTO_DEVICE, node_totals, worker_devices


def test_workers_n_without_gpus_are_n_cpu_workers() -> None:
    assert worker_devices(TrainConfig(workers=3)) == ["cpu"] * 3


def test_a_lone_worker_picks_its_device_itself_and_the_daemon_loads_no_torch() -> None:
    assert worker_devices(TrainConfig()) == [AUTO_DEVICE]  # the worker takes GPU 0 where there is one
    code = ("import sys; from hyphae.node.training_config import TrainConfig; "
            "from hyphae.node.worker_group import worker_devices; "
            "worker_devices(TrainConfig()); worker_devices(TrainConfig(workers=2)); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("gpus", ["all", "0", "0,1"])
def test_gpus_on_a_machine_without_cuda_is_refused_naming_the_fix(gpus: str) -> None:
    with pytest.raises(ConfigError, match=r"needs CUDA.*--workers N"):
        worker_devices(TrainConfig(gpus=gpus))


@pytest.mark.parametrize(("text", "parsed"), [("", ()), ("all", None), ("0", (0,)), (" 1, 0 ", (1, 0))])
def test_gpu_lists_parse(text: str, parsed: tuple[int, ...] | None) -> None:
    assert parse_gpus(text) == parsed


@pytest.mark.parametrize("text", ["0,0", "x", "-1", "0;1", "1,"])
def test_bad_gpu_lists_are_config_errors(text: str) -> None:
    with pytest.raises(ConfigError, match="training.gpus"):
        TrainConfig(gpus=text)


def test_workers_must_match_the_gpus_listed() -> None:
    assert TrainConfig(gpus="0,1").workers == 1  # left at its default: one per GPU
    assert TrainConfig(gpus="0,1", workers=2).gpus == "0,1"
    with pytest.raises(ConfigError, match="workers is 3 but training.gpus lists 2"):
        TrainConfig(gpus="0,1", workers=3)


@pytest.mark.parametrize("algorithm", ["zo", "dadao"])
def test_algorithms_that_cannot_run_in_lockstep_are_refused_with_several_workers(algorithm: str) -> None:
    assert TrainConfig(algorithm=algorithm).workers == 1
    with pytest.raises(ConfigError, match="cannot run on several workers"):
        TrainConfig(algorithm=algorithm, workers=2)


def test_workers_come_from_the_config_file_as_integers_only() -> None:
    assert TrainConfig.from_dict({"workers": 2, "gpus": ""}).workers == 2
    for bad in ({"workers": "2"}, {"workers": True}, {"workers": 0}, {"gpus": 1}):
        with pytest.raises(ConfigError):
            TrainConfig.from_dict(bad)


def test_the_nodes_progress_counts_every_workers_tokens() -> None:
    p = ipc.Progress(kind="log", step=10, tokens=1000, elapsed_s=1.0, tokens_per_s=500.0)
    assert node_totals(p, 1) is p
    two = node_totals(p, 2)
    assert (two.tokens, two.tokens_per_s, two.step) == (2000, 1000.0, 10)
