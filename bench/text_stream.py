"""Throughput of the streamed text data (issue 17): tokens/s for byte-level and BPE tokenizers.

    python bench/text_stream.py --size-mb 50 --json /tmp/text_stream.json

Generates a jsonl corpus of random words (fixed seed) and a small BPE tokenizer trained on it
(nothing downloaded), then times `TextStream.next()` over the corpus. Baselines measured in the
same run: for bytes, `BatchStream` drawing windows from the same tokens already in memory; for
BPE, `tokenizers` encoding the same texts already in memory (`encode_batch_fast`), so the ratio is
what reading, parsing, sharding and packing cost on top of the tokenizer itself.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from hyphae.training import BatchStream, ByteTokenizer, TextStream, load_tokenizer


def make_corpus(path: Path, size_mb: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    words = ["".join(map(chr, rng.integers(97, 123, rng.integers(2, 9)))) for _ in range(5000)]
    texts: list[str] = []
    written = 0
    with path.open("w") as f:
        while written < size_mb * 1_000_000:
            text = " ".join(rng.choice(words, rng.integers(50, 400)))
            line = json.dumps({"text": text}) + "\n"
            f.write(line)
            written += len(line)
            texts.append(text)
    return texts


def train_bpe(texts: list[str], path: Path, vocab_size: int) -> None:
    tok = RawTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts[:2000], trainer)
    tok.save(str(path))


def time_stream(make, max_tokens: int) -> float:
    """Tokens/s of one pass drawing up to max_tokens from a fresh stream (after one warm-up batch)."""
    stream = make()
    x, _ = stream.next()
    start, tokens = time.perf_counter(), 0
    while tokens < max_tokens:
        x, _ = stream.next()
        tokens += x.numel()
    return tokens / (time.perf_counter() - start)


def time_raw_bpe(tok_path: Path, texts: list[str], max_tokens: int) -> float:
    tok = RawTokenizer.from_file(str(tok_path))
    start, tokens, i = time.perf_counter(), 0, 0
    while tokens < max_tokens and i < len(texts):
        batch = texts[i : i + 512]
        tokens += sum(len(e.ids) for e in tok.encode_batch_fast(batch, add_special_tokens=False))
        i += 512
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bpe-tokens", type=int, default=3_000_000, help="tokens per timed BPE pass")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        corpus, tok_path = Path(tmp) / "corpus.jsonl", Path(tmp) / "tokenizer.json"
        texts = make_corpus(corpus, args.size_mb, args.seed)
        train_bpe(texts, tok_path, args.vocab_size)
        bpe = load_tokenizer(tok_path)
        shape = {"batch_size": args.batch_size, "seq_len": args.seq_len}
        byte_tokens = int(corpus.stat().st_size * 0.8)  # about one pass, minus the JSON syntax
        in_memory = np.frombuffer("\0".join(texts).encode(), dtype=np.uint8)
        runs = {
            "bytes_stream": lambda: time_stream(lambda: TextStream(str(corpus), tokenizer=ByteTokenizer(), **shape), byte_tokens),
            "bytes_in_memory_baseline": lambda: time_stream(lambda: BatchStream([in_memory], seed=0, **shape), byte_tokens),
            "bpe_stream": lambda: time_stream(lambda: TextStream(str(corpus), tokenizer=bpe, **shape), args.bpe_tokens),
            "bpe_tokenizer_baseline": lambda: time_raw_bpe(tok_path, texts, args.bpe_tokens),
        }
        results = {name: [run() for _ in range(args.repeats)] for name, run in runs.items()}
    summary = {f"{name}_tokens_per_s_median": statistics.median(v) for name, v in results.items()}
    summary |= {f"{name}_tokens_per_s_p90": float(np.percentile(v, 90)) for name, v in results.items()}
    summary["bytes_ratio_stream_vs_in_memory"] = (
        summary["bytes_stream_tokens_per_s_median"] / summary["bytes_in_memory_baseline_tokens_per_s_median"])
    summary["bpe_ratio_stream_vs_tokenizer"] = (
        summary["bpe_stream_tokens_per_s_median"] / summary["bpe_tokenizer_baseline_tokens_per_s_median"])
    out = {"device": "cpu", "params": vars(args) | {"json": str(args.json)}, **summary}
    for name in runs:
        print(f"{name:26s} {summary[f'{name}_tokens_per_s_median'] / 1e6:7.2f} Mtok/s (median of {args.repeats})")
    print(f"bytes: stream / in-memory = {summary['bytes_ratio_stream_vs_in_memory']:.2f}; "
          f"bpe: stream / tokenizer alone = {summary['bpe_ratio_stream_vs_tokenizer']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
