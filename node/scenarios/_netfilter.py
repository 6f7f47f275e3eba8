"""iptables on ``lo`` for scenarios: partitions between groups of nodes, and a link emulator.

On loopback every node is 127.0.0.1, so rules tell nodes apart by who sends a packet: each node
runs under its own group id and ``-m owner --gid-owner`` matches the sender (see ``_cluster``).

* Partition: a node of one side may send nothing to a listening port (libp2p or tensor plane)
  of a node on another side. Every connection between the sides has one such port at one end,
  so both directions of every link go silent, as when a route disappears: nothing is reset.
* Link emulation: every TCP packet a scenario node sends on ``lo`` goes to an NFQUEUE
  (:mod:`._nfqueue`), except answers to the runner's API polls (the runner reads from
  127.0.0.2, so they go to that address and are left alone: measuring must not be slowed).

All rules live in two chains of this scenario's own (``HYXP<tag>``, ``HYXQ<tag>``), jumped to
from OUTPUT; :meth:`Firewall.close` removes the jumps and the chains, whatever happened.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from ._cluster import RUNNER_SOURCE, ScenarioError, require_tools

__all__ = ["Firewall", "Side", "RUNNER_SOURCE"]

log = logging.getLogger(__name__)

MULTIPORT_MAX = 15


@dataclass(frozen=True)
class Side:
    """One side of a partition: the nodes' group ids and every port they listen on."""

    gids: tuple[int, ...]
    ports: tuple[int, ...]


def _iptables(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["iptables", "-w", "5", *args], capture_output=True, text=True)
    if check and done.returncode != 0:
        raise ScenarioError(f"iptables {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


class Firewall:
    """This scenario's iptables rules (root only). Use as a context manager.

    Args:
        tag: unique per runner (its pid), so two scenarios on one machine do not collide.
        gid_range: the group ids of this scenario's nodes, ``(first, last)``.
    """

    def __init__(self, tag: str, gid_range: tuple[int, int]) -> None:
        require_tools(("iptables",))
        self.partition_chain = f"HYXP{tag}"[:28]
        self.queue_chain = f"HYXQ{tag}"[:28]
        self.gid_range = gid_range
        self._jumps: list[list[str]] = []

    def __enter__(self) -> Firewall:
        for chain in (self.partition_chain, self.queue_chain):
            _iptables("-N", chain)
            jump = ["OUTPUT", "-o", "lo", "-j", chain, "-m", "comment", "--comment", "hyphae scenario"]
            _iptables("-A", *jump)
            self._jumps.append(jump)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove the jumps and the chains (idempotent; never raises)."""
        for jump in self._jumps:
            _iptables("-D", *jump, check=False)
        self._jumps.clear()
        for chain in (self.partition_chain, self.queue_chain):
            _iptables("-F", chain, check=False)
            _iptables("-X", chain, check=False)

    def partition(self, sides: Sequence[Side]) -> int:
        """Cut every link between different sides; returns the number of rules added."""
        self.heal()
        rules = 0
        for i, side in enumerate(sides):
            others = sorted({p for j, other in enumerate(sides) if j != i for p in other.ports})
            for gid in side.gids:
                for start in range(0, len(others), MULTIPORT_MAX):
                    chunk = ",".join(map(str, others[start:start + MULTIPORT_MAX]))
                    _iptables("-A", self.partition_chain, "-p", "tcp", "-m", "owner", "--gid-owner", str(gid),
                              "-m", "multiport", "--dports", chunk, "-j", "DROP")
                    rules += 1
        return rules

    def heal(self) -> None:
        _iptables("-F", self.partition_chain)

    def shape(self, queue: int) -> None:
        """Send every TCP packet of the scenario's nodes (but answers to the runner) to ``queue``."""
        _iptables("-F", self.queue_chain)
        first, last = self.gid_range
        _iptables("-A", self.queue_chain, "-p", "tcp", "!", "-d", RUNNER_SOURCE, "-m", "owner",
                  "--gid-owner", f"{first}-{last}", "-j", "NFQUEUE", "--queue-num", str(queue), "--queue-bypass")

    def unshape(self) -> None:
        _iptables("-F", self.queue_chain)

    def counters(self) -> dict[str, int]:
        """Packets matched by this scenario's rules so far (evidence that the rules did bite)."""
        out: dict[str, int] = {}
        for chain in (self.partition_chain, self.queue_chain):
            done = _iptables("-L", chain, "-v", "-x", "-n", check=False)
            out[chain] = sum(int(line.split()[0]) for line in done.stdout.splitlines()[2:] if line.strip())
        return out
