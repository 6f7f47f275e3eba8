"""Memory and CPU of a node's processes (daemon and worker), from Linux /proc.

RSS counts shared pages (torch's libraries) once per process, so the sum over nodes overstates
what they take together; PSS splits shared pages among the processes that map them, so the PSS
sum is what the testnet really occupies. Both are reported.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from ._cluster import Node, _children

__all__ = ["measure_nodes", "memory_kib", "cpu_s"]


def memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of ``pid`` in KiB; (0, 0) if it is gone."""
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0, 0
    values = {}
    for line in rollup.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in ("Rss:", "Pss:"):
            values[parts[0]] = int(parts[1])
    return values.get("Rss:", 0), values.get("Pss:", 0)


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` (0 if gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pids(node: Node) -> dict[str, int]:
    """The node's daemon and, if it trains, its worker (resource trackers are left out)."""
    pids = {"daemon": node.proc.pid}
    for child in _children(node.proc.pid):
        try:
            cmd = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"hyphae.node.worker" in cmd:
            pids["worker"] = child
    return pids


def measure_nodes(nodes: list[Node], *, window_s: float) -> dict[str, Any]:
    """Per-node memory now and CPU over the next ``window_s`` seconds, with totals and medians."""
    pids = {node.name: _pids(node) for node in nodes if node.alive}
    before = {name: {role: cpu_s(pid) for role, pid in roles.items()} for name, roles in pids.items()}
    started = time.monotonic()
    time.sleep(window_s)
    elapsed = time.monotonic() - started
    per_node: dict[str, Any] = {}
    for name, roles in pids.items():
        row: dict[str, Any] = {}
        for role, pid in roles.items():
            rss, pss = memory_kib(pid)
            if not rss:  # gone during the window (a worker restarted): nothing to say about it
                row[role] = {"rss_mib": None, "pss_mib": None, "cpu_cores": None, "exited": True}
                continue
            row[role] = {"rss_mib": round(rss / 1024, 1), "pss_mib": round(pss / 1024, 1),
                         "cpu_cores": round((cpu_s(pid) - before[name][role]) / elapsed, 4)}
        per_node[name] = row

    def column(role: str, key: str) -> list[float]:
        return sorted(r[role][key] for r in per_node.values() if role in r and r[role][key] is not None)

    summary: dict[str, Any] = {"window_s": round(elapsed, 2), "nodes": len(per_node)}
    for role in ("daemon", "worker"):
        for key in ("rss_mib", "pss_mib", "cpu_cores"):
            values = column(role, key)
            if values:
                summary[f"{role}_{key}_median"] = values[len(values) // 2]
                summary[f"{role}_{key}_max"] = values[-1]
                summary[f"{role}_{key}_total"] = round(sum(values), 3)
    return {"summary": summary, "per_node": per_node}
