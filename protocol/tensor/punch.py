"""TCP simultaneous open for the tensor plane's data connection (the :class:`~.connect.Puncher`).

When neither peer can accept a connection (both behind NAT), each connects to the other at the
same moment from a port it bound with ``SO_REUSEADDR | SO_REUSEPORT``: each SYN opens a mapping
in its own NAT that lets the other's SYN in, and the two crossing SYNs become one TCP connection
(RFC 793 simultaneous open). Port-preserving NATs (Linux MASQUERADE, most home routers) keep the
local port as the external one, so a peer's address is predicted as its observed public IP at the
port it bound; symmetric NATs pick a new port per destination and defeat this, which is when the
plane falls back to the libp2p stream (relayed, within the relay's limits).

Coordination rides on the handshake's libp2p stream (relayed or not), like DCUtR:

1. dialer -> ``{"v": 1, "t": "punch", "round": r, "addrs": [...]}`` (its candidates; RTT timer on)
2. listener -> ``{"v": 1, "t": "punch-ok", "addrs": [...]}`` (or ``"punch-no"``)
3. dialer -> ``{"v": 1, "t": "punch-sync"}``, then waits RTT/2; the listener connects on receipt,
   so both SYNs leave at about the same time. Up to ``rounds`` rounds, each on fresh ports.

The resulting socket is only a pipe: the session's sealed HELLO exchange then authenticates it
exactly as a direct dial (a wrong or hijacked connection fails there).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from typing import Any

from .._addrs import interface_ipv4s
from ..errors import EndOfStream, PeerError, ProtocolViolation
from ..host import Host
from ..stream import MessageStream
from ..wire import expect_map
from .connect import parse_data_addr

__all__ = ["TcpPuncher", "MAX_CANDIDATES"]

log = logging.getLogger(__name__)

WIRE_VERSION = 1
MAX_CANDIDATES = 4
MAX_ADDR_CHARS = 64


def _candidates(port: int, observed_ips: list[str]) -> list[str]:
    """Where the peer may reach our socket: public IPs peers see us at, then our own IPv4s."""
    local = [ip for ip in interface_ipv4s() if not ip.startswith("127.")]
    ips = list(dict.fromkeys([ip for ip in observed_ips if ":" not in ip] + local))
    return [f"/ip4/{ip}/tcp/{port}" for ip in ips][:MAX_CANDIDATES]


def _parse_addrs(value: Any) -> list[tuple[str, int]]:
    if not isinstance(value, list) or len(value) > MAX_CANDIDATES:
        raise ProtocolViolation(f"punch addrs must be a list of at most {MAX_CANDIDATES}")
    out: list[tuple[str, int]] = []
    for item in value:
        if not isinstance(item, str) or len(item) > MAX_ADDR_CHARS:
            raise ProtocolViolation(f"punch addrs must be strings of <= {MAX_ADDR_CHARS} characters")
        try:
            family, host, port = parse_data_addr(item)
        except ValueError as exc:
            raise ProtocolViolation(f"punch address: {exc}") from exc
        if family == socket.AF_INET and (host, port) not in out:
            out.append((host, port))
    return out


def _bound_socket(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("0.0.0.0", port))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class TcpPuncher:
    """The tensor plane's hole punching: pass it to ``open_tensor_plane(..., puncher=...)``.

    Args:
        host: the node's host (for the public IPs peers observe us at).
        rounds: simultaneous-open attempts before giving up (each on fresh ports).
        connect_timeout_s: how long one attempt's connects may take.
    """

    def __init__(self, host: Host, *, rounds: int = 3, connect_timeout_s: float = 3.0) -> None:
        if not 1 <= rounds <= 10 or not 0 < connect_timeout_s <= 30:
            raise ValueError(f"rounds must be 1-10 and connect_timeout_s 0-30, got {rounds}, {connect_timeout_s}")
        self.host = host
        self.rounds = rounds
        self.connect_timeout_s = connect_timeout_s
        self.stats: dict[str, int] = {"attempts": 0, "punched": 0, "failed": 0}

    async def _observed_ips(self, peer_id: str | None = None) -> list[str] | None:
        """Our public IPs as peers see them; None if libp2p hole punching with ``peer_id`` already
        failed (the NATs in between defeat port prediction: do not spend rounds on it)."""
        try:
            reach = await self.host.reachability()
        except Exception as exc:  # noqa: BLE001 — without them we still offer our own addresses
            log.debug("no reachability for hole punching: %s", exc)
            return []
        if peer_id is not None:
            state = reach.get("hole_punching", {}).get("peers", {}).get(peer_id, {})
            if state.get("state") == "failed":
                return None
        ips = []
        for addr in reach.get("observed", []) + reach.get("confirmed", []):
            parts = str(addr).split("/")
            if len(parts) > 2 and parts[1] == "ip4" and parts[2] not in ips:
                ips.append(parts[2])
        return ips

    async def dial(self, peer_id: str, stream: MessageStream) -> socket.socket | None:
        """Dialer side (see the module docstring); the connected socket or None."""
        observed = await self._observed_ips(peer_id)
        if observed is None:
            log.debug("libp2p hole punching with %s failed before; not trying TCP simultaneous open", peer_id)
            return None
        for round_ in range(self.rounds):
            first = _bound_socket(0)
            port = first.getsockname()[1]
            mine = _candidates(port, observed)
            self.stats["attempts"] += 1
            try:
                started = time.monotonic()
                reply = expect_map(await stream.request({"v": WIRE_VERSION, "t": "punch", "round": round_,
                                                         "addrs": mine}),
                                   {"v": int, "t": str}, {"addrs": list}, what="punch reply")
                if reply["t"] != "punch-ok":
                    first.close()
                    log.debug("%s declined hole punching", peer_id)
                    return None
                theirs = _parse_addrs(reply.get("addrs", []))
                rtt = time.monotonic() - started
                await stream.send({"v": WIRE_VERSION, "t": "punch-sync"})
            except (PeerError, ProtocolViolation) as exc:
                first.close()
                log.debug("hole punching with %s stopped: %s", peer_id, exc)
                return None
            await asyncio.sleep(rtt / 2)
            sock = await self._connect(first, port, theirs)
            if sock is not None:
                self.stats["punched"] += 1
                log.info("punched a data connection to %s (%s) in round %d", peer_id, sock.getpeername(), round_ + 1)
                return sock
        self.stats["failed"] += 1
        return None

    async def answer(self, peer_id: str, stream: MessageStream, message: dict[str, Any]) -> socket.socket | None:
        """Listener side, given the dialer's ``punch`` message; the connected socket or None."""
        m = expect_map(message, {"v": int, "t": str, "round": int, "addrs": list}, what="punch")
        if m["v"] != WIRE_VERSION:
            await stream.send({"v": WIRE_VERSION, "t": "punch-no"})
            return None
        theirs = _parse_addrs(m["addrs"])
        first = _bound_socket(0)
        port = first.getsockname()[1]
        try:
            await stream.send({"v": WIRE_VERSION, "t": "punch-ok", "addrs": _candidates(port, await self._observed_ips() or [])})
            sync = expect_map(await stream.recv(), {"v": int, "t": str}, what="punch sync")
            if sync["t"] != "punch-sync":
                raise ProtocolViolation(f"expected punch-sync, got {sync['t']!r:.40}")
        except (PeerError, ProtocolViolation, EndOfStream):
            first.close()
            raise
        return await self._connect(first, port, theirs)

    async def _connect(self, first: socket.socket, port: int, targets: list[tuple[str, int]]) -> socket.socket | None:
        """Connect to every target at once from ``port``; keep the first that connects."""
        if not targets:
            first.close()
            return None
        socks = [first] + [_bound_socket(port) for _ in targets[1:]]
        loop = asyncio.get_running_loop()
        winner: socket.socket | None = None

        async def one(sock: socket.socket, target: tuple[str, int]) -> None:
            nonlocal winner
            try:
                await loop.sock_connect(sock, target)
            except OSError as exc:
                log.debug("simultaneous open to %s:%d failed: %s", *target, exc)
                return
            if winner is None:
                winner = sock
                for task in tasks:
                    if task is not asyncio.current_task():
                        task.cancel()

        tasks: list[asyncio.Task[None]] = []
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.connect_timeout_s):
                async with asyncio.TaskGroup() as tg:
                    tasks.extend(tg.create_task(one(s, t)) for s, t in zip(socks, targets))
        for sock in socks:
            if sock is not winner:
                sock.close()
        return winner
