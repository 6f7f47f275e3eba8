"""Fixtures for integration tests: real hosts in threads, real daemons in subprocesses.

Nothing here is mocked: hosts listen on loopback TCP, daemons are ``python -m hyphae.cli node
join`` processes with their own data dirs. Everything a test starts is stopped at teardown.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest

from hyphae.node.testing import DaemonProcess
from hyphae.protocol.config import HostConfig
from hyphae.protocol.host import Host, open_host
from hyphae.protocol.identity import Identity
from hyphae.protocol.testing import wait_for


@pytest.fixture
async def make_host() -> AsyncIterator[Callable[..., Any]]:
    """``await make_host(bootstrap=(...), ...)``: a Host on loopback, mDNS off; closed at teardown."""
    async with AsyncExitStack() as stack:

        async def make(*, agent: str = "test/1", peerbook_path: Path | None = None, **kwargs: Any) -> Host:
            kwargs.setdefault("listen", ("/ip4/127.0.0.1/tcp/0",))
            kwargs.setdefault("mdns", False)
            return await stack.enter_async_context(
                open_host(Identity.generate(), HostConfig(**kwargs), agent=agent, peerbook_path=peerbook_path)
            )

        yield make


@pytest.fixture
def make_daemon(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    """``make_daemon(name, *args)``: a started daemon with data dir ``tmp_path/name``."""
    started: list[DaemonProcess] = []

    def make(name: str, *args: str, start: bool = True) -> DaemonProcess:
        d = DaemonProcess(tmp_path / name, list(args))
        started.append(d)
        return d.start() if start else d

    yield make
    for d in started:
        d.kill()


@pytest.fixture
def make_relayed_pair(make_host: Callable[..., Any]) -> Callable[..., Any]:
    """``relay, node, other, circuit_addr = await make_relayed_pair(limits)``: ``node`` holds a
    reservation on ``relay`` (whose limits are ``limits``) and ``other`` is connected to it through
    the relay only. On loopback anyone could dial ``node`` directly (the DHT and py-libp2p's
    auto-connector learn its address), so it announces a closed port; hole punching is off."""
    quiet = {"autonat": False, "hole_punching": False, "upnp": False}

    async def make(limits: dict[str, Any]) -> tuple[Host, Host, Host, str]:
        relay = await make_host(nat={**quiet, "relay_service": "on", "relay_client": "off", "relay_limits": limits})
        node = await make_host(bootstrap=(relay.addrs[0],), announce=(f"/ip4/127.0.0.1/tcp/{closed_port()}",),
                               nat={**quiet, "relay_client": "on", "relay_service": "off",
                                    "relays": [relay.addrs[0]], "relay_reservations": 1})

        async def circuit() -> str | None:
            addrs = (await node.reachability())["relay_addrs"]
            return addrs[0] if addrs else None

        addr = await wait_for(circuit, 20, "a relay reservation")
        other = await make_host(nat={**quiet, "relay_service": "off", "relay_client": "off"})
        await other.connect(f"{addr}/p2p/{node.peer_id}")

        async def hello_done() -> bool:
            return any(p.peer_id == node.peer_id and p.agent for p in await other.peers())

        await wait_for(hello_done, 20, "hello over the relayed connection")
        return relay, node, other, addr

    return make


def closed_port() -> int:
    """A loopback port nobody listens on (dialing it is refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
