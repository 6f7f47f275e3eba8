"""The data dir: what lives where, the single-instance lock, and ``node.json``.

Layout::

    identity.key    Ed25519 key (0600); the peer id derives from it
    peers.json      the peer book (peers met, redialed after a restart)
    node.json       written once the daemon is ready: peer_id, multiaddrs, api_url, pid
    api.token       bearer token for the HTTP API when it binds beyond loopback (0600)
    daemon.lock     held (flock) while a daemon runs on this dir
    runs/<run>/runstate.msgpack   the replicated run state (signed envelopes, re-verified on load)
    checkpoints/    the training worker's checkpoints
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
from pathlib import Path
from typing import Any

from hyphae.protocol.atomic import atomic_write_bytes, atomic_write_json
from hyphae.protocol.errors import HyphaeError

__all__ = ["DataDir", "AlreadyRunning"]


class AlreadyRunning(HyphaeError):
    """Another daemon holds this data dir."""


class DataDir:
    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self._lock_fd: int | None = None

    @property
    def identity_key(self) -> Path:
        return self.root / "identity.key"

    @property
    def peerbook(self) -> Path:
        return self.root / "peers.json"

    @property
    def node_json(self) -> Path:
        return self.root / "node.json"

    @property
    def api_token_file(self) -> Path:
        return self.root / "api.token"

    @property
    def lock_file(self) -> Path:
        return self.root / "daemon.lock"

    def create(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def lock(self) -> None:
        """Take the single-instance lock.

        Raises:
            AlreadyRunning: another live process holds it (its pid is in the message). The lock
                is an flock, so a daemon killed with -9 never leaves a stale lock behind.
        """
        self.create()
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise AlreadyRunning(
                f"another hyphae daemon (pid {holder}) is running on {self.root}; stop it with "
                f"`hyphae node leave --data-dir {self.root}` or pick another --data-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    def write_node_json(self, info: dict[str, Any]) -> None:
        atomic_write_json(self.node_json, info)

    def read_node_json(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.node_json.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def remove_node_json(self) -> None:
        self.node_json.unlink(missing_ok=True)

    def api_token(self) -> str:
        """The API token, generated on first use (0600)."""
        try:
            token = self.api_token_file.read_text().strip()
            if token:
                return token
        except FileNotFoundError:
            pass
        token = secrets.token_urlsafe(32)
        atomic_write_bytes(self.api_token_file, (token + "\n").encode(), mode=0o600)
        return token
