"""Training data that needs no download: corpora, per-peer batch streams, the validation set.

Sources (`DataConfig.source`):
- "stdlib" (default): the running interpreter's own standard library, every `*.py` file in path
  order, byte-level (token = byte, vocabulary 256);
- a text file or a directory of text files: byte-level, same rules;
- a `.bin` file or a directory of them: pre-tokenized uint16 shards (llm.c or nanoGPT layout).
`.jsonl` / `.parquet` data (and tokenized text) streams through `text_stream.open_text_data`.

Splits are fixed by the corpus, not by the peer: every 20th file (or the tail of a single file,
or shards named "*val*") is validation and never appears in training.

Streams: a `BatchStream` draws random windows; batch i of a stream is a pure function of
(seed, stream id, i), so a peer's data is reproducible, resumable from its position alone, and
different from every other peer's unless two peers are given the same stream id (the
"identical data" test oracles). `shard=(k, n)` additionally confines stream k to its own
1/n of the training tokens.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hyphae.training import _bin_shards, _corpus_files
from hyphae.training._config import check_choice, check_int, check_range, from_dict, to_dict

logger = logging.getLogger(__name__)

KINDS = ("auto", "stdlib", "text", "bin")


@dataclass(frozen=True, kw_only=True, slots=True)
class DataConfig:
    """Where the tokens come from and how they are split."""

    source: str = "stdlib"
    """"stdlib", or a path to a text file/directory or to `.bin` shard(s)."""

    kind: str = "auto"
    """"auto" (stdlib by name, bin if the path is/contains `.bin` files, else text), or force
    one of "stdlib", "text", "bin"."""

    cache_dir: str | None = None
    """Directory for the flattened byte corpus and the `.bin` shard index; None re-reads the
    files (~0.5 s for the stdlib) or scans every shard token on every start."""

    val_every: int = 20
    """File corpora: every `val_every`-th file is validation."""

    val_fraction: float = 0.05
    """Share of tokens held out when the file rule yields no validation data (one file, or
    shards without a "*val*" one)."""

    text_suffixes: tuple[str, ...] = ()
    """Text directories: keep only files ending in these (e.g. (".txt", ".md")); () keeps all."""

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source:
            raise ValueError(f"source must be 'stdlib' or a path, got {self.source!r}")
        check_choice("kind", self.kind, KINDS)
        check_int("val_every", self.val_every, minimum=2)
        check_range("val_fraction", self.val_fraction, 1e-6, 0.5)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DataConfig:
        return from_dict(cls, data)


@dataclass(frozen=True)
class Corpus:
    """A tokenized corpus split into training and validation segments.

    Attributes:
        train: training token segments (uint8 or uint16 arrays; windows never cross two).
        val: validation segments, disjoint from `train`.
        vocab_size: smallest vocabulary covering every token (256 for byte corpora).
        fingerprint: sha256 identifying the data; peers compare it to know they share a corpus
            (the stdlib differs between Python versions).
        description: human-readable origin, for logs.
    """

    train: tuple[np.ndarray, ...]
    val: tuple[np.ndarray, ...]
    vocab_size: int
    fingerprint: str
    description: str

    @property
    def train_tokens(self) -> int:
        return sum(int(s.size) for s in self.train)

    @property
    def val_tokens(self) -> int:
        return sum(int(s.size) for s in self.val)

    def check_vocab(self, model_vocab_size: int) -> None:
        """Raise ValueError if the corpus has token ids the model cannot embed."""
        if self.vocab_size > model_vocab_size:
            raise ValueError(
                f"corpus {self.description} uses token ids up to {self.vocab_size - 1} but the "
                f"model's vocab_size is {model_vocab_size}; build the model with "
                f"vocab_size >= {self.vocab_size}"
            )


def load_corpus(config: DataConfig, *, min_tokens: int = 2) -> Corpus:
    """Open the corpus `config` describes (fast: memory-mapped when cached).

    Args:
        config: the data source.
        min_tokens: every shard must hold at least this many tokens (use context_length + 1).

    Returns:
        The corpus with its train/val split.

    Raises:
        ValueError: missing path, empty corpus; `ShardError` (a ValueError) for bad shards.
    """
    start = time.perf_counter()
    kind = _resolve_kind(config)
    if kind == "bin":
        shards = _bin_shards.load_token_shards(
            Path(config.source), val_fraction=config.val_fraction, min_tokens=min_tokens,
            cache_dir=Path(config.cache_dir) if config.cache_dir else None,
        )
        corpus = Corpus(
            tuple(shards.train), tuple(shards.val), shards.max_token + 1, shards.fingerprint,
            f"bin:{config.source}",
        )
    else:
        root = _corpus_files.stdlib_root() if kind == "stdlib" else Path(config.source)
        suffixes = (".py",) if kind == "stdlib" else (config.text_suffixes or None)
        files = _corpus_files.list_files(root, suffixes)
        splits = _corpus_files.load_byte_splits(
            root, files, val_every=config.val_every, val_fraction=config.val_fraction,
            cache_dir=Path(config.cache_dir) if config.cache_dir else None,
        )
        corpus = Corpus((splits.train,), (splits.val,), 256, splits.fingerprint, f"{kind}:{root}")
    _check_sizes(corpus, min_tokens)
    logger.info(
        "opened corpus %s: %d train / %d val tokens in %.3f s",
        corpus.description, corpus.train_tokens, corpus.val_tokens, time.perf_counter() - start,
    )
    return corpus


def _resolve_kind(config: DataConfig) -> str:
    if config.kind == "stdlib" or (config.kind == "auto" and config.source == "stdlib"):
        return "stdlib"
    path = Path(config.source)
    if not path.exists():
        raise ValueError(f"data source {config.source!r} does not exist; use 'stdlib' or an existing path")
    if config.kind != "auto":
        return config.kind
    if path.suffix in (".jsonl", ".parquet") or (
        path.is_dir() and any(p.suffix in (".jsonl", ".parquet") for p in path.iterdir())
    ):  # read as raw bytes these would train on JSON syntax and parquet pages
        raise ValueError(
            f"data source {config.source!r} holds .jsonl/.parquet files; open it with "
            "hyphae.training.open_text_data (streamed and tokenized), or pass kind='text' for raw bytes"
        )
    if path.is_file():
        return "bin" if path.suffix == ".bin" else "text"
    return "bin" if any(p.suffix == ".bin" for p in path.iterdir()) else "text"


def _check_sizes(corpus: Corpus, min_tokens: int) -> None:
    for name, segments in (("training", corpus.train), ("validation", corpus.val)):
        if not any(s.size >= min_tokens for s in segments):
            raise ValueError(
                f"corpus {corpus.description}: the {name} split has no segment of >= "
                f"{min_tokens} tokens (one window); add data or shorten the context"
            )


def stream_key(seed: int, stream: int | str) -> int:
    """128-bit key of the data stream `stream` (peer index or peer id) under run seed `seed`.

    Ints and strings are hashed in separate domains, so peer index 3 and peer id "3" differ.
    """
    tag = f"i:{stream}" if isinstance(stream, int) else f"s:{stream}"
    digest = hashlib.blake2b(f"hyphae-data\0{seed}\0{tag}".encode(), digest_size=16).digest()
    return int.from_bytes(digest, "little")


class BatchStream:
    """An endless, resumable stream of (inputs, targets) batches of random windows.

    Args:
        segments: token segments to draw from (e.g. `corpus.train`).
        batch_size: sequences per batch.
        seq_len: tokens per sequence (<= the model's context_length).
        seed: the run's data seed.
        stream: this stream's id; give each peer its index or peer id. Equal ids => equal data.
        shard: (k, n) confines the stream to the k-th of n equal slices of window start
            positions (neighbouring slices share at most seq_len tokens at the border); None
            samples the whole split.

    Raises:
        ValueError: bad sizes, or no segment long enough for one window.
    """

    def __init__(
        self,
        segments: tuple[np.ndarray, ...] | list[np.ndarray],
        *,
        batch_size: int,
        seq_len: int,
        seed: int,
        stream: int | str = 0,
        shard: tuple[int, int] | None = None,
    ) -> None:
        check_int("batch_size", batch_size, minimum=1)
        check_int("seq_len", seq_len, minimum=1)
        self.batch_size, self.seq_len = batch_size, seq_len
        self.key = stream_key(seed, stream)
        self.position = 0
        self._segments = [s for s in segments if s.size >= seq_len + 1]
        if not self._segments:
            raise ValueError(f"no segment holds one window of {seq_len + 1} tokens; shorten seq_len")
        starts = np.array([s.size - seq_len for s in self._segments], dtype=np.int64)
        self._cum = np.concatenate([[0], np.cumsum(starts)])
        self._lo, self._hi = _shard_range(int(self._cum[-1]), shard)
        self.shard = shard

    def reshard(self, shard: tuple[int, int] | None) -> None:
        """Confine the stream to another slice from the next batch on (the members' shares were
        reassigned); the position is kept, so batch i stays a pure function of (key, i, shard).

        Raises:
            ValueError: a malformed or empty shard (the stream is left as it was).
        """
        self._lo, self._hi = _shard_range(int(self._cum[-1]), shard)
        self.shard = shard

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch: int64 tensors (batch_size, seq_len); targets are inputs shifted by one."""
        batch = self.batch_at(self.position)
        self.position += 1
        return batch

    def batch_at(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch number `index` of this stream, without moving the position."""
        rng = np.random.Generator(np.random.Philox(key=self.key, counter=index << 128))
        starts = rng.integers(self._lo, self._hi, size=self.batch_size)
        seg = np.searchsorted(self._cum, starts, side="right") - 1
        local = starts - self._cum[seg]
        n = self.seq_len + 1
        rows = np.stack([self._segments[s][o : o + n] for s, o in zip(seg, local)]).astype(np.int64)
        tokens = torch.from_numpy(rows)
        return tokens[:, :-1], tokens[:, 1:]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next()

    def state_dict(self) -> dict[str, int]:
        """Position (batches drawn) and stream key, for checkpoints."""
        return {"position": self.position, "key_low": self.key & (2**63 - 1)}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Resume at a saved position.

        Raises:
            ValueError: the state belongs to another stream (different seed or stream id).
        """
        if int(state["key_low"]) != self.key & (2**63 - 1):
            raise ValueError(
                "checkpointed data position belongs to a different stream (seed or stream id "
                "changed); resume with the same seed and stream id or start a fresh stream"
            )
        self.position = int(state["position"])


def _shard_range(total: int, shard: tuple[int, int] | None) -> tuple[int, int]:
    if shard is None:
        return 0, total
    k, n = shard
    if not (isinstance(k, int) and isinstance(n, int) and 0 <= k < n):
        raise ValueError(f"shard must be (k, n) with 0 <= k < n, got {shard!r}")
    lo, hi = total * k // n, total * (k + 1) // n
    if hi <= lo:
        raise ValueError(f"shard {shard} of {total} window starts is empty; use fewer shards")
    return lo, hi


def validation_batches(
    segments: tuple[np.ndarray, ...] | list[np.ndarray],
    *,
    batch_size: int,
    seq_len: int,
    n_batches: int,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed validation set: `n_batches` batches of windows spread evenly over `segments`.

    The same arguments give the same batches on every peer and every call, so validation
    losses are comparable across peers and over time.
    """
    stream = BatchStream(segments, batch_size=batch_size, seq_len=seq_len, seed=0)
    count = batch_size * n_batches
    starts = np.linspace(0, int(stream._cum[-1]) - 1, count).astype(np.int64)
    seg = np.searchsorted(stream._cum, starts, side="right") - 1
    local = starts - stream._cum[seg]
    n = seq_len + 1
    rows = np.stack([stream._segments[s][o : o + n] for s, o in zip(seg, local)]).astype(np.int64)
    tokens = torch.from_numpy(rows).view(n_batches, batch_size, n)
    return [(b[:, :-1], b[:, 1:]) for b in tokens]
