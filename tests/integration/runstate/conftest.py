"""Real hosts on loopback running the run state: a small network builder for these tests."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from hyphae.protocol.config import HostConfig
from hyphae.protocol.host import Host, open_host
from hyphae.protocol.identity import Identity
from hyphae.protocol.runstate import (MembershipConfig, RunState, RunStateConfig, RunStateNode, RunStore, SyncConfig,
                                      open_run_state)
from hyphae.protocol.testing import wait_for

RUN = "itest"
MEMBERSHIP = MembershipConfig(suspect_after_s=15, gone_after_s=45)


@dataclass
class Member:
    identity: Identity
    host: Host
    state: RunState
    node: RunStateNode
    stack: AsyncExitStack
    store_path: Path | None

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id


@dataclass
class Net:
    """A run replicated by real hosts in this process."""

    stack: AsyncExitStack
    tmp_path: Path
    sync: SyncConfig
    members: list[Member] = field(default_factory=list)

    async def add(self, *, identity: Identity | None = None, store: bool = False, bootstrap: int | None = 0,
                  owner: str | None = None) -> Member:
        identity = identity or Identity.generate()
        boot = (self.members[bootstrap].host.addrs[0],) if bootstrap is not None and self.members else ()
        stack = AsyncExitStack()
        await self.stack.enter_async_context(stack)
        host = await stack.enter_async_context(open_host(
            identity, HostConfig(listen=("/ip4/127.0.0.1/tcp/0",), mdns=False, bootstrap=boot), agent="rs-test/1"))
        state = RunState(RUN, identity, config=RunStateConfig(owner=owner, membership=MEMBERSHIP))
        path = self.tmp_path / identity.peer_id[-8:] / "runstate.msgpack" if store else None
        node = await stack.enter_async_context(open_run_state(
            host, state, config=self.sync, store=RunStore(path) if path else None))
        state.set_member(addrs=list(host.addrs), roles=["test"])
        member = Member(identity, host, state, node, stack, path)
        self.members.append(member)
        return member

    async def remove(self, member: Member, *, crash: bool) -> None:
        member.node.graceful = not crash
        await member.stack.aclose()
        self.members.remove(member)

    @property
    def states(self) -> list[RunState]:
        return [m.state for m in self.members]

    async def wait(self, predicate: Callable[[RunState], Any], timeout_s: float, what: str) -> None:
        await wait_for(lambda: all(predicate(s) for s in self.states), timeout_s,
                       lambda: f"{what} (holds on {sum(bool(predicate(s)) for s in self.states)}/{len(self.states)})")

    async def time_to_all(self, predicate: Callable[[RunState], Any], timeout_s: float, what: str) -> list[float]:
        """Seconds until ``predicate`` held on each node (polled every 2 ms)."""
        start = time.monotonic()
        seen: dict[int, float] = {}
        while len(seen) < len(self.members):
            for i, s in enumerate(self.states):
                if i not in seen and predicate(s):
                    seen[i] = time.monotonic() - start
            if time.monotonic() - start > timeout_s:
                raise AssertionError(f"timed out after {timeout_s} s waiting for {what} on "
                                     f"{len(self.members) - len(seen)} node(s)")
            await asyncio.sleep(0.002)
        return [seen[i] for i in range(len(self.members))]

    async def ready(self, timeout_s: float = 30.0) -> None:
        """Every node knows the owner and sees every member live."""
        n = len(self.members)
        await self.wait(lambda s: s.owner() is not None, timeout_s, "the owner known everywhere")
        await self.wait(lambda s: len(s.live_members()) == n, timeout_s, f"{n} live members everywhere")


def summary(samples: list[float]) -> str:
    return f"median {statistics.median(samples) * 1e3:.0f} ms, max {max(samples) * 1e3:.0f} ms"


@pytest.fixture
async def runnet(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """``net = await runnet(n, store=False, **sync)``: n hosts bootstrapped to the first, each
    running the run state; node 0 creates the run. Everything is stopped at teardown."""
    async with AsyncExitStack() as stack:

        async def make(n: int, *, store: bool = False, **sync: Any) -> Net:
            net = Net(stack, tmp_path, SyncConfig(**sync))
            for _ in range(n):
                await net.add(store=store)
            net.states[0].create_run()
            return net

        yield make
