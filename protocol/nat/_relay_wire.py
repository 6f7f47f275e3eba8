"""Circuit relay v2 on the wire: py-libp2p's protobufs, read under a small size cap.

The message types, protocol ids and status codes are py-libp2p 0.8.1's
(``libp2p.relay.circuit_v2``), so hyphae relays and clients interoperate with any circuit v2
implementation. Reading is ours: a relay message is a peer id, a few addresses and two limits,
so 4 KiB is plenty (py-libp2p allows 64 KiB), and a malformed one is a :class:`ProtocolViolation`.
"""

from __future__ import annotations

from typing import Any, TypeVar

import multiaddr
import trio
from google.protobuf.message import DecodeError, Message
from libp2p.peer.id import ID
from libp2p.exceptions import ParseError
from libp2p.io.exceptions import MessageTooLarge
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage, Limit, Reservation, StopMessage
from libp2p.relay.circuit_v2.pb.circuit_pb2 import PeerId as PbPeer
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID
from libp2p.relay.circuit_v2.protocol import STOP_PROTOCOL_ID
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode
from libp2p.utils.varint import encode_varint_prefixed, read_varint_prefixed_bytes_limited

from ..errors import PeerError, ProtocolViolation

__all__ = ["close_quietly", "reset_quietly", "HOP_PROTOCOL_ID", "STOP_PROTOCOL_ID", "HopMessage", "StopMessage", "Limit", "Reservation", "PbPeer",
           "StatusCode", "MAX_MESSAGE_BYTES", "read_msg", "write_msg", "peer_from", "is_circuit", "circuit_parts",
           "is_relayed_conn"]

MAX_MESSAGE_BYTES = 4096
MAX_ADDRS = 8
M = TypeVar("M", bound=Message)


async def read_msg(stream: Any, kind: type[M], timeout_s: float) -> M:
    """One length-prefixed message of ``kind``.

    Raises:
        ProtocolViolation: over the size cap or not decodable.
        PeerError: the stream broke, ended, or nothing came within ``timeout_s``.
    """
    try:
        with trio.fail_after(timeout_s):
            data = await read_varint_prefixed_bytes_limited(stream, MAX_MESSAGE_BYTES)
    except trio.TooSlowError as exc:
        raise PeerError(f"no relay message within {timeout_s} s") from exc
    except (MessageTooLarge, ParseError) as exc:
        raise ProtocolViolation(f"relay message refused (limit {MAX_MESSAGE_BYTES} bytes): {exc}") from exc
    except Exception as exc:  # noqa: BLE001 — libp2p stream errors of every kind
        raise PeerError(f"relay stream broke: {exc}") from exc
    message = kind()
    try:
        message.ParseFromString(data)
    except DecodeError as exc:
        raise ProtocolViolation(f"malformed {kind.__name__}: {exc}") from exc
    return message


async def write_msg(stream: Any, message: Message, timeout_s: float = 10.0) -> None:
    """Raises PeerError if the stream broke or the write stalled."""
    try:
        with trio.fail_after(timeout_s):
            await stream.write(encode_varint_prefixed(message.SerializeToString()))
    except trio.TooSlowError as exc:
        raise PeerError(f"relay message write stalled for {timeout_s} s") from exc
    except Exception as exc:  # noqa: BLE001
        raise PeerError(f"relay stream broke: {exc}") from exc


def peer_from(pb: PbPeer) -> ID:
    """The peer id in a relay message. Raises ProtocolViolation if it is not one."""
    if not pb.id or len(pb.id) > 128:
        raise ProtocolViolation(f"relay message names no valid peer ({len(pb.id)} id bytes)")
    try:
        return ID(pb.id)
    except Exception as exc:  # noqa: BLE001
        raise ProtocolViolation(f"relay message peer id does not decode: {exc}") from exc


def is_circuit(addr: str | multiaddr.Multiaddr) -> bool:
    return "/p2p-circuit" in str(addr)


def circuit_parts(addr: str | multiaddr.Multiaddr) -> tuple[str, multiaddr.Multiaddr | None]:
    """``<relay transport>/p2p/<relay>/p2p-circuit[/p2p/<target>]`` -> (relay id, relay transport addr).

    The transport part is None when the address names only the relay (``/p2p/<relay>/p2p-circuit``).

    Raises:
        ValueError: not a circuit address, or no relay peer id before ``/p2p-circuit``.
    """
    text = str(addr)
    if "/p2p-circuit" not in text:
        raise ValueError(f"not a circuit address: {text!r:.120}")
    head = text.split("/p2p-circuit", 1)[0]
    if "/p2p/" not in head:
        raise ValueError(f"circuit address names no relay: {text!r:.120}")
    transport, relay = head.rsplit("/p2p/", 1)
    ID.from_base58(relay)  # raises ValueError-likes on garbage
    return relay, (multiaddr.Multiaddr(transport) if transport else None)


def is_relayed_conn(conn: Any) -> bool:
    """True if a connection (SwarmConn or muxed connection) runs through a relay."""
    try:
        addrs = conn.get_transport_addresses()
    except Exception:  # noqa: BLE001 — a connection that cannot say is treated as direct
        return False
    return bool(addrs) and all(is_circuit(a) for a in addrs)


async def close_quietly(stream: Any) -> None:
    """Close a relay stream within 2 s; a stream that is already dead is fine."""
    with trio.move_on_after(2):
        try:
            await stream.close()
        except Exception:  # noqa: BLE001 — closing a dead stream is fine
            pass


async def reset_quietly(stream: Any) -> None:
    """Reset a relay stream within 2 s; a stream that is already dead is fine."""
    with trio.move_on_after(2):
        try:
            await stream.reset()
        except Exception:  # noqa: BLE001
            pass
