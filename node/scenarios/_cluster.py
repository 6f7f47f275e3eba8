"""The daemons of one scenario on loopback: start, kill, restart, add, poll, and clean up.

Each node is a real ``hyphae node join`` process in its own session (so a kill reaches nothing
else), with its own data dir under the scenario dir, listening on 127.0.0.1 with port 0. When
the runner is root, each node also runs under its own group id (``gid_base + index``): that is
how the firewall tells the nodes' packets apart on ``lo``, where every address is 127.0.0.1
(:mod:`._netfilter` matches ``-m owner --gid-owner``). The runner spawns every process, so it
joins every one: :meth:`Cluster.close` stops them (SIGTERM, then SIGKILL) and waits for them,
even when the scenario failed half-way.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hyphae.protocol.errors import HyphaeError

__all__ = ["Cluster", "MissingTool", "Node", "NodeDown", "Placement", "ScenarioError", "require_tools"]

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 60.0
STOP_GRACE_S = 15.0
API_TIMEOUT_S = 2.0
RUNNER_SOURCE = "127.0.0.2"
_RESUMED = re.compile(r"training resumed from the checkpoint at step (\d+)")


class ScenarioError(HyphaeError):
    """The scenario could not run (a node would not start, no root for the firewall, ...)."""


class MissingTool(ScenarioError):
    """A system tool the scenario needs is not installed. Raised before anything starts, so a
    caller (the test suite) can tell "cannot run here" from a scenario that failed."""

    def __init__(self, tool: str, package: str) -> None:
        super().__init__(f"{tool} is not installed; apt-get install {package}")
        self.tool = tool
        self.package = package


TOOL_PACKAGES = {"iptables": "iptables", "ip": "iproute2", "tc": "iproute2", "sysctl": "procps"}
"""The system tools scenarios run, and the Debian/Ubuntu package that brings each."""


def require_tools(tools: tuple[str, ...]) -> None:
    """Raise :class:`MissingTool` for the first of ``tools`` not on PATH."""
    for tool in tools:
        if shutil.which(tool) is None:
            raise MissingTool(tool, TOOL_PACKAGES.get(tool, tool))


class NodeDown(HyphaeError):
    """A node's API did not answer."""


@dataclass
class Node:
    """One daemon of the scenario (its process may be down: killed, or not started yet)."""

    index: int
    data_dir: Path
    train: bool
    gid: int | None
    proc: subprocess.Popen[bytes] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    starts: int = 0
    log_offset: int = 0
    """Size of the log when the current process started (what it printed comes after)."""
    host: str = ""
    """Where it runs: empty on loopback, a namespace host name of the netns harness for ``nat``."""
    connector: Callable[[int, float], socket.socket] | None = None
    """Opens a TCP connection to this node's API port (from inside its namespace); None: plain."""

    @property
    def name(self) -> str:
        return f"node-{self.index}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "daemon.log"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def peer_id(self) -> str:
        return str(self.info.get("peer_id", ""))

    @property
    def multiaddr(self) -> str:
        addrs = self.info.get("multiaddrs") or []
        return next((a for a in addrs if "/127.0.0.1/" in a), addrs[0] if addrs else "")

    def api(self, path: str, timeout_s: float = API_TIMEOUT_S) -> Any:
        """GET ``path`` from this node's API.

        Raises:
            NodeDown: not running, refused, timed out, or an HTTP error.
        """
        if not self.alive or not self.info.get("api_url"):
            raise NodeDown(f"{self.name} is not running")
        url = urllib.parse.urlsplit(self.info["api_url"])
        # From 127.0.0.2: the link emulator leaves the answers to this address alone (_netfilter).
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout_s,
                                          source_address=(RUNNER_SOURCE, 0) if url.hostname == "127.0.0.1" else None)
        try:
            if self.connector is not None:
                conn.sock = self.connector(url.port, timeout_s)
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read()
            if resp.status != 200:
                raise NodeDown(f"{self.name} {path}: HTTP {resp.status} {body[:200]!r}")
            return json.loads(body)
        except (OSError, ValueError, http.client.HTTPException) as exc:
            raise NodeDown(f"{self.name} {path}: {exc}") from None
        finally:
            conn.close()

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def resumed_step(self) -> int | None:
        """The step the current process's worker resumed from (its log line), None if fresh."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self.log_offset)
                text = f.read().decode(errors="replace")
        except OSError:
            return None
        found = _RESUMED.findall(text)
        return int(found[-1]) if found else None

    def ports(self) -> list[int]:
        """Every TCP port this node listens on: libp2p and the tensor plane's data port."""
        ports = {int(a.split("/tcp/")[1].split("/")[0]) for a in self.info.get("multiaddrs", []) if "/tcp/" in a}
        try:
            tensor = self.api("/api/v1/tensor")
        except NodeDown:
            tensor = {}
        for addr in tensor.get("data_addrs", []):
            if "/tcp/" in addr:
                ports.add(int(addr.split("/tcp/")[1].split("/")[0]))
        return sorted(ports)


class Placement:
    """Where the nodes run and how the runner reaches them: loopback in this namespace.

    The ``nat`` scenario substitutes one that runs each node in a network namespace.
    """

    name = "loopback"

    def wrap(self, node: Node, argv: list[str]) -> list[str]:
        """The command that runs ``argv`` where ``node`` lives."""
        return argv

    def listen(self, node: Node) -> str:
        return "/ip4/127.0.0.1/tcp/0"

    def bootstrap_addr(self, boot: Node) -> str:
        return boot.multiaddr

    def connector(self, node: Node) -> Callable[[int, float], socket.socket] | None:
        return None


class Cluster:
    """Starts and tracks the scenario's nodes; node 0 is the network-only bootstrap.

    Args:
        root: the scenario dir (``root/node-<i>/`` per node).
        config_path: the TOML every node gets with ``--config``.
        gid_base: run node i under group ``gid_base + i`` (root only), or None.
        env: extra environment for the daemons (e.g. one torch thread per worker).
    """

    def __init__(self, root: Path, config_path: Path, *, gid_base: int | None, env: dict[str, str],
                 placement: Placement | None = None) -> None:
        self.placement = placement or Placement()
        self.root = Path(root)
        self.config_path = Path(config_path)
        self.gid_base = gid_base
        self.env = {**os.environ, **env}
        self.nodes: list[Node] = []
        self.api_latency_max_s = 0.0
        """The slowest answer to a poll (failures are counted apart, in ``api_failures``)."""
        self.api_calls = 0
        self.api_failures = 0

    # ---- lifecycle -------------------------------------------------------------------------

    def add(self, *, train: bool = True, wait: bool = True, host: str = "") -> Node:
        """Create node ``len(nodes)`` and start it (bootstrapping from node 0 unless it is node 0)."""
        index = len(self.nodes)
        gid = None if self.gid_base is None else self.gid_base + index
        node = Node(index=index, data_dir=self.root / f"node-{index}", train=train, gid=gid, host=host)
        node.connector = self.placement.connector(node)
        self.nodes.append(node)
        self.start(node, wait=wait)
        return node

    def _command(self, node: Node) -> list[str]:
        cmd = [sys.executable, "-m", "hyphae.cli", "node", "join", "--data-dir", str(node.data_dir),
               "--listen", self.placement.listen(node), "--api", "127.0.0.1:0", "--no-mdns",
               "--config", str(self.config_path)]
        if node.index != 0:
            bootstrap = self.placement.bootstrap_addr(self.nodes[0])
            if not bootstrap:
                raise ScenarioError("node 0 (the bootstrap) has no address yet; start it first")
            cmd += ["--bootstrap", bootstrap]
        if not node.train:
            cmd.append("--no-train")
        return self.placement.wrap(node, cmd)

    def start(self, node: Node, *, wait: bool = True) -> None:
        """Start (or restart) ``node``'s process; with ``wait``, return once its node.json is written."""
        if node.alive:
            raise ScenarioError(f"{node.name} is already running (pid {node.proc.pid})")
        node.data_dir.mkdir(parents=True, exist_ok=True)
        (node.data_dir / "node.json").unlink(missing_ok=True)  # a killed node's stale file must not look ready
        node.log_offset = node.log_path.stat().st_size if node.log_path.exists() else 0
        node.info = {}
        with open(node.log_path, "ab") as log_file:
            node.proc = subprocess.Popen(self._command(node), stdin=subprocess.DEVNULL, stdout=log_file,
                                         stderr=subprocess.STDOUT, start_new_session=True, env=self.env,
                                         group=node.gid)
        node.starts += 1
        if wait:
            self.wait_ready(node)

    def wait_ready(self, node: Node, timeout_s: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                info = json.loads((node.data_dir / "node.json").read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                info = {}
            if info.get("pid") == node.proc.pid:
                node.info = info
                return
            if node.proc.poll() is not None:
                raise ScenarioError(f"{node.name} exited with {node.proc.returncode} during start-up:\n"
                                    f"{node.log_tail()}")
            time.sleep(0.1)
        raise ScenarioError(f"{node.name} did not write node.json within {timeout_s:.0f} s:\n{node.log_tail()}")

    def kill(self, node: Node) -> None:
        """Crash the node: SIGKILL the daemon and its worker at once (no checkpoint on the way out).

        The workers' shared-memory resource trackers are left to exit on their own: they unlink
        the segments the killed processes held.
        """
        if not node.alive:
            return
        for pid in [node.proc.pid, *_children(node.proc.pid)]:
            if "resource_tracker" not in _cmdline(pid):
                _signal(pid, signal.SIGKILL)
        node.proc.wait(10)
        _cleanup_group(node.proc.pid, grace_s=3.0)

    def stop(self, node: Node, grace_s: float = STOP_GRACE_S) -> None:
        """Stop the node cleanly (SIGTERM: it checkpoints), SIGKILL after ``grace_s``; join it."""
        if node.proc is None:
            return
        if node.proc.poll() is None:
            _signal(node.proc.pid, signal.SIGTERM)
            try:
                node.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0f s; killing it", node.name, grace_s)
                _killpg(node.proc.pid)
                node.proc.wait(10)
        _cleanup_group(node.proc.pid, grace_s=3.0)

    def close(self) -> None:
        """Stop every node (all at once, then join each); safe to call twice."""
        running = [n for n in self.nodes if n.alive]
        for node in running:
            _signal(node.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for node in self.nodes:
            if node.proc is None:
                continue
            try:
                node.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _killpg(node.proc.pid)
                node.proc.wait(10)
            _cleanup_group(node.proc.pid, grace_s=2.0)

    # ---- observation -----------------------------------------------------------------------

    def live(self) -> list[Node]:
        return [n for n in self.nodes if n.alive]

    def trainers(self) -> list[Node]:
        return [n for n in self.live() if n.train]

    def poll(self, nodes: list[Node], path: str) -> dict[int, Any]:
        """GET ``path`` from each node in parallel: ``{index: json}``, or a NodeDown for a node that
        did not answer. Tracks the slowest answer (``api_latency_max_s``)."""

        def one(node: Node) -> tuple[int, Any]:
            started = time.monotonic()
            try:
                result: Any = node.api(path)
            except NodeDown as exc:
                self.api_failures += 1
                return node.index, exc
            self.api_latency_max_s = max(self.api_latency_max_s, time.monotonic() - started)
            return node.index, result

        if not nodes:
            return {}
        with ThreadPoolExecutor(max_workers=min(16, len(nodes))) as pool:
            results = dict(pool.map(one, nodes))
        self.api_calls += len(nodes)
        return results

    def describe(self) -> list[dict[str, Any]]:
        return [{"index": n.index, "peer_id": n.peer_id, "train": n.train, "starts": n.starts,
                 "alive": n.alive, "data_dir": str(n.data_dir), "gid": n.gid, "host": n.host or "loopback"}
                for n in self.nodes]


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                members.append(int(entry.name))
    return members


def _cleanup_group(pgid: int, grace_s: float) -> None:
    """Wait for what is left of the node's process group (resource trackers), then SIGKILL it."""
    deadline = time.monotonic() + grace_s
    while _group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _group_members(pgid):
        _killpg(pgid)


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
