"""Configuration of NAT traversal: reachability checks, UPnP, relay service and client, punching.

One frozen :class:`NatConfig` nests in :class:`~hyphae.protocol.config.HostConfig` as ``nat``
(TOML: ``[network.nat]``). The defaults are what a volunteer machine wants: find out whether it
is reachable, open a port by UPnP if the router offers it, relay for others when public, keep
relay reservations and hole-punch when private.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from ..errors import ConfigError

__all__ = ["NatConfig", "RelayLimitsConfig", "MODES"]

MODES = ("auto", "on", "off")


@dataclass(frozen=True, kw_only=True)
class RelayLimitsConfig:
    """What a relay grants each reservation and each relayed connection (circuit).

    Relayed connections are for control traffic (hello, pubsub, DHT, run state) and for small
    transfers when no direct path exists; the limits keep a volunteer relay's cost bounded.
    """

    max_reservations: int = 64
    """Peers that may hold a reservation here at once."""
    max_reservations_per_ip: int = 8
    """Reservations from one IP address (one household behind one NAT)."""
    reservation_ttl_s: float = 900.0
    """A reservation expires unless renewed within this (clients renew at half of it)."""
    max_circuits: int = 128
    """Relayed connections through this node at once."""
    max_circuits_per_peer: int = 16
    """Relayed connections to (or from) one peer at once."""
    circuit_duration_s: float = 3600.0
    """A relayed connection is reset after this long (0: no limit)."""
    circuit_bytes: int = 256 << 20
    """Bytes a relayed connection may carry, both directions together (0: no limit)."""
    circuit_rate_bytes_s: int = 1 << 20
    """Bytes per second per direction of one relayed connection (0: no limit)."""
    total_rate_bytes_s: int = 16 << 20
    """Bytes per second through this relay, all circuits together (0: no limit)."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"relay limit {f.name} must be a number >= 0, got {value!r}")
        for name in ("max_reservations", "max_reservations_per_ip", "max_circuits", "max_circuits_per_peer"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"relay limit {name} must be an int >= 1, got {getattr(self, name)!r}")
        if self.reservation_ttl_s < 10:
            raise ConfigError(f"relay limit reservation_ttl_s must be >= 10, got {self.reservation_ttl_s}")


@dataclass(frozen=True, kw_only=True)
class NatConfig:
    """How the node finds out and improves its reachability."""

    autonat: bool = True
    """Ask peers to dial this node back on a fresh connection from another identity, to learn
    whether it is reachable (public) or not (private)."""
    autonat_service: bool = True
    """Answer other peers' dial-back requests (costs one short outbound dial each, rate-limited)."""
    autonat_interval_s: float = 120.0
    """Re-check reachability this often once known (it checks quickly at start and on change)."""
    upnp: bool = True
    """Ask the router for a port mapping by UPnP IGD; a router without it costs nothing."""
    upnp_discover_ms: int = 2000
    """How long to wait for an IGD to answer (in the background; start-up does not wait)."""
    relay_service: str = "auto"
    """Relay for others (circuit relay v2 hop): auto = only while this node is public."""
    relay_client: str = "auto"
    """Hold relay reservations and advertise /p2p-circuit addresses: auto = only while private."""
    relay_reservations: int = 2
    """How many relays a private node keeps a reservation on."""
    relays: tuple[str, ...] = ()
    """Relays to prefer (multiaddrs ending in /p2p/<id>); others are found among peers and in the
    DHT."""
    relay_limits: RelayLimitsConfig = RelayLimitsConfig()
    """What this node grants when it relays."""
    hole_punching: bool = True
    """Upgrade relayed connections to direct ones (DCUtR, TCP simultaneous open)."""
    punch_timeout_s: float = 15.0
    """Give up one hole-punching attempt after this long."""

    def __post_init__(self) -> None:
        for name in ("relay_service", "relay_client"):
            if getattr(self, name) not in MODES:
                raise ConfigError(f"nat.{name} must be one of {', '.join(MODES)}, got {getattr(self, name)!r}")
        if isinstance(self.relay_limits, dict):
            object.__setattr__(self, "relay_limits", _build(RelayLimitsConfig, self.relay_limits, "nat.relay_limits"))
        if not isinstance(self.relay_limits, RelayLimitsConfig):
            raise ConfigError(f"nat.relay_limits must be a table, got {self.relay_limits!r}")
        if isinstance(self.relays, (list, str)):
            object.__setattr__(self, "relays", tuple([self.relays] if isinstance(self.relays, str) else self.relays))
        if not 0 <= self.relay_reservations <= 8:
            raise ConfigError(f"nat.relay_reservations must be 0-8, got {self.relay_reservations}")
        if not 5 <= self.autonat_interval_s <= 86400:
            raise ConfigError(f"nat.autonat_interval_s must be 5-86400, got {self.autonat_interval_s}")
        if not 0 < self.upnp_discover_ms <= 10000:
            raise ConfigError(f"nat.upnp_discover_ms must be 1-10000, got {self.upnp_discover_ms}")
        if not 1 <= self.punch_timeout_s <= 120:
            raise ConfigError(f"nat.punch_timeout_s must be 1-120, got {self.punch_timeout_s}")
        from ..config import parse_peer_multiaddr  # late: config imports this module

        for text in self.relays:
            parse_peer_multiaddr(text, what="nat.relays address")

    @classmethod
    def from_value(cls, value: Any) -> NatConfig:
        """A :class:`NatConfig` from itself or a TOML table (unknown keys are errors)."""
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            return _build(cls, value, "nat")
        raise ConfigError(f"nat must be a table of NAT settings, got {value!r}")


def _build(kind: type, table: dict[str, Any], what: str) -> Any:
    known = {f.name for f in fields(kind)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(f"{what} has unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return kind(**table)
