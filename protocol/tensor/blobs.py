"""Content-addressed blobs over the tensor plane: put, announce in the DHT, fetch from anyone.

``put`` stores a blob (:mod:`.blobstore`) and provides ``/hyphae/blob/<id>`` in the DHT. ``get``
finds providers there (plus any the caller names), learns which chunks each holds, and fetches
chunks in parallel over the tensor plane, each verified against the manifest before it is kept.

Load spreading, so that many late joiners do not choke the one original provider:

* a fetching node announces itself as a provider as soon as it holds one verified chunk, and
  serves the chunks it holds (partial holders answer ``have`` with their bitmap);
* the rarest chunk (fewest known holders) is fetched first, so joiners start with different
  chunks, and each chunk is taken from the holder with the *fewest* chunks, i.e. from another
  joiner rather than from a full seed whenever one has it;
* every node serves at most ``serve_slots`` chunks at once and answers ``busy`` beyond that,
  which sends requesters to other holders;
* peer exchange: a ``have`` answer names the other peers recently fetching the same blob, so
  joiners find each other at once instead of a DHT lookup (and an announcement) later.

A provider that fails or disconnects mid-way is dropped and its chunks are fetched from the
others (fetching resumes with the next chunk; chunks already kept stay kept, also on disk across
restarts). One that sends a chunk not matching the manifest is dropped for the rest of the fetch.

Nothing is deleted on its own: the owner of the service decides what to keep and calls
:meth:`BlobService.remove` for the rest (every checkpoint passes through here, so it must).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import shutil
import struct
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from ..errors import PeerError, ProtocolViolation
from ..wire import decode_body, expect_map
from .blobstore import DEFAULT_CHUNK_BYTES, BlobStore, Manifest, check_blob_id
from .errors import BlobCorrupt, BlobNotFound, Refused, RemoteError
from .service import Reply, TensorPlane
from .spec import Tensor, TensorSpec, check_unique_names

__all__ = ["BlobConfig", "BlobService", "open_blob_service", "dht_key"]

log = logging.getLogger(__name__)

ROUTE_HAVE = "/hyphae/blob/have"
ROUTE_GET = "/hyphae/blob/get"
TENSORS_MAGIC = b"HYTB"
PEX_PEERS = 16
PEX_BLOBS = 1024
"""Blobs whose recent fetchers are remembered (any peer can ask about any id: bounded)."""
_LEN = struct.Struct(">I")


def dht_key(blob_id: str) -> str:
    return f"/hyphae/blob/{check_blob_id(blob_id)}"


@dataclass(frozen=True, kw_only=True)
class BlobConfig:
    """Where blobs live and how they are fetched and served."""

    directory: Path
    """Directory the daemon gives for blobs (created if missing)."""
    memory_bytes: int = 256 << 20
    """Complete blobs kept in memory as well, least recently used dropped first."""
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    """Chunk size of blobs this node creates (fetched blobs keep their creator's)."""
    serve_slots: int = 4
    """Chunks this node uploads at once; more requests are answered ``busy``."""
    parallel: int = 4
    """Chunk requests one fetch keeps in flight."""
    per_provider: int = 2
    """Of those, at most this many to one provider."""
    poll_s: float = 0.2
    """How often a fetch refreshes which chunks each provider holds."""
    lookup_s: float = 1.0
    """How often a fetch looks for new providers in the DHT."""
    request_timeout_s: float = 30.0
    """Give up one chunk request after this long (the chunk is then asked elsewhere)."""

    def __post_init__(self) -> None:
        for name in ("memory_bytes", "chunk_bytes", "serve_slots", "parallel", "per_provider"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < (0 if name == "memory_bytes" else 1):
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        for name in ("poll_s", "lookup_s", "request_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")


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


class BlobService:
    """Puts, serves and fetches blobs for one plane. Build it with :func:`open_blob_service`."""

    def __init__(self, plane: TensorPlane, config: BlobConfig) -> None:
        self.plane = plane
        self.config = config
        self.store = BlobStore(config.directory, memory_bytes=config.memory_bytes, chunk_bytes=config.chunk_bytes)
        self._serving = 0
        self._locks: dict[str, asyncio.Lock] = {}
        self._active: dict[str, _Fetch] = {}
        self._announced: set[str] = set()
        self._removing: set[str] = set()
        self._fetchers: OrderedDict[str, OrderedDict[str, None]] = OrderedDict()
        self.served_bytes = 0
        self.fetched_bytes: dict[str, int] = {}
        plane.serve(ROUTE_HAVE, self._on_have)
        plane.serve(ROUTE_GET, self._on_get)

    # ---- public API ------------------------------------------------------------------------

    async def put(self, data: bytes | memoryview) -> str:
        """Store ``data``, announce this node as a provider; return the blob id (hex)."""
        blob_id = await asyncio.to_thread(self.store.put, data)
        await self._announce(blob_id)
        return blob_id

    async def put_tensors(self, tensors: Sequence[Tensor]) -> str:
        """Store named tensors as one blob (specs + raw bytes); return its id."""
        check_unique_names(t.spec for t in tensors)
        header = msgpack.packb({"tensors": [t.spec.to_wire() for t in tensors]}, use_bin_type=True)
        parts = [TENSORS_MAGIC, _LEN.pack(len(header)), header, *(bytes(t.data) for t in tensors)]
        return await self.put(b"".join(parts))

    def has(self, blob_id: str) -> bool:
        return self.store.has(check_blob_id(blob_id))

    async def remove(self, blob_id: str) -> bool:
        """Delete this node's copy of a blob (whole or partial) and stop offering it.

        Returns whether any of it was here. Other blobs are untouched, also while they are being
        fetched or served. This blob is no longer offered from the first moment: ``have`` answers
        that it is unknown and chunk requests ``missing``, so fetchers take it from other holders;
        a chunk already being read from disk may still go out, or fail that one request. A
        ``get`` of the same blob in progress here finishes first (remove waits for it). The DHT
        provider record cannot be withdrawn; it expires, and whoever finds this node through it
        is told the blob is unknown.
        """
        check_blob_id(blob_id)
        async with self._locks.setdefault(blob_id, asyncio.Lock()):
            self._removing.add(blob_id)
            self._announced.discard(blob_id)
            self._fetchers.pop(blob_id, None)
            try:
                _forget(self.store, blob_id)
                return await asyncio.to_thread(_delete_files, self.store, blob_id)
            finally:
                _forget(self.store, blob_id)  # a serve that read a manifest meanwhile put it back
                self._removing.discard(blob_id)

    async def get(self, blob_id: str, *, providers: Sequence[str] = (), timeout_s: float = 600.0) -> bytes:
        """The blob's bytes, from here or fetched from providers (DHT, plus ``providers``).

        Raises:
            BlobNotFound: no provider with the blob was found before the deadline.
            TimeoutError: providers were found but the fetch did not finish in ``timeout_s``.
            ValueError: a malformed id.

        Cancellation leaves the verified chunks already fetched on disk (a later get resumes
        from them; one being written at that moment may land just after).
        """
        check_blob_id(blob_id)
        lock = self._locks.setdefault(blob_id, asyncio.Lock())
        async with lock:
            if not self.store.has(blob_id):
                fetch = _Fetch(self, blob_id, providers)
                self._active[blob_id] = fetch
                try:
                    async with asyncio.timeout(timeout_s):
                        await fetch.run()
                except TimeoutError:
                    if fetch.manifest is None:
                        raise BlobNotFound(f"no provider of blob {blob_id} found within {timeout_s} s "
                                           f"({len(fetch.providers)} asked)") from None
                    raise TimeoutError(f"blob {blob_id}: {len(fetch.held)} of {fetch.manifest.chunks} chunks "
                                       f"after {timeout_s} s") from None
                finally:
                    self._active.pop(blob_id, None)
            return await asyncio.to_thread(self.store.read, blob_id)

    async def get_tensors(self, blob_id: str, **kwargs: Any) -> list[Tensor]:
        """Tensors stored with :meth:`put_tensors` (arguments as :meth:`get`).

        Raises:
            ProtocolViolation: the blob is not a tensor blob, or its header and sizes disagree.
        """
        return decode_tensor_blob(await self.get(blob_id, **kwargs))

    def stats(self) -> dict[str, Any]:
        return {"served_bytes": self.served_bytes, "serving": self._serving,
                "fetched_bytes_by_provider": dict(self.fetched_bytes), "fetching": self.fetching()}

    def fetching(self) -> list[dict[str, Any]]:
        """Fetches in progress: id, chunks held of total, providers known (for progress bars)."""
        out = []
        for blob_id, fetch in self._active.items():
            total = fetch.manifest.chunks if fetch.manifest else None
            out.append({"id": blob_id, "chunks_done": len(fetch.held), "chunks_total": total,
                        "size_bytes": fetch.manifest.size if fetch.manifest else None,
                        "providers": len(fetch.providers)})
        return out

    # ---- serving ---------------------------------------------------------------------------

    async def _announce(self, blob_id: str) -> None:
        if blob_id in self._announced:
            return
        self._announced.add(blob_id)
        try:
            await self.plane.host.dht_provide(dht_key(blob_id))
        except Exception as exc:  # noqa: BLE001 — no DHT peers yet: those who ask directly still get it
            log.info("could not announce blob %s in the DHT: %s", blob_id, exc)

    async def _on_have(self, peer: str, meta: dict[str, Any], tensors: list[Tensor]) -> Reply:
        blob_id = _blob_id(meta, {})
        fetchers = self._fetchers.setdefault(blob_id, OrderedDict())
        self._fetchers.move_to_end(blob_id)
        while len(self._fetchers) > PEX_BLOBS:
            self._fetchers.popitem(last=False)
        fetchers[peer] = None
        fetchers.move_to_end(peer)
        while len(fetchers) > PEX_PEERS + 1:
            fetchers.popitem(last=False)
        others = [p for p in fetchers if p != peer]
        manifest = None if blob_id in self._removing else self.store.manifest(blob_id)
        if manifest is None:
            return Reply({"known": False, "peers": others})
        bits = _bits(self.store.held(blob_id), manifest.chunks)
        return Reply({"known": True, "peers": others},
                     [_bytes_tensor("manifest", manifest.to_bytes()), _bytes_tensor("have", bits)])

    async def _on_get(self, peer: str, meta: dict[str, Any], tensors: list[Tensor]) -> Reply:
        blob_id = _blob_id(meta, {"index": int})
        if self._serving >= self.config.serve_slots:
            return Reply({"busy": True})
        self._serving += 1
        done = False
        try:
            data = None
            if blob_id not in self._removing:
                with contextlib.suppress(OSError):  # removed between the check and the read
                    data = await asyncio.to_thread(self.store.read_chunk, blob_id, meta["index"])
            if data is None or blob_id in self._removing:
                return Reply({"missing": True})
            self.served_bytes += len(data)
            done = True
            return Reply({}, [_bytes_tensor("chunk", data)], sent=self._slot_free)
        finally:
            if not done:
                self._serving -= 1

    def _slot_free(self) -> None:
        self._serving -= 1


class _Fetch:
    """One blob being fetched: providers, what each holds, chunks in flight."""

    def __init__(self, service: BlobService, blob_id: str, hints: Sequence[str]) -> None:
        self.service, self.blob_id = service, blob_id
        self.plane, self.store, self.config = service.plane, service.store, service.config
        self.manifest: Manifest | None = self.store.manifest(blob_id)
        self.held: set[int] = self.store.held(blob_id) if self.manifest else set()
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

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            next_lookup = 0.0
            while self.manifest is None or len(self.held) < self.manifest.chunks:
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
            for task in list(self._tasks):
                task.cancel()  # lookups and polls still running; nothing else is in flight
        await asyncio.to_thread(self.store.finish, self.blob_id)
        log.info("fetched blob %s (%d chunks) from %s", self.blob_id, self.manifest.chunks,
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


def _forget(store: BlobStore, blob_id: str) -> None:
    """Drop what the store remembers of a blob in memory (cache, manifest, partial chunks).

    It reaches into the store: the store has no delete of its own yet."""
    cached = store._cache.pop(blob_id, None)
    if cached is not None:
        store._cached_bytes -= len(cached)
    store._manifests.pop(blob_id, None)
    store._partial.pop(blob_id, None)


def _delete_files(store: BlobStore, blob_id: str) -> bool:
    """Delete a blob's files; whether there were any. The blob file goes first, so that from
    then on the store no longer has it, whatever happens to the rest."""
    found = False
    for path in (store._blob_path(blob_id), store.directory / f"{blob_id}.manifest"):
        try:
            path.unlink()
            found = True
        except FileNotFoundError:
            pass
    folder = store._partial_dir(blob_id)
    if folder.exists():
        shutil.rmtree(folder, ignore_errors=True)
        found = True
    return found


def _blob_id(meta: dict[str, Any], extra: dict[str, type]) -> str:
    m = expect_map(meta, {"id": str, **extra}, what="blob request")
    try:
        return check_blob_id(m["id"])
    except ValueError as exc:
        raise ProtocolViolation(str(exc)) from exc


def _bytes_tensor(name: str, data: bytes) -> Tensor:
    return Tensor.from_buffer(TensorSpec(name, "uint8", (len(data),)), data)


def _bits(held: set[int], n: int) -> bytes:
    out = bytearray((n + 7) // 8)
    for i in held:
        out[i // 8] |= 1 << (i % 8)
    return bytes(out)


def _unbits(data: bytes, n: int) -> set[int]:
    if len(data) != (n + 7) // 8:
        raise ProtocolViolation(f"have-bitmap of {len(data)} bytes for {n} chunks")
    bits = np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little")[:n]
    return set(np.flatnonzero(bits).tolist())


def decode_tensor_blob(data: bytes) -> list[Tensor]:
    """Tensors from a blob written by :meth:`BlobService.put_tensors` (views of ``data``).

    Raises:
        ProtocolViolation: not a tensor blob, or a header that disagrees with the sizes.
    """
    view = memoryview(data)
    head = len(TENSORS_MAGIC) + _LEN.size
    if len(view) < head or bytes(view[:len(TENSORS_MAGIC)]) != TENSORS_MAGIC:
        raise ProtocolViolation("not a tensor blob (no HYTB magic)")
    (n,) = _LEN.unpack(view[len(TENSORS_MAGIC):head])
    if head + n > len(view):
        raise ProtocolViolation(f"tensor blob header of {n} bytes overruns the blob")
    m = expect_map(decode_body(bytes(view[head:head + n])), {"tensors": list}, what="tensor blob header")
    out, off = [], head + n
    for item in m["tensors"]:
        try:
            spec = TensorSpec(item[0], item[1], tuple(item[2]))
        except (ValueError, TypeError, IndexError) as exc:
            raise ProtocolViolation(f"bad tensor spec in a tensor blob: {exc}") from exc
        if off + spec.nbytes > len(view):
            raise ProtocolViolation(f"tensor blob is shorter than its specs say ({spec.name!r})")
        out.append(Tensor(spec, view[off:off + spec.nbytes]))
        off += spec.nbytes
    if off != len(view):
        raise ProtocolViolation(f"tensor blob has {len(view) - off} bytes beyond its tensors")
    return out


@contextlib.asynccontextmanager
async def open_blob_service(plane: TensorPlane, config: BlobConfig) -> AsyncIterator[BlobService]:
    """Serve and fetch blobs on ``plane``, stored under ``config.directory``."""
    yield BlobService(plane, config)

