"""The plane's TCP data listener, and the sessions the libp2p handshake left waiting for it.

Binding follows :class:`~.config.TensorConfig` ``listen``; the advertised addresses are
``announce`` if given, else the bound ones with ``0.0.0.0`` expanded to this machine's IPv4
addresses (as the libp2p host does). An inbound connection becomes a session only through
:func:`~.connect.accept_direct`, i.e. once its first frame authenticates under a pending
session's keys; anything else is closed and logged.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

from .._addrs import interface_ipv4s, is_dialable
from ..errors import PeerError, ProtocolViolation
from . import connect
from .carrier import PATH_DIRECT, PATH_PUNCHED
from .config import TensorConfig

__all__ = ["DataListener"]

log = logging.getLogger(__name__)

MAX_ADVERTISED = 8
Spawn = Callable[..., Any]


class DataListener:
    """Listening sockets and pending sessions of one plane.

    Args:
        config: listen/announce addresses and the handshake timeout.
        local_id: this node's peer id (sent in HELLO_OK).
        on_link: ``await on_link(peer_id, link)`` runs an authenticated inbound connection.
        spawn: ``spawn(name, fn, *args)`` starts a task in the plane's task group.
    """

    def __init__(self, config: TensorConfig, *, local_id: str,
                 on_link: Callable[[str, connect.Link], Awaitable[None]], spawn: Spawn) -> None:
        self.config = config
        self.local_id = local_id
        self._on_link = on_link
        self._spawn = spawn
        self.sockets: list[socket.socket] = []
        self.addrs: tuple[str, ...] = ()
        self._pending: dict[bytes, connect.Pending] = {}

    def start(self) -> None:
        """Bind every listen address and start accepting. Raises OSError if one cannot bind."""
        bound = []
        try:
            for addr in self.config.listen:
                sock, actual = _bind(addr)
                self.sockets.append(sock)
                bound.append(actual)
        except OSError:
            self.close()
            raise
        for sock, actual in zip(self.sockets, bound):
            self._spawn(f"tensor-accept {actual}", self._accept_loop, sock)
        self.addrs = self.config.announce or _advertised(bound)

    def close(self) -> None:
        """Close the sockets (call once the accept tasks have ended)."""
        for sock in self.sockets:
            sock.close()

    # ---- pending sessions ------------------------------------------------------------------

    def add_pending(self, session_id: bytes, pending: connect.Pending) -> None:
        self._pending[session_id] = pending

    def drop_pending(self, session_id: bytes) -> None:
        self._pending.pop(session_id, None)

    def lookup(self, session_id: bytes) -> connect.Pending | None:
        pending = self._pending.get(session_id)
        return pending if pending is not None and pending.expires_at > time.monotonic() else None

    def claim(self, session_id: bytes) -> connect.Pending | None:
        pending = self.lookup(session_id)
        self._pending.pop(session_id, None)
        return pending

    def expire(self, now: float) -> None:
        for sid in [s for s, p in self._pending.items() if p.expires_at <= now]:
            del self._pending[sid]

    # ---- accepting -------------------------------------------------------------------------

    async def _accept_loop(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as exc:
                log.warning("tensor data listener error (continuing): %s", exc)
                await asyncio.sleep(0.5)
                continue
            self._spawn("tensor-inbound", self._accept_one, conn)

    def adopt_socket(self, sock: socket.socket) -> None:
        """Treat a socket connected some other way (hole punching) as an inbound connection."""
        self._spawn("tensor-punched", self._accept_one, sock, PATH_PUNCHED)

    async def _accept_one(self, sock: socket.socket, path: str = PATH_DIRECT) -> None:
        try:
            pending, link = await connect.accept_direct(
                sock, self.lookup, self.claim, local_id=self.local_id, limits=self.config.limits,
                timeout_s=self.config.handshake_timeout_s, path=path)
        except ProtocolViolation as exc:
            log.warning("refused a data connection: %s", exc)
            return
        except PeerError as exc:
            log.info("inbound data connection failed: %s", exc)
            return
        await self._on_link(pending.peer_id, link)


def _bind(addr: str) -> tuple[socket.socket, str]:
    parts = addr.split("/")
    family = socket.AF_INET if parts[1] == "ip4" else socket.AF_INET6
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((parts[2], int(parts[4])))
        sock.listen(128)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock, f"/{parts[1]}/{parts[2]}/tcp/{sock.getsockname()[1]}"


def _advertised(bound: list[str]) -> tuple[str, ...]:
    out: list[str] = []
    for addr in bound:
        parts = addr.split("/")
        if parts[2] == "0.0.0.0":
            out += [f"/ip4/{ip}/tcp/{parts[4]}" for ip in interface_ipv4s()]
        elif parts[2] != "::" and is_dialable(addr):
            out.append(addr)  # an IPv6 wildcard is not expanded: announce the addresses instead
    return tuple(dict.fromkeys(out))[:MAX_ADVERTISED]

