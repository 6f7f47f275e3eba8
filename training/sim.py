"""`SimNetwork` / `SimComm`: N peers in one process and one event loop, in memory.

A `SimNetwork` hands out one `SimComm` per virtual peer. It implements every `Comm` operation
with plain dicts and futures (cheap enough for 1000 peers of the tiny model), copies every
tensor that crosses between peers (so a bug cannot make two peers share weights), and models:

- latency: `latency_s` seconds per message, a constant or a function of (sender, receiver);
- bandwidth: `bandwidth_bytes_per_s` per peer (constant or a function of the peer), adding
  bytes / bandwidth to a transfer;
- failures: `kill(peer, at_s=...)` drops a peer now or at a clock time (a step-based kill is a
  loop callback that calls `kill`); `SimComm.aclose()` is a graceful leave;
- traffic: payload bytes per peer, counted in the tensors' own dtypes.

Time is the event loop's clock. Under `run_virtual` (a `VirtualTimeLoop`) nothing really sleeps,
so 1000 peers with 100 ms links cost no wall time; under a normal loop the latencies are real.

Cost models (documented so results can be read):
- exchange: each side waits latency(a, b) + max(payload) / min(bandwidth) after both arrived;
  each sends its payload and receives the other's;
- all-reduce: a ring over the included peers (sorted): 2(n-1) hops of the slowest ring link
  plus 2(n-1)/n * payload / slowest bandwidth; each included peer sends and receives
  2(n-1)/n * payload bytes (the bandwidth-optimal ring); a late peer receives the payload;
- publish/collect: each value becomes visible to peer q at publish time + latency(p, q);
- blobs: fetched from the live holder with the lowest latency; the holder sends, the fetcher
  receives len(blob); the fetcher then holds it too;
- run-state reads and writes are instant and not counted (control plane, tiny).
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from hyphae.training._sim_parts import (
    Offer,
    ScalarSlot,
    ScalarWait,
    SimPeer,
    clone_tensors,
    copy_plain,
    resolve,
    retrieve,
)
from hyphae.training._sim_rounds import Round, RoundBook, reduce_contributions
from hyphae.training._tensor_codec import payload_bytes
from hyphae.training._virtual_loop import VirtualTimeLoop, run_virtual
from hyphae.training.comm import (
    MAX_SCALAR_BYTES,
    AllReduceResult,
    BlobCorrupt,
    BlobUnavailable,
    Comm,
    CommClosed,
    PeerUnavailable,
    ReduceOp,
    Traffic,
    check_plain,
)

__all__ = ["SimComm", "SimNetwork", "VirtualTimeLoop", "run_virtual"]

logger = logging.getLogger(__name__)

Latency = float | Callable[[str, str], float]
Bandwidth = float | Callable[[str], float] | None


class SimNetwork:
    """An in-memory network of virtual peers.

    Args:
        latency_s: one-way message latency in seconds, constant or f(sender, receiver).
        bandwidth_bytes_per_s: per-peer bandwidth, constant, f(peer), or None for infinite.
        round_retention: closed all-reduce rounds kept so that late contributors still get
            the result.
        scalar_retention_steps: published (topic, step) slots kept per topic.
    """

    def __init__(
        self,
        *,
        latency_s: Latency = 0.0,
        bandwidth_bytes_per_s: Bandwidth = None,
        round_retention: int = 8,
        scalar_retention_steps: int = 256,
    ) -> None:
        if not callable(latency_s) and latency_s < 0:
            raise ValueError(f"latency_s must be >= 0, got {latency_s}")
        if bandwidth_bytes_per_s is not None and not callable(bandwidth_bytes_per_s) and bandwidth_bytes_per_s <= 0:
            raise ValueError(f"bandwidth_bytes_per_s must be > 0 or None, got {bandwidth_bytes_per_s}")
        self._latency = latency_s
        self._bandwidth = bandwidth_bytes_per_s
        self._peers: dict[str, SimPeer] = {}
        self._comms: dict[str, SimComm] = {}
        self._live: list[str] = []  # sorted live peer ids
        self._offers: dict[tuple[str, str, str], Offer] = {}
        self._rounds = RoundBook(retention=round_retention)
        self._scalars: dict[str, OrderedDict[int, ScalarSlot]] = {}
        self._scalar_retention = scalar_retention_steps
        self._blobs: dict[str, bytes] = {}
        self._holders: dict[str, set[str]] = {}
        self._state: dict[str, Any] = {}

    # --- membership -------------------------------------------------------------------------

    def add_peer(self, peer_id: str | None = None) -> SimComm:
        """Create a live peer and return its Comm. Default ids are "peer-0000", "peer-0001", ...

        Raises:
            ValueError: the id is taken.
        """
        peer_id = peer_id if peer_id is not None else f"peer-{len(self._peers):04d}"
        if peer_id in self._peers:
            raise ValueError(f"peer id {peer_id!r} already exists in this SimNetwork")
        self._peers[peer_id] = SimPeer(peer_id)
        bisect.insort(self._live, peer_id)
        comm = SimComm(self, peer_id)
        self._comms[peer_id] = comm
        return comm

    def add_peers(self, n: int) -> list[SimComm]:
        """Create `n` peers with default ids."""
        return [self.add_peer() for _ in range(n)]

    def members(self) -> list[str]:
        """Live peer ids, sorted."""
        return list(self._live)

    def is_alive(self, peer_id: str) -> bool:
        peer = self._peers.get(peer_id)
        return peer is not None and peer.alive

    def kill(self, peer_id: str, *, at_s: float | None = None) -> None:
        """Drop `peer_id` from the network, now or at clock time `at_s` (needs a running loop).

        Its own pending and future calls raise CommClosed; peers waiting on it see
        PeerUnavailable (exchange) or finish without it (all-reduce, collect).

        Raises:
            ValueError: unknown peer.
        """
        if peer_id not in self._peers:
            raise ValueError(f"unknown peer {peer_id!r}; known: {len(self._peers)} peers")
        if at_s is not None:
            loop = asyncio.get_running_loop()
            loop.call_at(at_s, self.kill, peer_id)
            return
        peer = self._peers[peer_id]
        if not peer.alive:
            return
        peer.alive = False
        self._live.remove(peer_id)
        logger.debug("sim peer %s killed", peer_id)
        for fut in list(peer.pending):
            if not fut.done():
                fut.set_exception(CommClosed(f"peer {peer_id} was killed"))
        self._drop_offers(peer_id)
        for rnd in self._rounds.open_rounds():
            rnd.drop(peer_id)
            self._maybe_close(rnd)
        for slots in self._scalars.values():
            for slot in slots.values():
                self._scalar_progress(slot, peer_id)

    def traffic(self, peer_id: str) -> Traffic:
        """Bytes sent/received by `peer_id` so far."""
        p = self._peers[peer_id]
        return Traffic(p.sent, p.received)

    def corrupt_blob(self, digest: str) -> None:
        """Testing hook: flip a byte of a stored blob so fetchers detect the mismatch."""
        data = bytearray(self._blobs[digest])
        data[0] ^= 0xFF
        self._blobs[digest] = bytes(data)

    # --- cost model --------------------------------------------------------------------------

    def latency(self, a: str, b: str) -> float:
        if a == b:
            return 0.0
        return self._latency(a, b) if callable(self._latency) else self._latency

    def bandwidth(self, peer: str) -> float | None:
        bw = self._bandwidth
        return bw(peer) if callable(bw) else bw

    def _transfer_s(self, nbytes: float, peers: Sequence[str]) -> float:
        rates = [r for r in (self.bandwidth(p) for p in peers) if r is not None]
        return nbytes / min(rates) if rates and nbytes else 0.0

    # --- internals used by SimComm -----------------------------------------------------------

    def _peer(self, peer_id: str) -> SimPeer:
        peer = self._peers[peer_id]
        if not peer.alive:
            raise CommClosed(f"peer {peer_id} is closed (left or killed); it can make no calls")
        return peer

    def _future(self, owner: SimPeer) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        owner.pending.add(fut)
        fut.add_done_callback(owner.pending.discard)
        return fut

    def _drop_offers(self, peer_id: str) -> None:
        for key in [k for k in self._offers if peer_id in (k[1], k[2])]:
            offer = self._offers.pop(key)
            if key[2] == peer_id and not offer.future.done():
                offer.future.set_exception(PeerUnavailable(peer_id, "left during the exchange"))

    def _maybe_close(self, rnd: Round) -> None:
        if rnd.closed or not rnd.complete():
            return
        self._close_round(rnd)

    def _close_on_deadline(self, rnd: Round) -> None:
        if not rnd.closed:
            self._close_round(rnd)

    def _close_round(self, rnd: Round) -> None:
        included = tuple(sorted(rnd.contributions))
        if not included:
            self._rounds.discard(rnd)
            return
        result = reduce_contributions(rnd.contributions, included, rnd.op)
        n, size = len(included), payload_bytes(result)
        ring_bytes = 2 * (n - 1) * size // n
        hops = max((self.latency(a, b) for a, b in zip(included, included[1:] + included[:1])), default=0.0)
        duration = 2 * (n - 1) * hops + self._transfer_s(ring_bytes, included)
        for pid in included:
            self._peers[pid].sent += ring_bytes
            self._peers[pid].received += ring_bytes
        self._rounds.close(rnd, result, included, duration)

    def _scalar_slot(self, topic: str, step: int) -> ScalarSlot:
        slots = self._scalars.setdefault(topic, OrderedDict())
        slot = slots.get(step)
        if slot is None:
            slot = slots[step] = ScalarSlot()
            while len(slots) > self._scalar_retention:
                _, old = slots.popitem(last=False)
                for wait in old.waits.values():
                    resolve(wait.future)
        return slot

    def _scalar_progress(self, slot: ScalarSlot, peer_id: str) -> None:
        for wait in slot.waits.values():
            wait.missing.discard(peer_id)
            if not wait.missing:
                resolve(wait.future)


class SimComm(Comm):
    """One virtual peer's `Comm` on a `SimNetwork` (create it with `SimNetwork.add_peer`)."""

    def __init__(self, network: SimNetwork, peer_id: str) -> None:
        self._net = network
        self._id = peer_id

    @property
    def peer_id(self) -> str:
        return self._id

    @property
    def network(self) -> SimNetwork:
        return self._net

    async def members(self) -> list[str]:
        self._net._peer(self._id)
        return self._net.members()

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    async def sleep(self, seconds: float) -> None:
        """Sleep on the loop's clock; raises CommClosed at once if this peer is killed meanwhile."""
        net = self._net
        if seconds <= 0:
            await asyncio.sleep(0)
            net._peer(self._id)
            return
        fut = net._future(net._peer(self._id))
        handle = asyncio.get_running_loop().call_later(seconds, resolve, fut)
        try:
            await fut
        finally:
            handle.cancel()
            retrieve(fut)

    def traffic(self) -> Traffic:
        return self._net.traffic(self._id)

    async def aclose(self) -> None:
        if self._net.is_alive(self._id):
            self._net.kill(self._id)

    # --- exchange ----------------------------------------------------------------------------

    async def exchange(
        self, peer: str, tensors: Mapping[str, torch.Tensor], *, tag: str, timeout_s: float
    ) -> dict[str, torch.Tensor]:
        net, me = self._net, self._net._peer(self._id)
        if peer == self._id:
            raise ValueError(f"cannot exchange with oneself ({peer}); pick another member")
        if not net.is_alive(peer):
            raise PeerUnavailable(peer, "not a live member")
        async with asyncio.timeout(timeout_s):
            theirs = net._offers.pop((tag, peer, self._id), None)
            if theirs is not None:
                received = clone_tensors(theirs.tensors)
                theirs.future.set_result(clone_tensors(tensors))
            else:
                received = await self._wait_for_partner(peer, tensors, tag)
            sent_bytes, recv_bytes = payload_bytes(tensors), payload_bytes(received)
            me.sent += sent_bytes
            me.received += recv_bytes
            delay = net.latency(peer, self._id) + net._transfer_s(max(sent_bytes, recv_bytes), [peer, self._id])
            await self.sleep(delay)
        return received

    async def _wait_for_partner(
        self, peer: str, tensors: Mapping[str, torch.Tensor], tag: str
    ) -> dict[str, torch.Tensor]:
        net = self._net
        key = (tag, self._id, peer)
        if key in net._offers:
            raise ValueError(f"exchange {tag!r} with {peer} is already in progress on this peer")
        offer = Offer(tensors, net._future(net._peers[self._id]))
        net._offers[key] = offer
        try:
            return await offer.future
        finally:
            if net._offers.get(key) is offer:
                del net._offers[key]  # withdrawn: cancelled or timed out before the partner came
            retrieve(offer.future)

    # --- all-reduce --------------------------------------------------------------------------

    async def all_reduce(
        self,
        tensors: Mapping[str, torch.Tensor],
        *,
        group: Sequence[str],
        tag: str,
        timeout_s: float,
        op: ReduceOp = "mean",
    ) -> AllReduceResult:
        net, me = self._net, self._net._peer(self._id)
        if self._id not in group:
            raise ValueError(f"all_reduce group must contain this peer {self._id}; pass members()")
        closed = net._rounds.closed_round(tag)
        if closed is not None:  # too late: take the group's result without being included
            me.received += payload_bytes(closed.result)
            await self.sleep(max(net.latency(p, self._id) for p in closed.included))
            return AllReduceResult(clone_tensors(closed.result), closed.included)
        live_group = [p for p in group if net.is_alive(p)]
        rnd = net._rounds.open_round(tag, op, live_group, timeout_s, net._close_on_deadline)
        rnd.contribute(self._id, tensors, op)
        fut = net._future(me)
        rnd.waiters[self._id] = fut
        net._maybe_close(rnd)
        try:
            await fut
        finally:
            if not rnd.closed:
                rnd.withdraw(self._id)  # cancelled before the round closed: finish without us
                net._maybe_close(rnd)
            retrieve(fut)
        await self.sleep(rnd.duration_s)
        return AllReduceResult(clone_tensors(rnd.result), rnd.included)

    # --- small values ------------------------------------------------------------------------

    async def publish(self, topic: str, step: int, value: bytes) -> None:
        net, me = self._net, self._net._peer(self._id)
        if not isinstance(value, bytes | bytearray) or len(value) > MAX_SCALAR_BYTES:
            raise ValueError(
                f"publish takes bytes of at most {MAX_SCALAR_BYTES}, got "
                f"{type(value).__name__} of {len(value) if hasattr(value, '__len__') else '?'}; "
                "use put_blob for bigger payloads"
            )
        slot = net._scalar_slot(topic, step)
        slot.values[self._id] = (bytes(value), self.now())
        me.sent += len(value)
        net._scalar_progress(slot, self._id)

    async def collect(
        self, topic: str, step: int, *, peers: Sequence[str], timeout_s: float
    ) -> dict[str, bytes]:
        net, me = self._net, self._net._peer(self._id)
        deadline = self.now() + timeout_s
        slot = net._scalar_slot(topic, step)
        key = tuple(peers)
        wait = slot.waits.get(key)
        if wait is None:
            missing = {p for p in peers if p not in slot.values and net.is_alive(p)}
            wait = slot.waits[key] = ScalarWait(missing, asyncio.get_running_loop().create_future())
            if not missing:
                resolve(wait.future)
        if not wait.future.done():
            killed = net._future(me)  # fails with CommClosed if this peer is killed meanwhile
            try:
                await asyncio.wait([wait.future, killed], timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
            finally:
                resolve(killed)
                retrieve(killed)
            net._peer(self._id)
        out, ready, received = self._arrived(slot, peers, deadline)
        if ready > self.now():
            await self.sleep(ready - self.now())
        me.received += received
        return out

    def _arrived(
        self, slot: ScalarSlot, peers: Sequence[str], deadline: float
    ) -> tuple[dict[str, bytes], float, int]:
        """Values of `peers` that reach this peer by `deadline`, when the last one lands, bytes."""
        net, values = self._net, slot.values
        constant = None if callable(net._latency) else net._latency
        out: dict[str, bytes] = {}
        ready, received = self.now(), 0
        for p in peers:
            entry = values.get(p)
            if entry is None:
                continue
            value, t = entry
            if p != self._id:
                t += constant if constant is not None else net.latency(p, self._id)
            if t <= deadline:
                out[p] = value
                ready = max(ready, t)
                received += len(value) if p != self._id else 0
        return out, ready, received

    # --- blobs -------------------------------------------------------------------------------

    async def put_blob(self, data: bytes) -> str:
        net = self._net
        net._peer(self._id)
        data = bytes(data)
        digest = hashlib.sha256(data).hexdigest()
        net._blobs.setdefault(digest, data)
        net._holders.setdefault(digest, set()).add(self._id)
        return digest

    async def get_blob(self, digest: str, *, timeout_s: float) -> bytes:
        net, me = self._net, self._net._peer(self._id)
        holders = [h for h in net._holders.get(digest, ()) if net.is_alive(h)]
        if not holders:
            raise BlobUnavailable(digest)
        async with asyncio.timeout(timeout_s):
            if self._id not in holders:
                source = min(holders, key=lambda h: (net.latency(h, self._id), h))
                data = net._blobs[digest]
                await self.sleep(net.latency(source, self._id) + net._transfer_s(len(data), [source, self._id]))
                net._peers[source].sent += len(data)
                me.received += len(data)
        data = net._blobs[digest]
        if hashlib.sha256(data).hexdigest() != digest:
            raise BlobCorrupt(f"blob {digest}: received bytes hash to something else; fetch it again")
        net._holders[digest].add(self._id)
        return data

    # --- run state ---------------------------------------------------------------------------

    async def state_get(self, key: str) -> Any:
        self._net._peer(self._id)
        return copy_plain(self._net._state.get(key))

    async def state_set(self, key: str, value: Any) -> None:
        self._net._peer(self._id)
        check_plain(value)
        if value is None:
            self._net._state.pop(key, None)
        else:
            self._net._state[key] = copy_plain(value)

    async def state_items(self, prefix: str = "") -> dict[str, Any]:
        self._net._peer(self._id)
        state = self._net._state
        return {k: copy_plain(state[k]) for k in sorted(state) if k.startswith(prefix)}

