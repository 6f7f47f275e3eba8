"""The tensor plane over a relayed libp2p connection: 256 MiB each way, bit-exact, recorded as
``libp2p-relayed`` (the path a pair takes while hole punching has not given it a direct one).

The relay here is configured without byte or rate limits: the limits themselves are tested in
tests/integration/nat/test_loopback.py. Everything is on loopback, so the node announces a closed
port and both planes have direct dialing off; otherwise they would simply connect directly.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from hyphae.protocol.tensor import TensorConfig, open_tensor_plane

from .conftest import same, tensor_set

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

UNLIMITED = {"circuit_bytes": 0, "circuit_rate_bytes_s": 0, "total_rate_bytes_s": 0}


async def test_256_mib_tensor_set_crosses_bit_exact_over_a_relayed_connection(make_relayed_pair) -> None:
    relay, node, other, _ = await make_relayed_pair(UNLIMITED)
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
