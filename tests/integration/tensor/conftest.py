"""Fixtures for tensor-plane tests: real hosts on loopback (``make_host``), each with a plane.

``make_group(n)`` starts n hosts, connects every pair over libp2p (hello done), and opens a
:class:`TensorPlane` on each with a loopback data listener. Everything closes at teardown.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from typing import Any

import numpy as np
import pytest

from hyphae.protocol.errors import PeerError
from hyphae.protocol.host import Host
from hyphae.protocol.tensor import Tensor, TensorConfig, TensorPlane, open_tensor_plane
from hyphae.protocol.testing import wait_for

LOOPBACK_DATA = ("/ip4/127.0.0.1/tcp/0",)


async def ready_peers(host: Host) -> set[str]:
    return {p.peer_id for p in await host.peers() if p.agent}


@pytest.fixture
async def make_plane() -> AsyncIterator[Callable[..., Any]]:
    """``await make_plane(host, **TensorConfig fields)``: a plane on loopback, closed at teardown."""
    async with AsyncExitStack() as stack:

        async def make(host: Host, **config: Any) -> TensorPlane:
            config.setdefault("listen", LOOPBACK_DATA)
            return await stack.enter_async_context(open_tensor_plane(host, TensorConfig(**config)))

        yield make


@pytest.fixture
def make_group(make_host: Callable[..., Any], make_plane: Callable[..., Any]) -> Callable[..., Any]:
    """``hosts, planes = await make_group(n, **config)``: n hosts meshed, each with a plane."""

    async def make(n: int, **config: Any) -> tuple[list[Host], list[TensorPlane]]:
        hosts = [await make_host()]
        for _ in range(n - 1):
            hosts.append(await make_host(bootstrap=(hosts[0].addrs[0],)))
        first = hosts[0]
        await wait_for(lambda: _has_all(first, {h.peer_id for h in hosts[1:]}), 20, "every host joined the first")
        try:  # the DHT rendezvous usually meshes the rest within a few seconds
            await wait_for(lambda: _meshed(hosts), 6, "a full mesh")
        except AssertionError:
            for a, b in itertools.combinations(hosts[1:], 2):
                if b.peer_id not in await ready_peers(a) and a.peer_id not in await ready_peers(b):
                    try:
                        await a.connect(b.addrs[0])
                    except PeerError:
                        pass  # a simultaneous dial from the other side won; the wait below tells
            await wait_for(lambda: _meshed(hosts), 20, "every host sees every other")
        planes = [await make_plane(h, **config) for h in hosts]
        return hosts, planes

    return make


async def _meshed(hosts: list[Host]) -> bool:
    for h in hosts:
        if not await _has_all(h, {o.peer_id for o in hosts if o is not h}):
            return False
    return True


async def _has_all(host: Host, others: set[str]) -> bool:
    return others <= await ready_peers(host)


def tensor_set(total_bytes: int, seed: int = 0) -> list[Tensor]:
    """A realistic mix: a few big float tensors, small ones, a bf16 and an int tensor."""
    rng = np.random.default_rng(seed)
    big = total_bytes // 4 // 4
    arrays = {
        "embed": rng.standard_normal(big * 2, dtype=np.float32).reshape(-1, 256 if big * 2 % 256 == 0 else 1),
        "w1": rng.standard_normal(big, dtype=np.float32),
        "bias": rng.standard_normal(1000, dtype=np.float32),
        "steps": np.arange(7, dtype=np.int64),
    }
    out = [Tensor.from_numpy(k, v) for k, v in arrays.items()]
    bf16 = rng.integers(0, 1 << 16, big * 2 - 1000, dtype=np.uint16)
    out.append(Tensor.from_numpy("w2_bf16", bf16, dtype="bfloat16"))
    return out


def same(a: list[Tensor], b: list[Tensor]) -> bool:
    return len(a) == len(b) and all(x.spec == y.spec and x.data == y.data for x, y in zip(a, b))
