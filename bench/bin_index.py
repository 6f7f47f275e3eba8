"""Opening a folder of `.bin` shards with the cached index vs scanning every token (issue 21, item 3).

    python bench/bin_index.py --tokens 200000000 --shards 8 --repeats 5 --json bench/results/bin_index.json

Writes `--shards` llm.c shards of random uint16 tokens (fixed seed, `--tokens` in all) to a temp
folder, reads them once untimed (so both sides read from the page cache, not the disk), then
times `load_corpus` the old way (no cache_dir: the largest token id is found by scanning every
token on each start) and with the index cached in `cache_dir` (built by one untimed first load).
Reports the median and p90 of each and the ratio scan / cached, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from hyphae.training import DataConfig, load_corpus
from hyphae.training._bin_shards import LLMC_MAGIC


def write_shards(root: Path, tokens: int, shards: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    per = tokens // shards
    for i in range(shards):
        header = np.zeros(256, dtype="<i4")
        header[:3] = (LLMC_MAGIC, 1, per)
        name = f"data_{'val' if i == shards - 1 else 'train'}_{i:03d}.bin"
        with (root / name).open("wb") as f:
            f.write(header.tobytes())
            f.write(rng.integers(0, 50257, per, dtype=np.uint16).astype("<u2").tobytes())


def timed(config: DataConfig, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        load_corpus(config, min_tokens=1025)
        out.append(time.perf_counter() - start)
    return out


def summary(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {"median_s": statistics.median(ordered), "p90_s": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=200_000_000)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=Path("bench/results/bin_index.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root, cache = Path(tmp) / "shards", Path(tmp) / "cache"
        root.mkdir()
        write_shards(root, args.tokens, args.shards, args.seed)
        scan = DataConfig(source=str(root))
        cached = DataConfig(source=str(root), cache_dir=str(cache))
        load_corpus(scan, min_tokens=1025)  # warm-up: the page cache holds the shards
        load_corpus(cached, min_tokens=1025)  # builds the index
        scan_times, cached_times = [], []
        for _ in range(args.repeats):  # interleaved, so both see the same machine load
            scan_times += timed(scan, 1)
            cached_times += timed(cached, 1)
    result = {
        "bench": "bin_index", "device": "cpu", "tokens": args.tokens, "shards": args.shards,
        "bytes": 2 * args.tokens, "repeats": args.repeats,
        "scan": summary(scan_times), "cached": summary(cached_times),
    }
    result["speedup_scan_over_cached"] = result["scan"]["median_s"] / result["cached"]["median_s"]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(f"{args.shards} .bin shards, {args.tokens / 1e6:.0f}M tokens ({2 * args.tokens / 1e6:.0f} MB): "
          f"scan every start {result['scan']['median_s'] * 1e3:.1f} ms (p90 {result['scan']['p90_s'] * 1e3:.1f}), "
          f"cached index {result['cached']['median_s'] * 1e3:.1f} ms (p90 {result['cached']['p90_s'] * 1e3:.1f}): "
          f"{result['speedup_scan_over_cached']:.1f}x  -> {args.json}")


if __name__ == "__main__":
    main()
