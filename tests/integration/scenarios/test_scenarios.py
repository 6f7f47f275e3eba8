"""The scripted scenarios pass in CI size: a few nodes, the tiny preset, batch 4, seq 64, H = 4.

Each test runs one scenario end to end with real daemons and asserts that its report shows
every invariant held. The reports are copied to ``test-artifacts/scenarios/<name>.json`` (or
``$HYPHAE_TEST_ARTIFACTS``) so a CI run keeps the evidence: events with timestamps, and each
check's measured values and limits.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import _requires
import pytest

from hyphae.node.scenarios import SCENARIOS, MissingTool, ScenarioOptions, run_scenario

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ARTIFACTS = Path(os.environ.get("HYPHAE_TEST_ARTIFACTS", Path(__file__).resolve().parents[3] / "test-artifacts"))


def _run(name: str, tmp_path: Path, nodes: int) -> dict:
    try:
        report = run_scenario(name, root=tmp_path / name, options=ScenarioOptions(nodes=nodes),
                              json_path=ARTIFACTS / "scenarios" / f"{name}.json").to_json()
    except MissingTool as exc:  # raised before anything started; any other failure fails the test
        pytest.skip(str(exc))
    failed = [f"{c['name']}: {json.dumps(c['measured'])[:400]}" for c in report["checks"] if not c["passed"]]
    assert report["error"] is None, report["error"]
    assert not failed, "\n".join(failed)
    assert report["passed"]
    return report


def _no_leftovers(tmp_path: Path) -> None:
    """Every daemon the scenario started is gone, and no iptables chain of ours is left."""
    leftover = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _cmd_mentions(p, str(tmp_path))]
    assert not leftover, f"processes left running: {leftover}"
    if os.geteuid() == 0 and _requires.find("iptables"):
        rules = subprocess.run(["iptables", "-S"], capture_output=True, text=True).stdout
        assert f"HYXP{os.getpid()}" not in rules and f"HYXQ{os.getpid()}" not in rules


def _cmd_mentions(proc: Path, text: str) -> bool:
    try:
        return text.encode() in (proc / "cmdline").read_bytes()
    except OSError:
        return False


@pytest.mark.timeout(420)
def test_churn_kill_and_add_30_percent_every_node_catches_up(tmp_path: Path) -> None:
    report = _run("churn", tmp_path, nodes=3)
    kinds = [e["kind"] for e in report["events"]]
    assert kinds.count("kill") == 1 and kinds.count("add") == 1 and kinds.count("restart") == 1
    names = {c["name"] for c in report["checks"]}
    assert {"caught_up[node-3]", "caught_up[node-4]", "resumed_at_or_after_checkpoint[node-3]",
            "checkpoints_verify"} <= names
    _no_leftovers(tmp_path)


@pytest.mark.root
@pytest.mark.tools("iptables")
@pytest.mark.timeout(420)
def test_partition_each_side_trains_alone_then_everyone_converges(tmp_path: Path) -> None:
    report = _run("partition", tmp_path, nodes=4)
    assert [e["kind"] for e in report["events"]][-2:] == ["partition", "heal"]
    assert sum(report["measurements"]["partition_rule_packets"].values()) > 0  # the rules did drop packets
    _no_leftovers(tmp_path)


@pytest.mark.root
@pytest.mark.tools("iptables")
@pytest.mark.timeout(420)
def test_wan_delay_and_loss_slow_training_but_do_not_stop_it(tmp_path: Path) -> None:
    report = _run("wan", tmp_path, nodes=3)
    emulator = report["measurements"]["link_emulator"]
    assert emulator["dropped"] > 0 and emulator["packets"] > emulator["dropped"]
    assert sum(e["kind"] == "netem" for e in report["events"]) == 3
    _no_leftovers(tmp_path)


@pytest.mark.root
@pytest.mark.tools("ip", "iptables", "tc", "sysctl")
@pytest.mark.timeout(420)
def test_nat_two_nats_and_a_relay_train_together(tmp_path: Path) -> None:
    if "nat" not in SCENARIOS:
        pytest.skip("the network-namespace harness (deploy/netns/harness.py) is not in this checkout")
    _run("nat", tmp_path, nodes=4)
    _no_leftovers(tmp_path)
