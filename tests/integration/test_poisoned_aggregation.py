"""One member of a 4-daemon DiLoCo run sends NaN in every exchange: with the default (checked)
aggregation the other three refuse it, report it (its score drops on each of them), their
weights stay finite and their loss keeps falling.

The poisoner is a real daemon: its worker runs with the test-only switch
``HYPHAE_TEST_ONLY_POISON_EXCHANGES=nan`` (node/worker_comm.py), so it sends NaN for every
tensor it exchanges while training normally itself.
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path

import pytest
import torch

from hyphae.node.testing import DaemonProcess, sync_wait
from hyphae.node.worker_comm import TEST_ONLY_POISON_ENV
from hyphae.training import CheckpointStore

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

CONFIG = """
[training]
algorithm = "diloco"
preset = "tiny"
batch_size = 4
seq_len = 64
log_every = 5
eval_every = 0
checkpoint_every = 10

[training.algorithm_config]
inner_steps = 5
timeout_s = 20.0
inner = { lr = 3e-3, warmup_steps = 5 }
"""
STEPS = 30


def _t(d: DaemonProcess) -> dict:
    for attempt in range(5):  # a loaded machine can take seconds to answer
        try:
            return d.api("/api/v1/training")
        except TimeoutError:
            if attempt == 4:
                raise
    raise AssertionError("unreachable")


def _weights(d: DaemonProcess, step: int) -> dict[str, torch.Tensor]:
    store = CheckpointStore(d.data_dir / "checkpoints")
    return store.load(step).weights


@pytest.mark.slow  # four training daemons for ~90 s; tests/unit/training/test_robust*.py cover the rule quickly
def test_a_nan_member_of_four_diloco_daemons_is_refused_and_the_others_keep_learning(tmp_path: Path) -> None:
    config = tmp_path / "diloco.toml"
    config.write_text(CONFIG)
    args = ["--config", str(config)]
    nodes: list[DaemonProcess] = []
    try:
        nodes.append(DaemonProcess(tmp_path / "n0", args, train=True).start())
        boot = [*args, "--bootstrap", nodes[0].multiaddr]
        for i in (1, 2):
            nodes.append(DaemonProcess(tmp_path / f"n{i}", boot, train=True).start())
        os.environ[TEST_ONLY_POISON_ENV] = "nan"  # the daemon and its worker inherit it at spawn
        try:
            poisoner = DaemonProcess(tmp_path / "poisoner", boot, train=True).start()
        finally:
            del os.environ[TEST_ONLY_POISON_ENV]
        nodes.append(poisoner)
        honest = nodes[:3]
        sync_wait(lambda: all(len(_t(n)["members"]) == 4 for n in nodes), 120, "4 trainers in every view")
        sync_wait(lambda: all((_t(n)["checkpoint_step"] or 0) >= STEPS for n in honest), 480,
                  f"a checkpoint at step {STEPS} on every honest member")
        assert "TEST ONLY" in poisoner.log()
        states = {n.data_dir.name: _t(n) for n in honest}
        scores = {n.data_dir.name: n.api("/api/v1/peers/scores")["peers"] for n in honest}
    finally:
        for n in nodes:
            n.kill()

    for name, t in states.items():
        algo = t["algorithm_state"]
        assert algo.get("rejected_updates", 0) >= 1 and algo.get("refused_peers") == [poisoner.peer_id], (name, algo)
        assert algo["outer_steps"] >= STEPS // 5, (name, algo)
        losses = [h["loss"] for h in t["history"] if h["loss"] is not None]
        assert all(torch.isfinite(torch.tensor(losses))), (name, losses)
        first, last = statistics.mean(losses[:2]), statistics.mean(losses[-2:])
        assert last < first - 0.5, (name, losses)  # the loss keeps falling
        score = scores[name].get(poisoner.peer_id, {})
        assert score.get("score", 0) <= -50 and "training update refused" in score.get("last", ""), (name, score)
        assert not any(p != poisoner.peer_id and s["score"] <= -50 for p, s in scores[name].items()), scores[name]
    for n in honest:
        assert all(bool(torch.isfinite(t).all()) for t in _weights(n, STEPS).values()), n.data_dir.name
