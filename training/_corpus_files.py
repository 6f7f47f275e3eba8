"""Byte-level corpora made of files: the Python standard library and text directories.

A corpus of files is split by file, deterministically: in path order, every `val_every`-th file
(index % val_every == val_every - 1) is validation, the rest is training, so no file (and no
window) is ever in both. A corpus with fewer than `val_every` files (a single text file, say)
falls back to the last `val_fraction` of its bytes.

Reading the stdlib (~1800 files, ~31 MB) costs ~0.5 s cold; with a cache directory the two
splits are written once as flat byte files and later opened with `np.memmap` in milliseconds.
The cache key covers every file's path, size and mtime, so an edited corpus is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

_CACHE_VERSION = 1
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


@dataclass(frozen=True)
class ByteSplits:
    """The two splits of a byte corpus (uint8 arrays, possibly memory-mapped)."""

    train: np.ndarray
    val: np.ndarray
    fingerprint: str
    """sha256 over the file list and contents: peers compare it to know they read the same data."""


def stdlib_root() -> Path:
    """The running interpreter's standard library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def list_files(root: Path, suffixes: tuple[str, ...] | None) -> list[Path]:
    """Regular files under `root` (or `root` itself), sorted by relative POSIX path.

    Skips hidden entries, `__pycache__` and installed packages (`site-packages`), which are not
    part of the stdlib and differ between machines.

    Args:
        root: a file or a directory.
        suffixes: keep only names ending in one of these (e.g. (".py",)); None keeps all.
    """
    if root.is_file():
        return [root]
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(".")]
        for name in filenames:
            if name.startswith(".") or (suffixes and not name.endswith(suffixes)):
                continue
            path = Path(dirpath) / name
            if path.is_file():
                found.append((path.relative_to(root).as_posix(), path))
    found.sort()
    return [p for _, p in found]


def load_byte_splits(
    root: Path,
    files: list[Path],
    *,
    val_every: int,
    val_fraction: float,
    cache_dir: Path | None,
) -> ByteSplits:
    """Read (or open from cache) the train/val byte splits of `files`.

    Raises:
        ValueError: no files, or the corpus is empty.
    """
    if not files:
        raise ValueError(f"no input files found under {root}; point the data source at text files")
    if cache_dir is None:
        return _build(root, files, val_every=val_every, val_fraction=val_fraction)
    key = _cache_key(root, files, val_every, val_fraction)
    entry = Path(cache_dir) / f"corpus-{key[:20]}"
    cached = _open_cached(entry)
    if cached is not None:
        return cached
    splits = _build(root, files, val_every=val_every, val_fraction=val_fraction)
    _write_cache(entry, splits)
    logger.info("cached corpus of %d files under %s", len(files), entry)
    return _open_cached(entry) or splits


def _build(root: Path, files: list[Path], *, val_every: int, val_fraction: float) -> ByteSplits:
    digest = hashlib.sha256()
    train_parts: list[bytes] = []
    val_parts: list[bytes] = []
    for i, path in enumerate(files):
        data = path.read_bytes()
        rel = path.relative_to(root).as_posix() if path != root else path.name
        digest.update(f"{rel}\0{len(data)}\0".encode())
        digest.update(data)
        (val_parts if i % val_every == val_every - 1 else train_parts).append(data)
    if not val_parts:  # too few files to hold one out: hold out the tail instead
        whole = b"".join(train_parts)
        cut = len(whole) - max(1, int(len(whole) * val_fraction))
        train_parts, val_parts = [whole[:cut]], [whole[cut:]]
    train = np.frombuffer(b"".join(train_parts), dtype=np.uint8)
    val = np.frombuffer(b"".join(val_parts), dtype=np.uint8)
    if train.size == 0:
        raise ValueError(f"corpus under {root} is empty ({len(files)} files, 0 bytes)")
    return ByteSplits(train, val, digest.hexdigest())


def _cache_key(root: Path, files: list[Path], val_every: int, val_fraction: float) -> str:
    h = hashlib.sha256(f"v{_CACHE_VERSION}\0{root}\0{val_every}\0{val_fraction}\0".encode())
    for path in files:
        st = path.stat()
        h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()


def _open_cached(entry: Path) -> ByteSplits | None:
    meta_path = entry / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        arrays = []
        for split in ("train", "val"):
            path = entry / f"{split}.u8"
            if path.stat().st_size != meta[f"{split}_bytes"]:
                raise ValueError(f"{path} has the wrong size")
            arrays.append(_memmap(path))
        return ByteSplits(arrays[0], arrays[1], meta["fingerprint"])
    except (OSError, ValueError, KeyError) as exc:
        logger.warning("ignoring broken corpus cache %s (%s); rebuilding", entry, exc)
        return None


def _memmap(path: Path) -> np.ndarray:
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r")


def _write_cache(entry: Path, splits: ByteSplits) -> None:
    """Write the splits into a temp dir and rename it into place (atomic for readers)."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=entry.name + ".tmp-", dir=entry.parent))
    for split, array in (("train", splits.train), ("val", splits.val)):
        (tmp / f"{split}.u8").write_bytes(array.tobytes())
    meta = {
        "train_bytes": int(splits.train.size),
        "val_bytes": int(splits.val.size),
        "fingerprint": splits.fingerprint,
    }
    (tmp / "meta.json").write_text(json.dumps(meta))
    try:
        os.rename(tmp, entry)
    except OSError:  # another process won the race; its copy is as good as ours
        for child in tmp.iterdir():
            child.unlink()
        tmp.rmdir()
