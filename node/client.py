"""Talking to a running daemon over its local API (what ``hyphae node status|leave`` use).

The client always sends the daemon's ``api.token``: the API refuses every state-changing request
without it (a web page cannot read the file), and reads need it when the API binds beyond loopback.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hyphae.protocol.errors import HyphaeError

from .datadir import DataDir

__all__ = ["ApiClient", "NotRunning", "pid_alive", "read_api_token", "TOKEN_ENV"]

TOKEN_ENV = "HYPHAE_API_TOKEN"
"""Overrides the data dir's ``api.token`` (for a daemon whose data dir this machine cannot read)."""


def read_api_token(data_dir: Path) -> str | None:
    """``$HYPHAE_API_TOKEN``, else ``data_dir/api.token``, else None (never created here)."""
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV].strip()
    try:
        return DataDir(data_dir).api_token_file.read_text().strip() or None
    except (FileNotFoundError, PermissionError):
        return None


class NotRunning(HyphaeError):
    """No daemon answers for this data dir or URL."""


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (exited, not yet reaped by its parent) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc (not Linux): the signal check is all we have
    return state not in ("Z", "X")


@dataclass
class ApiClient:
    base_url: str
    token: str | None = None
    pid: int | None = None
    timeout_s: float = 5.0

    @classmethod
    def for_data_dir(cls, data_dir: Path) -> ApiClient:
        """Find the daemon of ``data_dir`` through its ``node.json``.

        Raises:
            NotRunning: no node.json, or the pid in it is gone (a daemon killed with -9).
        """
        datadir = DataDir(data_dir)
        info = datadir.read_node_json()
        if info is None:
            raise NotRunning(f"no daemon is running on {datadir.root} (no node.json); start one with `hyphae node join`")
        pid = int(info.get("pid", 0))
        if pid and not pid_alive(pid):
            raise NotRunning(f"the daemon of {datadir.root} (pid {pid}) is not running any more")
        return cls(str(info["api_url"]), token=read_api_token(datadir.root), pid=pid or None)

    @classmethod
    def for_url(cls, url: str, data_dir: Path) -> ApiClient:
        """A client for the daemon at ``url``, with the token of ``data_dir`` (or ``$HYPHAE_API_TOKEN``)."""
        return cls(url, token=read_api_token(data_dir))

    def _call(self, method: str, path: str) -> Any:
        req = urllib.request.Request(self.base_url.rstrip("/") + path, method=method)
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            body = exc.read().decode(errors="replace")
            raise HyphaeError(f"{method} {path} failed with HTTP {exc.code}: {body}") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            raise NotRunning(f"the daemon at {self.base_url} does not answer ({exc})") from None

    def node(self) -> dict[str, Any]:
        return self._call("GET", "/api/v1/node")

    def peers(self) -> list[dict[str, Any]]:
        return self._call("GET", "/api/v1/peers")["peers"]

    def training(self) -> dict[str, Any] | None:
        """The training progress, or None on a daemon that does not train."""
        try:
            return self._call("GET", "/api/v1/training")
        except HyphaeError as exc:
            if "HTTP 404" in str(exc):
                return None
            raise

    def get(self, path: str) -> Any:
        return self._call("GET", path)

    def leave(self, *, wait_s: float = 10.0) -> bool:
        """Ask the daemon to stop; wait until its process is gone. True if it stopped in time."""
        self._call("POST", "/api/v1/node/leave")
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if self.pid is not None and not pid_alive(self.pid):
                return True
            if self.pid is None:
                try:
                    self.node()
                except NotRunning:
                    return True
            time.sleep(0.05)
        return False
