"""The tensor plane's TCP simultaneous open: its coordination messages, rounds and refusals.

The simultaneous open itself needs two NATs (or at least latency) between the sockets and is
proven in network namespaces (tests/integration/nat/); here the connect step is replaced.
"""

import asyncio
import socket
from typing import Any

import pytest

from hyphae.protocol.errors import EndOfStream, ProtocolViolation
from hyphae.protocol.tensor import punch
from hyphae.protocol.tensor.punch import TcpPuncher


class Pipe:
    """One end of an in-memory MessageStream pair."""

    def __init__(self, inbox: asyncio.Queue, outbox: asyncio.Queue) -> None:
        self.inbox, self.outbox = inbox, outbox
        self.sent: list[Any] = []

    async def send(self, message: Any) -> None:
        self.sent.append(message)
        await self.outbox.put(message)

    async def recv(self) -> Any:
        message = await self.inbox.get()
        if message is None:
            raise EndOfStream("closed")
        return message

    async def request(self, message: Any) -> Any:
        await self.send(message)
        return await self.recv()


def pipes() -> tuple[Pipe, Pipe]:
    a, b = asyncio.Queue(), asyncio.Queue()
    return Pipe(a, b), Pipe(b, a)


class FakeHost:
    def __init__(self, observed: list[str], punch_state: dict[str, Any] | None = None) -> None:
        self.observed, self.punch_state = observed, punch_state or {}

    async def reachability(self) -> dict[str, Any]:
        return {"observed": self.observed, "confirmed": [], "hole_punching": {"peers": self.punch_state}}


async def answer_loop(puncher: TcpPuncher, stream: Pipe, got: list[Any]) -> None:
    while True:
        try:
            message = await stream.recv()
        except EndOfStream:
            return
        got.append(await puncher.answer("dialer", stream, message))


async def test_rounds_exchange_candidates_and_stop_at_the_first_connected_socket(monkeypatch) -> None:
    calls: list[list[tuple[str, int]]] = []
    connected, other = socket.socketpair()

    async def fake_connect(self: TcpPuncher, first: socket.socket, port: int, targets: list) -> Any:
        calls.append(targets)
        first.close()
        return connected if len(calls) >= 3 else None  # the second round (both sides) connects

    monkeypatch.setattr(TcpPuncher, "_connect", fake_connect)
    dialer = TcpPuncher(FakeHost(["/ip4/198.51.100.101/tcp/40000"]), rounds=3)
    listener = TcpPuncher(FakeHost(["/ip4/198.51.100.102/tcp/40000"]))
    d_end, l_end = pipes()
    got: list[Any] = []
    task = asyncio.create_task(answer_loop(listener, l_end, got))
    assert await dialer.dial("listener", d_end) is connected
    await l_end.inbox.put(None)
    await task
    first = d_end.sent[0]
    assert first["t"] == "punch" and first["addrs"][0].startswith("/ip4/198.51.100.101/tcp/")
    assert [m["t"] for m in d_end.sent] == ["punch", "punch-sync", "punch", "punch-sync"]
    assert {calls[0][0][0], calls[1][0][0]} == {"198.51.100.101", "198.51.100.102"}  # each dials the other
    assert dialer.stats == {"attempts": 2, "punched": 1, "failed": 0}
    connected.close()
    other.close()


async def test_a_peer_whose_libp2p_hole_punching_failed_is_not_tried(monkeypatch) -> None:
    dialer = TcpPuncher(FakeHost([], {"listener": {"state": "failed"}}))
    d_end, _ = pipes()
    assert await dialer.dial("listener", d_end) is None and d_end.sent == []


async def test_a_declining_listener_ends_punching_at_once() -> None:
    dialer = TcpPuncher(FakeHost([]))
    d_end, l_end = pipes()
    await l_end.outbox.put({"v": 1, "t": "punch-no"})
    assert await dialer.dial("listener", d_end) is None


@pytest.mark.parametrize("message", [
    {"v": 1, "t": "punch", "round": 0, "addrs": ["/ip4/1.2.3.4/tcp/1"] * 5},
    {"v": 1, "t": "punch", "round": 0, "addrs": ["/ip4/0.0.0.0/tcp/1"]},
    {"v": 1, "t": "punch", "round": 0, "addrs": ["/dns4/example.org/tcp/1"]},
    {"v": 1, "t": "punch", "round": 0, "addrs": [7]},
    {"v": 1, "t": "punch", "round": 0},
    {"v": 1, "t": "punch", "round": 0, "addrs": [], "extra": True},
])
async def test_malformed_punch_messages_are_protocol_violations(message: dict) -> None:
    _, l_end = pipes()
    with pytest.raises(ProtocolViolation):
        await TcpPuncher(FakeHost([])).answer("dialer", l_end, message)


def test_candidates_put_observed_public_ips_first_and_never_loopback(monkeypatch) -> None:
    monkeypatch.setattr(punch, "interface_ipv4s", lambda: ["127.0.0.1", "10.1.0.10"])
    assert punch._candidates(4100, ["198.51.100.101", "2001:db8::1"]) == [
        "/ip4/198.51.100.101/tcp/4100", "/ip4/10.1.0.10/tcp/4100"]


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        TcpPuncher(FakeHost([]), rounds=0)
