"""User text files as a sequence of records, read in small pieces from any saved position.

A source is a file, a directory (searched recursively for `.txt`, `.jsonl`, `.parquet`; hidden
entries skipped) or a glob. Files are taken in sorted path order. A file given by name that is
neither `.jsonl` nor `.parquet` is read as text.

Records (the unit of sharding, of the validation split, and of document separators):
- `.jsonl`: one line; its `text_field` string is the document. A line that is not JSON, is not
  an object, lacks the field, holds a non-string or exceeds 16 MiB is a bad record (text None);
  blank lines are bad records too, so every line keeps its number;
- `.parquet`: one row of the `text_field` column (a null is a bad record); the file is read one
  row group at a time through `ParquetFile.iter_batches`;
- `.txt`: a piece of at most 64 KiB cut after the last blank line in it, else after the last
  newline, else at a UTF-8 character boundary. A small file is one record, a big one a series
  of paragraph-aligned records. Bytes that are not UTF-8 decode as U+FFFD.

A record's position (`offset`) is a byte offset (txt, jsonl) or a row number (parquet), so a
reader restarted at a saved offset yields exactly the records that followed it.
"""

from __future__ import annotations

import glob as _glob
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

SUFFIXES = (".txt", ".jsonl", ".parquet")
TXT_RECORD_BYTES = 1 << 16
MAX_LINE_BYTES = 1 << 24
_PARQUET_BATCH_ROWS = 1024


@dataclass(frozen=True, slots=True)
class SourceFile:
    """One input file: its path, its name relative to the source (for fingerprints) and format."""

    path: Path
    name: str
    kind: str
    """"txt", "jsonl" or "parquet"."""
    size_bytes: int


@dataclass(frozen=True, slots=True)
class Record:
    """One record of a file: its number in the file, where it starts, and its text (None: bad)."""

    index: int
    offset: int
    text: str | None


def _kind(path: Path) -> str:
    suffix = path.suffix.lower()
    return {".jsonl": "jsonl", ".parquet": "parquet"}.get(suffix, "txt")


def list_sources(source: str) -> list[SourceFile]:
    """The input files of `source` (a file, a directory or a glob), in sorted path order.

    Raises:
        ValueError: nothing exists at `source`, or it holds no .txt/.jsonl/.parquet file.
    """
    if any(ch in source for ch in "*?["):
        paths = sorted(Path(p) for p in _glob.glob(source, recursive=True) if Path(p).is_file())
        root = Path(os.path.commonpath([str(p.parent) for p in paths])) if paths else Path(".")
    else:
        root = Path(source)
        if root.is_file():
            paths = [root]
            root = root.parent
        elif root.is_dir():
            paths = _walk(root)
        else:
            raise ValueError(f"data source {source!r} does not exist; give a file, a directory or a glob")
    if not paths:
        raise ValueError(
            f"data source {source!r} holds no {'/'.join(SUFFIXES)} files; point it at text data"
        )
    return [SourceFile(p, p.relative_to(root).as_posix(), _kind(p), p.stat().st_size) for p in paths]


def _walk(root: Path) -> list[Path]:
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(SUFFIXES):
                path = Path(dirpath) / name
                found.append((path.relative_to(root).as_posix(), path))
    found.sort()
    return [p for _, p in found]


def read_records(
    src: SourceFile, *, offset: int, index: int, text_field: str, keep: Callable[[int], bool]
) -> Iterator[Record]:
    """The records of `src` from `offset` (record number `index`) on, only those `keep` accepts.

    Records `keep` rejects are stepped over without being decoded, so a member reading 1/n of
    the corpus parses only that share.

    Raises:
        ValueError: a parquet file has no `text_field` column.
    """
    if src.kind == "jsonl":
        return _jsonl(src.path, offset, index, text_field, keep)
    if src.kind == "parquet":
        return _parquet(src.path, offset, text_field, keep)
    return _txt(src.path, offset, index, keep)


def _jsonl(path: Path, offset: int, index: int, field: str, keep: Callable[[int], bool]) -> Iterator[Record]:
    with path.open("rb") as f:
        f.seek(offset)
        while True:
            start = offset
            line = f.readline(MAX_LINE_BYTES)
            if not line:
                return
            offset += len(line)
            too_long = len(line) == MAX_LINE_BYTES and not line.endswith(b"\n")
            unfinished = too_long
            while unfinished:  # step over the rest of an oversized line without holding it
                rest = f.readline(MAX_LINE_BYTES)
                offset += len(rest)
                unfinished = bool(rest) and not rest.endswith(b"\n")
            if keep(index):
                yield Record(index, start, None if too_long else _json_text(line, field))
            index += 1


def _json_text(line: bytes, field: str) -> str | None:
    try:
        obj = json.loads(line)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError both derive from ValueError
        return None
    value = obj.get(field) if isinstance(obj, dict) else None
    return value if isinstance(value, str) else None


def _txt(path: Path, offset: int, index: int, keep: Callable[[int], bool]) -> Iterator[Record]:
    with path.open("rb") as f:
        while True:
            f.seek(offset)
            data = f.read(TXT_RECORD_BYTES)
            if not data:
                return
            if len(data) == TXT_RECORD_BYTES:
                data = data[: _txt_cut(data)]
            if keep(index):
                yield Record(index, offset, data.decode("utf-8", errors="replace"))
            offset += len(data)
            index += 1


def _txt_cut(data: bytes) -> int:
    """Where a full 64 KiB piece ends: after a blank line, a newline, or a whole UTF-8 character."""
    for sep in (b"\n\n", b"\n"):
        at = data.rfind(sep)
        if at > 0:
            return at + len(sep)
    cut = len(data)
    while cut > len(data) - 4 and (data[cut - 1] & 0xC0) == 0x80:  # inside a multi-byte char
        cut -= 1
    if cut > 0 and data[cut - 1] >= 0xC0:  # a lead byte whose continuation was cut off
        cut -= 1
    return cut if cut > 0 else len(data)


def _parquet(path: Path, row: int, field: str, keep: Callable[[int], bool]) -> Iterator[Record]:
    import pyarrow.parquet as pq  # lazy: pyarrow costs ~0.2 s to import

    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if field not in names:
        raise ValueError(f"{path} has no column {field!r} (columns: {names}); set text_field to the text column")
    first_group, group_start = 0, 0
    meta = pf.metadata
    while first_group < meta.num_row_groups and group_start + meta.row_group(first_group).num_rows <= row:
        group_start += meta.row_group(first_group).num_rows
        first_group += 1
    if first_group >= meta.num_row_groups:
        return
    index = group_start
    groups = list(range(first_group, meta.num_row_groups))
    for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, row_groups=groups, columns=[field]):
        for value in batch.column(0).to_pylist():
            if index >= row and keep(index):
                yield Record(index, index, value if isinstance(value, str) else None)
            index += 1
