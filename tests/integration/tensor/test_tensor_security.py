"""Only the peer libp2p authenticated can use a data connection, and a damaged stream of frames is
detected, fails the transfer cleanly and leaves nothing half-delivered.

A man in the middle sits on the TCP data path (the listener advertises the proxy's address): it
sees the clear preamble (so it *has* the session id), copies every byte, and can flip, drop,
swap, replay, inject or cut frames of the dialer's direction.
"""

from __future__ import annotations

import asyncio
import logging
import os

import numpy as np
import pytest

from hyphae.protocol.errors import PeerError
from hyphae.protocol.tensor import Tensor
from hyphae.protocol.tensor.keys import FrameSealer
from hyphae.protocol.tensor.wire import HEADER_BYTES, PREAMBLE, PREAMBLE_BYTES, FrameType, Hello

from .conftest import same

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

SECRET = b"SECRET-PATTERN-0123456789abcdef"
FRAME = 64 * 1024


class Proxy:
    """TCP man in the middle. Tampers with the first connection only, so a retry goes through."""

    def __init__(self, mode: str | None = None, at: int = 3) -> None:
        self.mode, self.at = mode, at
        self.target: tuple[str, int] | None = None
        self.captured = bytearray()
        self.session_ids: list[bytes] = []
        self.steal: bool = False
        self.stolen_results: list[bytes] = []
        self.connections = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self._server.close()

    async def _handle(self, down_r: asyncio.StreamReader, down_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        tamper = self.mode if self.connections == 1 else None
        up_r, up_w = await asyncio.open_connection(*self.target)
        back = asyncio.create_task(self._pipe(up_r, down_w))
        try:
            preamble = await down_r.readexactly(PREAMBLE_BYTES)
            self.captured += preamble
            self.session_ids.append(preamble[len(PREAMBLE):])
            if self.steal:
                self.stolen_results.append(await self._use_stolen_id(preamble))
            up_w.write(preamble)
            data_frames, held = 0, None
            while True:
                header = await down_r.readexactly(HEADER_BYTES)
                frame = header + await down_r.readexactly(int.from_bytes(header[4:], "big"))
                self.captured += frame
                if header[0] == FrameType.DATA:
                    data_frames += 1
                    if data_frames == self.at and tamper:
                        if tamper == "flip":
                            frame = frame[:HEADER_BYTES + 5] + bytes([frame[HEADER_BYTES + 5] ^ 1]) + frame[HEADER_BYTES + 6:]
                        elif tamper == "drop":
                            continue
                        elif tamper == "replay":
                            up_w.write(frame)
                        elif tamper == "swap":
                            held = frame
                            continue
                        elif tamper == "inject":
                            up_w.write(header + os.urandom(len(frame) - HEADER_BYTES))
                        elif tamper == "cut":
                            break
                up_w.write(frame)
                if held is not None and frame is not held:
                    up_w.write(held)
                    held = None
                await up_w.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            up_w.close()
            down_w.close()
            back.cancel()

    @staticmethod
    async def _pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(1 << 16):
                w.write(data)
                await w.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass

    async def _use_stolen_id(self, preamble: bytes) -> bytes:
        """Race the rightful dialer to the listener with its session id and a forged HELLO."""
        r, w = await asyncio.open_connection(*self.target)
        forged = FrameSealer(os.urandom(32)).seal(FrameType.HELLO, Hello(preamble[4:], "12D3KooWforged").to_bytes())
        w.write(preamble + forged)
        try:
            return await asyncio.wait_for(r.read(100), 5)
        finally:
            w.close()


async def _answer_to(addr: tuple[str, int], payload: bytes) -> bytes:
    """Send ``payload`` to a data listener; return what it says before closing on us."""
    r, w = await asyncio.open_connection(*addr)
    try:
        w.write(payload)
        await w.drain()
        return await asyncio.wait_for(r.read(100), 5)
    except ConnectionError:
        return b""
    finally:
        w.close()


def secret_tensors() -> list[Tensor]:
    body = np.frombuffer(SECRET * (600_000 // len(SECRET)), np.uint8)
    return [Tensor.from_numpy("secret", body), Tensor.from_numpy("w", np.arange(100_000, dtype=np.float32))]


async def _through_proxy(make_group, make_plane, proxy: Proxy):
    hosts, planes = await make_group(2)
    for p in planes:
        await p.aclose()
    port = await proxy.start()
    a = await make_plane(hosts[0], frame_bytes=FRAME)
    b = await make_plane(hosts[1], frame_bytes=FRAME, announce=(f"/ip4/127.0.0.1/tcp/{port}",))
    real = b._listener.sockets[0].getsockname()
    proxy.target = (real[0], real[1])
    return a, b


async def test_eavesdropper_with_the_session_id_can_neither_read_nor_join(make_group, make_plane, caplog) -> None:
    caplog.set_level(logging.INFO, logger="hyphae")
    proxy = Proxy()
    proxy.steal = True
    a, b = await _through_proxy(make_group, make_plane, proxy)
    ts = secret_tensors()
    got, _ = await asyncio.gather(b.recv(a.peer_id, "s"), a.send(b.peer_id, "s", ts))
    assert same(got, ts)
    assert a.stats()["peers"][b.peer_id]["path"] == "direct"
    # It saw every byte and the session id in clear, but no plaintext...
    assert proxy.session_ids and len(proxy.captured) > 600_000
    assert SECRET not in proxy.captured and SECRET[:12] not in proxy.captured
    # ...and its own connection with the stolen id and a forged HELLO got nothing back.
    assert proxy.stolen_results == [b""]
    assert any("refused a data connection" in r.getMessage() and "authentication" in r.getMessage()
               for r in caplog.records)
    # Replaying the whole captured stream later, as a new connection, binds to nothing.
    assert await _answer_to(proxy.target, bytes(proxy.captured[:PREAMBLE_BYTES + 200])) == b""
    assert b.stats()["peers"][a.peer_id]["transfers_received"] == 1


async def test_stranger_on_the_data_port_is_refused_and_the_listener_keeps_serving(make_group) -> None:
    _, (a, b) = await make_group(2)
    host, port = b._listener.sockets[0].getsockname()
    for junk in (b"GET / HTTP/1.1\r\nHost: hyphae\r\n\r\n", PREAMBLE + os.urandom(16) + os.urandom(64), os.urandom(5000)):
        assert await _answer_to((host, port), junk) == b""
    ts = secret_tensors()
    got, _ = await asyncio.gather(b.recv(a.peer_id, "ok"), a.send(b.peer_id, "ok", ts))
    assert same(got, ts)


@pytest.mark.parametrize("mode", ["flip", "drop", "swap", "replay", "inject", "cut"])
async def test_tampered_frames_fail_the_transfer_cleanly_and_nothing_is_half_delivered(
        make_group, make_plane, caplog, mode: str) -> None:
    caplog.set_level(logging.INFO, logger="hyphae")
    proxy = Proxy(mode, at=3)
    a, b = await _through_proxy(make_group, make_plane, proxy)
    ts = secret_tensors()
    with pytest.raises(PeerError):
        async with asyncio.timeout(20):
            await a.send(b.peer_id, "t", ts)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.5):
            await b.recv(a.peer_id, "t")  # nothing partial, nothing at all
    if mode != "cut":
        assert any("failed authentication" in r.getMessage() for r in caplog.records), mode
    assert b.stats()["unclaimed_bytes"] == 0
    # The next transfer takes a new connection (the proxy now passes it untouched) and arrives whole.
    got, _ = await asyncio.gather(b.recv(a.peer_id, "t"), a.send(b.peer_id, "t", ts))
    assert same(got, ts)
    assert a.stats()["peers"][b.peer_id]["failures"] == 1
    await proxy.stop()
