"""Benchmark: tokens/s of a node with 1 worker vs 2 local workers (issue 17, item 5).

Run from the repository root (about two minutes on two CPU cores):

    . .venv/bin/activate && python bench/local_workers.py

    python bench/local_workers.py --threads 1 --steps 30 --json bench/results/local_workers.json

Each worker is its own process, as in the daemon, running `hyphae.training.train` with DDP on a
one-peer SimNetwork (no network: this times the node, not the run). With 2 workers they form a
`LocalGroup` (gloo on CPU, NCCL with `--device cuda`): every step both average their gradients
and worker 0 mirrors its Comm to worker 1. Each worker has `--batch-size` sequences, so the
node trains 2x the tokens per step; tokens/s counts the node's tokens. The baseline (1 worker)
is measured in the same run, alternating with the pair (1, 2, 1, 2, ..., 1); each 2-worker run
is compared with the mean of the two 1-worker runs around it, and the median ratio reported.
Warm-up steps are not timed. CPU workers get `--threads` torch threads each: on a machine with
fewer than 2 x threads free cores the two workers compete and the ratio shows it, so tokens per
CPU second (all threads of all workers) is reported too: its ratio is the group's overhead.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _worker(args: argparse.Namespace) -> None:
    """One worker: train `warmup` steps, then time `steps` steps; print its JSON result."""
    import asyncio

    asyncio.run(_worker_main(args))  # SimComm's clock is the running loop's


async def _worker_main(args: argparse.Namespace) -> None:
    import torch

    from hyphae.training import (DDP, BatchStream, Callback, DataConfig, LoopConfig, SimNetwork, build_model,
                                 load_corpus, model_config, train)
    from hyphae.training.local_group import LocalGroup, LocalGroupComm, LocalGroupConfig, LocalGroupSync

    torch.set_num_threads(args.threads)
    config = model_config(args.preset)
    corpus = load_corpus(DataConfig(cache_dir=str(ROOT / ".cache")), min_tokens=config.context_length + 1)
    device = "cpu" if args.device == "cpu" else f"cuda:{args.rank}"
    model = build_model(config, seed=args.seed, device=device)
    comm = SimNetwork().add_peer()
    callbacks: list[Callback] = []
    if args.world > 1:
        group = LocalGroup(LocalGroupConfig(rank=args.rank, world=args.world, port=args.port, device=device))
        comm = LocalGroupComm(comm, group)
        callbacks.append(LocalGroupSync(group))
    batches = BatchStream(corpus.train, batch_size=args.batch_size, seq_len=min(args.seq_len, config.context_length),
                          seed=args.seed, stream=f"node/{args.rank}")

    class Clock(Callback):
        def __init__(self) -> None:
            self.marks: dict[int, float] = {}
            self.cpu: dict[int, float] = {}

        async def on_step(self, step: int) -> None:
            if step in (args.warmup, args.warmup + args.steps):
                if args.device != "cpu":
                    torch.cuda.synchronize()
                self.marks[step] = time.perf_counter()
                self.cpu[step] = time.process_time()  # every thread of this worker: compute, group, loop

    clock = Clock()
    strategy = DDP(model, comm)
    loop = LoopConfig(max_steps=args.warmup + args.steps, log_every=10_000, compute_in_thread=True)
    await train(strategy, batches, loop, callbacks=[*callbacks, clock])
    end = args.warmup + args.steps
    seconds = clock.marks[end] - clock.marks[args.warmup]
    print(json.dumps({"rank": args.rank, "seconds": seconds, "cpu_s": clock.cpu[end] - clock.cpu[args.warmup],
                      "tokens": args.steps * args.batch_size * batches.seq_len}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _node(args: argparse.Namespace, workers: int) -> tuple[float, float]:
    """Tokens/s of a node of `workers` worker processes (the node's tokens over the slowest rank),
    and its tokens per CPU second (all workers' CPU time: what the group's averaging costs)."""
    port = _free_port()
    common = ["--worker", "--world", str(workers), "--port", str(port), "--preset", args.preset,
              "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--steps", str(args.steps),
              "--warmup", str(args.warmup), "--threads", str(args.threads), "--seed", str(args.seed),
              "--device", args.device]
    procs = [subprocess.Popen([sys.executable, __file__, *common, "--rank", str(r)], stdout=subprocess.PIPE)
             for r in range(workers)]
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=args.timeout_s)
        if p.returncode != 0:
            raise SystemExit(f"a worker exited with {p.returncode}")
        results.append(json.loads(out.decode().strip().splitlines()[-1]))
    tokens = sum(r["tokens"] for r in results)
    return tokens / max(r["seconds"] for r in results), tokens / sum(r["cpu_s"] for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per worker and step")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per CPU worker")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of the 2-worker node")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout-s", type=float, default=600.0)
    parser.add_argument("--json", type=Path, help="write the result here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return
    runs1, runs2 = [_node(args, 1)], []
    for _ in range(args.repeats):  # 1, 2, 1, 2, ..., 1: each pair's baseline brackets it
        runs2.append(_node(args, 2))
        runs1.append(_node(args, 1))
    ones, twos = [r[0] for r in runs1], [r[0] for r in runs2]
    cpu1, cpu2 = [r[1] for r in runs1], [r[1] for r in runs2]
    ratios = [two / statistics.mean(ones[i : i + 2]) for i, two in enumerate(twos)]
    result = {
        "device": args.device, "preset": args.preset, "threads_per_worker": args.threads,
        "batch_size_per_worker": args.batch_size, "seq_len": args.seq_len, "timed_steps": args.steps,
        "repeats": args.repeats, "machine": platform.machine(), "cores": len(os.sched_getaffinity(0)),
        "one_worker_tokens_per_s": ones, "two_workers_tokens_per_s": twos,
        "one_worker_tokens_per_s_median": statistics.median(ones),
        "two_workers_tokens_per_s_median": statistics.median(twos),
        "ratio_two_over_one_per_repeat": ratios, "ratio_two_over_one_median": statistics.median(ratios),
        "one_worker_tokens_per_cpu_s_median": statistics.median(cpu1),
        "two_workers_tokens_per_cpu_s_median": statistics.median(cpu2),
        "cpu_efficiency_two_over_one": statistics.median(cpu2) / statistics.median(cpu1),
    }
    print(f"1 worker: {statistics.median(ones):.0f} tokens/s   2 workers: {statistics.median(twos):.0f} tokens/s "
          f"(medians of {len(ones)} and {len(twos)} runs)   ratio {statistics.median(ratios):.2f}x "
          f"(per repeat: {', '.join(f'{r:.2f}' for r in ratios)})")
    print(f"tokens per CPU second: 1 worker {statistics.median(cpu1):.0f}, 2 workers {statistics.median(cpu2):.0f} "
          f"({result['cpu_efficiency_two_over_one']:.2f}x: the group's overhead; on 2 free cores the tokens/s ratio "
          "is at most 2x this)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
