"""User text (.txt / .jsonl / .parquet) tokenized as a stream, sharded, split and resumable exactly.

    tokenizer = load_tokenizer("models/gpt2")          # or None: bytes
    batches, val = open_text_data("corpus/*.jsonl", tokenizer=tokenizer, batch_size=8,
                                  seq_len=1024, seed=0, shard=(rank, world))
    x, y = batches.next()                               # int64 (8, 1024); y is x shifted by one

Memory stays bounded: records (see `_text_sources`) are read a piece at a time and tokenized
about 1 MiB of text per `encode_batch` call; only unconsumed tokens are held.

Rules, all fixed by the corpus and never by the member:
- record number r = (file number in sorted path order) + (record number within the file);
- validation: r % val_every == val_every - 1 (1 record in 100 by default). Every member builds
  the same validation set from the first such records; they never reach a training stream;
- sharding: the training records are numbered t = r - (r + 1) // val_every, and stream k of n
  takes those with t % n == k: disjoint, covering, and balanced within every file. Each member
  reads every file but decodes and tokenizes only its own records;
- packing: each document's tokens are followed by the tokenizer's eos (or preceded by its bos
  when it has no eos; with neither, documents are concatenated), then cut into windows of
  seq_len + 1 tokens with stride seq_len, so every token is a target exactly once;
- epochs: after the last file the stream starts again at the first (in a new seed-dependent
  file order when shuffle_files is on) and counts the epoch.

Exact resume: `state_dict()` holds the record holding the next unread token (file, offset,
record number), how many of that record's tokens are already used, and the one token that
overlaps two windows: a few plain ints. Loading it re-reads and re-tokenizes that record, so the
next batch is exactly the one an uninterrupted stream would have drawn.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from hyphae.training._config import check_int
from hyphae.training._text_sources import Record, SourceFile, list_sources, read_records
from hyphae.training.tokenizer import ByteTokenizer, Tokenizer

logger = logging.getLogger(__name__)

_STATE_VERSION = 1
_CHUNK_CHARS = 1 << 20
"""Most text gathered per `encode_batch` call (at least 64 KiB or 4 batches' worth): enough to
amortize the call, little enough to bound memory and the re-read after a resume."""
_CHUNK_RECORDS = 4096

Cursor = tuple[int, int, int, int]
"""(epoch, position in the epoch's file order, offset in the file, record number in the file)."""

Batch = tuple[torch.Tensor, torch.Tensor]


class TextStream:
    """An endless, resumable stream of packed (inputs, targets) batches of tokenized text.

    Duck-type compatible with `BatchStream` (`next`, `batch_size`, `seq_len`, `position`,
    `state_dict`, `load_state_dict`), so the training loop and its checkpoints take either.

    Args:
        source: a file, a directory or a glob (see `_text_sources`), or its listed files.
        tokenizer: text to ids; None is `ByteTokenizer()`.
        batch_size: sequences per batch.
        seq_len: tokens per sequence.
        seed: orders the files of each epoch when `shuffle_files` (otherwise unused).
        shard: (k, n): this stream reads the k-th of n disjoint shares of the training
            records; None reads them all.
        text_field: the jsonl key / parquet column holding the text.
        val_every: every val_every-th record is validation (see the module docstring).
        shuffle_files: visit the files in a new order each epoch (a function of seed and epoch)
            instead of sorted path order; which records are validation or in a shard is unchanged.
        split: "train", or "val" for the validation records (one pass, no epochs; used by
            `text_validation_batches`).

    Raises:
        ValueError: bad sizes or shard, no input files; on reading, a shard without records.
    """

    def __init__(
        self,
        source: str | Sequence[SourceFile],
        *,
        tokenizer: Tokenizer | None = None,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        shard: tuple[int, int] | None = None,
        text_field: str = "text",
        val_every: int = 100,
        shuffle_files: bool = False,
        split: str = "train",
    ) -> None:
        check_int("batch_size", batch_size, minimum=1)
        check_int("seq_len", seq_len, minimum=1)
        check_int("val_every", val_every, minimum=2)
        check_int("seed", seed, minimum=0)
        k, n = shard if shard is not None else (0, 1)
        if not (isinstance(k, int) and isinstance(n, int) and 0 <= k < n):
            raise ValueError(f"shard must be (k, n) with 0 <= k < n, got {shard!r}")
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if not isinstance(text_field, str) or not text_field:
            raise ValueError(f"text_field must be a non-empty string, got {text_field!r}")
        self._files = list_sources(source) if isinstance(source, str) else list(source)
        if not self._files:
            raise ValueError("no input files; give a file, a directory or a glob of text data")
        self.tokenizer = tokenizer if tokenizer is not None else ByteTokenizer()
        self.batch_size, self.seq_len, self.vocab_size = batch_size, seq_len, self.tokenizer.vocab_size
        self._seed, self._k, self._n, self._val_every = seed, k, n, val_every
        self._text_field, self._shuffle, self._split = text_field, shuffle_files, split
        self._fingerprint = self._config_fingerprint()
        self.position = 0
        self._restart((0, 0, 0, 0), skip=0, prev=-1, bad=0)

    # -- the duck type of BatchStream --------------------------------------------------------

    def next(self) -> Batch:
        """The next batch: int64 tensors (batch_size, seq_len); targets are inputs shifted by one."""
        need = self.batch_size * self.seq_len + (1 if self._prev < 0 else 0)
        self._fill(need)
        if self._prev < 0:
            self._prev = int(self._buf[self._pos])
            self._pos += 1
        take = self.batch_size * self.seq_len
        seg = np.empty(take + 1, dtype=np.int64)
        seg[0] = self._prev
        seg[1:] = self._buf[self._pos : self._pos + take]
        self._pos += take
        self._prev = int(seg[-1])
        rows = np.lib.stride_tricks.sliding_window_view(seg, self.seq_len + 1)[:: self.seq_len]
        tokens = torch.from_numpy(rows.copy())  # the window view is read-only
        self.position += 1
        return tokens[:, :-1], tokens[:, 1:]

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next()

    @property
    def epoch(self) -> int:
        """Passes over the corpus completed before the next unread token."""
        return self._cursor_skip()[0][0]

    @property
    def bad_records(self) -> int:
        """Records skipped so far (not JSON, no text field, null...) before the next unread token."""
        return self._cursor_skip()[2]

    def state_dict(self) -> dict[str, Any]:
        """The exact data position (plain ints and strings), for checkpoints."""
        (epoch, order_pos, offset, record), skip, bad = self._cursor_skip()
        return {
            "version": _STATE_VERSION, "source": self._fingerprint, "position": self.position,
            "epoch": epoch, "file": order_pos, "offset": offset, "record": record, "skip": skip,
            "prev": self._prev, "bad_records": bad, **self._readable_config(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume at a saved position: the next batch is the one the saved stream would have drawn.

        Raises:
            ValueError: the state is malformed or belongs to another source, tokenizer, shard or
                batch shape (the message names what differs when it can).
        """
        keys = ("version", "source", "position", "epoch", "file", "offset", "record", "skip", "prev", "bad_records")
        missing = [key for key in keys if key not in state]
        if missing:
            raise ValueError(f"data state lacks {missing}; it is not a TextStream state (a BatchStream's?)")
        if state["version"] != _STATE_VERSION:
            raise ValueError(f"data state version {state['version']} is not {_STATE_VERSION}; start a fresh stream")
        if state["source"] != self._fingerprint:
            changed = [f"{key}: saved {state.get(key)!r}, now {value!r}"
                       for key, value in self._readable_config().items() if state.get(key) != value]
            raise ValueError(
                "checkpointed data position belongs to another data configuration ("
                + ("; ".join(changed) if changed else "the input files, their sizes or text_field differ")
                + "); resume with the same data and settings or start a fresh stream"
            )
        values = [state[key] for key in keys[2:]]
        if any(isinstance(v, bool) or not isinstance(v, int) for v in values):
            raise ValueError(f"data state holds a non-integer position: {dict(state)}")
        position, epoch, order_pos, offset, record, skip, prev, bad = values
        if min(position, epoch, order_pos, offset, record, skip, bad) < 0 or prev < -1:
            raise ValueError(f"data state holds a negative position (out of range): {dict(state)}")
        if order_pos >= len(self._files) or prev >= self.vocab_size:
            raise ValueError(f"data state file {order_pos} / token {prev} is out of range for this corpus")
        self.position = position
        self._restart((epoch, order_pos, offset, record), skip=skip, prev=prev, bad=bad)

    # -- reading and tokenizing --------------------------------------------------------------

    def _restart(self, cursor: Cursor, *, skip: int, prev: int, bad: int) -> None:
        self._start, self._start_skip, self._start_bad = cursor, skip, bad
        self._reader = self._records(cursor)
        self._buf = np.zeros(0, dtype=np.int32)
        self._pos = skip
        self._prev = prev
        self._bad = bad
        self._starts: list[int] = []  # where each buffered record's tokens begin in _buf
        self._cursors: list[Cursor] = []
        self._bad_before: list[int] = []
        self._last_text_epoch = cursor[0]
        self._warned = False

    def _cursor_skip(self) -> tuple[Cursor, int, int]:
        """The record holding the next unread token, how many of its tokens are used, bad count."""
        if not self._starts:
            return self._start, self._start_skip, self._start_bad
        i = max(0, bisect.bisect_right(self._starts, self._pos) - 1)
        return self._cursors[i], self._pos - self._starts[i], self._bad_before[i]

    def _fill(self, need: int) -> None:
        """Tokenize records until at least `need` unread tokens are buffered."""
        while self._buf.size - self._pos < need:
            self._compact()
            texts: list[str] = []
            chars, target = 0, min(_CHUNK_CHARS, max(1 << 16, 4 * need))  # a token is >= 1 char mostly
            while chars < target and len(texts) < _CHUNK_RECORDS:
                cursor, record = self._pull()
                if cursor is None:
                    break
                self._cursors.append(cursor)
                self._bad_before.append(self._bad)
                texts.append(record.text)
                chars += len(record.text)
            if not texts:
                raise ValueError(
                    f"the validation records of {len(self._files)} file(s) hold too few tokens for "
                    f"the validation set; lower val_every ({self._val_every}) or val_batches"
                )
            self._append(texts)

    def _append(self, texts: list[str]) -> None:
        eos, bos = self.tokenizer.eos_id, self.tokenizer.bos_id
        parts = [self._buf]
        size = self._buf.size
        for ids in self.tokenizer.encode_arrays(texts):
            self._starts.append(size)
            if eos is not None:
                ids = np.append(ids, np.int32(eos))
            elif bos is not None:
                ids = np.insert(ids, 0, np.int32(bos))
            parts.append(ids)
            size += ids.size
        self._buf = np.concatenate(parts).astype(np.int32, copy=False)

    def _compact(self) -> None:
        """Drop the tokens (and records) wholly before the next unread token."""
        if not self._starts:
            return
        i = max(0, bisect.bisect_right(self._starts, self._pos) - 1)
        cut = self._starts[i]
        self._buf = self._buf[cut:].copy()
        self._pos -= cut
        self._starts = [s - cut for s in self._starts[i:]]
        del self._cursors[:i], self._bad_before[:i]

    def _pull(self) -> tuple[Cursor | None, Record]:
        """The next record with text; (None, _) at the end of the validation pass."""
        for cursor, record in self._reader:
            if record.text is None:
                self._bad += 1
                if not self._warned:
                    self._warned = True
                    logger.warning(
                        "skipping record %d of %s (not JSON, no string %r field, or null); further "
                        "bad records are only counted (bad_records)",
                        record.index, self._files[self._order(cursor[0])[cursor[1]]].path, self._text_field,
                    )
            elif record.text or self.tokenizer.eos_id is not None or self.tokenizer.bos_id is not None:
                self._last_text_epoch = cursor[0]
                return cursor, record
            if cursor[0] - self._last_text_epoch >= 2:
                raise ValueError(
                    f"a whole pass over {len(self._files)} file(s) gave shard {self._k}/{self._n} no "
                    f"text ({self._bad} bad records); check text_field ({self._text_field!r}) and the data"
                )
        return None, Record(0, 0, "")

    def _records(self, start: Cursor) -> Iterator[tuple[Cursor, Record]]:
        epoch, order_pos, offset, index = start
        while True:
            order = self._order(epoch)
            whole_pass, found = order_pos == offset == index == 0, 0
            for pos in range(order_pos, len(order)):
                file_no = order[pos]
                keep = self._keeper(file_no)
                records = read_records(
                    self._files[file_no], offset=offset, index=index, text_field=self._text_field, keep=keep
                )
                for record in records:
                    found += 1
                    yield (epoch, pos, record.offset, record.index), record
                offset = index = 0
            if whole_pass and not found:
                what = "validation" if self._split == "val" else f"shard {self._k}/{self._n}"
                raise ValueError(
                    f"{len(self._files)} file(s) hold no {what} records (record r is validation when "
                    f"r % {self._val_every} == {self._val_every - 1}); add data, lower val_every or use fewer shards"
                )
            if self._split == "val":
                return
            epoch, order_pos = epoch + 1, 0

    def _keeper(self, file_no: int) -> Callable[[int], bool]:
        """Whether record `index` of file `file_no` belongs to this stream (the split and shard rule)."""
        every, k, n, val = self._val_every, self._k, self._n, self._split == "val"

        def keep(index: int) -> bool:
            r = file_no + index
            if r % every == every - 1:
                return val
            return not val and (r - (r + 1) // every) % n == k

        return keep

    def _order(self, epoch: int) -> list[int]:
        if not self._shuffle or len(self._files) < 2:
            return list(range(len(self._files)))
        digest = hashlib.blake2b(f"hyphae-text-files\0{self._seed}\0{epoch}".encode(), digest_size=16).digest()
        rng = np.random.Generator(np.random.Philox(key=int.from_bytes(digest, "little")))
        return [int(i) for i in rng.permutation(len(self._files))]

    def _readable_config(self) -> dict[str, Any]:
        return {
            "seq_len": self.seq_len, "batch_size": self.batch_size, "shard": f"{self._k}/{self._n}",
            "tokenizer": self.tokenizer.fingerprint, "n_files": len(self._files), "split": self._split,
            "val_every": self._val_every, "shuffle_seed": self._seed if self._shuffle else -1,
        }

    def _config_fingerprint(self) -> str:
        files = [[f.name, f.kind, f.size_bytes] for f in self._files]
        text = json.dumps({"files": files, "text_field": self._text_field, **self._readable_config()})
        return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def text_validation_batches(
    source: str | Sequence[SourceFile],
    *,
    tokenizer: Tokenizer | None = None,
    batch_size: int,
    seq_len: int,
    n_batches: int,
    text_field: str = "text",
    val_every: int = 100,
) -> list[Batch]:
    """A fixed validation set: the first `n_batches` batches packed from the validation records.

    Reads only as far as it needs, in sorted path order, independent of seed and shard, so every
    member gets the same batches.

    Raises:
        ValueError: the validation records hold fewer tokens than n_batches batches need.
    """
    check_int("n_batches", n_batches, minimum=0)
    stream = TextStream(
        source, tokenizer=tokenizer, batch_size=batch_size, seq_len=seq_len, text_field=text_field,
        val_every=val_every, split="val",
    )
    return [stream.next() for _ in range(n_batches)]


def open_text_data(
    source: str,
    *,
    tokenizer: Tokenizer | None = None,
    batch_size: int,
    seq_len: int,
    seed: int = 0,
    shard: tuple[int, int] | None = None,
    text_field: str = "text",
    val_batches: int = 8,
    val_every: int = 100,
    shuffle_files: bool = False,
) -> tuple[TextStream, list[Batch]]:
    """This member's training stream and the shared validation set of a text source.

    Args:
        source: a file, a directory or a glob of .txt / .jsonl / .parquet files.
        tokenizer: see `load_tokenizer`; None is byte-level.
        batch_size, seq_len: the batch shape.
        seed: orders files per epoch when shuffle_files.
        shard: (k, n) for member k of n (by rank, or by the sorted position of its peer id).
        text_field: jsonl key / parquet column of the text.
        val_batches: size of the validation set (0: none).
        val_every: every val_every-th record is held out for validation.
        shuffle_files: see `TextStream`.

    Returns:
        (train_stream, val_set).

    Raises:
        ValueError: no files, bad sizes, a shard or a validation split without data.
    """
    files = list_sources(source)
    train = TextStream(
        files, tokenizer=tokenizer, batch_size=batch_size, seq_len=seq_len, seed=seed, shard=shard,
        text_field=text_field, val_every=val_every, shuffle_files=shuffle_files,
    )
    val = text_validation_batches(
        files, tokenizer=train.tokenizer, batch_size=batch_size, seq_len=seq_len, n_batches=val_batches,
        text_field=text_field, val_every=val_every,
    ) if val_batches else []
    logger.info(
        "text data %s: %d file(s), tokenizer %s, shard %d/%d, %d validation batches",
        source, len(files), train.tokenizer.fingerprint, train._k, train._n, len(val),
    )
    return train, val


def is_text_source(source: str) -> bool:
    """Whether `source` needs `open_text_data` rather than `load_corpus`: a glob, or .jsonl/.parquet data."""
    if any(ch in source for ch in "*?["):
        return True
    try:
        files = list_sources(source)
    except ValueError:
        return False
    return any(f.kind != "txt" for f in files)
