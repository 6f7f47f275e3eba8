"""UPnP IGD port mapping (miniupnpc), in a worker thread so start-up never waits for it.

A home router that speaks UPnP can forward a public port to our listen port; AutoNAT then
confirms the mapped address and the node becomes public without relays or hole punching. Where no
router answers (most clouds, CI, network namespaces) discovery fails after ``discover_ms`` in the
background and nothing else happens. miniupnpc is optional: without it the feature is off.

The mapping is renewed before its lease ends and removed when the host stops (best effort: a
router that lost it is not asked again).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import trio

__all__ = ["PortMapping", "UpnpMapper"]

log = logging.getLogger(__name__)

LEASE_S = 3600
RENEW_S = LEASE_S / 2
DESCRIPTION = "hyphae"


@dataclass(frozen=True)
class PortMapping:
    protocol: str
    internal_ip: str
    internal_port: int
    external_ip: str
    external_port: int
    at: float

    def to_json(self) -> dict[str, Any]:
        return {"protocol": self.protocol, "internal": f"{self.internal_ip}:{self.internal_port}",
                "external": f"{self.external_ip}:{self.external_port}", "lease_s": LEASE_S,
                "age_s": round(time.time() - self.at, 1)}

    @property
    def multiaddr(self) -> str:
        family = "ip6" if ":" in self.external_ip else "ip4"
        return f"/{family}/{self.external_ip}/tcp/{self.external_port}"


class UpnpMapper:
    """Maps TCP ports on the IGD, if there is one.

    Args:
        discover_ms: how long miniupnpc waits for an IGD to answer.
        module: the miniupnpc module (tests pass a fake); None imports the real one.
    """

    def __init__(self, discover_ms: int, module: Any = None) -> None:
        self.discover_ms = discover_ms
        self._module = module
        self._igd: Any = None
        self.status = "not tried"
        self.mappings: list[PortMapping] = []

    def _discover(self) -> Any:
        """Blocking: find and select an IGD; None if there is none (or no miniupnpc)."""
        module = self._module
        if module is None:
            try:
                import miniupnpc as module  # noqa: PLC0415 — optional dependency
            except ImportError:
                self.status = "miniupnpc not installed"
                return None
        igd = module.UPnP()
        igd.discoverdelay = self.discover_ms
        try:
            found = igd.discover()
            if not found:
                self.status = "no UPnP gateway answered"
                return None
            igd.selectigd()
        except Exception as exc:  # noqa: BLE001 — miniupnpc raises plain Exception
            self.status = f"no usable UPnP gateway ({exc})"
            return None
        return igd

    def _map(self, port: int) -> PortMapping | None:
        """Blocking: map ``port`` (same external port if free, else any the router picks)."""
        if self._igd is None:
            self._igd = self._discover()
            if self._igd is None:
                return None
        igd = self._igd
        try:
            external_ip = str(igd.externalipaddress())
            lan = str(igd.lanaddr)
            external = port
            try:
                ok = igd.addportmapping(port, "TCP", lan, port, DESCRIPTION, "", LEASE_S)
            except Exception:  # noqa: BLE001 — taken by someone else: let the router pick
                ok = False
            if not ok:
                external = int(igd.addanyportmapping(port, "TCP", lan, port, DESCRIPTION, "", LEASE_S))
        except Exception as exc:  # noqa: BLE001
            self.status = f"port mapping refused ({exc})"
            return None
        self.status = "mapped"
        return PortMapping("TCP", lan, port, external_ip, external, time.time())

    def _unmap(self, mapping: PortMapping) -> None:
        try:
            self._igd.deleteportmapping(mapping.external_port, mapping.protocol)
        except Exception as exc:  # noqa: BLE001 — the router may have dropped it already
            log.debug("removing UPnP mapping %s: %s", mapping.multiaddr, exc)

    async def run(self, ports: list[int], on_change: Any) -> None:
        """Map ``ports`` now and renew them until cancelled; then remove them (best effort)."""
        try:
            while True:
                mapped: list[PortMapping] = []
                for port in ports:
                    mapping = await trio.to_thread.run_sync(self._map, port, abandon_on_cancel=True)
                    if mapping is not None:
                        mapped.append(mapping)
                if [m.multiaddr for m in mapped] != [m.multiaddr for m in self.mappings]:
                    self.mappings = mapped
                    for m in mapped:
                        log.info("UPnP: router forwards %s to port %d", m.multiaddr, m.internal_port)
                    on_change()
                if self._igd is None:
                    log.debug("UPnP off: %s", self.status)
                    return
                await trio.sleep(RENEW_S)
        finally:
            if self.mappings and self._igd is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    for m in self.mappings:
                        await trio.to_thread.run_sync(self._unmap, m, abandon_on_cancel=True)
