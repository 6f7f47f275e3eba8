"""How a data connection comes to be: key agreement over libp2p, then the path, in order.

Dialer side (:func:`dial`):

1. open ``/hyphae/tensor/1`` to the peer (libp2p has verified who it is) and trade
   :class:`~.wire.Open` / :class:`~.wire.Accept`: ephemeral X25519 keys, a fresh session id, the
   listener's advertised data addresses;
2. **direct**: dial each advertised data address over TCP, send the preamble and a sealed HELLO;
   the listener's sealed HELLO_OK proves it holds the keys;
3. **hole punching** (hook, :class:`Puncher`): the NAT issue adds TCP simultaneous open here,
   coordinated over the same libp2p stream; the punched socket then authenticates with the
   same HELLO exchange as a direct dial. By default there is none;
4. **libp2p fallback**: send :class:`~.wire.Fallback` and keep the libp2p stream itself (direct
   or relayed connection) as the carrier of the same sealed frames.

Listener side: :func:`answer` handles the libp2p half (it records the session id and keys as
*pending*), :func:`accept_direct` the TCP half. A TCP connection is bound to a session only when
its first frame authenticates under that session's keys, so knowing (or stealing) a session id
is worth nothing; a failed attempt does not use up the pending session.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import EndOfStream, HyphaeError, PeerError, ProtocolViolation
from ..stream import MessageStream
from .carrier import PATH_DIRECT, PATH_PUNCHED, Carrier, SocketCarrier, StreamCarrier
from .keys import Ephemeral, FrameOpener, FrameSealer, SessionKeys, derive_keys
from .wire import (PREAMBLE, PREAMBLE_BYTES, SESSION_ID_BYTES, Accept, Fallback, FrameType, Hello,
                   Limits, Open, parse_preamble)

__all__ = ["Link", "Pending", "Puncher", "dial", "answer", "accept_direct", "dial_direct", "prove_as_dialer",
           "parse_data_addr"]

log = logging.getLogger(__name__)


@dataclass
class Link:
    """A data connection ready to become a :class:`~.session.Session`."""

    carrier: Carrier
    sealer: FrameSealer
    opener: FrameOpener
    send_frame_bytes: int = 1 << 20
    """DATA frames this side sends: the smaller of the two sides' limits."""


@dataclass
class Pending:
    """A session the libp2p handshake set up, waiting for its TCP connection."""

    peer_id: str
    keys: SessionKeys
    expires_at: float
    send_frame_bytes: int = 1 << 20


class Puncher(Protocol):
    """Hook for TCP simultaneous open, coordinated over the handshake's libp2p stream.

    The NAT issue implements it; the tensor plane runs without one. It only has to produce a
    connected TCP socket: the session's HELLO exchange then runs over it exactly as over a
    direct dial, so a punched connection is authenticated the same way.
    """

    async def dial(self, peer_id: str, stream: MessageStream) -> socket.socket | None:
        """Dialer side, after direct dials failed: send ``{"v": 1, "t": "punch", ...}`` messages
        on ``stream``, try the simultaneous open, return the socket or None (then: fallback)."""

    async def answer(self, peer_id: str, stream: MessageStream, message: dict[str, Any]) -> socket.socket | None:
        """Listener side, given the dialer's first ``punch`` message: the socket or None."""


def parse_data_addr(addr: str) -> tuple[int, str, int]:
    """``/ip4/A/tcp/P`` or ``/ip6/A/tcp/P`` -> (address family, host, port).

    Raises:
        ValueError: anything else.
    """
    parts = addr.split("/")
    if len(parts) != 5 or parts[0] or parts[1] not in ("ip4", "ip6") or parts[3] != "tcp":
        raise ValueError(f"data address must look like /ip4/192.0.2.1/tcp/4102, got {addr!r:.80}")
    ip = ipaddress.ip_address(parts[2])
    port = int(parts[4])
    if not 0 < port < 65536 or ip.is_unspecified or ip.is_multicast:
        raise ValueError(f"data address {addr!r:.80} is not dialable")
    return (socket.AF_INET if ip.version == 4 else socket.AF_INET6), str(ip), port


def _dial_order(addrs: tuple[str, ...]) -> list[str]:
    """Loopback last: on another machine it would reach something else (harmlessly: the HELLO
    would not authenticate, but it costs a round trip)."""
    def loopback(a: str) -> bool:
        try:
            return ipaddress.ip_address(a.split("/")[2]).is_loopback
        except (ValueError, IndexError):
            return False
    return sorted(addrs, key=loopback)


async def dial_direct(addr: str, session_id: bytes, keys: SessionKeys, *, local_id: str, remote_id: str,
                      limits: Limits, timeout_s: float) -> Link:
    """Connect to a peer's data listener and prove both sides hold the session's keys.

    Raises:
        PeerError: unreachable, refused, timed out, or the answer did not authenticate (the
            socket is closed either way).
    """
    family, host, port = parse_data_addr(addr)
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        async with asyncio.timeout(timeout_s):
            await asyncio.get_running_loop().sock_connect(sock, (host, port))
    except TimeoutError as exc:
        sock.close()
        raise PeerError(f"direct dial of {addr} timed out after {timeout_s} s") from exc
    except OSError as exc:
        sock.close()
        raise PeerError(f"direct dial of {addr} failed: {exc}") from exc
    return await prove_as_dialer(sock, session_id, keys, local_id=local_id, remote_id=remote_id, limits=limits,
                                 timeout_s=timeout_s, what=addr)


async def prove_as_dialer(sock: socket.socket, session_id: bytes, keys: SessionKeys, *, local_id: str,
                          remote_id: str, limits: Limits, timeout_s: float, what: str,
                          path: str = PATH_DIRECT) -> Link:
    """On a connected socket: send the preamble and a sealed HELLO, check the sealed HELLO_OK.

    Raises:
        PeerError: the answer did not come, or did not authenticate (the socket is closed).
    """
    carrier = SocketCarrier(sock, limits, path=path)
    ok = False
    try:
        async with asyncio.timeout(timeout_s):
            sealer, opener = keys.sealer(dialer=True), keys.opener(dialer=True)
            hello = sealer.seal(FrameType.HELLO, Hello(session_id, local_id).to_bytes())
            await carrier.write(PREAMBLE + session_id + hello)
            ftype, header, body = await carrier.read_frame(limits)
            if ftype is not FrameType.HELLO_OK:
                raise ProtocolViolation(f"expected HELLO_OK from {what}, got {ftype.name}")
            answer_ = Hello.from_bytes(opener.open(header, body))
            if answer_.session_id != session_id or answer_.peer_id != remote_id:
                raise ProtocolViolation(f"HELLO_OK from {what} names another session or peer")
        ok = True
        return Link(carrier, sealer, opener)
    except TimeoutError as exc:
        raise PeerError(f"no HELLO_OK from {what} within {timeout_s} s") from exc
    except ProtocolViolation as exc:
        raise PeerError(f"data connection to {what}: {exc}") from exc
    finally:
        if not ok:
            carrier.abort()


async def accept_direct(sock: socket.socket, lookup: Callable[[bytes], Pending | None],
                        claim: Callable[[bytes], Pending | None], *, local_id: str, limits: Limits,
                        timeout_s: float, path: str = PATH_DIRECT) -> tuple[Pending, Link]:
    """Authenticate an inbound TCP data connection against the pending sessions.

    ``lookup`` finds a pending session by id without consuming it; ``claim`` consumes it once
    the HELLO authenticated (None if another connection won the race).

    Raises:
        ProtocolViolation: not a hyphae preamble, unknown session, HELLO that does not
            authenticate (stolen session id, wrong keys, tampering) — the socket is closed and
            the pending session stays available to its rightful owner.
        PeerError: the connection broke or was too slow.
    """
    carrier = SocketCarrier(sock, limits, path=path)
    ok = False
    try:
        async with asyncio.timeout(timeout_s):
            preamble = memoryview(bytearray(PREAMBLE_BYTES))
            await carrier.read_exactly(preamble)
            session_id = parse_preamble(preamble)
            pending = lookup(session_id)
            if pending is None:
                raise ProtocolViolation("data connection names an unknown or expired session")
            ftype, header, body = await carrier.read_frame(limits)
            if ftype is not FrameType.HELLO:
                raise ProtocolViolation(f"expected HELLO, got {ftype.name}")
            opener = pending.keys.opener(dialer=False)  # fresh counter: a failed try costs nothing
            hello = Hello.from_bytes(opener.open(header, body))
            if hello.session_id != session_id or hello.peer_id != pending.peer_id:
                raise ProtocolViolation("HELLO names another session or peer")
            if claim(session_id) is None:
                raise ProtocolViolation("session already bound to another connection")
            sealer = pending.keys.sealer(dialer=False)
            await carrier.write(sealer.seal(FrameType.HELLO_OK, Hello(session_id, local_id).to_bytes()))
        ok = True
        return pending, Link(carrier, sealer, opener, pending.send_frame_bytes)
    except TimeoutError as exc:
        raise PeerError(f"data connection from {carrier.remote} sent no valid HELLO within {timeout_s} s") from exc
    finally:
        if not ok:
            carrier.abort()


async def dial(open_stream: Callable[[], Awaitable[MessageStream]], *, local_id: str, remote_id: str,
               direct: bool, local_addrs: tuple[str, ...], limits: Limits, dial_timeout_s: float,
               handshake_timeout_s: float, is_relayed: Callable[[], Awaitable[bool]],
               puncher: Puncher | None = None) -> Link:
    """Set up a data connection to ``remote_id`` along the fallback order (module docstring).

    Raises:
        PeerError: the libp2p stream could not be opened or the handshake failed.
        ProtocolViolation: the peer answered the handshake with malformed data.

    Cancellation closes whatever was opened (stream, sockets).
    """
    stream = await open_stream()
    keep = False
    try:
        async with asyncio.timeout(handshake_timeout_s):
            ephemeral, session_id = Ephemeral(), os.urandom(SESSION_ID_BYTES)
            opened = Open(session_id, ephemeral.public, direct, local_addrs, limits.max_frame_bytes)
            accept = Accept.from_wire(await stream.request(opened.to_wire()))
            frame = min(limits.max_frame_bytes, accept.frame_bytes)
            keys = derive_keys(ephemeral.shared(accept.public_key), session_id, local_id, remote_id,
                               ephemeral.public, accept.public_key)
        if direct:
            for addr in _dial_order(accept.data_addrs):
                try:
                    return _framed(await dial_direct(addr, session_id, keys, local_id=local_id, remote_id=remote_id,
                                                     limits=limits, timeout_s=dial_timeout_s), frame)
                except (PeerError, ValueError) as exc:
                    log.debug("direct data path to %s unavailable: %s", remote_id, exc)
        if puncher is not None:  # hole punching: the NAT issue's TCP simultaneous open
            sock = await puncher.dial(remote_id, stream)
            if sock is not None:
                try:
                    return _framed(await prove_as_dialer(
                        sock, session_id, keys, local_id=local_id, remote_id=remote_id, limits=limits,
                        timeout_s=dial_timeout_s, what="punched socket", path=PATH_PUNCHED), frame)
                except PeerError as exc:
                    log.debug("punched data path to %s failed: %s", remote_id, exc)
        await stream.send(Fallback().to_wire())
        carrier = StreamCarrier(stream, relayed=await is_relayed())
        keep = True
        return Link(carrier, keys.sealer(dialer=True), keys.opener(dialer=True), frame)
    except TimeoutError as exc:
        raise PeerError(f"tensor handshake with {remote_id} timed out after {handshake_timeout_s} s") from exc
    finally:
        if not keep:
            await _close_quietly(stream)


async def answer(stream: MessageStream, *, local_id: str, data_addrs: tuple[str, ...], limits: Limits,
                 handshake_timeout_s: float, wait_fallback_s: float,
                 add_pending: Callable[[bytes, Pending], None], drop_pending: Callable[[bytes], None],
                 is_relayed: Callable[[], Awaitable[bool]], puncher: Puncher | None = None,
                 on_punched: Callable[[socket.socket], None] | None = None) -> Link | None:
    """Listener half of the handshake on an inbound ``/hyphae/tensor/1`` stream.

    Returns a stream-carried link when the dialer falls back, or None when it went direct (or
    punched through, or gave up): the stream is then done, and the TCP connection, if any,
    authenticates through the data listener against the pending session recorded here.
    A punched socket is handed to ``on_punched`` for exactly that.

    Raises:
        ProtocolViolation: malformed handshake (the host resets the stream and logs it).
    """
    async with asyncio.timeout(handshake_timeout_s):
        opened = Open.from_wire(await stream.recv())
        ephemeral = Ephemeral()
        keys = derive_keys(ephemeral.shared(opened.public_key), opened.session_id, stream.peer_id, local_id,
                           opened.public_key, ephemeral.public)
        frame = min(limits.max_frame_bytes, opened.frame_bytes)
        add_pending(opened.session_id, Pending(stream.peer_id, keys, time.monotonic() + wait_fallback_s, frame))
        offered = data_addrs if opened.direct else ()
        await stream.send(Accept(ephemeral.public, offered, limits.max_frame_bytes).to_wire())
    try:
        async with asyncio.timeout(wait_fallback_s):
            while True:
                message = await stream.recv()
                if puncher is None or not isinstance(message, dict) or message.get("t") != "punch":
                    Fallback.from_wire(message)
                    break
                sock = await puncher.answer(stream.peer_id, stream, message)
                if sock is not None and on_punched is not None:
                    on_punched(sock)  # authenticated like any inbound data connection
    except (EndOfStream, TimeoutError):
        return None  # went direct (the pending session is claimed) or gave up (it expires)
    drop_pending(opened.session_id)  # the TCP half must not bind as well
    return Link(StreamCarrier(stream, relayed=await is_relayed()), keys.sealer(dialer=False),
                keys.opener(dialer=False), frame)


def _framed(link: Link, frame: int) -> Link:
    link.send_frame_bytes = frame
    return link


async def _close_quietly(stream: MessageStream) -> None:
    try:
        await stream.aclose()
    except HyphaeError as exc:
        log.debug("closing tensor handshake stream: %s", exc)

