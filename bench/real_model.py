"""A real model on real-shaped data through real daemons: llama-20m on a jsonl corpus (issue 17).

    python bench/real_model.py --json bench/results/real_model.json          # ~10 min on 2 cores
    python bench/real_model.py --quick                                        # ~4 min, smaller run

Everything is made here, nothing is downloaded:
1. a jsonl corpus of synthetic documents (a Zipfian vocabulary of pseudo-words with a first-order
   Markov chain between them, so there is structure beyond word frequencies to learn), and a
   BPE tokenizer trained on it with the `tokenizers` library;
2. its **unigram entropy** in nats per token (the loss of the best model that ignores context);
3. **throughput**: one daemon with 1 CPU worker against the same daemon with `--workers 2`
   (threads 1 each), tokens/s over the same steps, and the workers' peak RSS;
4. **DiLoCo between 2 real daemons** on loopback (tensor plane, run state, worker processes):
   the validation loss at the end, which must fall below the unigram entropy within the run.

Ratios are measured in this one run (the machine is shared): workers-2 / workers-1 tokens/s,
and final val loss / unigram entropy.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from hyphae.node.testing import DaemonProcess, process_memory_kib, sync_wait

PRESET = "llama-20m"


def write_corpus(root: Path, *, docs: int, seed: int) -> list[Path]:
    """Two jsonl files of synthetic documents; returns their paths."""
    rng = np.random.default_rng(seed)
    n_words = 3000
    letters = np.array(list("etaoinshrdlucmfwypvbgkjqxz"))
    weights = 1.0 / np.arange(1, 27) ** 0.8
    words = ["".join(rng.choice(letters, size=rng.integers(2, 9), p=weights / weights.sum())) for _ in range(n_words)]
    zipf = 1.0 / np.arange(1, n_words + 1) ** 1.1
    zipf /= zipf.sum()
    successors = rng.choice(n_words, size=(n_words, 6), p=zipf)  # each word is followed by one of 6
    root.mkdir(parents=True, exist_ok=True)
    paths = [root / f"part-{i}.jsonl" for i in range(2)]
    files = [p.open("w") for p in paths]
    try:
        for d in range(docs):
            word = int(rng.choice(n_words, p=zipf))
            out = []
            for _ in range(int(rng.integers(40, 200))):
                out.append(words[word])
                word = int(successors[word, rng.integers(0, 6)]) if rng.random() < 0.9 else int(rng.choice(n_words, p=zipf))
            text = " ".join(out).capitalize() + "."
            files[d % 2].write(json.dumps({"id": d, "text": text, "source": "synthetic"}) + "\n")
    finally:
        for f in files:
            f.close()
    return paths


def train_tokenizer(paths: list[Path], out: Path, vocab_size: int) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)

    def texts():
        for path in paths:
            with path.open() as f:
                for line in f:
                    yield json.loads(line)["text"]

    tok.train_from_iterator(texts(), trainer=trainer)
    tok.save(str(out))
    return out


def unigram_entropy(paths: list[Path], tokenizer: Path) -> tuple[float, int]:
    """Entropy (nats/token) of the corpus's token frequencies, documents joined by end-of-text."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer))
    eos = tok.token_to_id("<|endoftext|>")
    counts = np.zeros(tok.get_vocab_size(), dtype=np.int64)
    for path in paths:
        texts = [json.loads(line)["text"] for line in path.open()]
        for enc in tok.encode_batch(texts):
            counts += np.bincount(enc.ids, minlength=counts.size)
        counts[eos] += len(texts)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum()), int(counts.sum())


def config_toml(path: Path, *, data: Path, tokenizer: Path, max_steps: int, eval_every: int = 0,
                extra: str = "") -> Path:
    path.write_text(f"""
[training]
preset = "{PRESET}"
algorithm = "diloco"
data = "{data}"
tokenizer = "{tokenizer}"
batch_size = 4
seq_len = 128
log_every = 5
eval_every = {eval_every}
checkpoint_every = 0
max_steps = {max_steps}
{extra}
[training.algorithm_config]
inner_steps = 25
[training.algorithm_config.inner]
lr = 0.003
warmup_steps = 20
""")
    return path


def _training(d: DaemonProcess) -> dict[str, Any]:
    for attempt in range(10):
        try:
            return d.api("/api/v1/training")
        except (TimeoutError, ConnectionError):
            if attempt == 9:
                raise
            time.sleep(1)
    raise AssertionError("unreachable")


def _workers(d: DaemonProcess) -> list[int]:
    return [pid for pid in d.family() if pid != d.proc.pid]


def _stop(nodes: list[DaemonProcess]) -> None:
    for n in nodes:
        if n.proc is not None and n.proc.poll() is None:
            n.signal(signal.SIGTERM)
    for n in nodes:
        try:
            n.wait(30)
        except Exception:  # noqa: BLE001 - a stuck daemon is killed, the bench goes on
            n.kill_family()


def measure_throughput(work: Path, data: Path, tokenizer: Path, workers: int, steps: int) -> dict[str, Any]:
    """tokens/s of one daemon with `workers` CPU workers between step 10 and step `steps`."""
    cfg = config_toml(work / f"w{workers}.toml", data=data, tokenizer=tokenizer, max_steps=0,
                      extra=f"workers = {workers}\nthreads = 1")
    node = DaemonProcess(work / f"w{workers}", ["--config", str(cfg)], train=True).start()
    peak_kib = 0
    try:
        sync_wait(lambda: _training(node)["step"] >= 10, 600, f"{workers} worker(s) to reach step 10")
        t0, tok0 = time.perf_counter(), _training(node)["tokens"]
        last = {}

        def reached() -> bool:
            nonlocal peak_kib, last
            last = _training(node)
            peak_kib = max(peak_kib, sum(process_memory_kib(p).get("VmHWM", 0) for p in _workers(node)))
            return last["step"] >= steps

        sync_wait(reached, 1200, f"{workers} worker(s) to reach step {steps}", interval_s=0.5)
        elapsed = time.perf_counter() - t0
        return {"workers": workers, "tokens_per_s": (last["tokens"] - tok0) / elapsed,
                "steps": last["step"], "peak_rss_mib": peak_kib / 1024, "worker_pids": len(_workers(node))}
    finally:
        _stop([node])


def measure_diloco(work: Path, data: Path, tokenizer: Path, steps: int, eval_every: int) -> dict[str, Any]:
    cfg = config_toml(work / "diloco.toml", data=data, tokenizer=tokenizer, max_steps=0, eval_every=eval_every,
                      extra="threads = 1")
    args = ["--config", str(cfg), "--run", "bench-real-model"]
    nodes = [DaemonProcess(work / "d0", args, train=True).start()]
    nodes.append(DaemonProcess(work / "d1", [*args, "--bootstrap", nodes[0].multiaddr], train=True).start())
    try:
        t0 = time.perf_counter()
        sync_wait(lambda: all(_training(n)["step"] >= steps for n in nodes), 3600,
                  f"both daemons to reach step {steps}", interval_s=1.0)
        states = [_training(n) for n in nodes]
        return {
            "steps": steps, "wall_s": time.perf_counter() - t0,
            "evals": [s["evals"] for s in states],
            "outer_steps": [s["algorithm_state"].get("outer_steps") for s in states],
            "peers_last_outer": [s["algorithm_state"].get("peers") for s in states],
            "final_val_loss": [s["evals"][-1]["val_loss"] if s["evals"] else None for s in states],
        }
    finally:
        _stop(nodes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=Path("bench/results/real_model.json"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--docs", type=int, default=20000, help="synthetic documents in the corpus")
    parser.add_argument("--vocab", type=int, default=2048, help="BPE vocabulary size")
    parser.add_argument("--throughput-steps", type=int, default=40)
    parser.add_argument("--diloco-steps", type=int, default=150)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--quick", action="store_true", help="smaller corpus and shorter runs")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (printed)")
    args = parser.parse_args()
    if args.quick:
        args.docs, args.throughput_steps, args.diloco_steps, args.eval_every = 4000, 25, 100, 25
    work = Path(tempfile.mkdtemp(prefix="hyphae-real-model-"))
    try:
        t0 = time.perf_counter()
        paths = write_corpus(work / "corpus", docs=args.docs, seed=args.seed)
        tokenizer = train_tokenizer(paths, work / "tokenizer.json", args.vocab)
        entropy, n_tokens = unigram_entropy(paths, tokenizer)
        prep_s = time.perf_counter() - t0
        print(f"corpus: {args.docs} docs, {sum(p.stat().st_size for p in paths) / 1e6:.1f} MB, "
              f"{n_tokens} tokens; unigram entropy {entropy:.3f} nats/token ({prep_s:.0f} s)", flush=True)
        one = measure_throughput(work, work / "corpus", tokenizer, 1, args.throughput_steps)
        print(f"1 worker : {one['tokens_per_s']:.0f} tokens/s, peak RSS {one['peak_rss_mib']:.0f} MiB", flush=True)
        two = measure_throughput(work, work / "corpus", tokenizer, 2, args.throughput_steps)
        print(f"2 workers: {two['tokens_per_s']:.0f} tokens/s, peak RSS {two['peak_rss_mib']:.0f} MiB", flush=True)
        diloco = measure_diloco(work, work / "corpus", tokenizer, args.diloco_steps, args.eval_every)
        finals = [v for v in diloco["final_val_loss"] if v is not None]
        result = {
            "bench": "real_model", "device": "cpu", "machine": platform.node(), "cpus": os.cpu_count(),
            "python": sys.version.split()[0], "preset": PRESET, "seed": args.seed,
            "corpus": {"docs": args.docs, "tokens": n_tokens, "vocab": args.vocab,
                       "unigram_entropy_nats": entropy},
            "throughput": {"one_worker": one, "two_workers": two,
                           "ratio_two_vs_one": two["tokens_per_s"] / one["tokens_per_s"]},
            "diloco_two_daemons": diloco,
            "val_loss_over_unigram_entropy": max(finals) / entropy if finals else math.nan,
            "below_unigram_entropy": bool(finals) and max(finals) < entropy,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        curve = " ".join(f"{e['step']}:{e['val_loss']:.3f}" for e in diloco["evals"][0])
        print(f"throughput 2 workers / 1 worker = {result['throughput']['ratio_two_vs_one']:.2f}")
        print(f"DiLoCo, 2 daemons, {args.diloco_steps} steps in {diloco['wall_s']:.0f} s: val loss {curve}")
        print(f"final val loss {finals} vs unigram entropy {entropy:.3f}: "
              f"ratio {result['val_loss_over_unigram_entropy']:.3f} "
              f"({'below' if result['below_unigram_entropy'] else 'NOT below'})")
        print(f"wrote {args.json}")
    finally:
        if args.keep:
            print(f"work dir kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
