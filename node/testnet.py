"""Local testnets: N daemons on loopback, each bootstrapped from the first.

``testnet up`` starts real ``hyphae node join`` processes (own session, own data dir, logs in
``DIR/node-<i>/daemon.log``), records them in ``DIR/testnet.json`` and returns once every node
sees every other one. ``testnet down`` stops only the processes that file names, after checking
that each pid still runs a hyphae daemon on that very data dir (a recycled pid is left alone).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hyphae.protocol.atomic import atomic_write_json
from hyphae.protocol.errors import HyphaeError

from .client import ApiClient, NotRunning, pid_alive
from .datadir import DataDir

__all__ = ["TestnetError", "testnet_up", "testnet_status", "testnet_down", "NodeRecord"]

STATE_FILE = "testnet.json"


class TestnetError(HyphaeError):
    """The testnet could not be started, read or stopped; the message says which node and why."""

    __test__ = False  # not a pytest test class


@dataclass
class NodeRecord:
    index: int
    pid: int
    data_dir: str
    log: str
    peer_id: str = ""
    api_url: str = ""
    multiaddr: str = ""


def _node_cmd(data_dir: Path, bootstrap: str | None, train: bool, extra: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "hyphae.cli", "node", "join", "--data-dir", str(data_dir),
           "--listen", "/ip4/127.0.0.1/tcp/0", "--api", "127.0.0.1:0", "--no-mdns"]
    if bootstrap:
        cmd += ["--bootstrap", bootstrap]
    if not train:
        cmd.append("--no-train")
    else:
        cmd += ["--threads", "1"]  # many nodes share this machine's cores
    return cmd + extra


def _spawn(root: Path, index: int, bootstrap: str | None, train: bool, extra: list[str]) -> NodeRecord:
    data_dir = root / f"node-{index}"
    data_dir.mkdir(parents=True, exist_ok=True)
    DataDir(data_dir).remove_node_json()  # a stale one from a killed run must not look ready
    log_path = data_dir / "daemon.log"
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(
            _node_cmd(data_dir, bootstrap, train, extra), stdin=subprocess.DEVNULL, stdout=log_file,
            stderr=subprocess.STDOUT, start_new_session=True,  # Ctrl+C on `testnet up` leaves nodes be
        )
    return NodeRecord(index=index, pid=proc.pid, data_dir=str(data_dir), log=str(log_path))


def _tail(path: str, lines: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait_ready(rec: NodeRecord, deadline: float) -> None:
    datadir = DataDir(Path(rec.data_dir))
    while time.monotonic() < deadline:
        info = datadir.read_node_json()
        if info and int(info.get("pid", 0)) == rec.pid:
            rec.peer_id, rec.api_url = info["peer_id"], info["api_url"]
            rec.multiaddr = next((a for a in info["multiaddrs"] if "/127.0.0.1/" in a), info["multiaddrs"][0])
            return
        if not pid_alive(rec.pid) or _reaped(rec.pid):
            raise TestnetError(f"node {rec.index} (pid {rec.pid}) exited during start-up:\n{_tail(rec.log)}")
        time.sleep(0.05)
    raise TestnetError(f"node {rec.index} (pid {rec.pid}) not ready in time:\n{_tail(rec.log)}")


def _reaped(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return False
    return done == pid


def _save(root: Path, records: list[NodeRecord]) -> None:
    atomic_write_json(root / STATE_FILE, {"created": time.time(), "nodes": [vars(r) for r in records]})


def load_records(root: Path) -> list[NodeRecord]:
    try:
        data = json.loads((root / STATE_FILE).read_text())
    except FileNotFoundError:
        raise TestnetError(f"no testnet in {root} ({STATE_FILE} missing)") from None
    except json.JSONDecodeError as exc:
        raise TestnetError(f"{root / STATE_FILE} is corrupt: {exc}") from None
    return [NodeRecord(**n) for n in data["nodes"]]


def _wait_full_mesh(records: list[NodeRecord], deadline: float) -> float:
    everyone = {r.peer_id for r in records}
    while time.monotonic() < deadline:
        missing = 0
        for rec in records:
            try:
                seen = {p["peer_id"] for p in ApiClient(rec.api_url).peers() if p.get("agent")}
            except NotRunning:
                raise TestnetError(f"node {rec.index} stopped answering:\n{_tail(rec.log)}") from None
            missing += len(everyone - {rec.peer_id} - seen)
        if missing == 0:
            return time.monotonic()
        time.sleep(0.2)
    raise TestnetError(f"the nodes did not all see each other in time ({missing} links missing)")


def testnet_up(root: Path, nodes: int, *, train: bool = False, timeout_s: float = 60.0,
               extra_args: list[str] | None = None) -> dict[str, Any]:
    """Start ``nodes`` daemons under ``root``; return when all see each other.

    Raises:
        TestnetError: a testnet already runs there, a node failed to start (its log tail is in
            the message), or the mesh did not form within ``timeout_s`` (nodes stay up for
            inspection; ``testnet down`` stops them).
    """
    if nodes < 1:
        raise TestnetError(f"--nodes must be >= 1, got {nodes}")
    root = Path(root).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    if (root / STATE_FILE).exists() and any(pid_alive(r.pid) for r in load_records(root)):
        raise TestnetError(f"a testnet already runs in {root}; `hyphae testnet down --dir {root}` first")
    extra = extra_args or []
    started = time.monotonic()
    deadline = started + timeout_s
    first = _spawn(root, 0, None, train, extra)
    records = [first]
    _save(root, records)
    _wait_ready(first, deadline)
    records += [_spawn(root, i, first.multiaddr, train, extra) for i in range(1, nodes)]
    _save(root, records)
    for rec in records[1:]:
        _wait_ready(rec, deadline)
    _save(root, records)
    meshed = _wait_full_mesh(records, deadline)
    return {"dir": str(root), "nodes": [vars(r) for r in records], "seconds_to_mesh": round(meshed - started, 2)}


def testnet_status(root: Path) -> list[dict[str, Any]]:
    rows = []
    for rec in load_records(Path(root).expanduser().resolve()):
        row: dict[str, Any] = {**vars(rec), "alive": pid_alive(rec.pid), "peers": None}
        if row["alive"] and rec.api_url:
            try:
                row["peers"] = len(ApiClient(rec.api_url).peers())
            except NotRunning:
                row["alive"] = False
        rows.append(row)
    return rows


def _is_our_daemon(rec: NodeRecord) -> bool:
    """True if ``rec.pid`` still runs a hyphae daemon on ``rec.data_dir`` (not a recycled pid)."""
    try:
        cmdline = Path(f"/proc/{rec.pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return pid_alive(rec.pid)  # no /proc (not Linux): trust the pid
    return rec.data_dir.encode() in cmdline and any(b"hyphae" in part for part in cmdline)


def testnet_down(root: Path, *, timeout_s: float = 10.0) -> list[int]:
    """SIGTERM every node this testnet started, SIGKILL what is left after ``timeout_s``."""
    root = Path(root).expanduser().resolve()
    records = [r for r in load_records(root) if pid_alive(r.pid) and _is_our_daemon(r)]
    for rec in records:
        os.kill(rec.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(pid_alive(r.pid) and not _reaped(r.pid) for r in records):
        time.sleep(0.05)
    for rec in records:
        if pid_alive(rec.pid) and not _reaped(rec.pid):
            os.kill(rec.pid, signal.SIGKILL)
    (root / STATE_FILE).unlink(missing_ok=True)
    return [r.pid for r in records]
