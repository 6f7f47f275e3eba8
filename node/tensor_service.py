"""The daemon's tensor plane: encrypted direct data connections, collectives and blobs.

Opens :func:`hyphae.protocol.tensor.open_tensor_plane` and a :class:`BlobService` for the life of
the daemon and adapts them to what the workers' Comm needs (:class:`Collectives` in
:mod:`.comm_backend`): named raw tensors in, named raw tensors out. Its ``status()`` feeds the
dashboard and ``/metrics`` with bytes by path and peer, and the links carrying data now.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from aiohttp import web

from hyphae.protocol.errors import PeerError
from hyphae.protocol.tensor import (
    BlobConfig,
    BlobService,
    Tensor,
    TensorConfig,
    TensorPlane,
    TensorSpec,
    open_blob_service,
    open_tensor_plane,
)

from .comm_backend import CommFailure, Tensors

if TYPE_CHECKING:
    from .daemon import Daemon

__all__ = ["TensorService", "data_listen_for"]

log = logging.getLogger(__name__)

READY_WAIT_S = 30.0
ACTIVE_WINDOW_S = 5.0


def data_listen_for(host_listen: tuple[str, ...]) -> tuple[str, ...]:
    """Listen for data where libp2p listens: loopback-only hosts keep their data on loopback."""
    loopback_only = all(addr.startswith("/ip4/127.") for addr in host_listen)
    return ("/ip4/127.0.0.1/tcp/0",) if loopback_only else ("/ip4/0.0.0.0/tcp/0",)


def _to_plane(tensors: Tensors) -> list[Tensor]:
    return [Tensor.from_buffer(TensorSpec(name, dtype, tuple(shape)), raw) for name, (dtype, shape, raw) in tensors.items()]


def _from_plane(tensors: list[Tensor]) -> Tensors:
    return {t.spec.name: (t.spec.dtype, t.spec.shape, np.frombuffer(t.data, dtype=np.uint8)) for t in tensors}


class TensorService:
    """Runs the tensor plane and the blob service; answers the Comm's multi-peer calls."""

    name = "tensor"

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.plane: TensorPlane | None = None
        self.blobs: BlobService | None = None
        self.ready = asyncio.Event()
        self._last_bytes: dict[str, tuple[float, int]] = {}
        self._active: dict[str, float] = {}

    async def run(self) -> None:
        config = TensorConfig(listen=data_listen_for(self.daemon.config.host.listen))
        blob_dir = self.daemon.datadir.root / "blobs"
        async with open_tensor_plane(self.daemon.host, config) as plane:
            async with open_blob_service(plane, BlobConfig(directory=blob_dir)) as blobs:
                self.plane, self.blobs = plane, blobs
                self.ready.set()
                log.info("tensor plane listening on %s", ", ".join(plane.data_addrs))
                try:
                    await asyncio.Event().wait()
                finally:
                    self.ready.clear()
                    self.plane = self.blobs = None

    async def _plane(self) -> TensorPlane:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(READY_WAIT_S):
                await self.ready.wait()
        if self.plane is None:
            raise CommFailure("CommClosed", "the tensor plane is not running")
        return self.plane

    # ---- Collectives (for comm_backend) ----------------------------------------------------

    async def exchange(self, peer: str, tag: str, tensors: Tensors, timeout_s: float) -> Tensors:
        plane = await self._plane()
        try:
            async with asyncio.timeout(timeout_s):
                received = await plane.exchange(peer, tag, _to_plane(tensors))
        except TimeoutError:
            raise CommFailure("TimeoutError", f"exchange {tag} with {peer} timed out after {timeout_s} s", peer) from None
        except Exception as exc:  # noqa: BLE001 — any transfer failure means the partner is unavailable
            raise CommFailure("PeerUnavailable", f"exchange {tag} failed: {exc}", peer) from None
        self._active[peer] = time.monotonic()
        return _from_plane(received)

    async def all_reduce(self, group: list[str], tag: str, tensors: Tensors, op: str,
                         timeout_s: float) -> tuple[Tensors, list[str]]:
        plane = await self._plane()
        try:
            result = await plane.all_reduce(group, tag, _to_plane(tensors), op=op, timeout_s=timeout_s)
        except TimeoutError:
            raise CommFailure("TimeoutError", f"all-reduce {tag} timed out after {timeout_s} s") from None
        except PeerError as exc:  # no member's part reached every owner (views of the group differed)
            raise CommFailure("PeerUnavailable", f"all-reduce {tag} failed: {exc}", group[0] if group else "") from None
        now = time.monotonic()
        for peer in result.included:
            self._active[peer] = now
        return _from_plane(result.tensors), list(result.included)

    async def put_blob(self, data: bytes) -> str:
        if self.blobs is None:
            await self._plane()
        return await self.blobs.put(data)

    async def get_blob(self, blob_id: str, timeout_s: float) -> bytes:
        await self._plane()
        return await self.blobs.get(blob_id, timeout_s=timeout_s)

    # ---- dashboard / metrics ---------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        if self.plane is None:
            return {}
        stats = self.plane.stats()
        now = time.monotonic()
        traffic, links = [], []
        for peer, st in stats["peers"].items():
            sent, received = sum(st["bytes_sent"].values()), sum(st["bytes_received"].values())
            last_t, last_total = self._last_bytes.get(peer, (now, sent + received))
            rate = (sent + received - last_total) / (now - last_t) if now > last_t else 0.0
            self._last_bytes[peer] = (now, sent + received)
            traffic.append({"plane": "tensor", "peer": peer, "sent": sent, "received": received,
                            "rate_bps": max(rate, 0.0), "path": st["path"]})
            active = rate > 0 or now - self._active.get(peer, -1e9) < ACTIVE_WINDOW_S
            links.append({"peer": peer, "path": st["path"], "active": active})
        counters = {"tensor_transfer_failures": sum(st["failures"] for st in stats["peers"].values())}
        downloads = [{"what": f"blob {f['id'][:12]}", "done": f["chunks_done"], "total": f["chunks_total"],
                      "size_bytes": f["size_bytes"], "providers": f["providers"]}
                     for f in (self.blobs.fetching() if self.blobs else [])]
        return {"traffic": traffic, "links": links, "counters": counters, "downloads": downloads,
                "tensor": {"data_addrs": stats["data_addrs"]}}

    def api_routes(self) -> list[Callable[[web.Application], None]]:
        async def tensor(_: web.Request) -> web.Response:
            return web.json_response(self.plane.stats() if self.plane else {"running": False})

        return [lambda app: app.router.add_get("/api/v1/tensor", tensor)]
