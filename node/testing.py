"""Tools for testing the daemon as a process: start ``hyphae node join``, poll, measure CPU."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

__all__ = ["DaemonProcess", "RawReply", "raw_request", "sync_wait", "process_cpu_s", "process_memory_kib",
           "tagged_pids"]

TAG_ENV = "HYPHAE_TEST_DAEMON_DIR"
"""Set on every daemon a test starts; its worker inherits it, so the whole family can be found
(and killed) even after the daemon died and the worker was reparented."""


def sync_wait(predicate: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.05) -> Any:
    """Poll ``predicate`` until truthy; raise AssertionError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


class RawReply(NamedTuple):
    status: int
    headers: dict[str, str]
    body: bytes


def raw_request(base_url: str, method: str, path: str, *, headers: dict[str, str] | None = None,
                body: bytes | None = None, timeout_s: float = 10.0) -> RawReply:
    """One HTTP request with exactly the headers given (``Host`` included, as an attacker sends it).

    A ``text/event-stream`` answer is not read (it never ends): its body comes back empty.
    """
    url = urllib.parse.urlsplit(base_url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout_s)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        sent = {"Host": url.netloc, **(headers or {})}
        if body is not None:
            sent.setdefault("Content-Length", str(len(body)))
        for key, value in sent.items():
            conn.putheader(key, value)
        conn.endheaders(body)
        resp = conn.getresponse()
        got = {k.lower(): v for k, v in resp.getheaders()}
        data = b"" if got.get("content-type", "").startswith("text/event-stream") else resp.read()
        return RawReply(resp.status, got, data)
    finally:
        conn.close()


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_memory_kib(pid: int) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` (peak RSS) of a live process in KiB, from /proc/<pid>/status."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def tagged_pids(tag: str) -> list[int]:
    """Live processes (not zombies) whose environment carries ``TAG_ENV=tag``."""
    needle = f"{TAG_ENV}={tag}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:  # gone, or not ours
            continue
    return found


class DaemonProcess:
    """One ``hyphae node join`` process on loopback with its own data dir."""

    def __init__(self, data_dir: Path, args: list[str], *, train: bool = False) -> None:
        self.data_dir = Path(data_dir)
        self.args = list(args)
        self.train = train
        self.log_path = self.data_dir / "test-daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.info: dict[str, Any] = {}

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "hyphae.cli", "node", "join", "--data-dir", str(self.data_dir),
               "--listen", "/ip4/127.0.0.1/tcp/0", "--api", "127.0.0.1:0", "--no-mdns"]
        if not self.train:
            cmd.append("--no-train")
        elif "--threads" not in self.args:
            cmd += ["--threads", "1"]  # tests start several trainers on one machine
        return cmd + self.args

    def spawn(self) -> DaemonProcess:
        """Start the daemon without waiting for it (a crash test may kill it mid-startup)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "node.json").unlink(missing_ok=True)
        env = dict(os.environ, **{TAG_ENV: str(self.data_dir)})
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env)
        return self

    def start(self, timeout_s: float = 90.0) -> DaemonProcess:
        """Spawn the daemon and wait for its ``node.json``."""
        self.spawn()
        ready = False
        try:
            sync_wait(self._ready, timeout_s, f"daemon in {self.data_dir} to write node.json")
            ready = True
        finally:
            if not ready:
                self.kill()  # a daemon that never came up must not outlive the test
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
            raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
        return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def peer_id(self) -> str:
        return self.info["peer_id"]

    @property
    def multiaddr(self) -> str:
        return self.info["multiaddrs"][0]

    @property
    def token(self) -> str:
        """The daemon's ``api.token`` (written at start-up)."""
        return (self.data_dir / "api.token").read_text().strip()

    def api(self, path: str, method: str = "GET", token: str | None = None) -> Any:
        """``method path`` as the CLI sends it: a POST always carries the API token."""
        req = urllib.request.Request(self.info["api_url"] + path, method=method)
        if token is None and method != "GET":
            token = self.token
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError:
            raise
        except urllib.error.URLError as exc:  # a slow accept reads as a timeout, like a slow reply
            if isinstance(exc.reason, TimeoutError):
                raise TimeoutError(f"{self.data_dir.name} {path}: {exc.reason}") from exc
            state = "alive" if self.proc is not None and self.proc.poll() is None else "exited"
            raise ConnectionError(f"{self.data_dir.name} {path}: {exc.reason} (process {state}); "
                                  f"log tail:\n{self.log()[-3000:]}") from exc

    def peer_ids(self) -> set[str]:
        """Peers that passed the hello (agent known)."""
        return {p["peer_id"] for p in self.api("/api/v1/peers")["peers"] if p["agent"]}

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout_s: float) -> int:
        return self.proc.wait(timeout_s)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)

    def family(self) -> list[int]:
        """The daemon and its live descendants (its worker, even once orphaned)."""
        return tagged_pids(str(self.data_dir))

    def kill_family(self) -> None:
        """SIGKILL the daemon and its worker at once, as the OOM killer or a power cut would:
        whatever either was writing stops mid-write."""
        others = [pid for pid in self.family() if self.proc is None or pid != self.proc.pid]
        for pid in others:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.kill()
