"""The tensor plane's per-peer limits: requests, pending sessions, unauthenticated connections."""

from __future__ import annotations

import asyncio
import time

import pytest

from hyphae.protocol.errors import PeerError, ProtocolViolation
from hyphae.protocol.scoring import scores_for
from hyphae.protocol.tensor import _guard
from hyphae.protocol.tensor import _listener as listener_mod
from hyphae.protocol.tensor._guard import Guard
from hyphae.protocol.tensor._listener import DataListener
from hyphae.protocol.tensor.config import TensorConfig
from hyphae.protocol.tensor.connect import Pending


class Local:
    def __init__(self) -> None:
        self.peer_id = f"local-{id(self)}"


def test_requests_in_flight_are_capped_per_peer_and_slots_come_back() -> None:
    local = Local()
    guard = Guard(local)
    for token in range(_guard.MAX_REQUESTS_PER_PEER):
        guard.admit_request("p", token)
    with pytest.raises(PeerError, match="being answered"):
        guard.admit_request("p", 999)
    guard.admit_request("q", 1000)  # another peer is not held back
    guard.release("p", 0)
    guard.release("p", 0)  # twice is harmless
    guard.admit_request("p", 1001)
    assert guard.in_flight("p") == _guard.MAX_REQUESTS_PER_PEER
    assert scores_for(local).scores()["p"]["violations"] == {"tensor.request_slots": 1}


def test_request_rate_is_capped_per_peer() -> None:
    guard = Guard(Local())
    refused = 0
    for token in range(int(_guard.REQUEST_RATE.burst) + 20):
        try:
            guard.admit_request("p", token)
        except PeerError:
            refused += 1
        guard.release("p", token)
    assert refused >= 10


def test_session_cap() -> None:
    guard = Guard(Local())
    guard.admit_session("p", 7, 8)
    with pytest.raises(PeerError, match="limit 8"):
        guard.admit_session("p", 8, 8)


def _listener() -> DataListener:
    return DataListener(TensorConfig(listen=("/ip4/127.0.0.1/tcp/0",)), local_id="me",
                        on_link=None, spawn=lambda *a: None)  # type: ignore[arg-type]


def test_a_pending_session_id_is_never_replaced_and_pending_per_peer_is_capped() -> None:
    lst = _listener()
    later = time.monotonic() + 60
    lst.add_pending(b"s" * 16, Pending("victim", None, later))  # type: ignore[arg-type]
    with pytest.raises(ProtocolViolation, match="already pending"):
        lst.add_pending(b"s" * 16, Pending("attacker", None, later))  # type: ignore[arg-type]
    assert lst.lookup(b"s" * 16).peer_id == "victim"
    for i in range(listener_mod.MAX_PENDING_PER_PEER):
        lst.add_pending(bytes([i]) * 16, Pending("attacker", None, later))  # type: ignore[arg-type]
    with pytest.raises(ProtocolViolation, match="pending"):
        lst.add_pending(b"x" * 16, Pending("attacker", None, later))  # type: ignore[arg-type]
    assert lst.pending_of("attacker") == listener_mod.MAX_PENDING_PER_PEER


async def test_unauthenticated_connections_from_one_address_are_capped(monkeypatch) -> None:
    monkeypatch.setattr(listener_mod, "MAX_UNAUTHENTICATED_PER_IP", 4)
    tasks: list[asyncio.Task] = []

    def spawn(name, fn, *args):
        task = asyncio.get_running_loop().create_task(fn(*args))
        tasks.append(task)
        return task

    lst = DataListener(TensorConfig(listen=("/ip4/127.0.0.1/tcp/0",), handshake_timeout_s=5.0), local_id="me",
                       on_link=None, spawn=spawn)  # type: ignore[arg-type]
    lst.start()
    port = int(lst.addrs[0].split("/")[4])
    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(7)]
    try:
        await asyncio.sleep(0.3)
        closed = 0
        for reader, _ in conns:
            try:
                async with asyncio.timeout(0.2):
                    closed += await reader.read(1) == b""
            except TimeoutError:
                pass  # still open: waiting for a handshake that never comes
        assert closed == 3 and lst.refused_connections == 3
        assert sum(lst._unauthenticated.values()) == 4
    finally:
        for _, writer in conns:
            writer.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        lst.close()
    assert sum(lst._unauthenticated.values()) == 0  # every slot came back
