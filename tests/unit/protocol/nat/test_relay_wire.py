"""Circuit relay messages: circuit addresses parsed strictly, messages read under a 4 KiB cap."""

import pytest
import trio
from libp2p.utils.varint import encode_varint_prefixed

from hyphae.protocol.errors import PeerError, ProtocolViolation
from hyphae.protocol.nat._relay_wire import (MAX_MESSAGE_BYTES, HopMessage, PbPeer, circuit_parts, is_relayed_conn,
                                              peer_from, read_msg)

RELAY = "12D3KooWEKNUC8Jm9GdhVLi4rygDH8NrnDzq7vcJNcJi9E9z4iym"
TARGET = "12D3KooWGzkZuUWYu32uvHfZjWDEBW12Y37LBPB8RiatM3imrTPe"


def run(test, timeout_s: float = 20.0) -> None:
    """Trio tests as plain functions under a deadline (pytest-asyncio would run them on asyncio)."""
    async def main() -> None:
        with trio.fail_after(timeout_s):
            await test()

    trio.run(main)


class BytesStream:
    def __init__(self, data: bytes) -> None:
        self.data = data

    async def read(self, n: int | None = None) -> bytes:
        n = len(self.data) if n is None else n
        out, self.data = self.data[:n], self.data[n:]
        return out


def test_circuit_parts() -> None:
    relay, transport = circuit_parts(f"/ip4/198.51.100.10/tcp/4001/p2p/{RELAY}/p2p-circuit/p2p/{TARGET}")
    assert relay == RELAY and str(transport) == "/ip4/198.51.100.10/tcp/4001"
    relay, transport = circuit_parts(f"/p2p/{RELAY}/p2p-circuit")
    assert relay == RELAY and transport is None
    for bad in ("/ip4/1.2.3.4/tcp/1", "/p2p-circuit/p2p/" + TARGET):
        with pytest.raises(ValueError):
            circuit_parts(bad)


async def _a_message_round_trips() -> None:
    wire = encode_varint_prefixed(HopMessage(type=HopMessage.CONNECT, peer=PbPeer(id=b"\x00\x24" + b"x" * 36))
                                  .SerializeToString())
    message = await read_msg(BytesStream(wire), HopMessage, 1.0)
    assert message.type == HopMessage.CONNECT


async def _an_oversized_length_is_refused_before_reading_it() -> None:
    with pytest.raises(ProtocolViolation, match="limit"):
        await read_msg(BytesStream(encode_varint_prefixed(b"x" * (MAX_MESSAGE_BYTES + 1))), HopMessage, 1.0)


async def _garbage_is_a_protocol_violation_and_silence_a_peer_error() -> None:
    with pytest.raises(ProtocolViolation):
        await read_msg(BytesStream(encode_varint_prefixed(b"\xff\xff\xff")), HopMessage, 1.0)

    class Silent:
        async def read(self, n: int | None = None) -> bytes:
            await trio.sleep_forever()

    with pytest.raises(PeerError, match="no relay message"):
        await read_msg(Silent(), HopMessage, 0.05)


def test_peer_ids_in_messages_are_checked() -> None:
    with pytest.raises(ProtocolViolation):
        peer_from(PbPeer(id=b""))
    with pytest.raises(ProtocolViolation):
        peer_from(PbPeer(id=b"x" * 200))


def test_relayed_connection_detection() -> None:
    class Conn:
        def __init__(self, addrs: list[str]) -> None:
            self.addrs = addrs

        def get_transport_addresses(self) -> list[str]:
            return self.addrs

    assert is_relayed_conn(Conn([f"/p2p/{RELAY}/p2p-circuit/p2p/{TARGET}"]))
    assert not is_relayed_conn(Conn(["/ip4/1.2.3.4/tcp/1"]))
    assert not is_relayed_conn(Conn([]))


def test_a_message_round_trips() -> None:
    run(_a_message_round_trips)


def test_an_oversized_length_is_refused_before_reading_it() -> None:
    run(_an_oversized_length_is_refused_before_reading_it)


def test_garbage_is_a_protocol_violation_and_silence_a_peer_error() -> None:
    run(_garbage_is_a_protocol_violation_and_silence_a_peer_error)
