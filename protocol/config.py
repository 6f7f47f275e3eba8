"""Configuration of the control plane (the libp2p host and how it finds peers)."""

from __future__ import annotations

from dataclasses import dataclass

import multiaddr

from .errors import ConfigError
from .nat.config import NatConfig

__all__ = ["HostConfig", "parse_multiaddr", "parse_peer_multiaddr"]

DHT_MODES = ("auto", "server", "client")


def parse_multiaddr(text: str, *, what: str) -> multiaddr.Multiaddr:
    try:
        return multiaddr.Multiaddr(text)
    except Exception as exc:  # noqa: BLE001 — multiaddr raises several unrelated types
        raise ConfigError(f"{what} {text!r} is not a multiaddr ({exc}); example: /ip4/192.0.2.1/tcp/4101") from exc


def parse_peer_multiaddr(text: str, *, what: str) -> tuple[str, multiaddr.Multiaddr]:
    """Split ``/ip4/…/tcp/…/p2p/<peer id>`` into (peer id, transport address)."""
    addr = parse_multiaddr(text, what=what)
    peer_id = addr.get_peer_id()
    if not peer_id:
        raise ConfigError(
            f"{what} {text!r} lacks the peer id: append /p2p/<peer id> (printed by the node at start "
            "and stored in its node.json)"
        )
    return peer_id, addr.decapsulate(multiaddr.Multiaddr(f"/p2p/{peer_id}"))


@dataclass(frozen=True, kw_only=True)
class HostConfig:
    """How the libp2p host listens, which peers it looks for, and how many it keeps."""

    listen: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/0",)
    """Multiaddrs to listen on (TCP). Port 0 picks a free port."""
    announce: tuple[str, ...] = ()
    """Addresses to advertise instead of the listen addresses (e.g. a public IP behind a forward)."""
    bootstrap: tuple[str, ...] = ()
    """Peers to dial at start and to keep reconnecting to: multiaddrs ending in /p2p/<peer id>."""
    mdns: bool = True
    """Find peers of the same network on the local network by multicast DNS."""
    dht_mode: str = "auto"
    """Kad-DHT mode: server answers queries, client only asks; auto = server until the dial-back
    check finds this node private (then client), server again once it is public."""
    network: str = "hyphae"
    """Name of the network; peers of other networks are disconnected."""
    target_peers: int = 16
    """How many connections the node works to keep (it dials more when below)."""
    max_connections: int = 64
    """Hard cap on connections; above it py-libp2p prunes."""
    ping_interval_s: float = 15.0
    """How often each connected peer is pinged to measure RTT."""
    discovery_interval_s: float = 30.0
    """Steady-state period of the DHT rendezvous lookup (it starts at 1 s and backs off)."""
    dial_timeout_s: float = 10.0
    """Give up a single dial after this long."""
    hello_deadline_s: float = 3.0
    """Drop a connection whose peer has not passed hello (and, in a closed run, admission) this
    long after it opened. Until then the peer gets few streams and little buffer (_yamux.py);
    an honest hello takes milliseconds. A stranger that redials is dropped again as fast."""
    nat: NatConfig = NatConfig()
    """NAT traversal: reachability checks, UPnP, relay service and client, hole punching (TOML:
    a ``[network.nat]`` table; see :class:`~hyphae.protocol.nat.NatConfig`)."""

    def __post_init__(self) -> None:
        self._check_types()  # values arrive from TOML and the environment, not only from code
        object.__setattr__(self, "nat", NatConfig.from_value(self.nat))  # a TOML table arrives as a dict
        if not self.listen:
            raise ConfigError("listen must name at least one address, e.g. /ip4/0.0.0.0/tcp/0")
        for text in self.listen:
            addr = parse_multiaddr(text, what="listen address")
            if "tcp" not in {p.name for p in addr.protocols()}:
                raise ConfigError(f"listen address {text!r} is not TCP; hyphae listens on TCP only")
        for text in self.announce:
            parse_multiaddr(text, what="announce address")
        for text in self.bootstrap:
            parse_peer_multiaddr(text, what="bootstrap address")
        if self.dht_mode not in DHT_MODES:
            raise ConfigError(f"dht_mode must be one of {', '.join(DHT_MODES)}, got {self.dht_mode!r}")
        if not self.network or len(self.network) > 64 or not self.network.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"network must be 1-64 letters, digits, '-' or '_', got {self.network!r}")
        if not 1 <= self.target_peers <= self.max_connections:
            raise ConfigError(
                f"target_peers must be between 1 and max_connections ({self.max_connections}), got {self.target_peers}"
            )
        if self.max_connections > 10_000:
            raise ConfigError(f"max_connections must be <= 10000, got {self.max_connections}")
        for name in ("ping_interval_s", "discovery_interval_s", "dial_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 < self.hello_deadline_s <= 60:
            raise ConfigError(f"hello_deadline_s must be in (0, 60] seconds, got {self.hello_deadline_s}")

    def _check_types(self) -> None:
        for name in ("listen", "announce", "bootstrap"):
            value = getattr(self, name)
            if not isinstance(value, tuple | list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{name} must be a list of multiaddr strings, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        for name, kinds in _SCALAR_TYPES.items():
            value = getattr(self, name)
            if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
                expected = " or ".join(k.__name__ for k in kinds)
                raise ConfigError(f"{name} must be {expected}, got {value!r}")


_SCALAR_TYPES: dict[str, tuple[type, ...]] = {
    "mdns": (bool,), "dht_mode": (str,), "network": (str,), "target_peers": (int,), "max_connections": (int,),
    "ping_interval_s": (int, float), "discovery_interval_s": (int, float), "dial_timeout_s": (int, float),
    "hello_deadline_s": (int, float),
}
"""HostConfig's scalar fields and the types TOML may give them (a bool is not a number here)."""
