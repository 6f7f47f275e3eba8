"""Real daemons behind real NATs (network namespaces, root): they meet, punch through, converge.

Each test builds its own testnet (deploy/netns/harness.py) and removes it, whatever happens.
Times are printed (``pytest -s``) and bounded loosely: the machine is shared; ``bench/nat.py``
measures them properly.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from harness import Netem, Segment, Testnet, Topology
from nodes import NetnsDaemon, wait_until

pytestmark = [pytest.mark.root, pytest.mark.tools("ip", "iptables", "tc", "sysctl"), pytest.mark.integration, pytest.mark.timeout(300)]


def both_direct(a: NetnsDaemon, b: NetnsDaemon) -> bool:
    return (a.peers().get(b.peer_id, {}).get("connection") == "direct"
            and b.peers().get(a.peer_id, {}).get("connection") == "direct")


def test_two_nodes_behind_two_cone_nats_meet_through_the_relay_and_end_direct(tmp_path: Path) -> None:
    with Testnet(Topology(public_hosts=1, segments=(Segment("cone"), Segment("cone")))) as net:
        boot = NetnsDaemon(net, "p1", tmp_path).start()
        a = NetnsDaemon(net, "a1", tmp_path, ["--bootstrap", boot.multiaddr])
        b = NetnsDaemon(net, "b1", tmp_path, ["--bootstrap", boot.multiaddr])
        start = time.monotonic()
        a.start()
        b.start()
        wait_until(lambda: both_direct(a, b), 90, "a1 and b1 on a direct connection")
        elapsed = time.monotonic() - start
        # They knew only the bootstrap: they met through the relay and the relayed connection was
        # upgraded by hole punching (the puncher logs the time from relayed to direct on its next
        # scan, a moment after the API shows the direct connection).
        wait_until(lambda: _punched(a.log() + b.log()), 5, "the hole-punch log lines")
        print(f"\ncone <-> cone: direct {elapsed:.1f} s after both daemons were started")
        wait_until(lambda: [d.api("/api/v1/reachability")["state"] for d in (boot, a, b)] == ["public", "private",
                                                                                            "private"],
                   20, "the API's reachability verdicts")
        assert elapsed < 30  # the 10 s target is measured by bench/nat.py, on a quiet machine


def _punched(logs: str) -> bool:
    return "relayed connection from" in logs and "after the relayed one" in logs


@pytest.mark.slow  # ~60 s; the cone-NAT test above keeps daemons behind NATs in the default tier
def test_with_50ms_delay_and_1pct_loss_joining_and_the_run_state_converge(tmp_path: Path) -> None:
    topology = Topology(public_hosts=1, segments=(Segment("cone"), Segment("cone"), Segment("symmetric")),
                        netem=Netem(delay_ms=50, loss_pct=1.0))
    with Testnet(topology) as net:
        # netem where the kernel has it, else the NFQUEUE emulator (deploy/netns/links.py)
        assert net.links.mode in ("netem", "nfqueue") and net.links.netem == topology.netem
        boot = NetnsDaemon(net, "p1", tmp_path).start()
        nodes = [NetnsDaemon(net, h, tmp_path, ["--bootstrap", boot.multiaddr]).start() for h in ("a1", "b1", "c1")]
        everyone = [boot, *nodes]
        ids = {d.peer_id for d in everyone}

        def joined() -> bool:
            return all(set(d.peers()) >= ids - {d.peer_id} for d in everyone)

        start = time.monotonic()
        wait_until(joined, 150, "every daemon connected to every other")
        join_s = time.monotonic() - start

        def converged() -> bool:
            runs = [d.api("/api/v1/run") for d in everyone]
            owners = {r.get("owner") for r in runs}
            members = [{m["peer_id"] for m in r.get("members", [])} for r in runs]
            return len(owners) == 1 and None not in owners and all(m >= ids for m in members)

        wait_until(converged, 150, "the same run owner and all four members everywhere")
        print(f"\nWAN 50 ms / 1 % ({net.links.mode}): joined in {join_s:.1f} s, "
              f"run state converged {time.monotonic() - start:.1f} s")
        # The node behind the symmetric NAT: private, and reached through the relay, says the API.
        symmetric = nodes[2]
        assert {symmetric.peers()[n.peer_id]["connection"] for n in nodes[:2]} == {"relayed"}
        wait_until(lambda: symmetric.api("/api/v1/reachability")["state"] == "private", 20, "c1 private")
        assert symmetric.api("/api/v1/reachability")["relays"][0]["peer_id"] == boot.peer_id
        # cone <-> cone punched even with delay and loss (the punch may need another round)
        wait_until(lambda: both_direct(nodes[0], nodes[1]), 60, "a1 and b1 direct despite delay and loss")
        print(f"a1 <-> b1 direct {time.monotonic() - start:.1f} s after the start")
