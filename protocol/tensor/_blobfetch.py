"""The fetching side of :mod:`.blobs`: one blob fetched from many providers at once.

Which chunk from whom (rarest first, from the holder with the fewest chunks), what each provider
holds, dropping providers that fail or lie, the blob budget check on the manifest, and the
fetch's progress (bytes, rate, ETA, a quiet log line). :class:`~.blobs.BlobService` runs one
:class:`Fetch` per blob being fetched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import PeerError, ProtocolViolation
from ._progress import FetchProgress
from .blobstore import Manifest, check_blob_id
from .errors import BlobCorrupt, BlobTooLarge, Refused, RemoteError

if TYPE_CHECKING:
    from .blobs import BlobService

__all__ = ["Fetch", "ROUTE_HAVE", "ROUTE_GET", "PEX_PEERS", "dht_key"]

log = logging.getLogger("hyphae.protocol.tensor.blobs")  # one logger for blobs, put or fetched

ROUTE_HAVE = "/hyphae/blob/have"
ROUTE_GET = "/hyphae/blob/get"
PEX_PEERS = 16

def dht_key(blob_id: str) -> str:
    return f"/hyphae/blob/{check_blob_id(blob_id)}"


@dataclass
class _Provider:
    peer: str
    have: set[int] | None = None
    asked_at: float = -math.inf
    asking: bool = False
    inflight: int = 0
    resting_until: float = 0.0
    dead: bool = False

    def usable(self, now: float) -> bool:
        return not self.dead and self.have is not None and self.resting_until <= now


class Fetch:
    """One blob being fetched: providers, what each holds, chunks in flight."""

    def __init__(self, service: BlobService, blob_id: str, hints: Sequence[str]) -> None:
        self.service, self.blob_id = service, blob_id
        self.plane, self.store, self.config = service.plane, service.store, service.config
        self.manifest: Manifest | None = self.store.manifest(blob_id)
        self.held: set[int] = self.store.held(blob_id) if self.manifest else set()
        self.progress: FetchProgress | None = None
        self.refusal: BlobTooLarge | None = None
        if self.manifest is not None:
            self._begin(self.manifest)
        self.providers: dict[str, _Provider] = {}
        self.inflight: set[int] = set()
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._rng = random.Random()
        for peer in hints:
            self._add(peer)

    def _add(self, peer: str) -> None:
        if peer != self.plane.peer_id and peer not in self.providers:
            self.providers[peer] = _Provider(peer)
            self._wake.set()

    def _begin(self, manifest: Manifest) -> None:
        """Check the blob's size against the budget and start counting its progress."""
        limit = self.service.max_blob_bytes
        if manifest.size > limit:
            self.refusal = BlobTooLarge(
                f"blob {self.blob_id} is {manifest.size} bytes, over this node's limit of {limit} bytes "
                f"(sized from {self.service.max_blob_reason}): a state blob of another model, or a wrong "
                "record; if the model really is this large, the daemon sizes the limit from it once it "
                "knows it (BlobService.set_max_blob_bytes)")
            return
        done = sum(manifest.chunk_range(i)[1] - manifest.chunk_range(i)[0] for i in self.held)
        self.progress = FetchProgress(manifest.size, done, time.monotonic())

    async def run(self) -> None:
        """Fetch every chunk, then assemble the blob.

        Raises:
            BlobTooLarge: the manifest declares more than the budget (nothing fetched).
        """
        if self.refusal is not None:
            raise self.refusal
        async with asyncio.TaskGroup() as tg:
            next_lookup = 0.0
            while self.manifest is None or len(self.held) < self.manifest.chunks:
                if self.refusal is not None:
                    break
                now = time.monotonic()
                if now >= next_lookup:
                    self._start(tg, self._lookup())
                    next_lookup = now + self.config.lookup_s
                for p in self.providers.values():
                    if not p.dead and not p.asking and now - p.asked_at >= self.config.poll_s:
                        p.asking = True
                        self._start(tg, self._ask(p))
                if self.manifest is not None:
                    self._schedule(tg, now)
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.config.poll_s):
                        await self._wake.wait()
                if self.progress is not None and self.progress.line_due(now):
                    log.info("fetching blob %s: %s from %d of %d providers", self.blob_id[:12],
                             self.progress.describe(now), sum(1 for p in self.providers.values() if not p.dead),
                             len(self.providers))
            for task in list(self._tasks):
                task.cancel()  # lookups, polls and (when refused) chunk requests still running
        if self.refusal is not None:
            raise self.refusal
        await asyncio.to_thread(self.store.finish, self.blob_id)
        summary = self.progress.summary(time.monotonic()) if self.progress else ""
        log.info("fetched blob %s (%d chunks): %s, from %s", self.blob_id[:12], self.manifest.chunks, summary,
                 {p[-8:]: n for p, n in self.service.fetched_bytes.items()})

    def _start(self, tg: asyncio.TaskGroup, coro: Any) -> None:
        task = tg.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _lookup(self) -> None:
        try:
            found = await self.plane.host.dht_find_providers(dht_key(self.blob_id), 20)
        except Exception as exc:  # noqa: BLE001 — a failed lookup is retried on the next round
            log.debug("provider lookup for %s failed: %s", self.blob_id, exc)
            return
        for peer in found:
            self._add(peer)

    async def _ask(self, p: _Provider) -> None:
        try:
            async with asyncio.timeout(self.config.request_timeout_s):
                reply = await self.plane.request(p.peer, ROUTE_HAVE, {"id": self.blob_id})
            peers = reply.meta.get("peers")
            if isinstance(peers, list):
                for other in peers[:PEX_PEERS]:
                    if isinstance(other, str) and len(other) < 128:
                        self._add(other)
            if reply.meta.get("known") is True and len(reply.tensors) == 2:
                if self.manifest is None:
                    manifest = Manifest.from_bytes(bytes(reply.tensors[0].data), self.blob_id)
                    self._begin(manifest)
                    if self.refusal is not None:
                        return  # too large: nothing of it is kept
                    await asyncio.to_thread(self.store.begin_partial, manifest)
                    self.manifest, self.held = manifest, self.store.held(self.blob_id)
                p.have = _unbits(bytes(reply.tensors[1].data), self.manifest.chunks)
        except (BlobCorrupt, ProtocolViolation) as exc:
            log.warning("provider %s of blob %s lies: %s", p.peer, self.blob_id, exc)
            p.dead = True
        except (RemoteError, Refused, TimeoutError):
            pass  # asked again at the next poll
        except PeerError as exc:
            log.info("provider %s of blob %s is gone: %s", p.peer, self.blob_id, exc)
            p.dead = True
        finally:
            p.asking = False
            p.asked_at = time.monotonic()
            self._wake.set()

    def _schedule(self, tg: asyncio.TaskGroup, now: float) -> None:
        """Start chunk requests: rarest chunk first, from its holder with the fewest chunks."""
        budget = self.config.parallel - len(self.inflight)
        if budget <= 0:
            return
        usable = [p for p in self.providers.values() if p.usable(now)]
        counts: dict[int, int] = {}
        for p in usable:
            for i in p.have:
                if i not in self.held and i not in self.inflight:
                    counts[i] = counts.get(i, 0) + 1
        wanted = sorted(counts, key=lambda i: (counts[i], self._rng.random()))
        for i in wanted:
            holders = [p for p in usable if i in p.have and p.inflight < self.config.per_provider]
            if not holders:
                continue
            p = min(holders, key=lambda q: (len(q.have), q.inflight, self._rng.random()))
            self.inflight.add(i)
            p.inflight += 1
            self._start(tg, self._get_chunk(p, i))
            budget -= 1
            if budget == 0:
                return

    async def _get_chunk(self, p: _Provider, index: int) -> None:
        try:
            async with asyncio.timeout(self.config.request_timeout_s):
                reply = await self.plane.request(p.peer, ROUTE_GET, {"id": self.blob_id, "index": index})
            if reply.meta.get("busy"):
                p.resting_until = time.monotonic() + self.config.poll_s
                return
            if reply.meta.get("missing") or len(reply.tensors) != 1:
                p.have.discard(index)
                return
            await asyncio.to_thread(self.store.put_chunk, self.blob_id, index, reply.tensors[0].data)
            self.held.add(index)
            p.have.add(index)
            if self.progress is not None:
                self.progress.add(len(reply.tensors[0].data), time.monotonic())
            fetched = self.service.fetched_bytes
            fetched[p.peer] = fetched.get(p.peer, 0) + len(reply.tensors[0].data)
            if self.blob_id not in self.service._announced:
                self._start_announce()
        except BlobCorrupt as exc:
            log.warning("provider %s sent a bad chunk of blob %s; not asking it again: %s", p.peer, self.blob_id, exc)
            p.dead = True
        except (RemoteError, Refused, TimeoutError):
            p.resting_until = time.monotonic() + 1.0
        except PeerError as exc:
            log.info("provider %s of blob %s dropped (%s); its chunks come from others", p.peer, self.blob_id, exc)
            p.dead = True
        finally:
            self.inflight.discard(index)
            p.inflight -= 1
            self._wake.set()

    def _start_announce(self) -> None:
        # Announcing takes DHT round trips: it runs beside the fetch, in the plane's task group.
        self.plane._spawn(f"blob-announce {self.blob_id[:12]}", self.service._announce, self.blob_id)


def _unbits(data: bytes, n: int) -> set[int]:
    if len(data) != (n + 7) // 8:
        raise ProtocolViolation(f"have-bitmap of {len(data)} bytes for {n} chunks")
    bits = np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little")[:n]
    return set(np.flatnonzero(bits).tolist())
