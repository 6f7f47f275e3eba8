"""Processes inside a :class:`harness.Testnet`: real daemons and bare hosts, and how to ask them.

* :class:`NetnsDaemon` runs ``python -m hyphae.cli node join`` in a namespace (``ip netns exec``)
  with its API on 127.0.0.1 *inside* that namespace. :meth:`NetnsDaemon.api` reaches it over a
  socket opened from inside the namespace (:meth:`harness.Testnet.connect`), so the root namespace
  needs no route into the testnet and no daemon listens anywhere it should not.
* :class:`NetnsPeer` runs ``deploy/netns/peer.py`` (a host and a tensor plane, driven by JSON
  lines over its stdin/stdout) for what the daemon API does not show: ``Host.reachability()``,
  tensor transfers and their path.

Everything started here is registered with the testnet, which stops it on exit.
"""

from __future__ import annotations

import http.client
import itertools
import json
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from harness import Testnet

__all__ = ["NetnsDaemon", "NetnsPeer", "LISTEN", "wait_until"]

LISTEN = "/ip4/0.0.0.0/tcp/4001"
PEER_SCRIPT = Path(__file__).with_name("peer.py")


def wait_until(predicate: Any, timeout_s: float, what: str, interval_s: float = 0.2) -> Any:
    """Poll ``predicate`` until truthy; AssertionError naming ``what`` (and the last value) after."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what} (last: {last!r:.300})")
        time.sleep(interval_s)


def public_addr(addrs: list[str]) -> str:
    """The first advertised address that is not loopback (our hosts list those last anyway)."""
    return next(a for a in addrs if not a.startswith("/ip4/127.") and "/p2p-circuit" not in a)


class _Started:
    """What a daemon and a bare host inside a namespace both tell once started: their log, peer
    id and the multiaddr others dial (``ADDRS_KEY`` names where their ready info lists addresses)."""

    ADDRS_KEY = "multiaddrs"
    log_path: Path
    info: dict[str, Any]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def peer_id(self) -> str:
        return self.info["peer_id"]

    @property
    def multiaddr(self) -> str:
        return public_addr(self.info[self.ADDRS_KEY])


class NetnsDaemon(_Started):
    """One ``hyphae node join`` in a namespace, with its own data dir under ``root``."""

    def __init__(self, net: Testnet, host: str, root: Path, args: list[str] | None = None) -> None:
        self.net, self.host = net, host
        self.data_dir = Path(root) / host
        self.args = list(args or [])
        self.log_path = self.data_dir / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.info: dict[str, Any] = {}

    def start(self, timeout_s: float = 60.0) -> NetnsDaemon:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "node.json").unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "hyphae.cli", "node", "join", "--data-dir", str(self.data_dir), "--listen",
               LISTEN, "--api", "127.0.0.1:0", "--no-mdns", "--no-train", *self.args]
        with open(self.log_path, "ab") as log:
            self.proc = self.net.popen(self.host, cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_until(self._ready, timeout_s, f"daemon in {self.host} to write node.json")
        return self

    def _ready(self) -> bool:
        try:
            info = json.loads((self.data_dir / "node.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            info = {}
        if info.get("pid") == self.proc.pid:
            self.info = info
            return True
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon in {self.host} exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
        return False


    def api(self, path: str, method: str = "GET") -> Any:
        port = int(self.info["api_url"].rsplit(":", 1)[1])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.sock = self.net.connect(self.host, ("127.0.0.1", port))
        try:
            conn.request(method, path)
            response = conn.getresponse()
            return json.loads(response.read())
        finally:
            conn.close()

    def peers(self) -> dict[str, dict[str, Any]]:
        """Peers that passed the hello, by peer id."""
        return {p["peer_id"]: p for p in self.api("/api/v1/peers")["peers"] if p.get("agent")}

    def stop(self, timeout_s: float = 15.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.terminate()
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)


class NetnsPeer(_Started):
    """``deploy/netns/peer.py`` in a namespace: ``call("reach")``, ``call("send", peer=…, bytes=…)``."""

    ADDRS_KEY = "addrs"

    def __init__(self, net: Testnet, host: str, *, bootstrap: list[str] | None = None,
                 nat: dict[str, Any] | None = None, network: str = "nattest", log_dir: Path | None = None,
                 extra: list[str] | None = None) -> None:
        self.net, self.host = net, host
        self.args = ["--listen", LISTEN, "--network", network, "--nat", json.dumps(nat or {}), *(extra or [])]
        for addr in bootstrap or []:
            self.args += ["--bootstrap", addr]
        self.log_path = (log_dir or Path("/tmp")) / f"{net.prefix}-{host}.log"
        self.proc: subprocess.Popen[str] | None = None
        self.info: dict[str, Any] = {}
        self._replies: queue.Queue[dict[str, Any]] = queue.Queue()
        self._stash: dict[int, dict[str, Any]] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def start(self, timeout_s: float = 30.0) -> NetnsPeer:
        log = open(self.log_path, "w")  # noqa: SIM115 — owned by the child until it exits
        self.proc = self.net.popen(self.host, [sys.executable, str(PEER_SCRIPT), *self.args], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=log, text=True, bufsize=1)
        threading.Thread(target=self._read, daemon=True, name=f"peer-{self.host}").start()
        try:
            self.info = self._replies.get(timeout=timeout_s)
        except queue.Empty:
            raise AssertionError(f"peer in {self.host} not ready after {timeout_s} s:\n{self.log()[-3000:]}") from None
        if "peer_id" not in self.info:
            raise AssertionError(f"peer in {self.host} failed to start: {self.info}\n{self.log()[-3000:]}")
        return self

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self._replies.put(json.loads(line))
            except json.JSONDecodeError:
                continue
        self._replies.put({"error": "process exited", "id": None})


    def call(self, op: str, timeout_s: float = 30.0, **fields: Any) -> Any:
        """Send one request and wait for its reply; raises RuntimeError with the peer's error."""
        with self._lock:
            rid = next(self._ids)
            self.proc.stdin.write(json.dumps({"op": op, "id": rid, **fields}) + "\n")
            self.proc.stdin.flush()
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                if rid in self._stash:
                    reply = self._stash.pop(rid)
                    break
            try:
                got = self._replies.get(timeout=max(0.01, min(0.2, deadline - time.monotonic())))
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{op} on {self.host} got no reply within {timeout_s} s") from None
                continue
            if got.get("id") is None and "error" in got:
                raise RuntimeError(f"peer in {self.host} exited:\n{self.log()[-3000:]}")
            if got.get("id") == rid:
                reply = got
                break
            with self._lock:
                self._stash[got["id"]] = got
        if "error" in reply:
            raise RuntimeError(f"{op} on {self.host}: {reply['error']}")
        return reply["result"]

    def reach(self) -> dict[str, Any]:
        return self.call("reach")

    def peers(self) -> dict[str, dict[str, Any]]:
        return {p["peer_id"]: p for p in self.call("peers") if p.get("agent")}

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
