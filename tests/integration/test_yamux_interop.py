"""LeanYamux against py-libp2p's own Yamux, both ways, over real loopback TCP with Noise.

Each test runs two py-libp2p hosts in one trio loop (``trio.run`` in a sync test, under
``trio.fail_after``), built as the project builds its hosts (Noise only, one connection per
peer). ``client`` is the dialer (odd stream ids), ``server`` the listener.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import multiaddr
import pytest
import trio
from libp2p import new_host
from libp2p.abc import IHost, INetStream
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.exceptions import BaseLibp2pError
from libp2p.host.ping import PingService
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.network.config import ConnectionConfig
from libp2p.network.stream.exceptions import StreamEOF, StreamReset
from libp2p.peer.peerinfo import PeerInfo
from libp2p.peer.peerstore import PeerStoreError
from libp2p.records.validator import NamespacedValidator, Validator
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.tools.anyio_service import background_trio_service

from hyphae.protocol._yamux import INITIAL_WINDOW, LeanYamux, honor_muxer_opt

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

os.environ.setdefault("PY_YAMUX_RELEASE_ON_READ", "0")  # as the project runs the stock Yamux



class AdmittedLeanYamux(LeanYamux):
    """LeanYamux with its after-hello budgets from the start: these hosts run no hello, and
    the before-hello budgets (tests/unit/protocol/test_yamux.py) are not what is tested here."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.admit()


MUXERS: dict[str, type] = {"lean": AdmittedLeanYamux, "stock": Yamux}
PAIRS = [("lean", "stock"), ("stock", "lean"), ("lean", "lean")]
LISTEN = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
ECHO = TProtocol("/test/echo/1")
BULK = TProtocol("/test/bulk/1")
MIB = 1 << 20


def build_host(muxer: str) -> IHost:
    keypair = create_new_key_pair()
    noise = NoiseTransport(keypair, noise_privkey=create_x25519_key_pair().private_key)
    host = new_host(key_pair=keypair, sec_opt={TProtocol(NOISE_PROTOCOL_ID): noise},
                    muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): MUXERS[muxer]}, listen_addrs=LISTEN,
                    connection_config=ConnectionConfig(max_connections_per_peer=1))
    if muxer == "lean":
        honor_muxer_opt(host)
    return host


@contextlib.asynccontextmanager
async def connected(client_muxer: str, server_muxer: str) -> AsyncIterator[tuple[IHost, IHost]]:
    client, server = build_host(client_muxer), build_host(server_muxer)
    async with client.run(LISTEN), server.run(LISTEN):
        await client.connect(PeerInfo(server.get_id(), server.get_addrs()))
        for host, other, muxer in ((client, server, client_muxer), (server, client, server_muxer)):
            conns = host.get_network().get_connections(other.get_id())
            assert type(conns[0].muxed_conn) is MUXERS[muxer]
        yield client, server


def run(test: Callable[..., Awaitable[None]], *args: Any, timeout_s: float = 120) -> None:
    async def main() -> None:
        with trio.fail_after(timeout_s):
            await test(*args)

    trio.run(main)


async def read_exactly(stream: INetStream, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        out += await stream.read(n - len(out))
    return bytes(out)


async def read_to_eof(stream: INetStream) -> bytes:
    out = bytearray()
    with contextlib.suppress(StreamEOF):
        while True:
            chunk = await stream.read(MIB)
            if not chunk:
                break
            out += chunk
    return bytes(out)


async def echo_handler(stream: INetStream) -> None:
    with contextlib.suppress(StreamEOF, StreamReset):
        while True:
            data = await stream.read(65536)
            if not data:
                break
            await stream.write(data)
    await stream.close()


def test_py_libp2p_ignores_muxer_opt_for_yamux_unless_honored() -> None:
    """Documents why honor_muxer_opt exists; if this fails, py-libp2p fixed it and it can go."""

    async def body() -> None:
        keypair = create_new_key_pair()
        noise = NoiseTransport(keypair, noise_privkey=create_x25519_key_pair().private_key)
        plain = new_host(key_pair=keypair, sec_opt={TProtocol(NOISE_PROTOCOL_ID): noise},
                         muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): AdmittedLeanYamux}, listen_addrs=LISTEN)
        other = build_host("stock")
        async with plain.run(LISTEN), other.run(LISTEN):
            await plain.connect(PeerInfo(other.get_id(), other.get_addrs()))
            assert type(plain.get_network().get_connections(other.get_id())[0].muxed_conn) is Yamux

    run(body)


@pytest.mark.parametrize(("client_muxer", "server_muxer"), PAIRS)
def test_many_concurrent_request_response_streams(client_muxer: str, server_muxer: str) -> None:
    async def body() -> None:
        async with connected(client_muxer, server_muxer) as (client, server):
            server.set_stream_handler(ECHO, echo_handler)
            client.set_stream_handler(ECHO, echo_handler)

            async def talk(host: IHost, peer: IHost, i: int) -> None:
                stream = await host.new_stream(peer.get_id(), [ECHO])
                for j in range(10):
                    message = f"stream {i} message {j} ".encode() * (1 + j)
                    await stream.write(message)
                    assert await read_exactly(stream, len(message)) == message
                await stream.close()
                assert await read_to_eof(stream) == b""

            async with trio.open_nursery() as nursery:
                for i in range(40):
                    nursery.start_soon(talk, client, server, i)
                for i in range(10):  # and streams the listener opens (even ids)
                    nursery.start_soon(talk, server, client, 100 + i)

    run(body)


@pytest.mark.parametrize(("client_muxer", "server_muxer"), PAIRS)
def test_32_mib_each_way_stalls_at_the_window_and_resumes(client_muxer: str, server_muxer: str) -> None:
    size, chunk = 32 * MIB, 64 * 1024
    upload = os.urandom(size)
    download = os.urandom(size)
    sent = {"up": 0, "down": 0}
    receiver_paused = {"up": trio.Event(), "down": trio.Event()}
    stalled_at: dict[str, int] = {}

    async def write_all(stream: INetStream, data: bytes, key: str) -> None:
        for start in range(0, len(data), chunk):
            await stream.write(data[start:start + chunk])
            sent[key] += chunk
        await stream.close()

    async def watch_stall(key: str) -> None:
        """While the receiver does not read, the writer must stop once the credit is used up."""
        await trio.sleep(0.5)
        before = sent[key]
        await trio.sleep(0.3)
        stalled_at[key] = sent[key] if sent[key] == before else -1
        receiver_paused[key].set()

    async def body() -> None:
        results: dict[str, bytes] = {}

        async def bulk_handler(stream: INetStream) -> None:
            await receiver_paused["up"].wait()
            results["up"] = await read_to_eof(stream)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch_stall, "down")
                await write_all(stream, download, "down")

        async with connected(client_muxer, server_muxer) as (client, server):
            server.set_stream_handler(BULK, bulk_handler)
            stream = await client.new_stream(server.get_id(), [BULK])
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch_stall, "up")
                await write_all(stream, upload, "up")
            await receiver_paused["down"].wait()
            results["down"] = await read_to_eof(stream)

        # A LeanYamux receiver grants exactly one 256 KiB window; py-libp2p's Yamux grows its
        # window (auto-tuning, up to 16 MiB) as it reads, so the writer may get further there.
        receivers = {"up": server_muxer, "down": client_muxer}
        for key, data in (("up", upload), ("down", download)):
            limit = INITIAL_WINDOW + chunk if receivers[key] == "lean" else 16 * MIB + chunk
            assert 0 < stalled_at[key] <= limit, (key, stalled_at[key])
            assert hashlib.sha256(results[key]).digest() == hashlib.sha256(data).digest(), key

    run(body, timeout_s=150)


@pytest.mark.parametrize(("client_muxer", "server_muxer"), PAIRS)
def test_half_close_then_the_other_side_answers(client_muxer: str, server_muxer: str) -> None:
    async def body() -> None:
        async def answer(stream: INetStream) -> None:
            request = await read_to_eof(stream)  # until the client's FIN
            await stream.write(b"answer to " + request)
            await stream.write(b"; and more")
            await stream.close()

        async with connected(client_muxer, server_muxer) as (client, server):
            server.set_stream_handler(ECHO, answer)
            stream = await client.new_stream(server.get_id(), [ECHO])
            await stream.write(b"the question")
            await stream.close_write()
            assert await read_to_eof(stream) == b"answer to the question; and more"

    run(body)


@pytest.mark.parametrize(("client_muxer", "server_muxer"), PAIRS)
def test_reset_reaches_the_other_side(client_muxer: str, server_muxer: str) -> None:
    async def body() -> None:
        outcome: dict[str, str] = {}
        done = trio.Event()

        async def wait_for_reset(stream: INetStream) -> None:
            assert await read_exactly(stream, 5) == b"hello"
            try:
                await stream.read(100)
                outcome["server"] = "read returned"
            except StreamReset:
                outcome["server"] = "reset"
            except StreamEOF:  # py-libp2p's Yamux forgets a reset stream and then reports EOF
                outcome["server"] = "eof"
            done.set()

        async with connected(client_muxer, server_muxer) as (client, server):
            server.set_stream_handler(ECHO, wait_for_reset)
            stream = await client.new_stream(server.get_id(), [ECHO])
            await stream.write(b"hello")
            await trio.sleep(0.2)
            await stream.reset()
            await done.wait()
            assert outcome["server"] == "reset" or (server_muxer == "stock" and outcome["server"] == "eof")

            async def reset_at_once(s: INetStream) -> None:
                await read_exactly(s, 2)
                await s.reset()

            server.set_stream_handler(BULK, reset_at_once)
            stream = await client.new_stream(server.get_id(), [BULK])
            await stream.write(b"hi")
            with pytest.raises(StreamReset if client_muxer == "lean" else (StreamReset, StreamEOF)):
                await stream.read(100)

    run(body)


def _tcp_socket(host: IHost, peer: IHost) -> trio.socket.SocketType:
    """The trio socket under the host's (only) connection to ``peer``."""
    conn = host.get_network().get_connections(peer.get_id())[0]
    session = conn.muxed_conn.secured_conn
    return session.conn.read_writer.read_write_closer.stream.stream.socket


@pytest.mark.parametrize(("client_muxer", "server_muxer"), PAIRS)
def test_connection_drop_mid_transfer_fails_both_sides_without_hanging(client_muxer: str, server_muxer: str) -> None:
    async def body() -> None:
        errors: dict[str, BaseException] = {}
        server_reading, server_done = trio.Event(), trio.Event()

        async def sink(stream: INetStream) -> None:
            try:
                while await stream.read(MIB):
                    server_reading.set()
                errors["server read"] = EOFError("read returned b''")  # py-libp2p's Yamux may
            except BaseLibp2pError as exc:
                errors["server read"] = exc
            server_done.set()

        async with connected(client_muxer, server_muxer) as (client, server):
            server.set_stream_handler(BULK, sink)
            server.set_stream_handler(ECHO, echo_handler)
            stream = await client.new_stream(server.get_id(), [BULK])
            idle = await client.new_stream(server.get_id(), [ECHO])

            async def write_forever() -> None:
                try:
                    while True:
                        await stream.write(bytes(64 * 1024))
                except BaseLibp2pError as exc:
                    errors["client write"] = exc

            async def read_idle() -> None:
                try:
                    await idle.read(100)
                except BaseLibp2pError as exc:
                    errors["client read"] = exc

            with trio.fail_after(20):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(write_forever)
                    nursery.start_soon(read_idle)
                    await server_reading.wait()
                    _tcp_socket(client, server).shutdown(socket.SHUT_RDWR)  # the wire goes dead
                await server_done.wait()
            assert set(errors) == {"client write", "client read", "server read"}, errors
            for side, muxer in (("client", client_muxer), ("server", server_muxer)):
                if muxer == "lean":  # a stream cut short is reset, never a clean EOF
                    assert all(isinstance(e, StreamReset) for k, e in errors.items() if k.startswith(side)), errors
            with trio.fail_after(10):
                while client.get_network().get_connections(server.get_id()) or \
                        server.get_network().get_connections(client.get_id()):
                    await trio.sleep(0.05)

    run(body)


class _AcceptAll(Validator):
    def validate(self, key: str, value: bytes) -> None:
        pass

    def select(self, key: str, values: list[bytes]) -> int:
        return 0


def _protocols(host, other) -> list[str]:
    """The protocols identify has recorded for ``other`` so far (none until its entry exists:
    the peerstore raises for a peer it has not seen yet, which under load is a while)."""
    try:
        return host.get_peerstore().get_protocols(other.get_id())
    except PeerStoreError:
        return []


@pytest.mark.parametrize(("client_muxer", "server_muxer"), PAIRS)
def test_identify_ping_and_dht_work_over_the_muxer(client_muxer: str, server_muxer: str) -> None:
    async def body() -> None:
        async with connected(client_muxer, server_muxer) as (client, server):
            with trio.fail_after(10):  # identify ran both ways
                for host, other in ((client, server), (server, client)):
                    while "/ipfs/ping/1.0.0" not in _protocols(host, other):
                        await trio.sleep(0.05)
            for host, other in ((client, server), (server, client)):
                rtts = await PingService(host).ping(other.get_id(), ping_amt=3)
                assert len(rtts) == 3

            validator = NamespacedValidator({"test": _AcceptAll()})
            dhts = [KadDHT(h, DHTMode.SERVER, validator=validator, validator_changed=True) for h in (client, server)]
            async with background_trio_service(dhts[0]), background_trio_service(dhts[1]):
                await dhts[0].add_peer(server.get_id())
                await dhts[1].add_peer(client.get_id())
                await dhts[0].put_value("/test/key", b"value from the client")
                assert await dhts[1].get_value("/test/key") == b"value from the client"
                await dhts[1].put_value("/test/other", b"value from the server")
                assert await dhts[0].get_value("/test/other") == b"value from the server"

    run(body)
