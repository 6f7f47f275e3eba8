"""Pre-tokenized `.bin` shards of uint16 tokens, memory-mapped, validated before use.

Two layouts are accepted:
- llm.c: a 1024-byte header of 256 little-endian int32 (magic 20240520, version 1, token
  count), then `count` uint16 tokens; the file size must be exactly 1024 + 2 * count.
- raw (nanoGPT's `train.bin`/`val.bin`): uint16 tokens and nothing else; the size must be even.

A file whose first int32 is the llm.c magic is read as llm.c (and must be valid); anything else
is raw. Validation split: shards whose file name contains "val" are validation, the others
training; without such a shard the last `val_fraction` of the training tokens are held out.

Index: the one pass over every token (the largest token id, which sizes the vocabulary check) and
the shard's digest (first and last MiB) are made once per shard and kept in
``<cache_dir>/bin-index.json`` under its resolved path, size and mtime, so a restart opens a folder
of shards in the time of reading their headers. A
shard rewritten in place gets a new size or mtime and is scanned again; an unreadable index is
rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

LLMC_MAGIC = 20240520
LLMC_VERSION = 1
LLMC_HEADER_BYTES = 256 * 4
INDEX_FILE = "bin-index.json"
_INDEX_VERSION = 1

logger = logging.getLogger(__name__)


class ShardError(ValueError):
    """A `.bin` shard is malformed; the message names the file, what is wrong and the fix."""


@dataclass(frozen=True)
class TokenShards:
    """Training and validation segments of uint16 tokens (windows never cross a segment)."""

    train: list[np.ndarray]
    val: list[np.ndarray]
    max_token: int
    fingerprint: str


def read_shard(path: Path) -> np.ndarray:
    """Memory-map one shard and return its tokens (uint16), after checking its layout.

    Raises:
        ShardError: empty file, odd size, bad llm.c header (version, count vs size).
    """
    size = path.stat().st_size
    if size == 0:
        raise ShardError(f"{path}: empty .bin shard; remove it or regenerate it")
    head = np.fromfile(path, dtype="<i4", count=min(3, size // 4))
    if head.size >= 1 and int(head[0]) == LLMC_MAGIC:
        return _open_llmc(path, size, head)
    if size % 2:
        raise ShardError(
            f"{path}: {size} bytes is not a whole number of uint16 tokens and there is no llm.c "
            f"header (magic {LLMC_MAGIC}); regenerate the shard as uint16 tokens"
        )
    return np.memmap(path, dtype="<u2", mode="r")


def _open_llmc(path: Path, size: int, head: np.ndarray) -> np.ndarray:
    if size < LLMC_HEADER_BYTES or head.size < 3:
        raise ShardError(
            f"{path}: llm.c magic present but the file ({size} bytes) is shorter than the "
            f"{LLMC_HEADER_BYTES}-byte header; the shard is truncated, regenerate it"
        )
    version, count = int(head[1]), int(head[2])
    if version != LLMC_VERSION:
        raise ShardError(
            f"{path}: llm.c header version {version} is not supported (expected "
            f"{LLMC_VERSION}, uint16 tokens); regenerate the shard with version {LLMC_VERSION}"
        )
    expected = LLMC_HEADER_BYTES + 2 * count
    if count <= 0 or size != expected:
        raise ShardError(
            f"{path}: header says {count} tokens, i.e. {expected} bytes, but the file has "
            f"{size} bytes; the shard is truncated or corrupt, regenerate it"
        )
    return np.memmap(path, dtype="<u2", mode="r", offset=LLMC_HEADER_BYTES, shape=(count,))


def find_shards(source: Path) -> list[Path]:
    """The `.bin` files of `source` (a file, or a directory searched non-recursively), sorted.

    Raises:
        ShardError: a directory without any `.bin` file.
    """
    if source.is_file():
        return [source]
    shards = sorted(p for p in source.iterdir() if p.suffix == ".bin" and p.is_file())
    if not shards:
        raise ShardError(f"{source}: no .bin shards in this directory; point at a file or a folder of .bin files")
    return shards


def load_token_shards(source: Path, *, val_fraction: float, min_tokens: int,
                      cache_dir: Path | None = None) -> TokenShards:
    """Open every shard of `source` and split it into training and validation segments.

    Args:
        source: a `.bin` file or a directory of them.
        val_fraction: share of training tokens held out when no shard is named "*val*".
        min_tokens: shortest usable segment (sequence length + 1); shorter shards are an error.
        cache_dir: where the shard index is kept (None: every token is scanned each time).

    Raises:
        ShardError: any malformed or too-short shard.
    """
    paths = find_shards(source)
    segments = {p: read_shard(p) for p in paths}
    for path, tokens in segments.items():
        if tokens.size < min_tokens:
            raise ShardError(
                f"{path}: {tokens.size} tokens is shorter than one training window "
                f"({min_tokens} tokens); use a shorter context or a bigger shard"
            )
    val = [t for p, t in segments.items() if "val" in p.name]
    train = [t for p, t in segments.items() if "val" not in p.name]
    if not train:
        raise ShardError(f"{source}: every shard is a validation shard (name contains 'val'); add training shards")
    if not val:
        train, val = _hold_out_tail(train, val_fraction, min_tokens, source)
    index = shard_index(segments, cache_dir)
    max_token = max(m for m, _ in index.values())
    return TokenShards(train, val, max_token, _fingerprint(paths, {p: d for p, (_, d) in index.items()}))


def shard_index(segments: dict[Path, np.ndarray], cache_dir: Path | None) -> dict[Path, tuple[int, str]]:
    """(largest token id, content digest) of each shard, from the index in `cache_dir` where it
    is current; the others are scanned (and the index updated)."""
    index_path = cache_dir / INDEX_FILE if cache_dir is not None else None
    index = _read_index(index_path) if index_path is not None else {}
    out: dict[Path, tuple[int, str]] = {}
    changed = False
    for path, tokens in segments.items():
        key, stamp = str(path.resolve()), _stamp(path)
        entry = index.get(key)
        if (isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("max_token"), int)
                and isinstance(entry.get("digest"), str)):
            out[path] = (entry["max_token"], entry["digest"])
            continue
        out[path] = (int(tokens.max()), _shard_digest(path))
        index[key] = {"stamp": stamp, "max_token": out[path][0], "digest": out[path][1]}
        changed = True
    if changed and index_path is not None:
        _write_index(index_path, index)
    return out


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _read_index(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != _INDEX_VERSION or not isinstance(data.get("shards"), dict):
        return {}
    return data["shards"]


def _write_index(path: Path, shards: dict[str, object]) -> None:
    """Best effort: a cache that cannot be written only costs the scan next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": _INDEX_VERSION, "shards": shards}))
        os.replace(tmp, path)
    except OSError as exc:
        logger.warning("could not write the .bin shard index %s (%s); shards are scanned on each start", path, exc)


def _hold_out_tail(
    train: list[np.ndarray], val_fraction: float, min_tokens: int, source: Path
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Cut the last `val_fraction` of the last shard(s) off as validation."""
    total = sum(t.size for t in train)
    want = max(min_tokens, int(total * val_fraction))
    last = train[-1]
    if last.size - want < min_tokens:
        raise ShardError(
            f"{source}: cannot hold out {want} validation tokens from the last shard "
            f"({last.size} tokens) and keep a training window; add a shard named '*val*.bin'"
        )
    return train[:-1] + [last[: last.size - want]], [last[last.size - want :]]


def _shard_digest(path: Path) -> str:
    """Cheap identity of one shard: its size and the first and last MiB (sha256)."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(f"{size}\0".encode())
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()


def _fingerprint(paths: list[Path], digests: dict[Path, str]) -> str:
    """Identity of the shard set: each shard's name and `_shard_digest`, in order."""
    h = hashlib.sha256()
    for path in paths:
        h.update(f"{path.name}\0{digests[path]}\0".encode())
    return h.hexdigest()
