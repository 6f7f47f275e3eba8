"""Bare hyphae hosts behind real NATs (network namespaces, root): what each one says about itself.

The daemon's HTTP API shows connections (direct / relayed) but not yet the reachability verdict,
so these tests drive ``deploy/netns/peer.py`` hosts, which answer with ``Host.reachability()``
and the tensor plane's path. Each test builds its own testnet and removes it, whatever happens.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from harness import Segment, Testnet, Topology
from nodes import NetnsPeer, wait_until

pytestmark = [pytest.mark.root, pytest.mark.tools("ip", "iptables", "tc", "sysctl"), pytest.mark.integration, pytest.mark.timeout(180)]

QUICK_CHECKS = {"autonat_interval_s": 5}  # re-checked every 5 s: a flip to public would show


def _start(net: Testnet, tmp_path: Path, hosts: list[str]) -> tuple[NetnsPeer, dict[str, NetnsPeer]]:
    boot = NetnsPeer(net, "p1", nat=QUICK_CHECKS, log_dir=tmp_path).start()
    peers = {h: NetnsPeer(net, h, bootstrap=[boot.multiaddr], nat=QUICK_CHECKS, log_dir=tmp_path).start()
             for h in hosts}
    return boot, peers


def _connection(peer: NetnsPeer, other: NetnsPeer) -> str | None:
    return peer.peers().get(other.peer_id, {}).get("connection")


def test_the_public_host_is_found_public_and_the_natted_ones_private_check_after_check(tmp_path: Path) -> None:
    # Two hosts share the cone NAT's LAN: each can dial the other's LAN address back, which
    # must not count (it once made both "public", and then nobody outside could reach them).
    topology = Topology(public_hosts=1, segments=(Segment("cone", hosts=2), Segment("symmetric")))
    with Testnet(topology) as net:
        boot, peers = _start(net, tmp_path, ["a1", "a2", "b1"])
        everyone = {"p1": boot, **peers}
        wait_until(lambda: peers["a2"].peer_id in peers["a1"].peers(), 30, "the LAN neighbours connected")

        def verdicts() -> dict[str, str]:
            return {name: p.reach()["state"] for name, p in everyone.items()}

        wait_until(lambda: "unknown" not in verdicts().values(), 30, "a verdict from every host")
        checks_at_start = {name: len(p.reach()["probes"]) for name, p in peers.items()}
        deadline = time.monotonic() + 15  # three more rounds of dial-back checks
        while time.monotonic() < deadline:
            assert verdicts() == {"p1": "public", "a1": "private", "a2": "private", "b1": "private"}
            time.sleep(1)
        public = boot.reach()
        assert public["confirmed"] == [f"/ip4/{net.ip('p1')}/tcp/4001"] and public["relay_service"]["enabled"]
        for name, peer in peers.items():
            reach = peer.reach()
            # No false positive: nothing was confirmed dialable, yet the NAT's address was seen,
            # and the node holds a relay reservation instead of relaying for others.
            assert reach["confirmed"] == [] and reach["observed"], reach
            seen_at = {a.split("/")[2] for a in reach["observed"]}  # the NAT's address; a LAN peer sees ours
            assert net.hosts[name].wan_ip in seen_at and seen_at <= {net.hosts[name].wan_ip, net.ip(name)}, reach
            assert reach["relay_addrs"] and not reach["relay_service"]["enabled"]
            assert sum(p["verdict"] == "private" for p in reach["probes"]) >= 1
            assert reach["last_check_s_ago"] < 30 and len(reach["probes"]) >= checks_at_start[name], reach


def test_behind_a_symmetric_nat_hole_punching_fails_and_the_relay_keeps_it_reachable(tmp_path: Path) -> None:
    topology = Topology(public_hosts=1, segments=(Segment("cone"), Segment("symmetric")))
    with Testnet(topology) as net:
        boot, peers = _start(net, tmp_path, ["a1", "b1"])
        cone, symmetric = peers["a1"], peers["b1"]
        wait_until(lambda: _connection(cone, symmetric) and _connection(symmetric, cone), 30,
                   "the cone and the symmetric host connected (through the relay)")

        def gave_up() -> bool:
            states = [a.reach()["hole_punching"]["peers"].get(b.peer_id, {}).get("state")
                      for a, b in ((cone, symmetric), (symmetric, cone))]
            assert "direct" not in states, states
            return "failed" in states

        # --random-fully gives every new connection a new port: the address the peer punches at
        # is never the one the NAT opens, so every attempt fails and the relay stays the path.
        # (Each side gives up after 3 attempts with growing pauses: the dialer's side first.)
        wait_until(gave_up, 90, "hole punching given up on one side", interval_s=1.0)
        reach = symmetric.reach()
        assert reach["state"] == "private" and reach["hole_punching"]["direct"] == 0, reach["hole_punching"]
        assert reach["hole_punching"]["attempts"] >= 1 and cone.reach()["hole_punching"]["direct"] == 0
        assert reach["relays"] and reach["relays"][0]["peer_id"] == boot.peer_id
        assert _connection(cone, symmetric) == "relayed" and _connection(symmetric, cone) == "relayed"
        # Reachable all the same: a tensor transfer goes over the relayed libp2p connection (the
        # tensor plane's own TCP punch fails the same way), within the relay's limits.
        sent = cone.call("send", timeout_s=60, peer=symmetric.peer_id, bytes=256 << 10, tag="t")
        assert symmetric.call("recv", timeout_s=30, peer=cone.peer_id, tag="t") == {"bytes": 256 << 10}
        assert sent["path"] == "libp2p-relayed", sent
        assert boot.reach()["relay_service"]["bytes_relayed"] >= 256 << 10
