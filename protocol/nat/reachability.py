"""What this node knows about its own reachability: a pure record, no I/O.

Evidence comes from dial-back probes (:mod:`.autonat`): a peer dialed our advertised addresses
from a fresh connection and another identity, and either got through or not. The verdict:

* **public**: at least one recent probe, by any peer, reached us on a fresh connection;
* **private**: recent probes failed and none reached us;
* **unknown**: no usable answer yet (no peers, only refusals, or answers too old).

Only each server's latest answer counts, and answers older than ``max_age_s`` are dropped, so a
node that moves (or a router that gains a port forward) changes its verdict within one probe
round. "Public" wins a disagreement: one peer that could open a connection to us proves that the
address works; a failed dial can be the failing peer's own outbound filtering.

The rest of the record (observed addresses from identify and probes, UPnP mappings, relay
reservations, relay and hole-punching counters) is kept here so that
:meth:`Reachability.snapshot` is the single JSON picture the API shows.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["PUBLIC", "PRIVATE", "UNKNOWN", "Probe", "Reservation", "Reachability"]

PUBLIC, PRIVATE, UNKNOWN = "public", "private", "unknown"
MAX_SERVERS = 8
MAX_OBSERVED = 8


@dataclass(frozen=True)
class Probe:
    """One dial-back answer from one server (or the reason it could not test)."""

    server: str
    at: float
    ok: tuple[str, ...] = ()
    failed: tuple[str, ...] = ()
    observed: str | None = None
    """Our address as that server saw it (IP and source port of our connection)."""
    refused: str = ""
    """Non-empty: the server did not test (rate limit, relayed connection, nothing to dial)."""

    @property
    def verdict(self) -> str:
        if self.refused:
            return UNKNOWN
        if self.ok:
            return PUBLIC
        return PRIVATE if self.failed else UNKNOWN

    def to_json(self) -> dict[str, Any]:
        return {"server": self.server, "at": round(self.at, 3), "verdict": self.verdict, "ok": list(self.ok),
                "failed": list(self.failed), "observed": self.observed, "refused": self.refused}


@dataclass
class Reservation:
    """A relay slot this node holds (so that others can reach it through that relay)."""

    relay: str
    addrs: tuple[str, ...]
    """Our /p2p-circuit addresses through this relay (without our own /p2p suffix)."""
    expires_at: float
    renewed: int = 0
    limit_duration_s: int = 0
    limit_bytes: int = 0


@dataclass
class Reachability:
    """The node's view of itself. Mutated only from the libp2p thread; read anywhere."""

    max_age_s: float = 600.0
    clock: Callable[[], float] = time.time
    probes: dict[str, Probe] = field(default_factory=dict)
    observed: dict[str, float] = field(default_factory=dict)
    """Addresses peers reported seeing us at -> when last reported."""
    mapped: list[dict[str, Any]] = field(default_factory=list)
    reservations: dict[str, Reservation] = field(default_factory=dict)
    relay_service: dict[str, Any] = field(default_factory=dict)
    hole_punching: dict[str, Any] = field(default_factory=dict)
    dht_mode: str = "server"
    _state: str = UNKNOWN
    _since: float = 0.0

    def __post_init__(self) -> None:
        self._since = self.clock()

    # ---- evidence --------------------------------------------------------------------------

    def record(self, probe: Probe) -> bool:
        """Keep ``probe`` as its server's latest answer; True if the verdict changed."""
        self.probes[probe.server] = probe
        if len(self.probes) > MAX_SERVERS:
            oldest = min(self.probes.values(), key=lambda p: p.at)
            del self.probes[oldest.server]
        if probe.observed:
            self.saw(probe.observed)
        return self._update()

    def forget(self, servers: list[str]) -> bool:
        """Drop these servers' answers (they cannot judge us any more); True if the verdict changed."""
        for server in servers:
            self.probes.pop(server, None)
        return self._update()

    def saw(self, addr: str) -> None:
        """A peer reported seeing us at ``addr`` (identify's observed address or a probe)."""
        self.observed[addr] = self.clock()
        if len(self.observed) > MAX_OBSERVED:
            del self.observed[min(self.observed, key=self.observed.__getitem__)]

    def expire(self) -> bool:
        """Drop answers older than ``max_age_s``; True if the verdict changed."""
        cutoff = self.clock() - self.max_age_s
        for server in [s for s, p in self.probes.items() if p.at < cutoff]:
            del self.probes[server]
        for addr in [a for a, t in self.observed.items() if t < cutoff]:
            del self.observed[addr]
        return self._update()

    def _update(self) -> bool:
        verdicts = [p.verdict for p in self.probes.values()]
        state = PUBLIC if PUBLIC in verdicts else PRIVATE if PRIVATE in verdicts else UNKNOWN
        if state == self._state:
            return False
        self._state, self._since = state, self.clock()
        return True

    # ---- reading ---------------------------------------------------------------------------

    @property
    def state(self) -> str:
        return self._state

    @property
    def confidence(self) -> int:
        """How many servers' latest answers agree with the verdict."""
        return sum(1 for p in self.probes.values() if p.verdict == self._state) if self._state != UNKNOWN else 0

    def confirmed(self) -> list[str]:
        """Addresses some server reached us at on a fresh connection."""
        return sorted({a for p in self.probes.values() for a in p.ok})

    def observed_ips(self) -> list[str]:
        """IPv4/IPv6 addresses peers see us at, most recent first."""
        ips: list[str] = []
        for addr in sorted(self.observed, key=self.observed.__getitem__, reverse=True):
            parts = addr.split("/")
            if len(parts) > 2 and parts[1] in ("ip4", "ip6") and parts[2] not in ips:
                ips.append(parts[2])
        return ips

    def relay_addrs(self) -> list[str]:
        now = self.clock()
        return [a for r in self.reservations.values() if r.expires_at > now for a in r.addrs]

    def last_check(self) -> float | None:
        return max((p.at for p in self.probes.values()), default=None)

    def snapshot(self) -> dict[str, Any]:
        """The JSON picture ``Host.reachability()`` returns (see that method for the fields)."""
        now = self.clock()
        last = self.last_check()
        return {
            "state": self._state,
            "confidence": self.confidence,
            "since": round(self._since, 3),
            "last_check": None if last is None else round(last, 3),
            "last_check_s_ago": None if last is None else round(now - last, 1),
            "observed": sorted(self.observed),
            "confirmed": self.confirmed(),
            "relay_addrs": self.relay_addrs(),
            "relays": [{"peer_id": r.relay, "addrs": list(r.addrs), "expires_in_s": round(r.expires_at - now, 1),
                        "renewed": r.renewed, "limit_duration_s": r.limit_duration_s,
                        "limit_bytes": r.limit_bytes}
                       for r in sorted(self.reservations.values(), key=lambda r: r.relay)],
            "mapped": [dict(m) for m in self.mapped],
            "dht_mode": self.dht_mode,
            "relay_service": dict(self.relay_service),
            "hole_punching": dict(self.hole_punching),
            "probes": [p.to_json() for p in sorted(self.probes.values(), key=lambda p: -p.at)],
        }
