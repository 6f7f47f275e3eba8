"""NAT traversal for one host (trio side): reachability, UPnP, relay service and client, punching.

:class:`NatService` is owned by the host's trio half (``_trio_host.TrioHost``) and ties the parts
together:

1. **Reachability** — every few seconds until known, then every ``autonat_interval_s``, up to
   three peers are asked to dial us back (:mod:`.autonat`); the verdict lives in a
   :class:`~.reachability.Reachability`. Our candidate addresses are the listen addresses, the
   IPs peers observe us at combined with our listen ports (NATs that keep ports), and any UPnP
   mapping (:mod:`.upnp`, found in the background). Confirmed addresses are advertised.
2. **On a verdict change**: DHT mode ``auto`` becomes server when public and client when private;
   relay service ``auto`` runs only while public (and public relays announce themselves in the
   DHT under ``/hyphae/relay/<network>``); relay client ``auto`` keeps reservations only while
   private. The host is told its addresses changed so it re-announces them.
3. **Relayed connections** are upgraded by :class:`~.holepunch.HolePuncher`; they stay the
   path for control traffic when punching fails (a symmetric NAT), within the relay's limits.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import Any, Protocol

import multiaddr
import trio
from libp2p.abc import IHost
from libp2p.custom_types import TProtocol
from libp2p.kad_dht.kad_dht import DHTMode
from libp2p.peer.id import ID
from libp2p.tools.anyio_service import background_trio_service

from .._addrs import expand_wildcards, interface_ipv4s
from ..config import HostConfig, parse_peer_multiaddr
from . import autonat
from ._relay_wire import is_circuit, is_relayed_conn
from .dht import find_providers, provide
from .holepunch import HolePuncher
from .reachability import PRIVATE, PUBLIC, UNKNOWN, Probe, Reachability
from .relay_client import RelayClient
from .relay_server import RelayServer
from .upnp import UpnpMapper

__all__ = ["NatService"]

log = logging.getLogger(__name__)

SERVERS_PER_ROUND = 3
UNKNOWN_RETRY_S = 5.0
FIRST_PROBE_S = 0.5
RELAY_PROVIDE_S = 300.0
RELAY_LOOKUP_S = 60.0
MAX_PROBE_ADDRS = 8


class Owner(Protocol):
    """What the service needs from the host's trio half."""

    host: IHost
    dht: Any
    config: HostConfig
    peer_id: str

    def ready_peers(self) -> list[str]: ...
    def on_addrs_changed(self) -> None: ...
    async def dial(self, peer_id: str, addrs: list[multiaddr.Multiaddr], source: str) -> bool: ...


class NatService:
    """Runs in the host's nursery; see the module docstring."""

    def __init__(self, owner: Owner, *, build_dialback: Callable[[], IHost]) -> None:
        self.owner = owner
        self.config = owner.config.nat
        self.host = owner.host
        self.reach = Reachability(max_age_s=max(600.0, 3 * self.config.autonat_interval_s))
        self.reach.dht_mode = "client" if owner.config.dht_mode == "client" else "server"
        ready = lambda pid: pid in owner.ready_peers()  # noqa: E731
        self.relay_server = RelayServer(self.host, self.config.relay_limits, admit=ready,
                                        stats=self.reach.relay_service)
        self.relay_client = RelayClient(self.host, self.reach, target=self.config.relay_reservations,
                                        on_change=self._addrs_changed)
        self.dialback = autonat.DialBack(lambda _listen: build_dialback())
        self.autonat_server = autonat.AutoNatServer(self.dialback, admit=ready)
        self.puncher = HolePuncher(self.host, stats=self.reach.hole_punching) if self.config.hole_punching else None
        self.upnp = UpnpMapper(self.config.upnp_discover_ms)
        self._probe_kick = trio.Event()
        self._asked: dict[str, float] = {}
        self._relay_providers: list[tuple[str, list[multiaddr.Multiaddr]]] = []
        self._relay_lookup_at = -1e9
        self._pending: list[Probe] = []
        self._inside: set[str] = set()  # servers that saw us at our own address: our side of the NAT
        self._nursery: trio.Nursery | None = None

    # ---- lifecycle -------------------------------------------------------------------------

    def install(self) -> None:
        """Register the protocol handlers (before the host accepts connections)."""
        if self.config.autonat_service:
            self.host.set_stream_handler(TProtocol(autonat.PROTOCOL_ID), self.autonat_server.handle)
        if self.config.relay_client != "off":
            self.relay_client.install()
        if self.config.relay_service == "on":
            self.relay_server.enable()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.config.autonat_service:
                await nursery.start(self.dialback.run)
            if self.puncher is not None:
                nursery.start_soon(self._run_puncher)
            if self.config.autonat:
                nursery.start_soon(self._probe_loop)
            if self.config.relay_client != "off":
                nursery.start_soon(self.relay_client.maintain, self._relay_wanted, self._relay_candidates)
            if self.config.upnp:
                nursery.start_soon(self.upnp.run, self._listen_ports(), self._mapping_changed)
            nursery.start_soon(self._relay_provide_loop)
            task_status.started()

    async def _run_puncher(self) -> None:
        async with background_trio_service(self.puncher):
            await trio.sleep_forever()

    # ---- what the host asks ----------------------------------------------------------------

    def extra_addrs(self) -> list[multiaddr.Multiaddr]:
        """Addresses to advertise besides the listen ones: confirmed public, and through relays."""
        out = [multiaddr.Multiaddr(a) for a in self.reach.confirmed()]
        return out + [multiaddr.Multiaddr(a) for a in self.reach.relay_addrs()]

    def peer_ready(self, peer_id: str) -> None:
        """A peer passed the hello: if we do not know our reachability yet, ask it now."""
        if self.config.autonat and self.reach.state == UNKNOWN:
            self._probe_kick.set()

    def peer_gone(self, peer_id: str) -> None:
        """The last connection to ``peer_id`` closed."""
        self.relay_client.lost(peer_id)
        self.relay_server.forget(peer_id)

    def snapshot(self) -> dict[str, Any]:
        snap = self.reach.snapshot()
        snap["relay_client"] = {"mode": self.config.relay_client, "target": self.config.relay_reservations,
                                **self.relay_client.stats}
        snap["relay_service"]["mode"] = self.config.relay_service
        snap["autonat_service"] = {"enabled": self.config.autonat_service, **self.autonat_server.stats}
        snap["upnp"] = {"enabled": self.config.upnp, "status": self.upnp.status}
        hp = snap["hole_punching"]
        hp["enabled"] = self.config.hole_punching
        if "peers" in hp:
            hp["peers"] = {p: dict(s) for p, s in hp["peers"].items()}
        return snap

    # ---- reachability ----------------------------------------------------------------------

    def _listen_ports(self) -> list[int]:
        ports = []
        for addr in self.host.get_transport_addrs():
            parts = str(addr).split("/")
            if len(parts) > 4 and parts[3] == "tcp" and parts[4].isdigit() and int(parts[4]) not in ports:
                ports.append(int(parts[4]))
        return ports

    def probe_addrs(self) -> list[str]:
        """What we ask servers to dial: listen addresses, observed IPs at our ports, UPnP mappings."""
        listen = [str(a) for a in expand_wildcards(list(self.host.get_transport_addrs()))]
        listen.sort(key=lambda a: a.startswith(("/ip4/127.", "/ip6/::1/")))  # the server uses the ports
        ports = self._listen_ports()
        manager = getattr(self.host, "_observed_addr_manager", None)
        if manager is not None:
            for addr in manager.addrs(min_observers=1):
                if not is_circuit(addr):
                    self.reach.saw(str(addr))
        observed = [f"/{'ip6' if ':' in ip else 'ip4'}/{ip}/tcp/{p}" for ip in self.reach.observed_ips() for p in ports]
        mapped = [m.multiaddr for m in self.upnp.mappings]
        return list(dict.fromkeys(mapped + observed + listen))[:MAX_PROBE_ADDRS]

    def _servers(self) -> list[str]:
        now = time.monotonic()
        network = self.host.get_network()
        inside = self._inside if self._behind_nat() else set()
        ready = [p for p in self.owner.ready_peers()
                 if any(not is_relayed_conn(c) for c in network.get_connections(ID.from_base58(p)))
                 and now - self._asked.get(p, -1e9) > autonat.PER_PEER_INTERVAL_S + 1 and p not in inside]
        random.shuffle(ready)
        ready.sort(key=lambda p: self._asked.get(p, -1e9))
        return ready[:SERVERS_PER_ROUND]

    async def _probe_loop(self) -> None:
        delay = FIRST_PROBE_S
        while True:
            with trio.move_on_after(delay):
                await self._probe_kick.wait()
            self._probe_kick = trio.Event()
            changed = self.reach.expire()
            if self._behind_nat():
                changed = self.reach.forget([p for p in self.reach.probes if p in self._inside]) or changed
            servers = self._servers()
            if servers:
                addrs = self.probe_addrs()
                if self.reach.state == UNKNOWN and self._behind_nat():
                    self.relay_client.kick()  # identify already told us: reserve while we check
                for server in servers:
                    self._asked[server] = time.monotonic()
                async with trio.open_nursery() as nursery:
                    for server in servers:
                        nursery.start_soon(self._probe_one, server, addrs)
                changed = self._update_after_probes() or changed
            if changed:
                self._state_changed()
            if not servers:
                delay = 1.0
            elif self.reach.state == UNKNOWN:
                delay = UNKNOWN_RETRY_S
            else:
                delay = self.config.autonat_interval_s

    async def _probe_one(self, server: str, addrs: list[str]) -> None:
        result = await autonat.probe(self.host, server, addrs)
        self._pending.append(result)
        log.debug("autonat via %s: %s (ok %s, failed %s%s)", server, result.verdict, list(result.ok),
                  list(result.failed), f", refused: {result.refused}" if result.refused else "")

    def _update_after_probes(self) -> bool:
        changed = False
        pending, self._pending = self._pending, []
        local = set(interface_ipv4s())
        for result in pending:  # every observed address first: one of them may show the NAT
            if result.observed:
                self.reach.saw(result.observed)
                if _ip(result.observed) in local:
                    self._inside.add(result.server)
        behind = self._behind_nat()
        for result in pending:
            if behind and result.server in self._inside:
                continue  # see _behind_nat: a neighbour on our LAN cannot judge the internet
            changed = self.reach.record(result) or changed
        return changed

    def _mapping_changed(self) -> None:
        self.reach.mapped = [m.to_json() for m in self.upnp.mappings]
        self._asked.clear()  # a new mapping deserves a fresh check by everyone
        self._probe_kick.set()

    def _state_changed(self) -> None:
        state = self.reach.state
        log.info("reachability: %s (confirmed %s, observed %s)", state, self.reach.confirmed() or "-",
                 self.reach.observed_ips() or "-")
        if self.owner.config.dht_mode == "auto" and self.owner.dht is not None and self._nursery is not None:
            self._nursery.start_soon(self._switch_dht, DHTMode.CLIENT if state == PRIVATE else DHTMode.SERVER)
        if self.config.relay_service == "on" or (self.config.relay_service == "auto" and state == PUBLIC):
            self.relay_server.enable()
        else:
            self.relay_server.disable()
        self.relay_client.kick()
        self._addrs_changed()

    async def _switch_dht(self, mode: DHTMode) -> None:
        dht = self.owner.dht
        if dht.mode == mode:
            return
        try:
            await dht.switch_mode(mode)
        except Exception as exc:  # noqa: BLE001 — stay in the old mode; the next change retries
            log.warning("could not switch the DHT to %s mode: %s", mode.value, exc)
            return
        self.reach.dht_mode = mode.value
        # py-libp2p empties the routing table on a switch to client mode: refill it from the
        # peers we are connected to, or our own lookups would have nobody to ask.
        for peer in self.owner.ready_peers():
            try:
                await dht.add_peer(ID.from_base58(peer))
            except Exception as exc:  # noqa: BLE001 — a refused peer is just not in the table
                log.debug("routing table refused %s: %s", peer, exc)

    def _addrs_changed(self) -> None:
        self.owner.on_addrs_changed()

    # ---- relays ----------------------------------------------------------------------------

    def _behind_nat(self) -> bool:
        """Some peer sees us at an IP that is not ours: a NAT is in the way (maybe forwarded).

        Then a dial-back server that saw us at our own address sits on our side of it, and its
        "reachable" only means reachable from our LAN: measured in the netns testnets, two
        trainers behind one NAT confirmed each other "public", which dropped their relay
        reservations, and the trainers behind the other NAT never reached them. Such servers
        are not asked (and what they said is forgotten) while a NAT is in the way.
        """
        local = set(interface_ipv4s())
        return any(ip not in local for ip in self.reach.observed_ips())

    def _relay_wanted(self) -> bool:
        """Relay client ``auto``: while private, and already while the verdict is pending behind a
        NAT (the usual case; reservations are cheap and dropped once we turn out public)."""
        mode, state = self.config.relay_client, self.reach.state
        return mode == "on" or (mode == "auto" and (state == PRIVATE or (state == UNKNOWN and self._behind_nat())))

    async def _relay_candidates(self) -> list[ID]:
        """Configured relays, then bootstrap peers and other directly connected peers, then relays
        announced in the DHT (looked up at most every :data:`RELAY_LOOKUP_S`)."""
        out: list[str] = []
        for text in self.config.relays:
            peer, addr = parse_peer_multiaddr(text, what="nat.relays address")
            if await self.owner.dial(peer, [addr], "relay"):
                out.append(peer)
        bootstrap = {parse_peer_multiaddr(b, what="bootstrap")[0] for b in self.owner.config.bootstrap}
        network = self.host.get_network()
        direct = [p for p in self.owner.ready_peers()
                  if any(not is_relayed_conn(c) for c in network.get_connections(ID.from_base58(p)))]
        out += sorted(direct, key=lambda p: p not in bootstrap)
        if len(set(out)) < 2 * self.config.relay_reservations:
            if self._nursery is not None:
                self._nursery.start_soon(self._lookup_relays)  # in the background: known peers first
            for peer, addrs in self._relay_providers:
                if peer not in out and await self.owner.dial(peer, addrs, "relay"):
                    out.append(peer)
        return [ID.from_base58(p) for p in dict.fromkeys(out) if p != self.owner.peer_id]

    async def _lookup_relays(self) -> None:
        now = time.monotonic()
        if self.owner.dht is None or now - self._relay_lookup_at < RELAY_LOOKUP_S:
            return
        self._relay_lookup_at = now
        key = f"/hyphae/relay/{self.owner.config.network}"
        try:
            with trio.move_on_after(10):
                found = await find_providers(self.owner.dht, key, 8)
                self._relay_providers = [(str(i.peer_id), [a for a in i.addrs if not is_circuit(a)])
                                         for i in {str(i.peer_id): i for i in found}.values() if i.addrs]
        except Exception as exc:  # noqa: BLE001 — a failed lookup is retried later
            log.debug("relay lookup failed: %s", exc)

    async def _relay_provide_loop(self) -> None:
        """While we relay, announce it in the DHT so private peers far away can find us."""
        key = f"/hyphae/relay/{self.owner.config.network}"
        while True:
            if self.relay_server.enabled and self.owner.dht is not None and self.owner.ready_peers():
                try:
                    if await provide(self.owner.dht, key, walk_in=self._nursery):
                        await trio.sleep(RELAY_PROVIDE_S)
                        continue
                except Exception as exc:  # noqa: BLE001 — retried below
                    log.debug("relay announcement failed: %s", exc)
            await trio.sleep(5.0)


def _ip(addr: str) -> str:
    """The IP of ``/ip4/<ip>/tcp/<port>`` (empty for anything else)."""
    parts = addr.split("/")
    return parts[2] if len(parts) > 2 and parts[1] in ("ip4", "ip6") else ""
