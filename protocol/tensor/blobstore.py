"""Content-addressed blobs on disk, with a bounded in-memory cache (no network here).

A blob is cut into chunks of ``chunk_bytes``; its :class:`Manifest` lists each chunk's SHA-256,
and its id is the SHA-256 of the manifest (a one-level hash tree)::

    blob_id = sha256("hyphae-blob/1" | size u64 | chunk_bytes u32 | chunk hash 0 | chunk hash 1 | ...)

So a manifest fetched from anyone is checked against the id at once, and every chunk against
the manifest as it arrives: a node can serve the verified chunks it holds before it has the
whole blob, and a lying provider is caught on its first chunk, not after the last.

Layout of the directory the daemon gives::

    <id>.blob, <id>.manifest        complete blobs (written atomically: temp, fsync, rename)
    partial/<id>/manifest, <i>.chunk  chunks of a blob being fetched (renamed into place; not
                                    fsynced, but re-verified whenever read, so a torn chunk
                                    after a crash is simply fetched again)
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import shutil
import struct
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from ..atomic import atomic_write_bytes
from ..errors import ProtocolViolation
from .errors import BlobCorrupt

__all__ = ["Manifest", "BlobStore", "DEFAULT_CHUNK_BYTES", "MAX_CHUNK_BYTES", "check_blob_id"]

log = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 1 << 20
MAX_CHUNKS = 1 << 20
MAX_CHUNK_BYTES = 64 << 20
"""Largest chunk a fetched manifest may declare: a chunk is held whole in memory on both ends,
so a provider must not be able to make it gigabytes."""
_DOMAIN = b"hyphae-blob/1"
_SIZES = struct.Struct(">QI")
_HEX = frozenset("0123456789abcdef")


def check_blob_id(blob_id: str) -> str:
    """Raise ValueError unless ``blob_id`` is 64 lowercase hex characters (a SHA-256)."""
    if not isinstance(blob_id, str) or len(blob_id) != 64 or not set(blob_id) <= _HEX:
        raise ValueError(f"blob id must be 64 lowercase hex characters, got {blob_id!r:.80}")
    return blob_id


@dataclass(frozen=True)
class Manifest:
    """Size, chunk size and chunk hashes of a blob; its hash is the blob id."""

    size: int
    chunk_bytes: int
    hashes: tuple[bytes, ...]

    @property
    def blob_id(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()

    @property
    def chunks(self) -> int:
        return len(self.hashes)

    def chunk_range(self, index: int) -> tuple[int, int]:
        lo = index * self.chunk_bytes
        return lo, min(self.size, lo + self.chunk_bytes)

    def to_bytes(self) -> bytes:
        return _DOMAIN + _SIZES.pack(self.size, self.chunk_bytes) + b"".join(self.hashes)

    @classmethod
    def of(cls, data: memoryview | bytes, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Manifest:
        view = memoryview(data)
        hashes = tuple(hashlib.sha256(view[lo:lo + chunk_bytes]).digest() for lo in range(0, len(view), chunk_bytes))
        return cls(len(view), chunk_bytes, hashes)

    @classmethod
    def of_file(cls, path: Path, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Manifest:
        """The manifest of a file, read one chunk at a time (a blob larger than memory is fine)."""
        hashes, size = [], 0
        with open(path, "rb") as f:
            while chunk := f.read(chunk_bytes):
                hashes.append(hashlib.sha256(chunk).digest())
                size += len(chunk)
        return cls(size, chunk_bytes, tuple(hashes))

    @classmethod
    def from_bytes(cls, data: bytes, blob_id: str) -> Manifest:
        """Decode a manifest and check it hashes to ``blob_id``.

        Raises:
            BlobCorrupt: it does not hash to the id (a lying or broken provider).
            ProtocolViolation: it is malformed.
        """
        if hashlib.sha256(data).hexdigest() != blob_id:
            raise BlobCorrupt(f"manifest does not hash to blob {blob_id}")
        head = len(_DOMAIN) + _SIZES.size
        if len(data) < head or data[:len(_DOMAIN)] != _DOMAIN or (len(data) - head) % 32:
            raise ProtocolViolation("malformed blob manifest")
        size, chunk_bytes = _SIZES.unpack(data[len(_DOMAIN):head])
        hashes = tuple(data[i:i + 32] for i in range(head, len(data), 32))
        if not 1 <= chunk_bytes <= MAX_CHUNK_BYTES or len(hashes) > MAX_CHUNKS or len(hashes) != -(-size // chunk_bytes):
            raise ProtocolViolation(f"blob manifest of {size} bytes in {len(hashes)} chunks of {chunk_bytes} is inconsistent")
        return cls(size, chunk_bytes, hashes)

    def verify_chunk(self, index: int, data: bytes | memoryview) -> bool:
        lo, hi = self.chunk_range(index)
        return len(data) == hi - lo and hashlib.sha256(data).digest() == self.hashes[index]


class BlobStore:
    """Blobs in ``directory``; complete blobs up to ``memory_bytes`` in total also kept in memory.

    Blocking file I/O: the blob service calls it through ``asyncio.to_thread``.
    """

    def __init__(self, directory: Path, *, memory_bytes: int = 256 << 20,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        if chunk_bytes < 1024 or memory_bytes < 0:
            raise ValueError(f"chunk_bytes must be >= 1024 and memory_bytes >= 0, got {chunk_bytes}, {memory_bytes}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.memory_bytes = memory_bytes
        self.chunk_bytes = chunk_bytes
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self._cached_bytes = 0
        self._manifests: dict[str, Manifest] = {}
        self._partial: dict[str, set[int]] = {}
        self._verified: dict[str, set[int]] = {}  # chunks checked in memory just before this process wrote them
        self._fresh: set[str] = set()  # blobs just assembled from such chunks: their next read skips the re-hash

    # ---- paths -----------------------------------------------------------------------------

    def _blob_path(self, blob_id: str) -> Path:
        return self.directory / f"{check_blob_id(blob_id)}.blob"

    def _partial_dir(self, blob_id: str) -> Path:
        return self.directory / "partial" / check_blob_id(blob_id)

    # ---- complete blobs --------------------------------------------------------------------

    def put(self, data: bytes | memoryview) -> str:
        """Store ``data``; return its id (idempotent). ``data`` is not copied unless it is small
        enough for the memory cache."""
        manifest = Manifest.of(data, self.chunk_bytes)
        blob_id = manifest.blob_id
        if not self.has(blob_id):
            atomic_write_bytes(self._blob_path(blob_id), data)  # type: ignore[arg-type]  # any buffer
            atomic_write_bytes(self.directory / f"{blob_id}.manifest", manifest.to_bytes())
        self._manifests[blob_id] = manifest
        if len(data) <= self.memory_bytes:
            self._remember(blob_id, bytes(data))
        return blob_id

    def put_file(self, path: Path) -> str:
        """Store the file at ``path`` without reading it into memory; return its id.

        The blob becomes a hard link to the file where both are on one file system (no second
        copy on disk), else a copy. Either way later changes to ``path`` must not happen: write
        a new file instead (the caller's files are written once, atomically)."""
        manifest = Manifest.of_file(path, self.chunk_bytes)
        blob_id = manifest.blob_id
        if not self.has(blob_id):
            _link_or_copy(Path(path), self._blob_path(blob_id))
            atomic_write_bytes(self.directory / f"{blob_id}.manifest", manifest.to_bytes())
        self._manifests[blob_id] = manifest
        self._fresh.add(blob_id)
        return blob_id

    def path(self, blob_id: str) -> Path:
        """The file of a complete blob, checked against its id (a chunk at a time) unless this
        process just wrote it from checked bytes. Do not modify it: link or copy it.

        Raises:
            KeyError: not here (on disk). BlobCorrupt: the file was damaged (it is removed).
        """
        path = self._blob_path(blob_id)
        if not path.exists():
            raise KeyError(blob_id)
        if blob_id in self._fresh:
            return path
        manifest = self.manifest(blob_id)
        if manifest is None or Manifest.of_file(path, manifest.chunk_bytes).blob_id != blob_id:
            path.unlink(missing_ok=True)
            self._cache.pop(blob_id, None)
            raise BlobCorrupt(f"local copy of blob {blob_id} is damaged; removed it")
        self._fresh.add(blob_id)
        return path

    def has(self, blob_id: str) -> bool:
        """Whether the whole blob is here."""
        return blob_id in self._cache or self._blob_path(blob_id).exists()

    def read(self, blob_id: str) -> bytes:
        """The whole blob, checked against its id when it comes from disk.

        Raises:
            KeyError: not here. BlobCorrupt: the file was damaged (it is removed).
        """
        cached = self._cache.get(blob_id)
        if cached is not None:
            self._cache.move_to_end(blob_id)
            return cached
        try:
            data = self._blob_path(blob_id).read_bytes()
        except FileNotFoundError:
            raise KeyError(blob_id) from None
        manifest = self.manifest(blob_id)
        if blob_id in self._fresh and manifest is not None and len(data) == manifest.size:
            self._fresh.discard(blob_id)  # assembled from checked chunks a moment ago: no second hash pass
        elif manifest is None or Manifest.of(data, manifest.chunk_bytes).blob_id != blob_id:
            self._blob_path(blob_id).unlink(missing_ok=True)
            raise BlobCorrupt(f"local copy of blob {blob_id} is damaged; removed it")
        self._remember(blob_id, data)
        return data

    def manifest(self, blob_id: str) -> Manifest | None:
        """The blob's manifest if this node knows it (complete or partial)."""
        known = self._manifests.get(blob_id)
        if known is not None:
            return known
        for path in (self.directory / f"{check_blob_id(blob_id)}.manifest", self._partial_dir(blob_id) / "manifest"):
            try:
                manifest = Manifest.from_bytes(path.read_bytes(), blob_id)
            except (FileNotFoundError, BlobCorrupt, ProtocolViolation):
                continue
            self._manifests[blob_id] = manifest
            return manifest
        return None

    def held(self, blob_id: str) -> set[int]:
        """Indices of the chunks this node can serve."""
        manifest = self.manifest(blob_id)
        if manifest is None:
            return set()
        if self.has(blob_id):
            return set(range(manifest.chunks))
        if blob_id not in self._partial:
            found = set()
            folder = self._partial_dir(blob_id)
            for path in folder.glob("*.chunk") if folder.exists() else ():
                if path.stem.isdigit() and int(path.stem) < manifest.chunks:
                    found.add(int(path.stem))
            self._partial[blob_id] = found
        return set(self._partial[blob_id])

    def read_chunk(self, blob_id: str, index: int) -> bytes | None:
        """A verified chunk, or None if this node does not hold it."""
        manifest = self.manifest(blob_id)
        if manifest is None or not 0 <= index < manifest.chunks:
            return None
        lo, hi = manifest.chunk_range(index)
        cached = self._cache.get(blob_id)
        if cached is not None:
            return cached[lo:hi]
        if self._blob_path(blob_id).exists():
            with open(self._blob_path(blob_id), "rb") as f:
                data = os.pread(f.fileno(), hi - lo, lo)
        else:
            try:
                data = (self._partial_dir(blob_id) / f"{index}.chunk").read_bytes()
            except FileNotFoundError:
                return None
        if not manifest.verify_chunk(index, data):
            log.warning("chunk %d of blob %s on disk is damaged; not serving it", index, blob_id)
            self._partial.get(blob_id, set()).discard(index)
            return None
        return data

    # ---- blobs being fetched ---------------------------------------------------------------

    def begin_partial(self, manifest: Manifest) -> None:
        blob_id = manifest.blob_id
        self._manifests[blob_id] = manifest
        folder = self._partial_dir(blob_id)
        if not (folder / "manifest").exists():
            atomic_write_bytes(folder / "manifest", manifest.to_bytes())

    def put_chunk(self, blob_id: str, index: int, data: bytes | memoryview) -> None:
        """Keep one chunk of a blob being fetched, after checking it against the manifest.

        Raises:
            BlobCorrupt: the chunk does not match its hash (nothing is written).
        """
        manifest = self.manifest(blob_id)
        if manifest is None or not 0 <= index < manifest.chunks or not manifest.verify_chunk(index, data):
            raise BlobCorrupt(f"chunk {index} of blob {blob_id} does not match its hash")
        folder = self._partial_dir(blob_id)
        fd, tmp = tempfile.mkstemp(prefix=f".{index}.", suffix=".tmp", dir=folder)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, folder / f"{index}.chunk")
        self.held(blob_id)
        self._partial[blob_id].add(index)
        self._verified.setdefault(blob_id, set()).add(index)

    def finish(self, blob_id: str) -> None:
        """Assemble a fully fetched blob into its final file (atomically) and drop the chunks."""
        manifest = self.manifest(blob_id)
        if manifest is None or self.held(blob_id) != set(range(manifest.chunks)):
            raise ValueError(f"blob {blob_id} is not complete")
        folder = self._partial_dir(blob_id)
        target = self._blob_path(blob_id)
        checked = self._verified.pop(blob_id, set())
        fd, tmp = tempfile.mkstemp(prefix=f".{blob_id[:16]}.", suffix=".tmp", dir=self.directory)
        try:
            with os.fdopen(fd, "wb") as f:
                for i in range(manifest.chunks):
                    data = (folder / f"{i}.chunk").read_bytes()
                    # Chunks written by this process were checked a moment before; those found
                    # on disk (an earlier run, maybe torn by a crash) are checked now.
                    if (i not in checked or len(data) != manifest.chunk_range(i)[1] - manifest.chunk_range(i)[0]) \
                            and not manifest.verify_chunk(i, data):
                        self._partial[blob_id].discard(i)
                        raise BlobCorrupt(f"chunk {i} of blob {blob_id} was damaged on disk")
                    f.write(data)
                f.flush()
                os.fsync(f.fileno())
            atomic_write_bytes(self.directory / f"{blob_id}.manifest", manifest.to_bytes())
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        self._partial.pop(blob_id, None)
        self._fresh.add(blob_id)

    # ---- memory ----------------------------------------------------------------------------

    def _remember(self, blob_id: str, data: bytes) -> None:
        if len(data) > self.memory_bytes or blob_id in self._cache:
            return
        self._cache[blob_id] = data
        self._cached_bytes += len(data)
        while self._cached_bytes > self.memory_bytes:
            _, old = self._cache.popitem(last=False)
            self._cached_bytes -= len(old)


def _link_or_copy(src: Path, dst: Path) -> None:
    """Put ``src`` at ``dst`` atomically: a hard link where possible, else a copy."""
    tmp = dst.with_name(f".{dst.name}.{secrets.token_hex(6)}.tmp")  # unique: two links at once must not meet
    try:
        os.link(src, tmp)
    except OSError:  # another file system, or no hard links there
        shutil.copyfile(src, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    os.replace(tmp, dst)
