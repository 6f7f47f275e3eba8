"""Kernel throughput as a fraction of a plain copy of the same bytes (issue 9).

Each hyphae.kernels op is timed on one device and compared with `dst.copy_(src)` of a buffer
moving the same number of bytes (read + write), measured in the same run. ratio_vs_copy = 1.0
means the op runs at copy bandwidth; the targets are >= 0.5 for the fused ZO update on the
CPU reference path and >= 0.8 on a GPU (Triton path).

    python bench/kernels.py                               # CPU (or CUDA if present), defaults
    python bench/kernels.py --device cpu --numel 33554432 --seeds 8 --json bench/results/kernels.json
    python bench/kernels.py --device cpu --threads 1          # one core: steadier on a shared box
    python bench/kernels.py --device cuda --numel 268435456   # on a GPU machine (Triton path)

Bytes counted per op (n elements, fp32 unless noted): rademacher writes 4n; zo_apply reads and
writes theta once whatever the number of seeds (8n, 4n for bf16); quantize reads 4n and writes
codes + scales; dequantize the reverse; quantize_ef_ also writes the residual back; the NoLoCo
step moves 7 fp32 streams (phi, delta, Dbar, phibar in; delta, phi, theta out) and DiLoCo 6.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from hyphae.kernels import (
    dequantize,
    diloco_outer_,
    noloco_outer_,
    quantize,
    quantize_ef_,
    rademacher,
    triton_available,
    zo_apply_,
)
from hyphae.kernels._triton import use_triton

TARGET_ZO = {"cpu": 0.5, "cuda": 0.8}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--numel", type=int, default=None, help="elements per tensor (default 2**25 CPU, 2**28 GPU)")
    p.add_argument("--seeds", type=int, default=8, help="(seed, coef) pairs in the batched ZO apply")
    p.add_argument("--repeats", type=int, default=7, help="timed runs per op (each next to a copy run)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per op (compiles Triton)")
    p.add_argument("--seed", type=int, default=0, help="torch.manual_seed for the data")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--json", type=Path, default=Path("bench/results/kernels.json"), help="result file")
    return p.parse_args()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def p90(xs: list[float]) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(0.9 * (len(s) - 1)))]


class Bench:
    """Times each op interleaved with a copy of the same bytes, so both see the same machine.

    On a shared machine the load drifts during a run; alternating op and baseline runs (rather
    than timing the baseline once) keeps the ratio honest.
    """

    def __init__(self, device: str, warmup: int, repeats: int) -> None:
        self.device, self.warmup, self.repeats = device, warmup, repeats
        self.results: dict[str, dict[str, float]] = {}
        self._copy_bufs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _copy_fn(self, nbytes: int) -> Callable[[], object]:
        """A copy of nbytes/2 bytes: nbytes move in all, half read and half written."""
        if nbytes not in self._copy_bufs:
            self._copy_bufs.clear()  # keep one pair alive: these can be GBs
            src = torch.ones(nbytes // 2, dtype=torch.uint8, device=self.device)
            self._copy_bufs[nbytes] = (src, torch.empty_like(src))
        src, dst = self._copy_bufs[nbytes]
        return lambda: dst.copy_(src)

    def _once(self, fn: Callable[[], object]) -> float:
        sync(self.device)
        t0 = time.perf_counter()
        fn()
        sync(self.device)
        return (time.perf_counter() - t0) * 1e3

    def run(self, name: str, fn: Callable[[], object], nbytes: int) -> None:
        copy = self._copy_fn(nbytes)
        for _ in range(self.warmup):
            fn()
            copy()
        ms, copy_ms = [], []
        for _ in range(self.repeats):
            copy_ms.append(self._once(copy))
            ms.append(self._once(fn))
        med, cmed = statistics.median(ms), statistics.median(copy_ms)
        self.results[name] = {
            "median_ms": med,
            "p90_ms": p90(ms),
            "min_ms": min(ms),
            "bytes_moved": nbytes,
            "gb_per_s": nbytes / med / 1e6,
            "copy_median_ms": cmed,
            "copy_p90_ms": p90(copy_ms),
            "copy_gb_per_s": nbytes / cmed / 1e6,
            "ratio_vs_copy": cmed / med,
        }
        r = self.results[name]
        print(f"  {name:<18} {med:9.2f} ms  p90 {r['p90_ms']:9.2f}  {r['gb_per_s']:7.1f} GB/s  "
              f"copy {cmed:8.2f} ms  ratio {r['ratio_vs_copy']:.2f}", flush=True)


def bench_zo(b: Bench, n: int, k: int) -> None:
    theta = [torch.randn(n, device=b.device)]
    half = [theta[0].bfloat16()]
    z = torch.empty(n, device=b.device)
    seeds, coefs = list(range(100, 100 + k)), [1e-3 * (-1) ** i for i in range(k)]
    b.run("rademacher_f32", partial(rademacher, 7, n, out=z), 4 * n)
    b.run("zo_apply_1_f32", partial(zo_apply_, theta, [7], [1e-3]), 8 * n)
    b.run(f"zo_apply_{k}_f32", partial(zo_apply_, theta, seeds, coefs), 8 * n)
    b.run("zo_apply_1_bf16", partial(zo_apply_, half, [7], [1e-3]), 4 * n)


def bench_quant(b: Bench, n: int) -> None:
    x = torch.randn(n, device=b.device)
    out = torch.empty_like(x)
    for bits, bs in ((8, 256), (4, 64)):
        code_bytes = n if bits == 8 else n // 2
        scale_bytes = 4 * (n // bs)
        b.run(f"quantize_int{bits}", partial(quantize, x, bits=bits), 4 * n + code_bytes + scale_bytes)
        q = quantize(x, bits=bits)
        b.run(f"dequantize_int{bits}", partial(dequantize, q, out=out), code_bytes + scale_bytes + 4 * n)
    b.run("quantize_ef_int8", partial(quantize_ef_, x, bits=8), 8 * n + n + 4 * (n // 256))


def bench_outer(b: Bench, n: int) -> None:
    def t(scale: float = 1.0) -> list[torch.Tensor]:
        return [torch.randn(n, device=b.device) * scale]

    phi, delta, dbar, phibar, theta = t(), t(1e-2), t(1e-2), t(), t()
    b.run("noloco_outer", partial(noloco_outer_, phi, delta, dbar, phibar, theta), 28 * n)
    b.run("diloco_outer", partial(diloco_outer_, phi, delta, dbar, theta), 24 * n)


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} torch threads)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} torch threads)"


def main() -> int:
    args = parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch sees no CUDA device", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.numel or (1 << 28 if args.device == "cuda" else 1 << 25)
    path = "triton" if use_triton(torch.empty(0, device=args.device)) else "reference"
    if args.device == "cuda" and not triton_available():
        print("triton is not importable: skipping the Triton kernels; timing the torch reference on CUDA")
    print(f"kernels bench: {device_name(args.device)}, path={path}, numel={n}, seeds={args.seeds}, "
          f"repeats={args.repeats}")
    b = Bench(args.device, args.warmup, args.repeats)
    bench_zo(b, n, args.seeds)
    bench_quant(b, n)
    bench_outer(b, n)
    target = TARGET_ZO[args.device]
    zo_ratio = b.results["zo_apply_1_f32"]["ratio_vs_copy"]
    result = {
        "bench": "kernels",
        "device": device_name(args.device),
        "device_kind": args.device,
        "path": path,
        "torch": torch.__version__,
        "triton": _triton_version(),
        "params": {"numel": n, "seeds": args.seeds, "repeats": args.repeats, "warmup": args.warmup,
                   "seed": args.seed, "torch_threads": torch.get_num_threads()},
        "results": b.results,
        "target": {"op": "zo_apply_1_f32", "ratio_vs_copy_min": target, "ratio_vs_copy": zo_ratio,
                   "met": zo_ratio >= target},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"fused ZO update: {zo_ratio:.2f} x copy bandwidth (target >= {target}: "
          f"{'met' if zo_ratio >= target else 'NOT met'}); wrote {args.json}")
    return 0


def _triton_version() -> str | None:
    if not triton_available():
        return None
    import triton

    return triton.__version__


if __name__ == "__main__":
    sys.exit(main())
