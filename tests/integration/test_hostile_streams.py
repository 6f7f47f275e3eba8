"""Garbage on every protocol of a live Host: the host keeps serving, honest peers still get
answers, and the sender's score sinks until the daemon's score service disconnects it.

A :class:`RawPeer` (a bare py-libp2p host, Noise, no hello) opens streams on each protocol the
daemon serves — ``/hyphae/hello/1``, ``/hyphae/runsync/1``, ``/hyphae/tensor/1``, a
request/response echo — and on py-libp2p's own (gossipsub, Kad-DHT, identify, ping), and writes
one generated payload per stream: random bytes, a frame announcing 4 GiB, a truncated frame,
random msgpack, schema-shaped maps with wrong types or sizes, several frames back to back. Up to
16 streams run at once. After each protocol's batch an honest host must still get an echo reply
and a run-state sync from the target within a second or two.

In-suite: :data:`PER_PROTOCOL` payloads per protocol. The long campaign for the report:
``HYPHAE_FUZZ_STREAMS=2000 pytest tests/integration/test_hostile_streams.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import struct
import time
from types import SimpleNamespace
from typing import Any

import msgpack
import multiaddr
import pytest
import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.peerinfo import info_from_p2p_addr

from hyphae.node.peer_scores import PeerScoreService
from hyphae.protocol.runstate import SYNC_PROTOCOL, RunState, open_run_state
from hyphae.protocol.scoring import scores_for
from hyphae.protocol.tensor import TensorConfig, open_tensor_plane
from hyphae.protocol.testing import RawPeer, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

PER_PROTOCOL = int(os.environ.get("HYPHAE_FUZZ_STREAMS", "60"))
ECHO = "/test/echo/1"
OURS = ["/hyphae/hello/1", SYNC_PROTOCOL, "/hyphae/tensor/1", ECHO]
LIBP2P = ["/meshsub/1.1.0", "/ipfs/kad/1.0.0", "/ipfs/id/1.0.0", "/ipfs/ping/1.0.0"]


def _value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 1, 2**31, 2**63 - 1, -(2**63), 2**64 - 1, rng.randrange(-1000, 1000)])
    if kind == 3:
        return rng.choice([0.0, -1.5, float("nan"), float("inf"), 1e308])
    if kind == 4:
        return "".join(rng.choice("ab/12D3KooW_\u00e9\x00") for _ in range(rng.randrange(0, 40)))
    if kind == 5:
        return rng.randbytes(rng.randrange(0, 64))
    if kind in (6, 7):
        return {str(_value(rng, depth + 1))[:12]: _value(rng, depth + 1) for _ in range(rng.randrange(0, 5))}
    return [_value(rng, depth + 1) for _ in range(rng.randrange(0, 5))]


def _shaped(rng: random.Random, protocol: str) -> dict[str, Any]:
    """A map with the protocol's field names, some values of the wrong type or size."""
    fields = {
        "/hyphae/hello/1": {"v": 1, "agent": "x", "network": "hyphae", "roles": [], "listen": []},
        SYNC_PROTOCOL: {"v": 1, "run": "r", "heads": {"12D3KooWx": {"member": [1, 0, b"12345678"]}}},
        "/hyphae/tensor/1": {"t": "open", "v": 1, "pk": b"k" * 32, "sid": b"s" * 16, "direct": True, "frame": 1 << 20},
    }.get(protocol, {"a": 1})
    out = dict(fields)
    for key in rng.sample(list(out), k=rng.randrange(0, len(out) + 1)):
        out[key] = _value(rng)
    if rng.random() < 0.3:
        out[str(_value(rng))[:8]] = _value(rng)
    if rng.random() < 0.2:
        out["heads"] = {f"12D3KooW{i}": {"s": [1, 0, b"x" * 8]} for i in range(rng.choice([1, 5000]))}
    return out


def payload(rng: random.Random, protocol: str) -> bytes:
    """One hostile payload for ``protocol`` (length-prefixed msgpack frames where that applies)."""
    frame = lambda body: struct.pack(">I", len(body)) + body  # noqa: E731
    kind = rng.randrange(8)
    if kind == 0:
        return rng.randbytes(rng.randrange(0, 300))
    if kind == 1:
        return struct.pack(">I", rng.choice([0xFFFFFFFF, 1 << 30, 64 << 20])) + rng.randbytes(16)
    if kind == 2:
        return frame(rng.randbytes(rng.randrange(0, 200)))
    if kind == 3:
        return frame(msgpack.packb(_value(rng), use_bin_type=True))
    if kind == 4:
        whole = frame(msgpack.packb(_shaped(rng, protocol), use_bin_type=True))
        return whole[:rng.randrange(1, len(whole))]  # truncated
    if kind == 5:
        return b"".join(frame(msgpack.packb(_shaped(rng, protocol), use_bin_type=True)) for _ in range(rng.randrange(2, 6)))
    return frame(msgpack.packb(_shaped(rng, protocol), use_bin_type=True))


async def blast(peer: RawPeer, addr: str, protocol: str, payloads: list[bytes], *, parallel: int = 16) -> int:
    """Write each payload on its own stream (``parallel`` at once), glance at the answer, reset.
    Returns how many streams could be opened."""
    info = info_from_p2p_addr(multiaddr.Multiaddr(addr))

    async def run() -> int:
        opened = 0
        limiter = trio.CapacityLimiter(parallel)

        async def one(data: bytes) -> None:
            nonlocal opened
            async with limiter:
                with trio.move_on_after(5):
                    try:
                        await peer.host.connect(info)  # the target may have dropped us: come back
                        stream = await peer.host.new_stream(info.peer_id, [TProtocol(protocol)])
                    except Exception:  # noqa: BLE001 — refused or disconnected: that is allowed
                        return
                    opened += 1
                    try:
                        await stream.write(data)
                        with trio.move_on_after(0.05):
                            await stream.read(65536)
                    except Exception:  # noqa: BLE001 — a reset is a fine answer to garbage
                        pass
                    finally:
                        with contextlib.suppress(Exception):
                            await stream.reset()

        async with trio.open_nursery() as nursery:
            for data in payloads:
                nursery.start_soon(one, data)
        return opened

    return await peer._thread.run(run)


async def test_garbage_on_every_protocol_never_stops_the_host_and_sinks_the_senders_score(make_host) -> None:
    target = await make_host()
    honest = await make_host(bootstrap=(target.addrs[0],))

    async def echo(peer_id: str, message: Any) -> Any:
        return message

    target.serve(ECHO, echo)
    scores = scores_for(target)
    service = PeerScoreService(SimpleNamespace(host=target), check_interval_s=0.2)
    async with contextlib.AsyncExitStack() as stack, asyncio.TaskGroup() as tg:
        watcher = tg.create_task(service.run())
        node = await stack.enter_async_context(open_run_state(target, RunState("fuzz", target.identity)))
        node.state.create_run()
        other = await stack.enter_async_context(open_run_state(honest, RunState("fuzz", honest.identity)))
        await stack.enter_async_context(open_tensor_plane(target, TensorConfig(listen=("/ip4/127.0.0.1/tcp/0",))))
        await wait_for(lambda: _ready(honest, target.peer_id), 20, "the honest host to pass hello")
        raw = await stack.enter_async_context(RawPeer())
        rng = random.Random(12)
        sent = 0
        started = time.monotonic()
        for protocol in OURS + LIBP2P:
            payloads = [payload(rng, protocol) for _ in range(PER_PROTOCOL)]
            opened = await blast(raw, target.addrs[0], protocol, payloads)
            sent += len(payloads)
            t0 = time.monotonic()
            async with asyncio.timeout(10):  # the target still serves honest peers
                assert await honest.request(target.peer_id, ECHO, {"after": protocol}) == {"after": protocol}
                await other.sync_with(target.peer_id)
            assert time.monotonic() - t0 < 5, f"honest traffic took {time.monotonic() - t0:.1f} s after {protocol}"
            assert opened >= 1 or protocol in LIBP2P, f"no stream on {protocol} could be opened at all"
        assert other.state.owner() == target.peer_id  # the honest sync carried the run through
        row = scores.scores()[raw.identity.peer_id]
        # every protocol of ours the payloads reached scored what was wrong with them
        assert {"hello", "runsync", "tensor"} <= {kind.split(".")[0] for kind in row["violations"]}, row
        await wait_for(lambda: service.disconnected >= 1, 10, "the score service to disconnect the raw peer")
        assert scores.is_banned(raw.identity.peer_id)
        assert honest.peer_id not in scores.scores()  # the honest peer was never blamed
        watcher.cancel()
    print(f"\n{sent} hostile streams on {len(OURS + LIBP2P)} protocols in {time.monotonic() - started:.1f} s; "
          f"raw peer score {row['score']}, violations {row['violations']}")


async def _ready(host, peer_id: str) -> bool:
    return any(p.peer_id == peer_id and p.agent for p in await host.peers())


async def test_one_undecodable_gossipsub_rpc_no_longer_takes_the_host_down(make_host) -> None:
    """py-libp2p 0.8.1's gossipsub raises on an RPC it cannot parse, and the exception used to end
    the whole host (protocol/_libp2p_guard.py); now only that stream is reset."""
    target = await make_host()
    honest = await make_host(bootstrap=(target.addrs[0],))

    async def echo(peer_id: str, message: Any) -> Any:
        return message

    target.serve(ECHO, echo)
    await wait_for(lambda: _ready(honest, target.peer_id), 20, "the honest host to pass hello")
    async with RawPeer() as raw:
        garbage = b"\xff\xff\xff\xff\x0f" + b"\x01" * 32  # a varint length far over the limit, then junk
        undecodable = b"\x05\xff\xff\xff\xff\xff"  # 5 bytes that are no protobuf RPC
        assert await blast(raw, target.addrs[0], "/meshsub/1.1.0", [garbage, undecodable] * 4) >= 1
        assert scores_for(target).score(raw.identity.peer_id) < 0
    async with asyncio.timeout(10):
        assert await honest.request(target.peer_id, ECHO, "still here") == "still here"
