"""The tensor plane over a relayed libp2p connection: 256 MiB each way, bit-exact, recorded as
``libp2p-relayed`` (the path a pair takes while hole punching has not given it a direct one).

The relay here is configured without byte or rate limits: the limits themselves are tested in
tests/integration/nat/test_loopback.py. Everything is on loopback, so the node announces a closed
port and both planes have direct dialing off; otherwise they would simply connect directly.
"""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from hyphae.protocol.tensor import TensorConfig, open_tensor_plane
from hyphae.protocol.testing import wait_for

from .conftest import same, tensor_set

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

QUIET = {"autonat": False, "hole_punching": False, "upnp": False}
UNLIMITED = {"circuit_bytes": 0, "circuit_rate_bytes_s": 0, "total_rate_bytes_s": 0}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_256_mib_tensor_set_crosses_bit_exact_over_a_relayed_connection(make_host) -> None:
    relay = await make_host(nat={**QUIET, "relay_service": "on", "relay_client": "off", "relay_limits": UNLIMITED})
    node = await make_host(bootstrap=(relay.addrs[0],), announce=(f"/ip4/127.0.0.1/tcp/{closed_port()}",),
                           nat={**QUIET, "relay_client": "on", "relay_service": "off", "relays": [relay.addrs[0]],
                                "relay_reservations": 1})

    async def circuit() -> str | None:
        addrs = (await node.reachability())["relay_addrs"]
        return addrs[0] if addrs else None

    addr = await wait_for(circuit, 20, "a relay reservation")
    other = await make_host(nat={**QUIET, "relay_service": "off", "relay_client": "off"})
    await other.connect(f"{addr}/p2p/{node.peer_id}")
    config = TensorConfig(listen=("/ip4/127.0.0.1/tcp/0",), direct_dial=False)
    async with open_tensor_plane(node, config) as a, open_tensor_plane(other, config) as b:
        ts = tensor_set(256 << 20)
        start = time.monotonic()
        got_b, got_a = await asyncio.gather(b.exchange(a.peer_id, "big", ts), a.exchange(b.peer_id, "big", ts))
        elapsed = time.monotonic() - start
        assert same(got_a, ts) and same(got_b, ts)
        for plane, peer in ((a, b.peer_id), (b, a.peer_id)):
            assert plane.stats()["peers"][peer]["path"] == "libp2p-relayed"
    relayed = (await relay.reachability())["relay_service"]
    assert relayed["circuits"] >= 1
    print(f"256 MiB each way over the relay: {elapsed:.1f} s")
