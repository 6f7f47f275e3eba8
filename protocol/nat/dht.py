"""Provider lookups and announcements that still work when this node is a DHT client (private).

py-libp2p 0.8.1's ``find_providers`` answers from the local provider store as soon as it holds
*any* record for the key, and never asks the network again. A DHT server receives everyone's
ADD_PROVIDER (it is among the closest peers), so its local store stays current; a node that
switched to client mode because it is behind NAT receives none after the switch, and kept
finding only the providers it had stored before (measured: two NATed peers never found each
other through the bootstrap). :func:`find_providers` merges the local records with a GET_PROVIDERS
to the closest servers we know, and falls back to py-libp2p's full walk when we know none.

Announcing has the mirror problem. py-libp2p's ``provide`` sends ADD_PROVIDER only after a full
network walk (``find_closest_peers_network``), and behind a NAT that walk dials the private
addresses of the other NATed peers it learns about; each dial hangs until its timeout, and our
callers give up after 10 s. Measured in network namespaces: a node's first announcement (before
it knew it was private) went out, every later one (the one carrying its new relay addresses)
never did, so the two NATed peers only ever found each other's unreachable LAN addresses and
never met. :func:`provide` first sends ADD_PROVIDER straight to the closest servers we already
know (one round trip), then runs the walk for the rest of the network.
"""

from __future__ import annotations

import logging
from typing import Any

import trio
from libp2p.kad_dht.kad_dht import _encode_key
from libp2p.peer.peerinfo import PeerInfo

__all__ = ["find_providers", "provide", "ASK_CLOSEST", "ASK_TIMEOUT_S"]

log = logging.getLogger(__name__)

ASK_CLOSEST = 3
ASK_TIMEOUT_S = 5.0


async def find_providers(dht: Any, key: str, count: int) -> list[PeerInfo]:
    """Providers of ``key``: local records plus those the closest known servers hold."""
    key_bytes = _encode_key(key)
    store = dht.provider_store
    found: dict[str, PeerInfo] = {str(p.peer_id): p for p in store.get_providers(key_bytes)}
    servers = dht.routing_table.find_local_closest_peers(key_bytes, ASK_CLOSEST)
    if not servers:
        return list(await dht.find_providers(key, count))[:count]

    async def ask(peer: Any) -> None:
        with trio.move_on_after(ASK_TIMEOUT_S):
            try:
                # One GET_PROVIDERS round trip (py-libp2p 0.8.1 internal API, as dht_get uses).
                providers, _closer = await store._get_providers_from_peer_with_closers(peer, key_bytes)
            except Exception as exc:  # noqa: BLE001 — a server that fails just adds nothing
                log.debug("GET_PROVIDERS %s from %s failed: %s", key, peer, exc)
                return
            for info in providers or []:
                found[str(info.peer_id)] = info
                store.add_provider(key_bytes, info)

    async with trio.open_nursery() as nursery:
        for peer in servers:
            nursery.start_soon(ask, peer)
    return list(found.values())[:count]


async def provide(dht: Any, key: str, *, walk_in: trio.Nursery | None = None, walk_s: float = 10.0) -> bool:
    """Announce that we provide ``key``; True if at least one known server took the record.

    The closest known servers get ADD_PROVIDER at once (in parallel, :data:`ASK_TIMEOUT_S` each).
    py-libp2p's walk, which announces to the closest peers of the whole network, then runs in
    ``walk_in`` for at most ``walk_s`` (one walk per key at a time), so a caller that announces
    and then looks up is not held up by dials that time out behind NATs. Without ``walk_in`` the
    walk runs inline (and counts toward the result).
    """
    key_bytes = _encode_key(key)
    store = dht.provider_store
    # Our own record first (py-libp2p's provide does the same): a local lookup finds us too.
    store.providing_keys.add(key_bytes)
    store.add_provider(key_bytes, PeerInfo(dht.host.get_id(), list(dht.host.get_addrs())))
    servers = [p for p in dht.routing_table.find_local_closest_peers(key_bytes, ASK_CLOSEST) if p != dht.host.get_id()]
    delivered = 0

    async def tell(peer: Any) -> None:
        nonlocal delivered
        with trio.move_on_after(ASK_TIMEOUT_S):
            try:
                # One ADD_PROVIDER, fire-and-forget as py-libp2p sends it (0.8.1 internal API).
                if await store._send_add_provider(peer, key_bytes):
                    delivered += 1
            except Exception as exc:  # noqa: BLE001 — a server that fails just misses the record
                log.debug("ADD_PROVIDER %s to %s failed: %s", key, peer, exc)

    async with trio.open_nursery() as nursery:
        for peer in servers:
            nursery.start_soon(tell, peer)
    if walk_in is None:
        return await _walk(dht, key, walk_s) or delivered > 0
    if (id(dht), key) not in _walking:
        walk_in.start_soon(_walk, dht, key, walk_s)
    return delivered > 0


_walking: set[tuple[int, str]] = set()


async def _walk(dht: Any, key: str, walk_s: float) -> bool:
    """py-libp2p's provide (network walk, then ADD_PROVIDER to the closest), bounded in time."""
    _walking.add((id(dht), key))
    try:
        with trio.move_on_after(walk_s):
            return bool(await dht.provide(key))
        return False
    except Exception as exc:  # noqa: BLE001 — the direct round already did what it could
        log.debug("DHT walk to announce %s failed: %s", key, exc)
        return False
    finally:
        _walking.discard((id(dht), key))
