"""The ``nat`` scenario: trainers behind two different NATs, a public bootstrap and a relay.

Built on the network-namespace harness of ``deploy/netns/harness.py`` (owned by the NAT
traversal work; loaded from the source tree, as it is not part of the installed package)::

    p1: bootstrap (network-only)      p2: relay (network-only)        198.51.100.0/24
         \\__________________ br0 (the "internet") __________________/
                 ra: cone NAT (MASQUERADE)      rb: symmetric NAT (--random-fully)
                 a1, a2, ... trainers           b1, b2, ... trainers

Each daemon runs inside its host's namespace (``ip netns exec``) and listens on
``0.0.0.0:4101``; its API stays on 127.0.0.1 inside the namespace and the runner reaches it
through a socket opened from inside (``Testnet.connect``), so the root namespace gets no route
into the testnet. The invariants are the usual ones (mesh, run state, progress, checkpoints);
how each pair of trainers across the NATs is connected (direct, relayed, hole-punched; libp2p
and tensor plane) is recorded in the report.
"""

from __future__ import annotations

import importlib.util
import math
import socket
import sys
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from types import ModuleType
from typing import Any

from ._cluster import Node, Placement, ScenarioError
from ._engine import Run, ScenarioOptions

__all__ = ["nat", "nat_placement", "HARNESS"]

HARNESS = Path(__file__).resolve().parents[2] / "deploy" / "netns" / "harness.py"
LISTEN_PORT = 4101

if not HARNESS.exists():  # an installed package without the source tree: no nat scenario
    raise ImportError(f"the netns harness is not at {HARNESS}")


def load_harness() -> ModuleType:
    name = "hyphae_netns_harness"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, HARNESS)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module by name while it loads
    spec.loader.exec_module(module)
    return module


class NetnsPlacement(Placement):
    """Runs each node in its harness host's namespace."""

    name = "netns"

    def __init__(self, testnet: Any) -> None:
        self.testnet = testnet

    def wrap(self, node: Node, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.testnet.ns(node.host), *argv]

    def listen(self, node: Node) -> str:
        return f"/ip4/0.0.0.0/tcp/{LISTEN_PORT}"

    def bootstrap_addr(self, boot: Node) -> str:
        return f"/ip4/{self.testnet.ip(boot.host)}/tcp/{LISTEN_PORT}/p2p/{boot.peer_id}"

    def connector(self, node: Node) -> Callable[[int, float], socket.socket]:
        return lambda port, timeout_s: self.testnet.connect(node.host, ("127.0.0.1", port), timeout_s)


def nat_placement(cleanup: ExitStack, options: ScenarioOptions) -> NetnsPlacement:
    """Build the namespaces (removed when ``cleanup`` unwinds) for ``options.nodes`` trainers."""
    if options.nodes < 2:
        raise ScenarioError(f"nat needs --nodes >= 2 (a trainer behind each NAT), got {options.nodes}")
    harness = load_harness()
    per_cone = math.ceil(options.nodes / 2)
    topology = harness.Topology(public_hosts=2, segments=(harness.Segment("cone", per_cone),
                                                          harness.Segment("symmetric", options.nodes - per_cone)))
    testnet = cleanup.enter_context(harness.Testnet(topology))
    return NetnsPlacement(testnet)


def _private_hosts(testnet: Any) -> list[str]:
    hosts = [h for h in testnet.hosts.values() if h.role == "private"]
    return [h.name for h in sorted(hosts, key=lambda h: (h.segment, h.name))]


def _paths(run: Run, trainers: list[Node]) -> dict[str, Any]:
    """How each trainer reaches each other one: libp2p connection kind and tensor-plane path."""
    by_peer = {n.peer_id: n.name for n in run.cluster.nodes}
    out: dict[str, Any] = {}
    peers = run.cluster.poll(trainers, "/api/v1/peers")
    tensor = run.cluster.poll(trainers, "/api/v1/tensor")
    for node in trainers:
        row: dict[str, Any] = {}
        listed = peers.get(node.index)
        for p in listed.get("peers", []) if isinstance(listed, dict) else []:
            row.setdefault(by_peer.get(p["peer_id"], p["peer_id"][:12]), {})["libp2p"] = p.get("connection")
        stats = tensor.get(node.index)
        for peer_id, st in (stats.get("peers", {}) if isinstance(stats, dict) else {}).items():
            row.setdefault(by_peer.get(peer_id, peer_id[:12]), {})["tensor"] = st.get("path")
        out[node.name] = row
    return out


def nat(run: Run) -> None:
    placement = run.cluster.placement
    if not isinstance(placement, NetnsPlacement):
        raise ScenarioError("the nat scenario runs only on its network-namespace placement")
    testnet = placement.testnet
    boot = run.cluster.add(train=False, host="p1")
    relay = run.cluster.add(train=False, host="p2", wait=False)
    trainers = [run.cluster.add(host=h, wait=False) for h in _private_hosts(testnet)]
    for node in (relay, *trainers):
        run.cluster.wait_ready(node)
    run.report.event("started", hosts={n.name: {"host": n.host, "ip": testnet.ip(n.host),
                                                "nat": testnet.hosts[n.host].nat} for n in run.cluster.nodes},
                     bootstrap=boot.index, relay=relay.index, namespaces=testnet.prefix)
    run.settle("nat")
    run.progress_window("nat", trainers)
    across = [(a, b) for a in trainers for b in trainers
              if testnet.hosts[a.host].segment < testnet.hosts[b.host].segment]

    def connected_across() -> tuple[bool, dict[str, Any]]:
        paths = _paths(run, trainers)
        missing = [f"{a.name}-{b.name}" for a, b in across if b.name not in paths.get(a.name, {})]
        return not missing, {"pairs_not_connected": missing, "paths": paths}

    run.wait("connected_across_nats[nat]", connected_across, limit={"every_cross_nat_pair": "connected"})
    run.report.measurements["paths"] = _paths(run, trainers)
    run.final()
