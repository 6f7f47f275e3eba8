"""``hyphae testnet``: N real daemons on loopback that all see each other; down stops only them."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from hyphae.node.client import ApiClient, pid_alive
from hyphae.node.testing import process_cpu_s

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

IDLE_WINDOW_S = 10.0
IDLE_CPU_LIMIT = 0.25  # of one core for the whole testnet; measured ~0.08 for 8 nodes


def hyphae(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hyphae.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow  # 8 daemons and a CPU-idle window, ~45-60 s
def test_testnet_of_8_meshes_idles_quietly_and_goes_down(tmp_path, make_daemon) -> None:
    root = tmp_path / "net"
    up = hyphae("testnet", "up", "--nodes", "8", "--dir", str(root), "--json")
    try:
        assert up.returncode == 0, up.stderr
        nodes = json.loads(up.stdout)["nodes"]
        ids = {n["peer_id"] for n in nodes}
        for n in nodes:
            seen = {p["peer_id"] for p in ApiClient(n["api_url"]).peers() if p["agent"]}
            assert seen == ids - {n["peer_id"]}, f"node {n['index']} sees {len(seen)} of 7"

        pids = [n["pid"] for n in nodes]
        before = sum(process_cpu_s(p) for p in pids)
        time.sleep(IDLE_WINDOW_S)
        idle = (sum(process_cpu_s(p) for p in pids) - before) / IDLE_WINDOW_S
        print(f"idle CPU of the 8-node testnet: {idle:.3f} of one core")
        assert idle < IDLE_CPU_LIMIT

        status = hyphae("testnet", "status", "--dir", str(root), "--json")
        assert all(row["alive"] and row["peers"] == 7 for row in json.loads(status.stdout))

        bystander = make_daemon("bystander")  # a daemon the testnet did not start
        decoy = subprocess.Popen(["sleep", "60"])  # a pid that is not a hyphae daemon
        state = json.loads((root / "testnet.json").read_text())
        state["nodes"].append({**state["nodes"][0], "index": 99, "pid": decoy.pid})
        (root / "testnet.json").write_text(json.dumps(state))

        down = hyphae("testnet", "down", "--dir", str(root))
        assert down.returncode == 0 and "stopped 8 node(s)" in down.stdout, down.stdout + down.stderr
        assert not any(pid_alive(p) for p in pids)
        assert bystander.proc.poll() is None and decoy.poll() is None
        decoy.kill()
    finally:
        hyphae("testnet", "down", "--dir", str(root))


def test_testnet_up_reports_a_node_that_cannot_start(tmp_path) -> None:
    root = tmp_path / "net"
    (root / "node-0").mkdir(parents=True)
    (root / "node-0" / "identity.key").write_text("garbage")
    up = hyphae("testnet", "up", "--nodes", "2", "--dir", str(root), "--timeout", "20")
    assert up.returncode == 1
    assert "node 0" in up.stderr and "not a PEM private key" in up.stderr
