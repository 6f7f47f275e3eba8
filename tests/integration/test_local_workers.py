"""Every worker of a node as one member: a real daemon with ``--workers 2`` (two CPU workers)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from hyphae.node.testing import DaemonProcess, sync_wait

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

SMALL = """
[training]
batch_size = 4
seq_len = 64
log_every = 5
eval_every = 10
checkpoint_every = 10
algorithm = "diloco"
algorithm_config = {inner_steps = 5}
"""


def _daemon(tmp_path: Path, *args: str) -> DaemonProcess:
    config = tmp_path / "small.toml"
    config.write_text(SMALL)
    return DaemonProcess(tmp_path / "a", ["--config", str(config), "--workers", "2", *args], train=True)


def _training(d: DaemonProcess) -> dict:
    return d.api("/api/v1/training")


def test_two_cpu_workers_train_as_one_member_and_report_the_nodes_tokens(tmp_path: Path) -> None:
    d = _daemon(tmp_path, "--max-steps", "20").start()
    try:
        t = sync_wait(lambda: (t := _training(d))["step"] >= 10 and t["val_loss"] is not None and t, 150,
                      "10 steps and a validation loss from the group")
        assert t["workers"] == 2 and len(set(t["worker_pids"])) == 2 and t["members"] == [d.peer_id]
        assert t["tokens"] == t["step"] * 4 * 64 * 2  # rank 0 reports, the node counts both workers
        assert t["loss"] > 0 and t["tokens_per_s"] > 0
        assert d.wait(150) == 0
    finally:
        d.kill()
    log = d.log()
    assert "training finished at step 20" in log and "stopped cleanly" in log
    assert sorted(int(p.name.split("-")[1]) for p in (d.data_dir / "checkpoints").glob("step-*"))[-1] == 20


@pytest.mark.slow  # ~40 s; the two-worker training test above stays in the default tier
def test_a_killed_worker_restarts_the_group_and_ctrl_c_resumes_both(tmp_path: Path) -> None:
    d = _daemon(tmp_path).start()
    try:
        first = sync_wait(lambda: (t := _training(d))["checkpoint_step"] and t, 150, "a first group checkpoint")
        os.kill(first["worker_pids"][1], signal.SIGKILL)  # not rank 0: the group still restarts as one
        again = sync_wait(lambda: (t := _training(d))["worker_restarts"] == 1 and t["step"] > first["step"] and t,
                          150, "the restarted group making progress")
        assert not set(again["worker_pids"]) & set(first["worker_pids"])
        assert "training worker 1 of 2 exited with code -9" in d.log()
        d.signal(signal.SIGINT)
        assert d.wait(20) == 0
        saved = sorted(int(p.name.split("-")[1]) for p in (d.data_dir / "checkpoints").glob("step-*"))[-1]
        assert saved >= again["step"]
        d.start()
        sync_wait(lambda: _training(d)["step"] > saved, 150, "both workers training past the saved step")
        assert f"training resumed from the checkpoint at step {saved}" in d.log()
    finally:
        d.kill()
