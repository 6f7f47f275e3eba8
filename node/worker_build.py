"""What a worker trains, built from its :class:`~.ipc.Setup`: the model, the tokenizer, the data.

The model is a preset (GPT or Llama, seeded init: identical on every peer) or a local Hugging
Face directory (its architecture and weights). The tokenizer is the one named, else the model
directory's ``tokenizer.json``, else bytes; a preset's vocabulary is sized to the tokenizer.

Data (first match wins):

- none: the Python standard library's sources, byte-level (the built-in corpus);
- ``.bin`` shards: pre-tokenized, memory-mapped;
- ``.jsonl`` / ``.parquet`` files, a glob, or any text with a tokenizer: streamed and tokenized as
  read, never loaded whole (:mod:`hyphae.training.text_stream`), with this member's own shard of
  the documents;
- other text files read as bytes (a ``.txt`` file, a directory of ``.md``): the byte-level file
  corpus, as before (memory-mapped from the data dir's cache).

A member's shard is ``(k, n)``: its place in the run's shard table (:mod:`.data_shards`, kept in
the run state by the lowest live member), times the node's local workers. A ``BatchStream``
corpus (built-in, bytes, ``.bin``) follows the table while it trains (:class:`~.data_shards.
ShardKeeper`: a member that goes has its windows spread over the others, a joiner gets its own),
so no two live members read the same window under one table. A text stream's checkpointed
position belongs to its shard, so its shard is the table's when it first trained on this data,
kept in ``DATA_DIR/data-shard.json`` for restarts; it changes only with a fresh data dir.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Awaitable, Callable
from typing import Any

import torch
from torch import nn

from hyphae.training import (
    BatchStream,
    DataConfig,
    build_model,
    load_corpus,
    model_config,
    validation_batches,
)
from hyphae.training.hf import load_hf_model
from hyphae.training.text_stream import is_text_source, open_text_data
from hyphae.training.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer

from . import ipc

__all__ = ["Built", "build", "data_id", "fit_vocab", "model_label"]

log = logging.getLogger(__name__)

EVAL_BATCHES = 8
VOCAB_MULTIPLE = 64
"""A preset's vocabulary is rounded up to this multiple when a tokenizer widens it (fast matmuls)."""
SHARD_FILE = "data-shard.json"


@dataclass
class Built:
    """The pieces the worker's loop runs on."""

    model: nn.Module
    batches: Any
    """A `BatchStream` or a `TextStream`: `next()`, `state_dict()`, `load_state_dict()`."""
    val: list[tuple[torch.Tensor, torch.Tensor]]
    tokenizer: Tokenizer | None
    """None for the built-in and `.bin` corpora (their tokens need no tokenizer)."""


def model_label(setup: ipc.Setup) -> str:
    """What peers compare to know they train the same model: the preset, or ``hf:<dir name>``."""
    return f"hf:{Path(setup.model_dir).name}" if setup.model_dir else setup.preset


def fit_vocab(tokenizer_vocab: int) -> int:
    """The vocabulary a preset gets for a tokenizer: its size rounded up to a multiple of 64
    (a preset counts 32000 tokens; a 2048-token BPE would otherwise train 30000 dead rows)."""
    return -(-tokenizer_vocab // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


async def build(setup: ipc.Setup, *, member_shard: Callable[[], Awaitable[tuple[int, int]]],
                share_int: Callable[[int], int] = lambda value: value,
                local_rank: int = 0, local_world: int = 1) -> Built:
    """Build the model and the data streams this worker trains on.

    Args:
        setup: what the daemon asked for.
        member_shard: this member's (k, n) in the run's shard table (:func:`.data_shards.
            member_shard`); called by local rank 0 only (a text stream: on the first start of
            this data dir only).
        share_int: rank 0's value on every local worker (a collective: every rank calls it).
        local_rank, local_world: this worker's place among the node's workers.

    Raises:
        ValueError: an invalid combination (the message says what to change).
    """
    tokenizer = _tokenizer(setup)
    model = _model(setup, tokenizer)
    vocab = model.config.vocab_size
    if tokenizer is not None and tokenizer.vocab_size > vocab:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model {model_label(setup)} "
                         f"embeds {vocab}; use the model's own tokenizer")
    seq_len = min(setup.seq_len, model.config.context_length)
    if _streamed(setup, tokenizer):
        shard = await _shard(setup, member_shard, share_int, local_rank, local_world, saved=True)
        batches, val = _open_text(setup, tokenizer or ByteTokenizer(), seq_len, shard)
        return Built(model, batches, val, tokenizer or batches.tokenizer)
    corpus = load_corpus(DataConfig(source=data_id(setup), cache_dir=setup.cache_dir), min_tokens=seq_len + 1)
    corpus.check_vocab(vocab)
    shard = await _shard(setup, member_shard, share_int, local_rank, local_world, saved=False)
    stream = setup.peer_id if local_world == 1 else f"{setup.peer_id}/{local_rank}"
    try:
        batches = BatchStream(corpus.train, batch_size=setup.batch_size, seq_len=seq_len, seed=setup.seed,
                              stream=stream, shard=shard)
    except ValueError:  # more members than windows: share the whole corpus (or fail below, for good)
        log.warning("the corpus has too few windows for shard %d/%d; reading all of it", *shard)
        batches = BatchStream(corpus.train, batch_size=setup.batch_size, seq_len=seq_len, seed=setup.seed,
                              stream=stream)
    val = validation_batches(corpus.val, batch_size=setup.batch_size, seq_len=seq_len, n_batches=EVAL_BATCHES)
    return Built(model, batches, val, None)


def _open_text(setup: ipc.Setup, tokenizer: Tokenizer, seq_len: int, shard: tuple[int, int]) -> tuple[Any, list]:
    """The streamed data, with as many validation batches (up to EVAL_BATCHES) as the held-out
    documents fill: a small corpus still trains, with a smaller validation set."""
    n = EVAL_BATCHES
    while True:
        try:
            return open_text_data(setup.data, tokenizer=tokenizer, batch_size=setup.batch_size, seq_len=seq_len,
                                  seed=setup.seed, shard=shard, text_field=setup.text_field, val_batches=n)
        except ValueError as exc:
            if n == 1 or "validation" not in str(exc):
                raise
            n //= 2
            log.info("the held-out documents fill fewer than %d validation batches; trying %d", n * 2, n)


def _tokenizer(setup: ipc.Setup) -> Tokenizer | None:
    if setup.tokenizer:
        return load_tokenizer(setup.tokenizer)
    if setup.model_dir and (Path(setup.model_dir) / "tokenizer.json").is_file():
        return load_tokenizer(setup.model_dir)
    return None


def _model(setup: ipc.Setup, tokenizer: Tokenizer | None) -> nn.Module:
    if setup.model_dir:
        model, _ = load_hf_model(setup.model_dir, device=setup.device)
        if setup.activation_checkpointing:
            model.config = model.config.replace(activation_checkpointing=True)
        model.train()
        log.info("loaded %s (%.1fM parameters) from %s", model_label(setup),
                 sum(p.numel() for p in model.parameters()) / 1e6, setup.model_dir)
    else:
        base = model_config(setup.preset)
        vocab = fit_vocab(tokenizer.vocab_size) if tokenizer is not None else base.vocab_size
        config = base.replace(vocab_size=vocab, activation_checkpointing=setup.activation_checkpointing)
        model = build_model(config, seed=setup.seed, device=setup.device)  # identical init on every peer
    if setup.compile:
        model.compile()  # in place: parameter names (what peers exchange) stay the same
    return model


def _streamed(setup: ipc.Setup, tokenizer: Tokenizer | None) -> bool:
    if not setup.data:
        if tokenizer is not None:
            raise ValueError("the built-in corpus is byte-level and cannot be re-tokenized; give --data "
                             "(.txt/.jsonl/.parquet files) to train with a tokenizer")
        return False
    if Path(setup.data).suffix == ".bin" or (Path(setup.data).is_dir() and any(Path(setup.data).glob("*.bin"))):
        if tokenizer is not None:
            raise ValueError(f"{setup.data} holds pre-tokenized .bin shards; drop --tokenizer for them")
        return False
    # Plain text read as bytes keeps the file corpus (its split holds out the tail of a lone
    # file, which a small corpus needs); a tokenizer, a glob or jsonl/parquet records stream.
    return tokenizer is not None or is_text_source(setup.data)


def data_id(setup: ipc.Setup) -> str:
    """What the run's shard table is keyed by: the data path as configured, or "stdlib"."""
    return setup.data or "stdlib"


async def _shard(setup: ipc.Setup, member_shard: Callable[[], Awaitable[tuple[int, int]]],
                 share_int: Callable[[int], int], local_rank: int, local_world: int, *, saved: bool) -> tuple[int, int]:
    """(k, n) of this worker: its member's place in the shard table (with `saved`, the one kept
    across restarts) times its local rank."""
    k = n = 0
    if local_rank == 0:
        path = Path(setup.checkpoint_dir).parent / SHARD_FILE
        kept = _saved_member_shard(path, setup.data) if saved else None
        if kept is None:
            kept = await member_shard()
            if saved:
                _save_member_shard(path, setup.data, kept)
        k, n = kept
    k, n = share_int(k), share_int(n)
    log.info("reading data shard %d/%d (member %d of %d, local worker %d of %d)",
             k * local_world + local_rank, n * local_world, k, n, local_rank, local_world)
    return k * local_world + local_rank, n * local_world


def _saved_member_shard(path: Path, data: str) -> tuple[int, int] | None:
    try:
        saved = json.loads(path.read_text())
        k, n = int(saved["member"][0]), int(saved["member"][1])
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None
    return (k, n) if saved.get("data") == data and 0 <= k < n else None


def _save_member_shard(path: Path, data: str, member: tuple[int, int]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"data": data, "member": list(member)}))
    os.replace(tmp, path)
