"""What every scenario is made of: start a testnet, wait for invariants, inject events, clean up.

A :class:`Run` owns the cluster of daemons, the optional firewall and link emulator, and the
report. Waits poll the nodes' HTTP APIs once a second until an invariant holds or its time is up;
either way the check goes into the report with what was measured, and the scenario goes on (a
failed check fails the run at the end, it does not hide the checks after it).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import _checks
from ._cluster import Cluster, Node, NodeDown
from ._netfilter import Firewall
from ._nfqueue import Delayer
from ._report import Report

__all__ = ["Run", "ScenarioOptions", "training_toml", "write_corpus"]

log = logging.getLogger(__name__)

Probe = Callable[[], tuple[bool, dict[str, Any]]]
POLL_INTERVAL_S = 1.0
CORPUS_BYTES = 600_000


@dataclass(frozen=True, kw_only=True)
class ScenarioOptions:
    """Size and timing of a scenario run (the CI-sized defaults)."""

    nodes: int = 4
    """Training nodes (the network-only bootstrap comes on top)."""
    train: bool = True
    """False: every node is network-only (``scale`` without training)."""
    wait_s: float = 150.0
    """Longest wait for one invariant to hold before it is recorded as failed."""
    batch_size: int = 4
    seq_len: int = 64
    inner_steps: int = 4
    """DiLoCo's H: an outer all-reduce every H local steps."""
    allreduce_timeout_s: float = 8.0
    """How long an outer all-reduce waits for members that went away."""
    checkpoint_every: int = 4
    log_every: int = 2
    torch_threads: int = 1
    """Threads per worker: on a 2-core machine several workers must not each take both cores."""
    dht_mode: str = "auto"
    """``[network] dht_mode`` of every node (``server`` pins it: no switch when reachability
    changes)."""

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ValueError(f"nodes must be >= 1, got {self.nodes}")
        if self.wait_s <= 0:
            raise ValueError(f"wait_s must be > 0, got {self.wait_s}")
        if self.dht_mode not in ("auto", "server", "client"):
            raise ValueError(f"dht_mode must be auto, server or client, got {self.dht_mode!r}")


def training_toml(options: ScenarioOptions, corpus: Path) -> str:
    """The config every node of the scenario gets: tiny preset, DiLoCo, small H; DHT mode."""
    return (f'[training]\npreset = "tiny"\nalgorithm = "diloco"\ndata = "{corpus}"\n'
            f"batch_size = {options.batch_size}\nseq_len = {options.seq_len}\nlog_every = {options.log_every}\n"
            f"eval_every = 0\ncheckpoint_every = {options.checkpoint_every}\n\n[training.algorithm_config]\n"
            f"inner_steps = {options.inner_steps}\ntimeout_s = {options.allreduce_timeout_s}\n"
            f'\n[network]\ndht_mode = "{options.dht_mode}"\n')


def write_corpus(path: Path, size_bytes: int = CORPUS_BYTES) -> Path:
    """A small text corpus cut from the standard library's sources: every node opens it in
    milliseconds instead of each indexing the whole stdlib (~30 MB) at start."""
    if path.exists() and path.stat().st_size >= size_bytes:
        return path
    stdlib = Path(os.__file__).parent
    chunks, total = [], 0
    for source in sorted(stdlib.glob("*.py")):
        text = source.read_text(errors="replace")
        chunks.append(text)
        total += len(text)
        if total >= size_bytes:
            break
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(chunks))
    return path


class Run:
    """One scenario run: the cluster, the report, and the waits and events scenarios are made of."""

    def __init__(self, report: Report, cluster: Cluster, options: ScenarioOptions) -> None:
        self.report = report
        self.cluster = cluster
        self.options = options
        self.restart_floor: dict[int, int | None] = {}
        self.firewall: Firewall | None = None
        """iptables on lo (root only): partitions and the link emulator's queue."""
        self.delayer: Delayer | None = None
        """The link emulator (wan), when running."""

    def name_of(self, peer_id: str) -> str:
        """``node-<i>`` for a peer id of this scenario, else the peer id itself."""
        return next((n.name for n in self.cluster.nodes if n.peer_id == peer_id), peer_id)

    # ---- topology --------------------------------------------------------------------------

    def start(self, trainers: int, *, train: bool = True) -> tuple[Node, list[Node]]:
        """Start the bootstrap (network-only), then ``trainers`` nodes at once; wait until all
        have written node.json."""
        boot = self.cluster.add(train=False)
        nodes = [self.cluster.add(train=train, wait=False) for _ in range(trainers)]
        for node in nodes:
            self.cluster.wait_ready(node)
        self.report.event("started", bootstrap=boot.index, nodes=[n.index for n in nodes], train=train)
        return boot, nodes

    def add(self, count: int) -> list[Node]:
        nodes = [self.cluster.add(train=self.options.train, wait=False) for _ in range(count)]
        for node in nodes:
            self.cluster.wait_ready(node)
        self.report.event("add", nodes=[n.index for n in nodes], peer_ids=[n.peer_id for n in nodes])
        return nodes

    def kill(self, node: Node) -> None:
        steps = self.steps([node])
        self.cluster.kill(node)
        floor = _checks.latest_checkpoint(node.data_dir / "checkpoints")
        self.report.event("kill", node=node.index, signal="SIGKILL", step_before=steps.get(node.name),
                          latest_checkpoint=floor)

    def restart(self, node: Node) -> None:
        floor = _checks.latest_checkpoint(node.data_dir / "checkpoints")
        self.restart_floor[node.index] = floor
        self.cluster.start(node)
        self.report.event("restart", node=node.index, latest_checkpoint=floor, peer_id=node.peer_id)

    # ---- waiting for invariants -------------------------------------------------------------

    def wait(self, name: str, probe: Probe, *, limit: dict[str, Any] | None = None,
             timeout_s: float | None = None) -> bool:
        """Poll ``probe`` until it holds or ``timeout_s`` passes; record the check either way."""
        timeout_s = self.options.wait_s if timeout_s is None else timeout_s
        started = time.monotonic()
        while True:
            holds, measured = probe()
            waited = time.monotonic() - started
            if holds or waited >= timeout_s:
                return self.report.check(name, holds, waited_s=waited,
                                         limit={"within_s": timeout_s, **(limit or {})}, measured=measured)
            time.sleep(POLL_INTERVAL_S)

    def steps(self, nodes: list[Node]) -> dict[str, int]:
        polled = self.cluster.poll(nodes, "/api/v1/training")
        return {self.cluster.nodes[i].name: int(t["step"]) for i, t in polled.items() if isinstance(t, dict)}

    def _names(self, nodes: list[Node] | None) -> list[Node]:
        return self.cluster.live() if nodes is None else nodes

    def mesh_probe(self, nodes: list[Node] | None = None, *, min_peers: int | None = None) -> Probe:
        def probe() -> tuple[bool, dict[str, Any]]:
            live = self._names(nodes)
            polled = self.cluster.poll(live, "/api/v1/peers")
            return _checks.meshed({self.cluster.nodes[i].name: v for i, v in polled.items()},
                                  {n.name: n.peer_id for n in live}, min_peers=min_peers)
        return probe

    def run_state_probe(self, nodes: list[Node] | None = None) -> Probe:
        def probe() -> tuple[bool, dict[str, Any]]:
            live = self._names(nodes)
            polled = self.cluster.poll(live, "/api/v1/run")
            return _checks.run_state_converged({self.cluster.nodes[i].name: v for i, v in polled.items()},
                                               {n.name: n.peer_id for n in live})
        return probe

    def progress_probe(self, nodes: list[Node], before: dict[str, int] | None = None, *,
                       min_increase: int = 1) -> Probe:
        timed = before is None  # a rate only means something from a measured starting point
        base = dict(before) if before is not None else self.steps(nodes)
        for node in nodes:
            base.setdefault(node.name, 0)
        started = time.monotonic()

        def probe() -> tuple[bool, dict[str, Any]]:
            polled = self.cluster.poll(nodes, "/api/v1/training")
            holds, measured = _checks.progressed(base, {self.cluster.nodes[i].name: v for i, v in polled.items()},
                                                 min_increase=min_increase)
            elapsed = max(time.monotonic() - started, 1e-3)
            if timed:
                measured["steps_per_s"] = {name: round((to - frm) / elapsed, 3) for name, (frm, to)
                                           in measured["steps_from_to"].items() if to is not None}
            return holds, measured
        return probe

    def settle(self, phase: str, nodes: list[Node] | None = None, *, min_peers: int | None = None) -> None:
        """The start-of-phase invariants: mesh, run state agreed, and training under way."""
        self.wait(f"mesh[{phase}]", self.mesh_probe(nodes, min_peers=min_peers))
        self.wait(f"run_state_converges[{phase}]", self.run_state_probe(nodes))
        trainers = [n for n in self._names(nodes) if n.train]
        if trainers:
            self.wait(f"training_started[{phase}]", self.progress_probe(trainers, {n.name: 0 for n in trainers}),
                      limit={"step_above": 0})

    def progress_window(self, phase: str, nodes: list[Node]) -> bool:
        """Every node in ``nodes`` takes at least H more steps from now on: at least one outer
        all-reduce (DiLoCo) completes under the phase's conditions."""
        steps = self.options.inner_steps
        return self.wait(f"training_progresses[{phase}]", self.progress_probe(nodes, min_increase=steps),
                         limit={"steps_increase_at_least": steps})

    def caught_up(self, node: Node) -> bool:
        """A (re)started node is live everywhere, counts as a trainer everywhere, and trains."""
        floor = self.restart_floor.get(node.index)
        resumed_probe = lambda: node.resumed_step()  # noqa: E731 - read the log lazily

        def probe() -> tuple[bool, dict[str, Any]]:
            live = self.cluster.live()
            agree, run_measured = self.run_state_probe(live)()
            trainers = [n for n in live if n.train and n is not node]
            polled = self.cluster.poll([*trainers, node], "/api/v1/training")
            named = {self.cluster.nodes[i].name: v for i, v in polled.items()}
            counted, missing = _checks.in_training_members({n.name: named.get(n.name) for n in trainers}, node.peer_id)
            own = named.get(node.name)
            step = int(own["step"]) if isinstance(own, dict) else None
            resumed = resumed_probe()
            start = max(resumed or 0, floor or 0)
            trains = step is not None and step > start
            return agree and counted and trains, {
                "node": node.index, "step": step, "resumed_from": resumed, "checkpoint_floor": floor,
                "not_counted_by": missing, "run_state": run_measured}

        ok = self.wait(f"caught_up[{node.name}]", probe, limit={"live_everywhere": True, "trainer_everywhere": True,
                                                                "step_above_resume": True})
        if node.starts > 1:
            resumed = node.resumed_step()
            held = floor is None or (resumed is not None and resumed >= floor)
            self.report.check(f"resumed_at_or_after_checkpoint[{node.name}]", held, waited_s=0.0,
                              limit={"resume_step_at_least": floor}, measured={"resumed_from": resumed})
        return ok

    # ---- the end ---------------------------------------------------------------------------

    def final(self, *, min_peers: int | None = None) -> None:
        """End-of-run invariants over every live node, and every checkpoint on disk verifies."""
        live = self.cluster.live()
        self.wait("mesh[end]", self.mesh_probe(live, min_peers=min_peers))
        self.wait("run_state_converges[end]", self.run_state_probe(live))
        trainers = [n for n in live if n.train]
        if trainers:
            self.progress_window("end", trainers)
            polled = self.cluster.poll(trainers, "/api/v1/training")
            self.report.measurements["worker_restarts"] = {
                self.cluster.nodes[i].name: t.get("worker_restarts") for i, t in polled.items() if isinstance(t, dict)}
        self.check_checkpoints()

    def check_checkpoints(self) -> None:
        verified: dict[str, list[int]] = {}
        problems: dict[str, list[str]] = {}
        for node in self.cluster.nodes:
            if not node.train:
                continue
            good, bad = _checks.verify_checkpoints(node.data_dir / "checkpoints")
            verified[node.name] = good
            if bad:
                problems[node.name] = bad
        self.report.check("checkpoints_verify", not problems and all(verified.values()), waited_s=0.0,
                          limit={"sha256_matches_manifest": True, "at_least_one_per_trainer": True},
                          measured={"verified_steps": verified, "problems": problems})

    def describe_settings(self) -> dict[str, Any]:
        return {**asdict(self.options), "python": sys.version.split()[0]}

