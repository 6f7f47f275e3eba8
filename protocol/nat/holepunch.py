"""Hole punching of relayed libp2p connections: py-libp2p's DCUtR, driven and measured by us.

py-libp2p 0.8.1's ``DCUtRProtocol`` does the protocol well (measured across two MASQUERADE
NATs in network namespaces: direct in ~3.5 s): CONNECT/SYNC over the relayed connection, the
peer's address predicted as its observed IP at its listen port, dials bound to our listen port
(``SO_REUSEPORT``) so both SYNs leave from the ports the NATs will map, the simultaneous-open
connection upgraded with the roles the spec fixes, retry rounds, and the relayed connection
closed a minute after the direct one verified. What we change:

* **who starts**: its ``_auto_drive_loop`` makes *both* peers initiate on every relayed
  connection; two crossing sessions made an attempt fail (measured). Here the peer that
  *accepted* the relayed connection initiates at once (as the DCUtR spec says); the dialer
  initiates only if nothing happened after :data:`DIALER_GRACE_S`; failed attempts back off;
* **the plain dial first** (spec step 0: maybe the peer is reachable after all) runs in the
  background instead of before the exchange, one attempt per address: py-libp2p waits for it
  (with retries, up to the dial timeout) before starting, which cost ~3 s per punch here;
* **bookkeeping**: per-peer state (relayed / punching / direct / failed), attempts, and the time
  from the relayed connection to the direct one, for ``Host.reachability()`` and the bench.

The hole-punch source address is our first advertised TCP address (``_local_tcp_listen_addrs``):
the host's address list puts loopback last, as binding 127.0.0.1 cannot reach anyone.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.dcutr import MAX_HOLE_PUNCH_ATTEMPTS, DCUtRProtocol

from ._relay_wire import is_relayed_conn

__all__ = ["HolePuncher", "DIALER_GRACE_S"]

log = logging.getLogger(__name__)

DIALER_GRACE_S = 6.0
SCAN_S = 0.25
RETRY_BACKOFF_S = 10.0
MAX_TRACKED = 256
KEEP_TIMES = 64


class HolePuncher(DCUtRProtocol):
    """DCUtR with deterministic initiation and per-peer results (a py-libp2p ``Service``).

    Args:
        host: the libp2p host (DCUtR registers ``/libp2p/dcutr`` on it when run).
        stats: a dict kept current: totals and the recent times to direct.
        dial_timeout_s: one hole-punch dial (and the plain dial tried first) gives up after this.
    """

    def __init__(self, host: IHost, *, stats: dict[str, Any], dial_timeout_s: float = 3.0) -> None:
        super().__init__(host, read_timeout=10, write_timeout=10, dial_timeout=int(max(1, dial_timeout_s)))
        self.stats = stats
        self.peers: dict[str, dict[str, Any]] = {}
        self._since: dict[str, float] = {}
        self._next_try: dict[str, float] = {}
        self._driving: set[str] = set()
        self._times: list[float] = []
        self.stats.update(attempts=0, direct=0, failed=0, time_to_direct_s=[], peers=self.peers)

    # ---- driving ---------------------------------------------------------------------------

    async def _try_unilateral_upgrade(self, peer_id: ID) -> bool:
        """Dial the peer's own addresses in the background; DCUtR goes on meanwhile."""
        try:
            addrs = [a for a in self.host.get_peerstore().addrs(peer_id)
                     if "/p2p-circuit" not in str(a) and not str(a).startswith(("/ip4/127.", "/ip6/::1"))]
        except Exception:  # noqa: BLE001 — nothing known: nothing to try
            return False
        if addrs and self._nursery is not None:
            self._nursery.start_soon(self._plain_dials, peer_id, addrs)
        return False

    async def _plain_dials(self, peer_id: ID, addrs: list[Any]) -> None:
        network = self.host.get_network()

        async def one(addr: Any) -> None:
            try:
                await network._dial_addr_single_attempt(addr, peer_id)  # py-libp2p 0.8.1 internal API
            except Exception as exc:  # noqa: BLE001 — unreachable is the expected outcome
                log.debug("plain dial of %s at %s: %s", peer_id, addr, exc)

        with trio.move_on_after(self.dial_timeout):
            async with trio.open_nursery() as nursery:
                for addr in addrs[:8]:
                    nursery.start_soon(one, addr)

    async def _auto_drive_loop(self) -> None:  # replaces py-libp2p's both-sides driver
        while True:
            await trio.sleep(SCAN_S)
            try:
                self._scan()
            except Exception:  # noqa: BLE001 — a bad connection object must not stop punching
                log.exception("hole-punch scan failed")

    def _scan(self) -> None:
        now = time.monotonic()
        seen: set[str] = set()
        for peer, conns in list(self.host.get_network().connections.items()):
            pid = peer.to_base58()
            seen.add(pid)
            relayed = [c for c in conns if is_relayed_conn(c)]
            direct = [c for c in conns if not is_relayed_conn(c)]
            if not relayed:
                self._settle(pid, "direct" if pid in self._since else None)
                continue
            if direct:
                if pid in self._since:
                    self._settle(pid, "direct")
                continue
            since = self._since.setdefault(pid, now)
            state = self.peers.setdefault(pid, {"state": "relayed", "attempts": 0, "time_to_direct_s": None})
            if pid in self._driving or state["attempts"] >= MAX_HOLE_PUNCH_ATTEMPTS:
                continue
            inbound = any(getattr(c.direction, "name", str(c.direction)).upper() == "INBOUND" for c in relayed)
            if (inbound or now - since >= DIALER_GRACE_S) and now >= self._next_try.get(pid, 0.0):
                self._driving.add(pid)
                self._nursery.start_soon(self._drive, peer)
        for pid in [p for p in self.peers if p not in seen]:
            self.peers.pop(pid, None)
            self._since.pop(pid, None)
            self._next_try.pop(pid, None)

    def _settle(self, pid: str, outcome: str | None) -> None:
        """The peer's relayed connection is gone or has a direct sibling: record the outcome once."""
        since = self._since.pop(pid, None)
        state = self.peers.get(pid)
        if outcome != "direct" or since is None or state is None or state["state"] == "direct":
            return
        elapsed = round(time.monotonic() - since, 3)
        state.update(state="direct", time_to_direct_s=elapsed)
        self.stats["direct"] += 1
        self._times.append(elapsed)
        del self._times[:-KEEP_TIMES]
        self.stats["time_to_direct_s"] = list(self._times)
        log.info("direct connection with %s %.2f s after the relayed one", pid, elapsed)
        if len(self.peers) > MAX_TRACKED:
            for old in [p for p, s in self.peers.items() if s["state"] == "direct"][: len(self.peers) - MAX_TRACKED]:
                self.peers.pop(old, None)

    async def _drive(self, peer: ID) -> None:
        pid = peer.to_base58()
        state = self.peers.setdefault(pid, {"state": "relayed", "attempts": 0, "time_to_direct_s": None})
        try:
            state["state"] = "punching"
            state["attempts"] += 1
            self.stats["attempts"] += 1
            ok = await self.initiate_hole_punch(peer)
        except Exception as exc:  # noqa: BLE001 — a failed attempt is an outcome, not a crash
            log.debug("hole punch with %s raised: %s", pid, exc)
            ok = False
        finally:
            self._driving.discard(pid)
        if ok:
            self._scan_one(pid)
            return
        self._next_try[pid] = time.monotonic() + RETRY_BACKOFF_S * state["attempts"]
        failed = state["attempts"] >= MAX_HOLE_PUNCH_ATTEMPTS
        state["state"] = "failed" if failed else "relayed"
        if failed:
            self.stats["failed"] += 1
            log.info("hole punching with %s failed %d times; staying on the relay", pid, state["attempts"])

    def _scan_one(self, pid: str) -> None:
        conns = self.host.get_network().connections.get(ID.from_base58(pid), [])
        if any(not is_relayed_conn(c) for c in conns):
            self._settle(pid, "direct")
