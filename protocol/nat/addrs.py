"""Which addresses a host advertises, and how it dials a peer that has relay addresses too.

Advertised (the libp2p host's ``addrs_factory``): the ``announce`` addresses if configured, else
the listen addresses with wildcards expanded, loopback last; then what NAT traversal adds
(addresses a dial-back confirmed, ``/p2p-circuit`` addresses through our relays). py-libp2p also
offers, among the candidates, any address four peers *observed* us at; those are NAT mappings of
outgoing connections (their ports belong to one connection each) and are dropped here — an
observed address is advertised only once a dial-back confirmed it.

py-libp2p 0.8.1's ``BasicHost.get_addrs`` strips everything from an address's first ``/p2p/``
component before appending ours, which turns ``<relay>/p2p/<relay id>/p2p-circuit`` into a plain
(wrong) address of the relay; :func:`install_get_addrs` replaces it on the host instance.

Loopback goes last because py-libp2p's DCUtR binds its hole-punching dials to the first TCP
address we advertise: bound to 127.0.0.1 they cannot leave the machine.

Dialing (:func:`dial_any`): direct addresses first; relay addresses after a short head start, or
at once when the direct ones failed, so a private peer is reached in about a relay round trip
instead of after the direct dial's timeout.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import multiaddr
import trio

from .._addrs import expand_wildcards, interface_ipv4s, is_dialable
from ._relay_wire import is_circuit

__all__ = ["advertised", "install_get_addrs", "dial_any", "RELAY_HEAD_START_S"]

log = logging.getLogger(__name__)

RELAY_HEAD_START_S = 1.0
_LOCAL_TTL_S = 2.0
_local_cache: tuple[float, frozenset[str]] = (-1e9, frozenset())


def _local_ips() -> frozenset[str]:
    global _local_cache
    now = time.monotonic()
    if now - _local_cache[0] > _LOCAL_TTL_S:
        _local_cache = (now, frozenset(interface_ipv4s()))
    return _local_cache[1]


def _is_local(addr: multiaddr.Multiaddr) -> bool:
    parts = str(addr).split("/")
    if len(parts) < 3 or parts[1] != "ip4":
        return True  # IPv6 and DNS candidates come from configuration, not observation
    return parts[2] == "0.0.0.0" or parts[2] in _local_ips()


def advertised(candidates: list[multiaddr.Multiaddr], *, announce: list[multiaddr.Multiaddr],
               extra: Callable[[], list[multiaddr.Multiaddr]]) -> list[multiaddr.Multiaddr]:
    if announce:
        base = list(announce)
    else:
        local = [a for a in candidates if _is_local(a)]
        base = [a for a in expand_wildcards(local) if is_dialable(str(a))]
        base.sort(key=lambda a: str(a).startswith(("/ip4/127.", "/ip6/::1/")))
    try:
        more = extra()
    except Exception:  # noqa: BLE001 — advertising must never fail because of NAT bookkeeping
        log.exception("NAT addresses unavailable")
        more = []
    return list(dict.fromkeys(base + more))


def install_get_addrs(host: Any, *, announce: list[multiaddr.Multiaddr],
                      extra: Callable[[], list[multiaddr.Multiaddr]]) -> None:
    """Make ``host.get_addrs()`` return :func:`advertised` addresses, each ending in our /p2p id
    (circuit addresses keep their relay part)."""
    own = f"/p2p/{host.get_id()}"

    def get_addrs() -> list[multiaddr.Multiaddr]:
        out = []
        for addr in advertised(list(host.get_transport_addrs()), announce=announce, extra=extra):
            text = str(addr)
            if not is_circuit(text):
                text = text.split("/p2p/")[0]
            elif text.endswith(own):
                text = text[: -len(own)]
            out.append(multiaddr.Multiaddr(text + own))
        return out

    host.get_addrs = get_addrs


async def dial_any(peer_id: str, addrs: list[multiaddr.Multiaddr], *,
                   direct: Callable[[list[multiaddr.Multiaddr]], Awaitable[Any]],
                   relayed: Callable[[multiaddr.Multiaddr], Awaitable[Any]] | None,
                   timeout_s: float) -> bool:
    """Race the direct addresses against the relay addresses (after a head start).

    ``direct(addrs)`` and ``relayed(addr)`` raise on failure. Returns True once one connected;
    False when all failed or ``timeout_s`` passed. Cancellation cancels both.
    """
    plain = [a for a in addrs if not is_circuit(a)]
    circuits = [a for a in addrs if is_circuit(a)] if relayed is not None else []
    won = False
    direct_failed = trio.Event()

    async def go_direct(scope: trio.CancelScope) -> None:
        nonlocal won
        try:
            await direct(plain)
            won = True
            scope.cancel()
        except Exception as exc:  # noqa: BLE001 — every dial failure is "try the relay"
            log.debug("direct dial of %s failed: %s", peer_id, exc)
        finally:
            direct_failed.set()

    async def go_relayed(scope: trio.CancelScope) -> None:
        nonlocal won
        if plain:
            with trio.move_on_after(RELAY_HEAD_START_S):
                await direct_failed.wait()
        for addr in circuits:
            try:
                await relayed(addr)
                won = True
                scope.cancel()
                return
            except Exception as exc:  # noqa: BLE001 — the next relay may work
                log.debug("relayed dial of %s via %s failed: %s", peer_id, addr, exc)

    with trio.move_on_after(timeout_s):
        async with trio.open_nursery() as nursery:
            if plain:
                nursery.start_soon(go_direct, nursery.cancel_scope)
            if circuits:
                nursery.start_soon(go_relayed, nursery.cancel_scope)
    return won
