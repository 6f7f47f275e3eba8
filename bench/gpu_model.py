"""Real-model GPU check (issue 17): our loop against a bare torch loop, and 1B memory.

    python bench/gpu_model.py --json bench/results/gpu_model.json               # on a CUDA GPU
    python bench/gpu_model.py --preset llama-20m --steps 3 --memory-preset llama-20m   # CPU smoke

1. Throughput: `--preset` (llama-125m) in bf16 autocast, the same model, data and AdamW settings
   in (a) a bare torch loop (forward, backward, clip, step, zero_grad) and (b) hyphae's
   `training.train` loop with DiLoCo (one peer, in memory). Timed between `cuda.synchronize()`
   calls after a warm-up; tokens/s, MFU (6·N·tokens/s over the GPU's dense bf16 peak) and the
   ratio (b)/(a) — the goal is >= 0.9.
2. Memory: `--memory-preset` (llama-1b) trained a few DiLoCo steps with the outer state
   (φ + Nesterov momentum, fp32) on the CPU; peak GPU memory must stay under 24 GB.
Rotations alternate (a) and (b) so drift on a shared machine hits both alike.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from hyphae.training import (
    AdamWConfig,
    DiLoCo,
    DiLoCoConfig,
    LoopConfig,
    SimNetwork,
    build_adamw,
    build_model,
    model_config,
    train,
)
from hyphae.training.optim import clip_grad_norm

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.0}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Tokens:
    """Random token batches made once on the device (both loops read the same ones)."""

    def __init__(self, vocab: int, batch: int, seq: int, device: torch.device, n: int = 8) -> None:
        gen = torch.Generator().manual_seed(0)
        self.data = [torch.randint(0, vocab, (batch, seq + 1), generator=gen).to(device) for _ in range(n)]
        self.batch_size, self.seq_len, self.position = batch, seq, 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        block = self.data[self.position % len(self.data)]
        self.position += 1
        return block[:, :-1], block[:, 1:]

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}


def bare_loop(model: torch.nn.Module, tokens: _Tokens, steps: int, device: torch.device) -> float:
    """Seconds for `steps` steps of the plainest bf16 loop."""
    opt = build_adamw(list(model.named_parameters()), AdamWConfig(lr=3e-4, warmup_steps=0))
    params = [p for p in model.parameters() if p.requires_grad]
    dtype = torch.bfloat16
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        x, y = tokens.next()
        with torch.autocast(device.type, dtype=dtype):
            out = model(x, y)
        out.loss.backward()
        clip_grad_norm(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    _sync(device)
    return time.perf_counter() - start


def hyphae_loop(model: torch.nn.Module, tokens: _Tokens, steps: int, device: torch.device,
                outer_state_device: str = "same", inner_steps: int = 500) -> float:
    """Seconds for `steps` steps of training.train with DiLoCo on one in-memory peer.

    With the default H = 500 no outer step falls in a timed window: this measures the loop
    against the bare loop, not DiLoCo's outer step (once per 500 steps)."""
    cfg = DiLoCoConfig(inner=AdamWConfig(lr=3e-4, warmup_steps=0), inner_steps=inner_steps,
                       outer_state_device=outer_state_device)
    strategy = DiLoCo(model, SimNetwork().add_peer(), cfg, precision="bf16")
    _sync(device)
    start = time.perf_counter()
    asyncio.run(train(strategy, tokens, LoopConfig(max_steps=steps, log_every=max(1, steps))))
    _sync(device)
    return time.perf_counter() - start


def throughput(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    config = model_config(args.preset)
    seq = min(args.seq_len, config.context_length)
    model = build_model(config, seed=0, device=device)
    tokens = _Tokens(config.vocab_size, args.batch_size, seq, device)
    n_params = sum(p.numel() for p in model.parameters())
    bare_loop(model, tokens, args.warmup, device)
    hyphae_loop(model, tokens, args.warmup, device)
    bare, ours = [], []
    for _ in range(args.rotations):
        bare.append(bare_loop(model, tokens, args.steps, device))
        ours.append(hyphae_loop(model, tokens, args.steps, device))
    per_step = args.batch_size * seq
    tps = {"bare": per_step * args.steps / statistics.median(bare),
           "hyphae": per_step * args.steps / statistics.median(ours)}
    peak = _peak_tflops(device)
    mfu = {k: 6 * n_params * v / (peak * 1e12) for k, v in tps.items()} if peak else {}
    return {"preset": args.preset, "params": n_params, "batch_size": args.batch_size, "seq_len": seq,
            "steps": args.steps, "rotations": args.rotations, "tokens_per_s": tps, "mfu": mfu,
            "ratio_hyphae_vs_bare": tps["hyphae"] / tps["bare"], "bare_s": bare, "hyphae_s": ours}


def memory(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    config = model_config(args.memory_preset)
    seq = min(args.seq_len, config.context_length)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = build_model(config, seed=0, device=device)
    tokens = _Tokens(config.vocab_size, args.memory_batch_size, seq, device, n=2)
    hyphae_loop(model, tokens, 4, device, outer_state_device="cpu", inner_steps=2)  # two outer steps
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return {"preset": args.memory_preset, "params": sum(p.numel() for p in model.parameters()),
            "batch_size": args.memory_batch_size, "seq_len": seq, "outer_state_device": "cpu",
            "peak_gpu_bytes": peak, "peak_gpu_gib": peak / 2**30, "under_24_gb": peak < 24e9}


def _peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=Path("bench/results/gpu_model.json"))
    parser.add_argument("--preset", default="llama-125m")
    parser.add_argument("--memory-preset", default="llama-1b")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--memory-batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rotations", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        args.batch_size, args.seq_len, args.memory_batch_size = min(args.batch_size, 2), min(args.seq_len, 64), 1
    result = {"bench": "gpu_model", "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "throughput": throughput(args, device), "memory": memory(args, device)}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    t, m = result["throughput"], result["memory"]
    print(f"{result['device']}: {t['preset']} ({t['params'] / 1e6:.0f}M) bf16 tokens/s bare {t['tokens_per_s']['bare']:.0f}"
          f" | hyphae {t['tokens_per_s']['hyphae']:.0f} | ratio {t['ratio_hyphae_vs_bare']:.3f}"
          + (f" | MFU bare {t['mfu']['bare']:.1%} hyphae {t['mfu']['hyphae']:.1%}" if t["mfu"] else ""))
    print(f"{m['preset']} ({m['params'] / 1e9:.2f}B) DiLoCo, outer state on CPU: peak GPU memory "
          f"{m['peak_gpu_gib']:.1f} GiB ({'under' if m['under_24_gb'] else 'OVER'} 24 GB)")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
