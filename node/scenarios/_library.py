"""The scenarios: each is a script of events against a testnet, with invariants checked between.

Timelines (``n`` = ``--nodes`` training nodes; node 0 is a network-only bootstrap):

* ``churn``: start; train; SIGKILL 30 % of the trainers (daemon and worker at once) and add as
  many new ones; the survivors keep training and the new ones catch up; restart the killed ones
  from their data dirs: each resumes at or after its last checkpoint and catches up.
* ``partition`` (root): split the nodes in two (the bootstrap on side A); each side sees only
  itself live and keeps training; heal; everyone converges and trains on.
* ``wan`` (root): every link gets 40 ms one-way delay and 1 % loss from the start; train; make it
  100 ms and 3 %; train on; RTTs show the delay; clear it; everyone converges.
* ``scale``: ``n`` nodes (``--no-train`` for network-only); checks what "sustains" means in
  ``bench/scale.py`` and measures memory and CPU per node.
* ``nat`` runs in network namespaces (:mod:`._nat`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ._cluster import Node, NodeDown, ScenarioError
from ._engine import Run
from ._netfilter import Side
from ._nfqueue import LinkShape
from ._procstats import measure_nodes

__all__ = ["churn", "partition", "wan", "scale", "CHURN_FRACTION"]

log = logging.getLogger(__name__)

CHURN_FRACTION = 0.3
WAN_START = LinkShape(delay_ms=40.0, loss=0.01)
WAN_WORSE = LinkShape(delay_ms=100.0, loss=0.03)


def churn(run: Run) -> None:
    n = run.options.nodes
    _, trainers = run.start(n)
    run.settle("start")
    run.progress_window("steady", trainers)
    k = max(1, round(CHURN_FRACTION * n))
    victims = trainers[-k:]
    for node in victims:
        run.kill(node)
    newcomers = run.add(k)
    survivors = [t for t in trainers if t not in victims]
    if survivors:
        run.progress_window("after_kill", survivors)
    for node in newcomers:
        run.caught_up(node)
    for node in victims:
        run.restart(node)
    for node in victims:
        run.caught_up(node)
    run.final()


def _sides(run: Run, boot: Node, trainers: list[Node]) -> list[list[Node]]:
    half = max(1, len(trainers) // 2)
    return [[boot, *trainers[:half]], trainers[half:]]


def partition(run: Run) -> None:
    firewall = run.firewall
    if firewall is None:
        raise ScenarioError("the partition scenario needs root (iptables on lo); run it with sudo")
    if run.options.nodes < 2:
        raise ScenarioError(f"partition needs --nodes >= 2 (one trainer per side), got {run.options.nodes}")
    boot, trainers = run.start(run.options.nodes)
    run.settle("start")
    sides = _sides(run, boot, trainers)
    ports = {node.index: node.ports() for side in sides for node in side}
    rules = firewall.partition([Side(tuple(n.gid for n in side), tuple(p for n in side for p in ports[n.index]))
                                for side in sides])
    run.report.event("partition", sides=[[n.index for n in side] for side in sides], rules=rules,
                     ports={str(i): p for i, p in ports.items()})

    def split() -> tuple[bool, dict[str, Any]]:
        wrong: dict[str, Any] = {}
        for side in sides:
            want = {n.peer_id for n in side}
            for node, view in zip(side, run.cluster.poll(side, "/api/v1/run").values()):
                live = {m["peer_id"] for m in view.get("members", []) if m.get("status") == "live"} \
                    if isinstance(view, dict) else set()
                scenario_live = live & {n.peer_id for n in run.cluster.nodes}
                if scenario_live != want:
                    wrong[node.name] = sorted(run.name_of(p) for p in scenario_live ^ want)
        return not wrong, {"disagreeing": wrong}

    run.wait("each_side_sees_only_itself[partition]", split, limit={"live_set": "own side"})
    run.progress_window("partition", trainers)
    run.report.measurements["partition_rule_packets"] = firewall.counters()
    firewall.heal()
    run.report.event("heal")
    healed = time.monotonic()
    run.wait("run_state_converges[heal]", run.run_state_probe())
    run.report.measurements["seconds_to_converge_after_heal"] = round(time.monotonic() - healed, 2)
    run.wait("mesh[heal]", run.mesh_probe())
    run.report.measurements["seconds_to_mesh_after_heal"] = round(time.monotonic() - healed, 2)
    run.final()


def _shape_event(run: Run, shape: LinkShape) -> None:
    run.delayer.set_shape(shape)
    run.report.event("netem", delay_ms=shape.delay_ms, loss=shape.loss, rate_mbit=shape.rate_mbit,
                     how="NFQUEUE link emulator on lo (sch_netem is not in this kernel)")


def _rtt_probe(run: Run, nodes: list[Node], at_least_ms: float, *, every_path: bool):
    """Ping RTTs (``/api/v1/peers``, pinged every 15 s) show the emulated delay: on every path
    (``every_path``: the smallest RTT of each node), or on the latest pinged one (the largest)."""
    def probe() -> tuple[bool, dict[str, Any]]:
        seen: dict[str, float | None] = {}
        for node, peers in zip(nodes, run.cluster.poll(nodes, "/api/v1/peers").values()):
            rtts = [p["rtt_ms"] for p in peers.get("peers", []) if p.get("rtt_ms")] if isinstance(peers, dict) else []
            seen[node.name] = round(min(rtts) if every_path else max(rtts), 1) if rtts else None
        holds = all(v is not None and v >= at_least_ms for v in seen.values())
        return holds, {("min" if every_path else "max") + "_peer_rtt_ms": seen}
    return probe


def wan(run: Run) -> None:
    if run.delayer is None:
        raise ScenarioError("the wan scenario needs root (NFQUEUE on lo); run it with sudo")
    _shape_event(run, WAN_START)
    _, trainers = run.start(run.options.nodes)
    run.settle("wan_40ms_1pct")
    run.progress_window("wan_40ms_1pct", trainers)
    floor_ms = 2 * WAN_START.delay_ms * 0.9
    run.wait("rtt_shows_delay[wan_40ms_1pct]", _rtt_probe(run, trainers, floor_ms, every_path=True),
             limit={"min_peer_rtt_ms_at_least": floor_ms})
    _shape_event(run, WAN_WORSE)
    run.progress_window("wan_100ms_3pct", trainers)
    # Pings run every 15 s: within a minute every node has measured a path under the new delay.
    floor_ms = 2 * WAN_WORSE.delay_ms * 0.9
    run.wait("rtt_shows_delay[wan_100ms_3pct]", _rtt_probe(run, trainers, floor_ms, every_path=False),
             limit={"max_peer_rtt_ms_at_least": floor_ms})
    run.report.measurements["link_emulator"] = dict(run.delayer.stats)
    _shape_event(run, LinkShape())
    run.final()


def scale(run: Run) -> None:
    """Start ``n`` nodes, check the sustain criteria, measure memory and CPU (bench/scale.py)."""
    started = time.monotonic()
    _, nodes = run.start(run.options.nodes, train=run.options.train)
    everyone = run.cluster.live()
    min_peers = min(len(everyone) - 1, 8)  # target_peers is 16: a big testnet is not a full mesh
    run.wait("mesh[scale]", run.mesh_probe(everyone, min_peers=min_peers), timeout_s=60.0,
             limit={"min_peers": min_peers})
    run.report.measurements["seconds_to_mesh"] = round(time.monotonic() - started, 2)
    run.wait("run_state_converges[scale]", run.run_state_probe(everyone), timeout_s=90.0)
    if run.options.train:
        run.wait("training_started[scale]", run.progress_probe(nodes, {n.name: 0 for n in nodes}))
        run.progress_window("scale", nodes)
    run.cluster.api_latency_max_s = 0.0
    run.report.measurements["resources"] = measure_nodes(everyone, window_s=10.0)
    run.wait("api_answers_within_1s[scale]", _api_probe(run, everyone), timeout_s=1.0, limit={"max_s": 1.0})


def _api_probe(run: Run, nodes: list[Node]):
    """One call at a time, so the time measured is the daemon's, not the runner's thread pool's.

    Not ``/api/v1/node``: it answers 500 while ``[training] data`` is set (the effective config it
    returns holds a Path that aiohttp cannot serialize), and the scenarios set it.
    """
    def probe() -> tuple[bool, dict[str, Any]]:
        times, failed = [], []
        for node in nodes:
            for path in ("/api/v1/peers", "/api/v1/run", "/api/v1/training" if node.train else "/api/v1/tensor"):
                started = time.monotonic()
                try:
                    node.api(path, timeout_s=5.0)
                except NodeDown:
                    failed.append(f"{node.name}{path}")
                times.append(time.monotonic() - started)
        times.sort()
        slowest = times[-1] if times else 0.0
        return slowest < 1.0 and not failed, {
            "slowest_answer_s": round(slowest, 3), "median_answer_s": round(times[len(times) // 2], 4),
            "calls": len(times), "failed": failed}
    return probe
