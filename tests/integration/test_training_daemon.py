"""A training daemon for real: worker process, shared-memory IPC, checkpoints, restarts."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from hyphae.node.testing import DaemonProcess, sync_wait

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

SMALL = """
[training]
batch_size = 4
seq_len = 64
log_every = 5
eval_every = 10
checkpoint_every = 10
algorithm = "ddp"
"""


def training_daemon(tmp_path: Path, name: str, *args: str) -> DaemonProcess:
    config = tmp_path / "small.toml"
    config.write_text(SMALL)
    return DaemonProcess(tmp_path / name, ["--config", str(config), *args], train=True)


def checkpoint_steps(d: DaemonProcess) -> list[int]:
    root = d.data_dir / "checkpoints"
    return sorted(int(p.name.split("-")[1]) for p in root.glob("step-*")) if root.exists() else []


def test_join_trains_and_leaves_after_max_steps(tmp_path) -> None:
    d = training_daemon(tmp_path, "a", "--max-steps", "20").start()
    try:
        assert d.wait(120) == 0
    finally:
        d.kill()
    log = d.log()
    assert "training finished at step 20" in log and "stopped cleanly" in log
    assert checkpoint_steps(d)[-1] == 20


def test_progress_is_served_ctrl_c_saves_and_restart_resumes(tmp_path) -> None:
    d = training_daemon(tmp_path, "a").start()
    try:
        t = sync_wait(lambda: _training(d, lambda t: t["step"] >= 10 and t["val_loss"] is not None), 90,
                      "10 steps and a validation loss")
        assert t["algorithm"] == "ddp" and t["preset"] == "tiny" and t["state"] == "running"
        assert t["loss"] > 0 and t["tokens_per_s"] > 0 and t["members"] == [d.peer_id]
        d.signal(signal.SIGINT)
        assert d.wait(10) == 0
        saved = checkpoint_steps(d)[-1]
        assert saved >= 10
        d.start()
        sync_wait(lambda: _training(d, lambda t: t["step"] > saved), 90, "training past the saved step")
        assert f"training resumed from the checkpoint at step {saved}" in d.log()
    finally:
        d.kill()


def test_killed_worker_is_restarted_and_training_continues(tmp_path) -> None:
    d = training_daemon(tmp_path, "a").start()
    try:
        first = sync_wait(lambda: _training(d, lambda t: t["step"] >= 10 and t["checkpoint_step"]), 90,
                          "a first checkpoint")
        os.kill(first["worker_pid"], signal.SIGKILL)
        again = sync_wait(lambda: _training(d, lambda t: t["worker_restarts"] == 1 and t["step"] > first["step"]),
                          90, "a restarted worker making progress")
        assert again["worker_pid"] != first["worker_pid"]
        assert d.api("/api/v1/node")["peer_id"] == d.peer_id  # the daemon itself never went down
        assert "training worker exited with code -9" in d.log()
    finally:
        d.kill()


def _training(d: DaemonProcess, predicate):
    t = d.api("/api/v1/training")
    return t if predicate(t) else None


DILOCO = """
[training]
algorithm = "diloco"
batch_size = 4
seq_len = 64
log_every = 5
eval_every = 0
checkpoint_every = 10
[training.algorithm_config]
inner_steps = 10
timeout_s = 60.0
"""


def test_two_daemons_run_diloco_together_and_end_bit_identical(tmp_path) -> None:
    config = tmp_path / "diloco.toml"
    config.write_text(DILOCO)
    a = DaemonProcess(tmp_path / "a", ["--config", str(config), "--max-steps", "30"], train=True).start()
    b = DaemonProcess(tmp_path / "b", ["--config", str(config), "--max-steps", "30", "--bootstrap", a.multiaddr],
                      train=True)
    try:
        b.start()
        seen = sync_wait(lambda: _training(a, lambda t: len(t["members"]) == 2), 60, "a counting b as a trainer")
        assert set(seen["members"]) == {a.peer_id, b.peer_id}
        assert a.wait(180) == 0 and b.wait(180) == 0
    finally:
        a.kill()
        b.kill()
    assert checkpoint_steps(a)[-1] == 30 and checkpoint_steps(b)[-1] == 30
    # After an outer step every replica holds the same slow weights: the checkpoints agree bit for bit.
    manifest = lambda d: (d.data_dir / "checkpoints" / "step-00000030" / "manifest.json").read_text()
    import json
    assert json.loads(manifest(a))["weights_sha256"] == json.loads(manifest(b))["weights_sha256"]
