"""The plane's TCP data listener, and the sessions the libp2p handshake left waiting for it.

Binding follows :class:`~.config.TensorConfig` ``listen``; the advertised addresses are
``announce`` if given, else the bound ones with ``0.0.0.0`` expanded to this machine's IPv4
addresses (as the libp2p host does). An inbound connection becomes a session only through
:func:`~.connect.accept_direct`, i.e. once its first frame authenticates under a pending
session's keys; anything else is closed and logged.

Anyone can open TCP connections to the data port, so connections not yet authenticated are
capped (:data:`MAX_UNAUTHENTICATED`, :data:`MAX_UNAUTHENTICATED_PER_IP`; each lasts at most the
handshake timeout), and so are pending sessions per peer (:data:`MAX_PENDING_PER_PEER`); a
session id already pending is never replaced (it would hijack another peer's handshake).
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
MAX_UNAUTHENTICATED = 128
MAX_UNAUTHENTICATED_PER_IP = 16
MAX_PENDING_PER_PEER = 16
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
        self._unauthenticated: dict[str, int] = {}
        self.refused_connections = 0

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
        """Remember a session the libp2p handshake agreed on, until its TCP connection arrives.

        Raises:
            ProtocolViolation: the id is already pending, or the peer has too many pending.
        """
        if session_id in self._pending:
            raise ProtocolViolation("session id already pending; pick a fresh random one")
        if self.pending_of(pending.peer_id) >= MAX_PENDING_PER_PEER:
            raise ProtocolViolation(f"more than {MAX_PENDING_PER_PEER} pending data connections from one peer")
        self._pending[session_id] = pending

    def pending_of(self, peer_id: str) -> int:
        """Sessions of ``peer_id`` waiting for their TCP connection."""
        now = time.monotonic()
        return sum(1 for p in self._pending.values() if p.peer_id == peer_id and p.expires_at > now)

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
            ip = _remote_ip(conn)
            held = self._unauthenticated.get(ip, 0)
            if held >= MAX_UNAUTHENTICATED_PER_IP or sum(self._unauthenticated.values()) >= MAX_UNAUTHENTICATED:
                self.refused_connections += 1
                log.info("refused a data connection from %s: too many not yet authenticated", ip)
                conn.close()
                continue
            self._unauthenticated[ip] = held + 1
            if self._spawn("tensor-inbound", self._accept_counted, conn, ip) is None:
                self._unauthenticated[ip] -= 1
                conn.close()

    async def _accept_counted(self, sock: socket.socket, ip: str) -> None:
        authenticated = False

        def on_link_ready() -> None:
            nonlocal authenticated
            authenticated = True
            self._uncount(ip)

        try:
            await self._accept_one(sock, on_authenticated=on_link_ready)
        finally:
            if not authenticated:
                self._uncount(ip)

    def _uncount(self, ip: str) -> None:
        left = self._unauthenticated.get(ip, 0) - 1
        if left > 0:
            self._unauthenticated[ip] = left
        else:
            self._unauthenticated.pop(ip, None)

    def adopt_socket(self, sock: socket.socket) -> None:
        """Treat a socket connected some other way (hole punching) as an inbound connection."""
        self._spawn("tensor-punched", self._accept_one, sock, PATH_PUNCHED)

    async def _accept_one(self, sock: socket.socket, path: str = PATH_DIRECT,
                          on_authenticated: Callable[[], None] | None = None) -> None:
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
        if on_authenticated is not None:
            on_authenticated()
        await self._on_link(pending.peer_id, link)


def _remote_ip(sock: socket.socket) -> str:
    try:
        return str(sock.getpeername()[0])
    except (OSError, IndexError):
        return "?"


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

