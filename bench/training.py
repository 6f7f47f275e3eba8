"""Benchmark of hyphae.training: loop overhead, DDP vs DiLoCo convergence, bytes per peer.

Run from the repository root (about 3-4 minutes on one CPU core):

    . .venv/bin/activate && python bench/training.py

    python bench/training.py --threads 1 --seed 0 --json bench/results/training.json

Three measurements, all in one run so they share the machine's state:

1. Throughput: tokens/s of `hyphae.training.loop.train` (DDP strategy over a 1-peer SimComm,
   a logging callback on every step, logging every 10 steps, no eval or checkpoints) against a
   bare nanoGPT-style torch loop on the same model, batches and optimizer (AdamW + clip + lr
   schedule). Warm-up first, then `--repeats` interleaved pairs of timed runs; the median
   per-pair ratio is reported on wall time and on process CPU time (the latter is what to
   trust on a shared machine). Both end with bit-identical weights. Target: ratio >= 0.9.
   The same loop with `compute_in_thread` on a real event loop (what the daemon's worker runs)
   is timed in the same rotation and must end bit-identical too.
2. Convergence: validation loss vs total tokens for DDP and DiLoCo with `--peers` simulated
   peers (SimNetwork, virtual time) on the built-in stdlib corpus, tiny preset, same seed,
   same per-peer data streams. DiLoCo uses a short H (`--inner-steps`, default 50, instead of
   the paper's 500) so several outer steps fit in a short run.
3. Communication: payload bytes sent by one peer per 1000 steps for each algorithm, as the
   SimComm counts them (ring all-reduce: 2(n-1)/n of the fp32 payload per round).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from hyphae.training import (
    DDP,
    AdamWConfig,
    BatchStream,
    Callback,
    DataConfig,
    DDPConfig,
    DiLoCo,
    DiLoCoConfig,
    EvalInfo,
    LoopConfig,
    SimNetwork,
    StepInfo,
    build_adamw,
    build_model,
    evaluate,
    model_config,
    load_corpus,
    run_virtual,
    train,
    validation_batches,
)
from hyphae.training.optim import clip_grad_norm, set_lr

ROOT = Path(__file__).resolve().parents[1]


class _Counter(Callback):
    """The "callbacks on" of the throughput test: cheap hooks on every step and every log."""

    def __init__(self) -> None:
        self.steps = 0
        self.logs: list[StepInfo] = []

    async def on_step(self, step: int) -> None:
        self.steps += 1

    async def on_log(self, info: StepInfo) -> None:
        self.logs.append(info)


class _Clock:
    """Wall and process-CPU seconds of a block (CPU time is robust to other processes' load)."""

    def __enter__(self) -> _Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


def _bare_loop(model, optimizer, batches: BatchStream, opt_cfg: AdamWConfig, steps: int, start: int) -> None:
    """nanoGPT's inner loop: batch, forward, backward, lr, clip, step, zero_grad."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for step in range(start, start + steps):
        x, y = batches.next()
        loss = model(x, y).loss
        loss.backward()
        set_lr(optimizer, opt_cfg.lr_at(step))
        clip_grad_norm(params, opt_cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def bench_throughput(args: argparse.Namespace, corpus) -> dict:
    cfg = model_config(args.preset)
    opt_cfg = AdamWConfig(lr=3e-3, warmup_steps=10)
    tokens_per_step = args.batch_size * args.seq_len

    bare_model = build_model(cfg, seed=args.seed)
    bare_opt = build_adamw(bare_model.named_parameters(), opt_cfg)
    bare_batches = BatchStream(corpus.train, batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed)

    counter = _Counter()

    def loop_runner(in_thread: bool) -> tuple[DDP, Callable[[int, int], _Clock]]:
        """The loop on its own replica and stream: on the virtual clock, or (``in_thread``, what
        the daemon's worker runs) on a real event loop with each step's compute in a thread."""
        strategy = DDP(build_model(cfg, seed=args.seed), SimNetwork().add_peer(), DDPConfig(optimizer=opt_cfg))
        batches = BatchStream(corpus.train, batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed)

        def run(start: int, steps: int) -> _Clock:
            config = LoopConfig(max_steps=start + steps, log_every=10, compute_in_thread=in_thread)
            with _Clock() as clock:
                job = train(strategy, batches, config, callbacks=[counter], start_step=start)
                if in_thread:
                    asyncio.run(job)
                else:
                    run_virtual(job)
            return clock

        return strategy, run

    def run_bare(start: int, steps: int) -> _Clock:
        with _Clock() as clock:
            _bare_loop(bare_model, bare_opt, bare_batches, opt_cfg, steps, start)
        return clock

    strategy, run_loop = loop_runner(in_thread=False)
    threaded, run_threaded = loop_runner(in_thread=True)
    run_bare(0, args.warmup_steps)
    run_loop(0, args.warmup_steps)
    run_threaded(0, args.warmup_steps)
    runners = {"bare": run_bare, "loop": run_loop, "threaded": run_threaded}
    done, rows = args.warmup_steps, []
    for rep in range(args.repeats):  # interleaved, order rotating, so drift hits all alike
        pair = {}
        order = list(runners)[rep % 3:] + list(runners)[:rep % 3]
        for kind in order:
            pair[kind] = runners[kind](done, args.timed_steps)
        done += args.timed_steps
        tokens = tokens_per_step * args.timed_steps
        rows.append({
            "bare_tokens_per_s": tokens / pair["bare"].wall,
            "loop_tokens_per_s": tokens / pair["loop"].wall,
            "bare_tokens_per_cpu_s": tokens / pair["bare"].cpu,
            "loop_tokens_per_cpu_s": tokens / pair["loop"].cpu,
            "threaded_tokens_per_s": tokens / pair["threaded"].wall,
            "threaded_tokens_per_cpu_s": tokens / pair["threaded"].cpu,
        })
    same = all(torch.equal(p, q) for p, q in zip(bare_model.parameters(), strategy.model.parameters()))
    same_threaded = all(torch.equal(p, q) for p, q in zip(bare_model.parameters(), threaded.model.parameters()))
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    return {
        "preset": args.preset,
        "params": bare_model.num_parameters(),
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "timed_steps_per_repeat": args.timed_steps,
        "repeats": rows,
        **{f"{k}_median": v for k, v in med.items()},
        "ratio_loop_over_bare_wall": statistics.median(r["loop_tokens_per_s"] / r["bare_tokens_per_s"] for r in rows),
        "ratio_loop_over_bare_cpu": statistics.median(r["loop_tokens_per_cpu_s"] / r["bare_tokens_per_cpu_s"] for r in rows),
        "ratio_threaded_over_bare_wall": statistics.median(
            r["threaded_tokens_per_s"] / r["bare_tokens_per_s"] for r in rows),
        "ratio_threaded_over_bare_cpu": statistics.median(
            r["threaded_tokens_per_cpu_s"] / r["bare_tokens_per_cpu_s"] for r in rows),
        "weights_identical_to_bare_loop": same,
        "threaded_weights_identical_to_bare_loop": same_threaded,
    }


async def _run_peers(args: argparse.Namespace, corpus, val, algorithm: str) -> dict:
    cfg = model_config(args.preset)
    inner = AdamWConfig(lr=3e-3, warmup_steps=20)
    net = SimNetwork(latency_s=0.05)
    comms = net.add_peers(args.peers)
    strategies = []
    for comm in comms:
        model = build_model(cfg, seed=args.seed)
        if algorithm == "ddp":
            strategies.append(DDP(model, comm, DDPConfig(optimizer=inner)))
        else:
            strategies.append(DiLoCo(model, comm, DiLoCoConfig(inner=inner, inner_steps=args.inner_steps)))
    curve: list[dict] = [{"step": 0, "tokens": 0, "val_loss": evaluate(strategies[0].model, val)}]

    class Curve(Callback):
        async def on_eval(self, info: EvalInfo) -> None:
            curve.append({"step": info.step, "tokens": info.tokens * args.peers, "val_loss": info.val_loss})

    loops = []
    for i, (strategy, comm) in enumerate(zip(strategies, comms)):
        batches = BatchStream(corpus.train, batch_size=args.batch_size, seq_len=args.conv_seq_len,
                              seed=args.seed, stream=comm.peer_id)
        config = LoopConfig(max_steps=args.steps, log_every=args.eval_every,
                            eval_every=args.eval_every if i == 0 else 0)
        loops.append(train(strategy, batches, config, val_set=val, callbacks=[Curve()] if i == 0 else []))
    t0 = time.perf_counter()
    await asyncio.gather(*loops)
    wall = time.perf_counter() - t0
    sent = [c.traffic().sent_bytes for c in comms]
    return {
        "curve": curve,
        "wall_s": wall,
        "virtual_s": comms[0].now(),
        "bytes_sent_per_peer_per_1000_steps": statistics.mean(sent) / args.steps * 1000,
        "bytes_received_per_peer_per_1000_steps": statistics.mean(c.traffic().received_bytes for c in comms) / args.steps * 1000,
    }


def bench_convergence(args: argparse.Namespace, corpus) -> dict:
    val = validation_batches(corpus.val, batch_size=8, seq_len=args.conv_seq_len, n_batches=args.val_batches)
    out = {}
    for algorithm in ("ddp", "diloco"):
        out[algorithm] = run_virtual(_run_peers(args, corpus, val, algorithm))
        print(f"  {algorithm}: done in {out[algorithm]['wall_s']:.0f} s", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 = one CPU core)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128, help="throughput test sequence length")
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--timed-steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=250, help="steps per peer in the convergence test")
    parser.add_argument("--conv-seq-len", type=int, default=64)
    parser.add_argument("--inner-steps", type=int, default=50, help="DiLoCo H (paper: 500)")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--val-batches", type=int, default=4)
    parser.add_argument("--cache-dir", default=str(ROOT / "bench" / "results" / "cache"))
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "training.json"))
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    corpus = load_corpus(DataConfig(cache_dir=args.cache_dir))
    corpus_open_s = time.perf_counter() - t0
    print(f"corpus: {corpus.train_tokens} train / {corpus.val_tokens} val bytes, opened in {corpus_open_s:.3f} s")
    print("throughput ...", flush=True)
    throughput = bench_throughput(args, corpus)
    print("convergence ...", flush=True)
    convergence = bench_convergence(args, corpus)
    result = {
        "bench": "training",
        "device": "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": args.threads,
        "args": vars(args),
        "corpus_open_s": corpus_open_s,
        "throughput": throughput,
        "convergence": convergence,
        "total_s": time.perf_counter() - t0,
    }
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    _summary(result)
    print(f"wrote {path}")


def _summary(result: dict) -> None:
    tp = result["throughput"]
    print(
        f"\nthroughput ({tp['preset']}, {tp['params']/1e6:.2f}M params, batch {tp['batch_size']}x{tp['seq_len']}, "
        f"{result['threads']} thread, median of {len(tp['repeats'])} interleaved pairs):\n"
        f"  wall: bare {tp['bare_tokens_per_s_median']:.0f} tok/s, loop {tp['loop_tokens_per_s_median']:.0f} tok/s, "
        f"ratio {tp['ratio_loop_over_bare_wall']:.3f}\n"
        f"  cpu:  bare {tp['bare_tokens_per_cpu_s_median']:.0f} tok/cpu-s, loop {tp['loop_tokens_per_cpu_s_median']:.0f} "
        f"tok/cpu-s, ratio {tp['ratio_loop_over_bare_cpu']:.3f}\n"
        f"  threaded loop (the daemon worker's mode): wall ratio {tp['ratio_threaded_over_bare_wall']:.3f}, "
        f"cpu ratio {tp['ratio_threaded_over_bare_cpu']:.3f}\n"
        f"  loop and bare loop end with identical weights: {tp['weights_identical_to_bare_loop']}, "
        f"threaded: {tp['threaded_weights_identical_to_bare_loop']}"
    )
    conv = result["convergence"]
    print(f"\nval loss vs total tokens ({result['args']['peers']} peers, DiLoCo H={result['args']['inner_steps']}):")
    print(f"{'step':>6} {'tokens':>9} {'ddp':>8} {'diloco':>8}")
    for d, l in zip(conv["ddp"]["curve"], conv["diloco"]["curve"]):
        print(f"{d['step']:>6} {d['tokens']:>9} {d['val_loss']:>8.4f} {l['val_loss']:>8.4f}")
    for name in ("ddp", "diloco"):
        mb = conv[name]["bytes_sent_per_peer_per_1000_steps"] / 1e6
        print(f"{name}: {mb:,.1f} MB sent per peer per 1000 steps")


if __name__ == "__main__":
    main()
