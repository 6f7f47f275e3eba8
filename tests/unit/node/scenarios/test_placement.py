"""Where scenario nodes run: loopback by default, a harness namespace for ``nat``."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from hyphae.node.scenarios._cluster import Cluster, Node, Placement


def test_loopback_command_listens_on_127_and_bootstraps_from_node_0(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, tmp_path / "c.toml", gid_base=None, env={})
    boot = Node(index=0, data_dir=tmp_path / "node-0", train=False, gid=None,
                info={"multiaddrs": ["/ip4/127.0.0.1/tcp/5000/p2p/12D3KooWBoot"]})
    cluster.nodes.append(boot)
    node = Node(index=1, data_dir=tmp_path / "node-1", train=True, gid=None)
    cmd = cluster._command(node)
    assert cmd[cmd.index("--listen") + 1] == "/ip4/127.0.0.1/tcp/0"
    assert cmd[cmd.index("--bootstrap") + 1] == "/ip4/127.0.0.1/tcp/5000/p2p/12D3KooWBoot"
    assert "--no-train" not in cmd and cmd[cmd.index("--api") + 1] == "127.0.0.1:0"
    assert "--no-train" in cluster._command(boot) and "--bootstrap" not in cluster._command(boot)
    assert Placement().connector(node) is None


def test_netns_placement_wraps_in_the_hosts_namespace() -> None:
    nat = pytest.importorskip("hyphae.node.scenarios._nat", reason="the netns harness is not in this checkout")
    fake = SimpleNamespace(ns=lambda host: f"hynat-1-ab-{host}", ip=lambda host: {"p1": "198.51.100.10"}[host])
    placement = nat.NetnsPlacement(fake)
    boot = Node(index=0, data_dir=Path("/x"), train=False, gid=None, host="p1", info={"peer_id": "12D3KooWBoot"})
    node = Node(index=2, data_dir=Path("/y"), train=True, gid=None, host="a1")
    assert placement.wrap(node, ["python", "-m", "hyphae.cli"])[:4] == ["ip", "netns", "exec", "hynat-1-ab-a1"]
    assert placement.listen(node) == "/ip4/0.0.0.0/tcp/4101"
    assert placement.bootstrap_addr(boot) == "/ip4/198.51.100.10/tcp/4101/p2p/12D3KooWBoot"
