"""Fixtures for integration tests: real hosts in threads, real daemons in subprocesses.

Nothing here is mocked: hosts listen on loopback TCP, daemons are ``python -m hyphae.cli node
join`` processes with their own data dirs. Everything a test starts is stopped at teardown.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest

from hyphae.node.testing import DaemonProcess
from hyphae.protocol.config import HostConfig
from hyphae.protocol.host import Host, open_host
from hyphae.protocol.identity import Identity


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
