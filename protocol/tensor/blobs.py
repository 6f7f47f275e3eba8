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

A blob larger than :attr:`BlobService.max_blob_bytes` (the daemon sizes it from the model its
run trains, :mod:`.budget`) is refused as soon as its manifest arrives, before any chunk. A fetch
reports its bytes, rate and ETA (:meth:`BlobService.fetching`) and logs a quiet progress line.

Nothing is deleted on its own: the owner of the service decides what to keep and calls
:meth:`BlobService.remove` for the rest (every checkpoint passes through here, so it must).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
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

from ..errors import ProtocolViolation
from ..wire import decode_body, expect_map
from ._blobfetch import PEX_PEERS, ROUTE_GET, ROUTE_HAVE, Fetch, dht_key
from .blobstore import DEFAULT_CHUNK_BYTES, MAX_CHUNK_BYTES, BlobStore, check_blob_id
from .budget import DEFAULT_MAX_BLOB_BYTES
from .errors import BlobNotFound
from .service import Reply, TensorPlane
from .spec import Tensor, TensorSpec, check_unique_names

__all__ = ["BlobConfig", "BlobService", "open_blob_service", "dht_key"]

log = logging.getLogger(__name__)

TENSORS_MAGIC = b"HYTB"
PEX_BLOBS = 1024
"""Blobs whose recent fetchers are remembered (any peer can ask about any id: bounded)."""
_LEN = struct.Struct(">I")


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
    max_blob_bytes: int = DEFAULT_MAX_BLOB_BYTES
    """Largest blob fetched from peers until :meth:`BlobService.set_max_blob_bytes` sizes it from
    the model (the daemon does, once it knows the model's state size)."""

    def __post_init__(self) -> None:
        for name in ("memory_bytes", "chunk_bytes", "serve_slots", "parallel", "per_provider", "max_blob_bytes"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < (0 if name == "memory_bytes" else 1):
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.chunk_bytes > MAX_CHUNK_BYTES:
            raise ValueError(f"chunk_bytes must be <= {MAX_CHUNK_BYTES} (peers refuse larger chunks), "
                             f"got {self.chunk_bytes}")
        for name in ("poll_s", "lookup_s", "request_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")


class BlobService:
    """Puts, serves and fetches blobs for one plane. Build it with :func:`open_blob_service`."""

    def __init__(self, plane: TensorPlane, config: BlobConfig) -> None:
        self.plane = plane
        self.config = config
        self.store = BlobStore(config.directory, memory_bytes=config.memory_bytes, chunk_bytes=config.chunk_bytes)
        self._serving = 0
        self._locks: dict[str, asyncio.Lock] = {}
        self._active: dict[str, Fetch] = {}
        self._announced: set[str] = set()
        self._removing: set[str] = set()
        self._fetchers: OrderedDict[str, OrderedDict[str, None]] = OrderedDict()
        self.served_bytes = 0
        self.fetched_bytes: dict[str, int] = {}
        self.max_blob_bytes = config.max_blob_bytes
        self.max_blob_reason = "the default"
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

    async def put_file(self, path: Path) -> str:
        """Store the file at ``path`` as a blob without reading it into memory (a hard link where
        the file system allows: the file must not change afterwards); announce it; return its id."""
        blob_id = await asyncio.to_thread(self.store.put_file, path)
        await self._announce(blob_id)
        return blob_id

    def has(self, blob_id: str) -> bool:
        return self.store.has(check_blob_id(blob_id))

    def set_max_blob_bytes(self, limit: int, reason: str) -> None:
        """Refuse blobs over ``limit`` bytes from now on; ``reason`` (what it was sized from)
        goes into the refusal's message."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"max_blob_bytes must be an int >= 1, got {limit!r}")
        self.max_blob_bytes, self.max_blob_reason = limit, reason

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
            BlobTooLarge: its manifest declares more than :attr:`max_blob_bytes`.
            TimeoutError: providers were found but the fetch did not finish in ``timeout_s``.
            ValueError: a malformed id.

        Cancellation leaves the verified chunks already fetched on disk (a later get resumes
        from them; one being written at that moment may land just after).
        """
        await self._ensure(blob_id, providers, timeout_s)
        return await asyncio.to_thread(self.store.read, blob_id)

    async def get_file(self, blob_id: str, *, providers: Sequence[str] = (), timeout_s: float = 600.0) -> Path:
        """As :meth:`get`, but the path of the complete, verified blob file instead of its bytes
        (nothing is read into memory: for blobs of gigabytes). Link or copy it; do not modify
        it, and expect it gone after :meth:`remove`."""
        await self._ensure(blob_id, providers, timeout_s)
        return await asyncio.to_thread(self.store.path, blob_id)

    async def _ensure(self, blob_id: str, providers: Sequence[str], timeout_s: float) -> None:
        """Fetch the blob unless it is here (see :meth:`get`)."""
        check_blob_id(blob_id)
        lock = self._locks.setdefault(blob_id, asyncio.Lock())
        async with lock:
            if not self.store.has(blob_id):
                fetch = Fetch(self, blob_id, providers)
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
        """Fetches in progress (for progress bars): id, chunks and bytes held of the total, the
        rate over the last seconds, the ETA at that rate (None: unknown yet), and how many
        providers are known and still usable."""
        out, now = [], time.monotonic()
        for blob_id, fetch in self._active.items():
            total = fetch.manifest.chunks if fetch.manifest else None
            progress = fetch.progress
            out.append({"id": blob_id, "chunks_done": len(fetch.held), "chunks_total": total,
                        "size_bytes": fetch.manifest.size if fetch.manifest else None,
                        "bytes_done": progress.done_bytes if progress else 0,
                        "rate_bps": progress.rate_bps(now) if progress else 0.0,
                        "eta_s": progress.eta_s(now) if progress else None,
                        "providers": len(fetch.providers),
                        "providers_live": sum(1 for p in fetch.providers.values() if not p.dead)})
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


def _forget(store: BlobStore, blob_id: str) -> None:
    """Drop what the store remembers of a blob in memory (cache, manifest, partial chunks).

    It reaches into the store: the store has no delete of its own yet."""
    cached = store._cache.pop(blob_id, None)
    if cached is not None:
        store._cached_bytes -= len(cached)
    store._manifests.pop(blob_id, None)
    store._partial.pop(blob_id, None)
    store._verified.pop(blob_id, None)
    store._fresh.discard(blob_id)


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

