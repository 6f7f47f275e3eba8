"""NoLoCo, A²CiD² (dadao), SPES and ZO across real daemons on loopback: worker processes, shared
memory, the tensor plane, the run state — with a member killed and another joining mid-run."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from hyphae.node.testing import DaemonProcess, sync_wait

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

BASE = """
[training]
algorithm = "{algorithm}"
preset = "{preset}"
batch_size = 4
seq_len = 64
log_every = 5
eval_every = 0
checkpoint_every = 10
{extra}
[training.algorithm_config]
{algo}
"""

ALGO = {
    "noloco": ("tiny", "", "inner_steps = 10\ntimeout_s = 8.0"),
    # The worker computes in a thread, so a tick is attended on time but touches the weights
    # only between steps: a gossip waits up to a step (5 trainers on 2 cores: ~2 s) for them.
    "dadao": ("tiny", "", "gossip_interval_s = 2.0\ntimeout_s = 12.0"),
}


def _daemons(tmp_path: Path, algorithm: str) -> tuple[Path, list[DaemonProcess]]:
    preset, extra, algo = ALGO[algorithm]
    config = tmp_path / f"{algorithm}.toml"
    config.write_text(BASE.format(algorithm=algorithm, preset=preset, extra=extra, algo=algo))
    return config, []


def _t(d: DaemonProcess) -> dict:
    """/api/v1/training; on a machine this loaded an answer may take seconds, so retry."""
    for attempt in range(5):
        try:
            return d.api("/api/v1/training")
        except TimeoutError:
            if attempt == 4:
                raise
    raise AssertionError("unreachable")


def _max_log_gap_s(d: DaemonProcess, since: float) -> float:
    times = [h["t"] for h in _t(d)["history"] if h["t"] >= since]
    return max((b - a for a, b in zip(times, times[1:])), default=0.0)


@pytest.mark.parametrize("algorithm", ["noloco", "dadao"])
def test_four_daemons_keep_training_through_a_kill_and_a_join(tmp_path, algorithm: str) -> None:
    config, nodes = _daemons(tmp_path, algorithm)
    args = ["--config", str(config)]
    try:
        first = DaemonProcess(tmp_path / "n0", args, train=True).start()
        nodes.append(first)
        for i in (1, 2, 3):
            nodes.append(DaemonProcess(tmp_path / f"n{i}", [*args, "--bootstrap", first.multiaddr], train=True).start())
        sync_wait(lambda: all(len(_t(n)["members"]) == 4 for n in nodes), 90, "4 trainers in every view")
        sync_wait(lambda: all(_t(n)["step"] >= 20 for n in nodes), 180, "20 steps everywhere")

        victim, live = nodes[3], nodes[:3]
        victim.signal(signal.SIGKILL)
        victim.wait(10)
        killed_at = time.time()
        before = {n.peer_id: _t(n)["step"] for n in live}
        sync_wait(lambda: all(_t(n)["step"] >= before[n.peer_id] + 20 for n in live), 240,
                  "every live member 20 steps past the kill")
        deadline = float(ALGO[algorithm][2].split("timeout_s = ")[1])
        for n in live:  # a log line every 5 steps: no gap may exceed the partner deadline by much
            assert _max_log_gap_s(n, killed_at) < deadline + 15, (n.peer_id, _max_log_gap_s(n, killed_at))

        joiner = DaemonProcess(tmp_path / "n4", [*args, "--bootstrap", first.multiaddr], train=True).start()
        nodes.append(joiner)
        sync_wait(lambda: _t(joiner)["step"] >= 10, 240, "the joiner training")
        if algorithm == "noloco":
            assert "took the run's weights" in joiner.log()
            state = _t(live[0])["algorithm_state"]
            assert state["outer_steps"] >= 4
        else:
            # Right after a kill and a join, pairings that name the dead peer (until membership
            # marks it gone) or that differ between views fail by timeout; the others go on, and
            # every member, the joiner included, gossips again.
            gossips = {n.peer_id: _t(n)["algorithm_state"].get("gossips", 0) for n in [*live, joiner]}
            try:
                sync_wait(lambda: all(_t(n)["algorithm_state"].get("gossips", 0) > gossips[n.peer_id]
                                      for n in [*live, joiner]), 150, "a new gossip on every member")
            except AssertionError as exc:
                states = {n.data_dir.name: _t(n)["algorithm_state"] for n in [*live, joiner]}
                raise AssertionError(f"{exc}; gossip state: {states}") from None
        steps = {n.peer_id: _t(n)["step"] for n in live}
        sync_wait(lambda: all(_t(n)["step"] > steps[n.peer_id] for n in live), 120, "everyone still training")
    finally:
        for n in nodes:
            n.kill()


def _start_group(tmp_path: Path, config: Path, n: int, *extra: str) -> list[DaemonProcess]:
    args = ["--config", str(config), *extra]
    nodes = [DaemonProcess(tmp_path / "n0", args, train=True).start()]
    for i in range(1, n):
        nodes.append(DaemonProcess(tmp_path / f"n{i}", [*args, "--bootstrap", nodes[0].multiaddr], train=True).start())
    return nodes


def _final_weights(d: DaemonProcess, step: int) -> str:
    import json

    return json.loads((d.data_dir / "checkpoints" / f"step-{step:08d}" / "manifest.json").read_text())["weights_sha256"]


@pytest.mark.xfail(strict=False, reason=(
    "known race, not fixed yet: a daemon counts as a trainer in members() as soon as it starts, so "
    "at SPES's first all-reduce some nodes split the shared weights over 3 members and others over "
    "4; the round times out and the nodes end apart. Fails the same at 3556b81 and at HEAD; the ZO "
    "twin of this race was fixed by Strategy.catch_up (4489c02). The fix is an agreed round group."))
def test_four_daemons_run_spes_and_end_bit_identical(tmp_path) -> None:
    config = tmp_path / "spes.toml"
    config.write_text(BASE.format(algorithm="spes", preset="tiny-moe", extra="",
                                  algo="sync_steps = 10\nmerge_interval = 10\ntimeout_s = 60.0"))
    nodes = _start_group(tmp_path, config, 4, "--max-steps", "30")
    try:
        sync_wait(lambda: all(len(_t(n)["members"]) == 4 for n in nodes), 90, "4 trainers in every view")
        owned = sync_wait(lambda: _all_owned(nodes), 300, "every node to own its experts")
        for n in nodes:
            assert n.wait(400) == 0
    finally:
        for n in nodes:
            n.kill()
    weights = {_final_weights(n, 30) for n in nodes}
    assert len(weights) == 1, "after the last sync every node holds the same model"
    assert all(owned) and sum(len(o) for o in owned) == 8 and set().union(*owned) == set(range(8))


def _all_owned(nodes: list[DaemonProcess]) -> list[set[int]] | None:
    """Each node's owned experts once all four report them after the first sync."""
    owned = []
    for n in nodes:
        t = _t(n)
        experts = t.get("algorithm_state", {}).get("owned_experts")
        if not experts or t["step"] < 10:
            return None
        owned.append(set(experts))
    return owned if sum(len(o) for o in owned) == 8 else None


PRETRAIN = """
[training]
algorithm = "ddp"
batch_size = 8
seq_len = 64
log_every = 10
eval_every = 100
checkpoint_every = 100
"""

# lr 1e-3 is too noisy for 0.84M parameters from a pretrained start (measured in-process from the
# same 200-step checkpoint, 4 peers, 60 steps: val 2.551 -> 2.561); 3e-4 with two projected
# gradients per peer-step lowered it in every one of three seeds (2.540-2.544).
ZO = """
[training]
algorithm = "zo"
batch_size = 8
seq_len = 64
log_every = 5
eval_every = 30
checkpoint_every = 30
init_from = "{init}"
[training.algorithm_config]
lr = 3e-4
perturbations = 2
snapshot_steps = 10
timeout_s = 20.0
run_id = "zo-test"
"""


def test_zo_with_four_daemons_lowers_the_loss_of_a_pretrained_checkpoint(tmp_path) -> None:
    pre_cfg = tmp_path / "pre.toml"
    pre_cfg.write_text(PRETRAIN)
    pre = DaemonProcess(tmp_path / "pre", ["--config", str(pre_cfg), "--max-steps", "200"], train=True).start()
    try:
        assert pre.wait(400) == 0
    finally:
        pre.kill()
    pretrained_val = _last_val(pre)
    zo_cfg = tmp_path / "zo.toml"
    zo_cfg.write_text(ZO.format(init=pre.data_dir / "checkpoints"))
    nodes = _start_group(tmp_path, zo_cfg, 4, "--max-steps", "60")
    try:
        sync_wait(lambda: all(len(_t(n)["members"]) == 4 for n in nodes), 90, "4 trainers in every view")
        for n in nodes:
            assert n.wait(400) == 0
    finally:
        for n in nodes:
            n.kill()
    finals = [_last_val(n) for n in nodes]
    assert all(v < pretrained_val for v in finals), (pretrained_val, finals)
    # Every peer rebuilds the same canonical weights at the last boundary: a peer that joined
    # after the first steps replayed the log and counts run steps from there (Strategy.catch_up),
    # so it stops at the same run step and its step-60 checkpoint is the same boundary.
    hashes = [_final_weights(n, 60) for n in nodes]
    assert len(set(hashes)) == 1, hashes


def _last_val(d: DaemonProcess) -> float:
    import re

    found = re.findall(r"validation loss ([0-9.]+)", d.log())
    assert found, d.log()[-2000:]
    return float(found[-1])
