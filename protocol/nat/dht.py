"""Provider lookups that still work when this node is a DHT client (a private node).

py-libp2p 0.8.1's ``find_providers`` answers from the local provider store as soon as it holds
*any* record for the key, and never asks the network again. A DHT server receives everyone's
ADD_PROVIDER (it is among the closest peers), so its local store stays current; a node that
switched to client mode because it is behind NAT receives none after the switch, and kept
finding only the providers it had stored before (measured: two NATed peers never found each
other through the bootstrap). :func:`find_providers` merges the local records with a GET_PROVIDERS
to the closest servers we know, and falls back to py-libp2p's full walk when we know none.
"""

from __future__ import annotations

import logging
from typing import Any

import trio
from libp2p.kad_dht.kad_dht import _encode_key
from libp2p.peer.peerinfo import PeerInfo

__all__ = ["find_providers", "ASK_CLOSEST", "ASK_TIMEOUT_S"]

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
