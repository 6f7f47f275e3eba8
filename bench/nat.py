"""NAT traversal in network namespaces: how many NAT pairs end direct, how fast, relay limits kept.

    sudo .venv/bin/python bench/nat.py                         # 3 rounds, 3 cone NATs + 1 symmetric
    sudo .venv/bin/python bench/nat.py --rounds 5 --cone 4 --json bench/results/nat.json
    sudo .venv/bin/python bench/nat.py --delay-ms 25 --loss-pct 1   # impaired internet links

Needs root (namespaces, veth, iptables); without it, it says so and exits 0 without a result.

Each round builds a fresh testnet (``deploy/netns/harness.py``): one public host (bootstrap, relay
and dial-back server; its relay limits set by ``--relay-rate-kib`` and ``--relay-budget-mib``),
``--cone`` private LANs behind port-preserving MASQUERADE NATs and one behind a symmetric NAT
(``--random-fully``), one bare hyphae host in each (``deploy/netns/peer.py``: host + tensor
plane, fresh identities, knowing only the bootstrap). Measured:

* **share direct**: of the cone<->cone pairs (target: all), and of every NAT pair (the pairs with
  the symmetric NAT are expected to stay relayed), after ``--wait-s``;
* **time to direct** per cone pair: from the moment both hosts were up until both list each other
  as ``direct`` (target: under 10 s for every pair); also the hole puncher's own time from the
  relayed connection to the direct one (``Host.reachability()``);
* **relay limits** (first round): a cone host sends ``--relay-mib`` MiB over the tensor plane to
  the symmetric host, which only the relay reaches: the rate it gets against the configured
  per-circuit rate (the relay's token bucket lets one second of rate through at once, so the
  bound is ``(size - rate) / rate`` seconds), then a transfer larger than the circuit's byte
  budget, which the relay must cut.

The machine is shared and small (2 cores here): the load average is recorded with each round.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "deploy" / "netns"))
from harness import Netem, Segment, Testnet, Topology  # noqa: E402 — deploy/netns is not a package
from nodes import NetnsPeer  # noqa: E402

TARGET_S = 10.0


def _connection(peer: NetnsPeer, other: NetnsPeer) -> str | None:
    return peer.peers().get(other.peer_id, {}).get("connection")


def _start(net: Testnet, logs: Path, relay_limits: dict[str, int]) -> tuple[NetnsPeer, list[NetnsPeer], dict[str, float]]:
    """The public host, then one host per NAT; their names and the moment each was up."""
    # relay_service "on", as an operator running a relay sets it: with "auto" it would wait for
    # its first peers to confirm it public, and the hosts' first reservations would be refused.
    public = NetnsPeer(net, "p1", nat={"relay_limits": relay_limits, "relay_service": "on"}, log_dir=logs).start()
    up: dict[str, float] = {}
    private = []
    for host in sorted(h.name for h in net.hosts.values() if h.role == "private"):
        peer = NetnsPeer(net, host, bootstrap=[public.multiaddr], log_dir=logs).start()
        up[host] = time.monotonic()
        private.append(peer)
    return public, private, up


def _watch_pairs(net: Testnet, private: list[NetnsPeer], up: dict[str, float], wait_s: float) -> list[dict[str, Any]]:
    """Poll every pair until each cone pair is direct on both sides and every other pair is
    connected somehow (or ``wait_s`` passed); times count from when both hosts were up."""
    pairs = [{"a": a, "b": b, "kind": "cone-cone" if {net.hosts[a.host].nat, net.hosts[b.host].nat} == {"cone"}
              else "with-symmetric", "direct_after_s": None, "connected_after_s": None}
             for a, b in itertools.combinations(private, 2)]
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        for pair in pairs:
            both = (_connection(pair["a"], pair["b"]), _connection(pair["b"], pair["a"]))
            since = round(time.monotonic() - max(up[pair["a"].host], up[pair["b"].host]), 2)
            if pair["connected_after_s"] is None and None not in both:
                pair["connected_after_s"] = since
            if pair["direct_after_s"] is None and both == ("direct", "direct"):
                pair["direct_after_s"] = since
        if all(p["direct_after_s" if p["kind"] == "cone-cone" else "connected_after_s"] is not None for p in pairs):
            break
        time.sleep(0.2)
    for pair in pairs:
        pair["connection"] = [_connection(pair["a"], pair["b"]), _connection(pair["b"], pair["a"])]
    return pairs


def _verdicts(peers: list[NetnsPeer], wait_s: float) -> dict[str, str]:
    """Each host's reachability verdict, once none is "unknown" (or after ``wait_s``): the hosts
    may meet and punch before their dial-back checks (a few seconds each) have answered."""
    deadline = time.monotonic() + wait_s
    while True:
        states = {p.host: p.reach()["state"] for p in peers}
        if "unknown" not in states.values() or time.monotonic() > deadline:
            return states
        time.sleep(0.5)


def _tensor_path(sender: NetnsPeer, receiver: NetnsPeer, size_bytes: int = 8 << 20) -> dict[str, Any]:
    """The tensor plane between two cone-NATed hosts: which path it took (its TCP punch) and its rate."""
    sent = sender.call("send", timeout_s=60, peer=receiver.peer_id, bytes=size_bytes, tag="cone")
    receiver.call("recv", timeout_s=60, peer=sender.peer_id, tag="cone")
    return {"path": sent["path"], "bytes": size_bytes, "seconds_with_setup": round(sent["seconds"], 3)}


def _relay_limits(sender: NetnsPeer, receiver: NetnsPeer, public: NetnsPeer, limits: dict[str, int],
                  size_bytes: int) -> dict[str, Any]:
    """Rate through the relay against its per-circuit limit; a transfer over the byte budget is cut."""
    sender.call("send", timeout_s=60, peer=receiver.peer_id, bytes=1024, tag="warm")  # picks the path
    receiver.call("recv", timeout_s=60, peer=sender.peer_id, tag="warm")
    rate = limits["circuit_rate_bytes_s"]
    sent = sender.call("send", timeout_s=120, peer=receiver.peer_id, bytes=size_bytes, tag="rate")
    receiver.call("recv", timeout_s=60, peer=sender.peer_id, tag="rate")
    measured = size_bytes / sent["seconds"]
    burst_bound = rate * size_bytes / max(1, size_bytes - rate)  # one second of rate may go at once
    over = limits["circuit_bytes"] + (1 << 20)
    try:
        sender.call("send", timeout_s=120, peer=receiver.peer_id, bytes=over, tag="over")
        cut = False
    except RuntimeError:
        cut = True
    service = public.reach()["relay_service"]
    return {"path": sent["path"], "bytes": size_bytes, "seconds": round(sent["seconds"], 2),
            "rate_limit_bytes_s": rate, "measured_bytes_s": round(measured),
            "measured_over_limit": round(measured / rate, 3), "bound_with_burst_bytes_s": round(burst_bound),
            "rate_honored": measured <= burst_bound * 1.05,
            "budget_bytes": limits["circuit_bytes"], "over_budget_transfer_bytes": over,
            "over_budget_transfer_cut": cut, "relay_resets_for_data": service["refused"].get("reset_data", 0),
            "relay_bytes_relayed": service["bytes_relayed"]}


def run_round(index: int, args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    netem = Netem(args.delay_ms, 0.0, args.loss_pct) if args.delay_ms or args.loss_pct else None
    topology = Topology(public_hosts=1, segments=(*(Segment("cone") for _ in range(args.cone)), Segment("symmetric")),
                        netem=netem)
    limits = {"circuit_rate_bytes_s": args.relay_rate_kib << 10, "circuit_bytes": args.relay_budget_mib << 20}
    load = os.getloadavg()[0]
    logs = scratch / f"round{index}"
    logs.mkdir(parents=True, exist_ok=True)
    with Testnet(topology) as net:
        public, private, up = _start(net, logs, limits)
        pairs = _watch_pairs(net, private, up, args.wait_s)
        punch = {p.host: p.reach()["hole_punching"] for p in private}
        reach = _verdicts(private, 20.0)
        relay = tensor = None
        cones = [p for p in private if net.hosts[p.host].nat == "cone"]
        if index == 0 and len(cones) >= 2:
            tensor = _tensor_path(cones[0], cones[1])
        if index == 0 and args.relay_mib > 0:
            symmetric = next(p for p in private if net.hosts[p.host].nat == "symmetric")
            relay = _relay_limits(cones[0], symmetric, public, limits, args.relay_mib << 20)
        public_state = public.reach()["state"]
        for peer in (*private, public):
            peer.stop()
    rows = [{"pair": f"{p['a'].host}-{p['b'].host}", "kind": p["kind"], "direct_after_s": p["direct_after_s"],
             "connected_after_s": p["connected_after_s"], "connection": p["connection"]} for p in pairs]
    return {"round": index, "load_avg_1min_before": round(load, 2), "pairs": rows,
            "punch_time_to_direct_s": sorted(t for s in punch.values() for t in s.get("time_to_direct_s", [])),
            "punch_attempts": sum(s.get("attempts", 0) for s in punch.values()),
            "punch_failed": sum(s.get("failed", 0) for s in punch.values()),
            "reachability": {"p1": public_state, **reach}, "relay": relay, "tensor_cone_pair": tensor}


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    pairs = [p for r in rounds for p in r["pairs"]]
    cone = [p for p in pairs if p["kind"] == "cone-cone"]
    times = [p["direct_after_s"] for p in cone if p["direct_after_s"] is not None]
    punch = sorted(t for r in rounds for t in r["punch_time_to_direct_s"])
    states = [(h, s) for r in rounds for h, s in r["reachability"].items()]
    return {
        "cone_pairs": len(cone),
        "cone_pairs_direct_share": round(len(times) / len(cone), 3) if cone else None,
        "all_nat_pairs_direct_share": round(sum(p["direct_after_s"] is not None for p in pairs) / len(pairs), 3),
        "time_to_direct_s_median": round(statistics.median(times), 2) if times else None,
        "time_to_direct_s_max": max(times) if times else None,
        "cone_pairs_direct_within_target": sum(t < TARGET_S for t in times),
        "target_s": TARGET_S,
        "punch_relayed_to_direct_s_median": round(statistics.median(punch), 2) if punch else None,
        "punch_relayed_to_direct_s_max": max(punch) if punch else None,
        "reachability_right": all(s == ("public" if h.startswith("p") else "private") for h, s in states),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="fresh testnets, one after another")
    parser.add_argument("--cone", type=int, default=3, help="cone-NAT LANs (one host each); plus one symmetric")
    parser.add_argument("--wait-s", type=float, default=45.0, help="how long a round waits for the cone pairs")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="per internet link and direction")
    parser.add_argument("--loss-pct", type=float, default=0.0, help="per internet link and direction")
    parser.add_argument("--relay-rate-kib", type=int, default=256, help="relay limit: KiB/s per circuit direction")
    parser.add_argument("--relay-budget-mib", type=int, default=4, help="relay limit: MiB per circuit")
    parser.add_argument("--relay-mib", type=int, default=2, help="MiB sent through the relay (0: skip)")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "nat.json")
    parser.add_argument("--keep-logs", action="store_true", help="keep the hosts' logs (their dir is in the JSON)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench/nat.py needs root (network namespaces, veth, iptables): skipped, no result written")
        return 0
    if not 2 <= args.cone + 1 <= 8:
        parser.error(f"--cone must be 1-7 (the harness has 8 private segments), got {args.cone}")
    scratch = Path(tempfile.mkdtemp(prefix="hyphae-nat-bench-"))
    rounds = []
    for i in range(args.rounds):
        rounds.append(run_round(i, args, scratch))
        got = [p["direct_after_s"] for p in rounds[-1]["pairs"] if p["kind"] == "cone-cone"]
        sym = [(p["connected_after_s"], p["connection"][0]) for p in rounds[-1]["pairs"] if p["kind"] != "cone-cone"]
        print(f"round {i}: cone pairs direct after {got} s; pairs with the symmetric NAT connected after "
              f"{sym} (load {rounds[-1]['load_avg_1min_before']})", flush=True)
    summary = summarize(rounds)
    result = {"bench": "nat", "cpus": os.cpu_count(), "params": {k: v for k, v in vars(args).items() if k != "json"},
              "summary": summary, "relay": rounds[0]["relay"], "tensor_cone_pair": rounds[0]["tensor_cone_pair"],
              "rounds": rounds,
              "logs": str(scratch) if args.keep_logs else None,
              "python": sys.version.split()[0]}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"cone<->cone pairs direct: {summary['cone_pairs_direct_share']:.0%} of {summary['cone_pairs']}, "
          f"time to direct median {summary['time_to_direct_s_median']} s, max {summary['time_to_direct_s_max']} s "
          f"({summary['cone_pairs_direct_within_target']} under the {TARGET_S:.0f} s target); "
          f"relayed->direct by the puncher median {summary['punch_relayed_to_direct_s_median']} s")
    print(f"every NAT pair (with the symmetric NAT too): {summary['all_nat_pairs_direct_share']:.0%} direct; "
          f"reachability verdicts right: {summary['reachability_right']}")
    tensor = rounds[0]["tensor_cone_pair"]
    if tensor:
        print(f"tensor plane between two cone-NATed hosts: path {tensor['path']}, {tensor['bytes'] >> 20} MiB in "
              f"{tensor['seconds_with_setup']} s including the connection setup")
    relay = rounds[0]["relay"]
    if relay:
        print(f"relay: {relay['bytes'] >> 20} MiB over {relay['path']} at {relay['measured_bytes_s'] / 1024:.0f} KiB/s "
              f"(limit {relay['rate_limit_bytes_s'] / 1024:.0f} KiB/s, bound with the 1 s burst "
              f"{relay['bound_with_burst_bytes_s'] / 1024:.0f}): honored {relay['rate_honored']}; "
              f"a {relay['over_budget_transfer_bytes'] >> 20} MiB transfer over the {relay['budget_bytes'] >> 20} MiB "
              f"budget cut: {relay['over_budget_transfer_cut']}")
    print(f"wrote {args.json}" + (f"; logs in {scratch}" if args.keep_logs else ""))
    if not args.keep_logs:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
