"""Benchmark of the training algorithms on simulated peers: loss vs tokens and vs bytes sent,
and the longest time any peer's training loop waited on the others.

Run from the repository root (about 15-20 minutes on one CPU core; `--quick` about 2):

    . .venv/bin/activate && python bench/algorithms.py

    python bench/algorithms.py --seed 0 --threads 1 --json bench/results/algorithms.json
    python bench/algorithms.py --quick --json /tmp/algorithms_quick.json

SPES vs full-MoE DiLoCo and the shared-seed ZO measurements (issue 8) run as a second suite
with its own options (bench/algorithms_spes_zo.py):

    python bench/algorithms.py spes-zo --threads 1 --seed 0 --json bench/results/algorithms_spes_zo.json

Scenarios, all on the same model (tiny preset), the same per-peer data streams (built-in stdlib
corpus) and the same seed, on a `SimNetwork` with 50 ms latency and 100 Mbit/s per peer, on the
virtual clock (so waiting is simulated time):

1. `peers`: `--peers` (8) peers, every gradient step taking 1 virtual second (`--algorithms`);
2. `stragglers`: `--straggler-peers` (32) peers, one in four 3x slower (3 s per step);
3. `bytes` (issue 19): val loss vs bytes sent per peer on 8 peers with H = `--bytes-inner-steps`
   (10): DiLoCo fp32 (paper defaults, and plain averaging: outer lr 1, no momentum), DiLoCo +
   SparseLoCo (`--density` 8 %, `--sparse-bits` 2: top-k with error feedback, no outer momentum,
   β `--error-decay` 0.95),
   Streaming DiLoCo (the outer exchange overlapped with `--overlap-steps` inner steps), NoLoCo
   (fp32, and int8 φ + SparseLoCo progress), A²CiD² at DiLoCo's measured bytes per second;
4. `blocking` (issue 19): DiLoCo without and with overlap on a `--slow-bandwidth-bytes-per-s`
   (10 Mbit/s) link: the share of wall time the worker is blocked on the network.

    python bench/algorithms.py --scenarios bytes,blocking --json bench/results/algorithms_bytes.json

Every peer runs the same number of steps (equal tokens). A step's virtual duration comes from a
callback that sleeps `step_time` after each step (`Pace`); the time a loop spends inside
`strategy.step` is its wait on the others (virtual compute is free, so this is communication
and waiting only). Reported per algorithm: validation loss of peer 0 vs total tokens and vs
bytes sent per peer (curve), final validation loss (peer 0, mean over every peer's own
weights, and the weights averaged over peers), bytes sent per peer, the longest single wait
of any peer, the virtual time to finish, and whether an all-reduce was ever called.

The baselines (DDP, DiLoCo) are measured in the same run; the summary gives each method's
final loss relative to DiLoCo's and its longest wait relative to one outer step (H fast steps).
Adding an algorithm (e.g. SPES, ZO) = one `Entry` in `ENTRIES` (name, registry name, a config
function of the scenario); nothing else changes.
"""

from __future__ import annotations

import argparse
import sys
import asyncio
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hyphae.training import (
    BatchStream,
    Callback,
    DataConfig,
    EvalInfo,
    LoopConfig,
    SimComm,
    SimNetwork,
    build_model,
    build_strategy,
    evaluate,
    load_corpus,
    model_config,
    run_virtual,
    train,
    validation_batches,
)

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Scenario:
    name: str
    peers: int
    steps: int
    inner_steps: int
    slow_every: int = 0  # every k-th peer (k-1, 2k-1, ...) is slow; 0 = none
    slow_factor: float = 1.0
    step_time_s: float = 1.0
    entries: tuple[str, ...] = ()  # the algorithms this scenario runs; () = --algorithms
    bandwidth_bytes_per_s: float = 0.0  # 0 = --bandwidth-bytes-per-s

    def step_time(self, i: int) -> float:
        slow = self.slow_every and (i % self.slow_every == self.slow_every - 1)
        return self.step_time_s * (self.slow_factor if slow else 1.0)


@dataclass(frozen=True)
class Entry:
    """One algorithm in the benchmark: its registry name and its config for a scenario."""

    algorithm: str
    config: Callable[[Scenario, argparse.Namespace], dict[str, Any]]


def _inner(scenario: Scenario, args: argparse.Namespace, weight_decay: float = 0.1) -> dict[str, Any]:
    """The local AdamW every method shares: warm-up, then cosine decay to the last step."""
    return {"lr": args.lr, "warmup_steps": args.warmup_steps, "decay_steps": scenario.steps,
            "weight_decay": weight_decay}


def _diloco(s: Scenario, a: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    return {"inner": _inner(s, a), "inner_steps": s.inner_steps, **extra}


def _sparse(a: argparse.Namespace) -> dict[str, Any]:
    """SparseLoCo: top-k per 4096-chunk with decayed error feedback in place of outer momentum."""
    return {"compression": f"topk-{'int8' if a.sparse_bits == 8 else '2bit'}", "density": a.density,
            "error_decay": a.error_decay}


def _matched_budget(s: Scenario, a: argparse.Namespace) -> float:
    """DiLoCo fp32's bytes per peer per second in this scenario (measured if it ran first)."""
    return a.matched_bytes_per_s[s.name]


ENTRIES: dict[str, Entry] = {
    "ddp": Entry("ddp", lambda s, a: {"optimizer": _inner(s, a)}),
    "diloco": Entry("diloco", lambda s, a: _diloco(s, a)),
    "diloco-avg": Entry("diloco", lambda s, a: _diloco(s, a, outer_lr=1.0, outer_momentum=0.0)),
    "sparseloco": Entry("diloco", lambda s, a: _diloco(s, a, outer_lr=1.0, outer_momentum=0.0, **_sparse(a))),
    "streaming": Entry("diloco", lambda s, a: _diloco(s, a, overlap_steps=a.overlap_steps)),
    "sparseloco-overlap": Entry("diloco", lambda s, a: _diloco(s, a, outer_lr=1.0, outer_momentum=0.0,
                                                               overlap_steps=a.overlap_steps, **_sparse(a))),
    "noloco": Entry("noloco", lambda s, a: {
        "inner": _inner(s, a, weight_decay=0.0), "inner_steps": s.inner_steps,
        # the deadline: a quarter of a fast outer step, so nobody waits on a straggler longer
        "timeout_s": 0.25 * s.inner_steps * s.step_time_s, "run_id": f"bench-{a.seed}",
    }),
    "noloco-sparse": Entry("noloco", lambda s, a: {
        "inner": _inner(s, a, weight_decay=0.0), "inner_steps": s.inner_steps,
        "timeout_s": 0.25 * s.inner_steps * s.step_time_s, "run_id": f"bench-{a.seed}",
        "quantize": "int8", **_sparse(a),
    }),
    "dadao": Entry("dadao", lambda s, a: {
        "optimizer": _inner(s, a), "gossip_interval_s": a.gossip_steps * s.step_time_s,
        "timeout_s": 2.0 * s.step_time_s, "run_id": f"bench-{a.seed}",
    }),
    "dadao-budget": Entry("dadao", lambda s, a: {
        "optimizer": _inner(s, a), "bytes_per_s": _matched_budget(s, a),
        "timeout_s": 2.0 * s.step_time_s, "run_id": f"bench-{a.seed}",
    }),
}
"""name -> entry, in the order they run. SPES / ZO: add their entries here."""

DEFAULT_ENTRIES = ("ddp", "diloco", "noloco", "dadao")
"""What the peers and stragglers scenarios run unless --algorithms says otherwise."""

BYTES_ENTRIES = ("diloco", "diloco-avg", "sparseloco", "streaming", "noloco", "noloco-sparse", "dadao-budget")
BLOCKING_ENTRIES = ("diloco", "streaming")


class Pace(Callback):
    """Gives each step a virtual duration and records how long the loop waited in between."""

    def __init__(self, comm: SimComm, step_time_s: float) -> None:
        self.comm, self.step_time_s = comm, step_time_s
        self.resumed_at = 0.0
        self.waits: list[float] = []

    async def on_step(self, step: int) -> None:
        self.waits.append(self.comm.now() - self.resumed_at)  # time spent in strategy.step
        await self.comm.sleep(self.step_time_s)
        self.resumed_at = self.comm.now()


def _count_all_reduce(comms: list[SimComm]) -> list[int]:
    """Wrap each peer's all_reduce with a counter (the 'no collective' check)."""
    calls = [0]

    for comm in comms:
        inner = comm.all_reduce

        async def counted(*a: Any, _inner: Any = inner, **kw: Any) -> Any:
            calls[0] += 1
            return await _inner(*a, **kw)

        comm.all_reduce = counted  # type: ignore[method-assign]
    return calls


@torch.no_grad()
def _averaged_model(strategies: list[Any], cfg: Any, seed: int) -> torch.nn.Module:
    avg = build_model(cfg, seed=seed)
    for name, p in avg.named_parameters():
        p.copy_(torch.stack([dict(s.model.named_parameters())[name].float() for s in strategies]).mean(0))
    return avg


async def _run(args: argparse.Namespace, scenario: Scenario, name: str, corpus: Any, val: list) -> dict:
    entry = ENTRIES[name]
    cfg = model_config(args.preset)
    net = SimNetwork(latency_s=args.latency_s,
                     bandwidth_bytes_per_s=scenario.bandwidth_bytes_per_s or args.bandwidth_bytes_per_s)
    comms = net.add_peers(scenario.peers)
    all_reduce_calls = _count_all_reduce(comms)
    config = entry.config(scenario, args)
    strategies = [build_strategy(entry.algorithm, build_model(cfg, seed=args.seed), c, config, precision="fp32")
                  for c in comms]
    paces = [Pace(c, scenario.step_time(i)) for i, c in enumerate(comms)]
    tokens_per_step = args.batch_size * args.seq_len
    curve: list[dict] = []

    def point(step: int, val_loss: float) -> dict:
        return {
            "step": step,
            "virtual_s": comms[0].now(),
            "tokens": sum(len(p.waits) for p in paces) * tokens_per_step,
            "bytes_sent_per_peer": statistics.mean(c.traffic().sent_bytes for c in comms),
            "val_loss": val_loss,
        }

    curve.append(point(0, evaluate(strategies[0].model, val)))

    class Curve(Callback):
        async def on_eval(self, info: EvalInfo) -> None:
            curve.append(point(info.step, info.val_loss))

    loops = []
    for i, (strategy, comm) in enumerate(zip(strategies, comms)):
        batches = BatchStream(corpus.train, batch_size=args.batch_size, seq_len=args.seq_len,
                              seed=args.seed, stream=comm.peer_id)
        loop_cfg = LoopConfig(max_steps=scenario.steps, log_every=args.eval_every,
                              eval_every=args.eval_every if i == 0 else 0)
        callbacks: list[Callback] = [paces[i]] + ([Curve()] if i == 0 else [])
        loops.append(train(strategy, batches, loop_cfg, val_set=val, callbacks=callbacks))
    t0 = time.perf_counter()
    await asyncio.gather(*loops)
    wall = time.perf_counter() - t0
    finish = [p.resumed_at for p in paces]
    own = [evaluate(s.model, val) for s in strategies]
    waits = [max(p.waits, default=0.0) for p in paces]
    outer_step_s = scenario.inner_steps * scenario.step_time_s
    return {
        "config": config,
        "curve": curve,
        "final_val_loss_peer0": curve[-1]["val_loss"],
        "final_val_loss_mean_over_peers": statistics.mean(own),
        "final_val_loss_max_over_peers": max(own),
        "final_val_loss_averaged_weights": evaluate(_averaged_model(strategies, cfg, args.seed), val),
        "bytes_sent_per_peer": statistics.mean(c.traffic().sent_bytes for c in comms),
        "bytes_sent_per_peer_per_1000_steps": statistics.mean(c.traffic().sent_bytes for c in comms)
        / scenario.steps * 1000,
        "max_wait_s": max(waits),
        "max_wait_in_outer_steps": max(waits) / outer_step_s,
        "mean_total_wait_per_peer_s": statistics.mean(sum(p.waits) for p in paces),
        "blocked_fraction": statistics.mean(sum(p.waits) / max(p.resumed_at, 1e-9) for p in paces),
        "virtual_s_to_finish": max(finish),
        "all_reduce_calls": all_reduce_calls[0],
        "wall_s": wall,
    }


def bench_scenario(args: argparse.Namespace, scenario: Scenario, corpus: Any, val: list) -> dict:
    out = {"scenario": scenario.__dict__, "algorithms": {}}
    for name in scenario.entries or args.algorithms:
        if name == "dadao-budget" and scenario.name not in args.matched_bytes_per_s:
            raise SystemExit("dadao-budget matches DiLoCo's bytes: run diloco before it in the same scenario")
        torch.manual_seed(args.seed)
        result = run_virtual(_run(args, scenario, name, corpus, val))
        out["algorithms"][name] = result
        if name == "diloco":
            args.matched_bytes_per_s[scenario.name] = result["bytes_sent_per_peer"] / result["virtual_s_to_finish"]
        print(f"  {scenario.name} / {name}: loss {result['final_val_loss_mean_over_peers']:.4f}, "
              f"{result['bytes_sent_per_peer'] / 1e6:.1f} MB sent/peer, blocked {100 * result['blocked_fraction']:.2f} %,"
              f" {result['wall_s']:.0f} s wall", flush=True)
    for base_name, key in (("diloco", "loss_vs_diloco"), ("diloco-avg", "loss_vs_diloco_avg")):
        base = out["algorithms"].get(base_name)
        if base:
            for result in out["algorithms"].values():
                result[key] = result["final_val_loss_mean_over_peers"] / base["final_val_loss_mean_over_peers"]
                result[f"bytes_vs_{base_name.replace('-', '_')}"] = (
                    base["bytes_sent_per_peer"] / max(result["bytes_sent_per_peer"], 1))
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "spes-zo":
        # SPES vs full-MoE DiLoCo, ZO bytes per projected gradient, ZO replay speed (issue 8):
        # its own options, see bench/algorithms_spes_zo.py.
        sys.argv.pop(1)
        sys.path.insert(0, str(Path(__file__).parent))
        import algorithms_spes_zo

        algorithms_spes_zo.main()
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 = one CPU core)")
    parser.add_argument("--algorithms", default=",".join(DEFAULT_ENTRIES),
                        help=f"comma-separated names for the peers/stragglers scenarios, of {', '.join(ENTRIES)}")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--peers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=200, help="steps per peer, scenario 1")
    parser.add_argument("--inner-steps", type=int, default=50, help="H of DiLoCo/NoLoCo, scenario 1")
    parser.add_argument("--straggler-peers", type=int, default=32)
    parser.add_argument("--straggler-steps", type=int, default=100, help="steps per peer, scenario 2")
    parser.add_argument("--straggler-inner-steps", type=int, default=25, help="H, scenario 2")
    parser.add_argument("--gossip-steps", type=float, default=1.0, help="A²CiD² gossip interval in fast step times")
    parser.add_argument("--bytes-inner-steps", type=int, default=10, help="H of the bytes scenario")
    parser.add_argument("--density", type=float, default=0.08, help="SparseLoCo: share of each chunk sent")
    parser.add_argument("--error-decay", type=float, default=0.95, help="SparseLoCo: beta of the error feedback")
    parser.add_argument("--sparse-bits", type=int, choices=(8, 2), default=2, help="SparseLoCo value bits")
    parser.add_argument("--overlap-steps", type=int, default=5, help="Streaming DiLoCo: tau, inner steps overlapped")
    parser.add_argument("--slow-bandwidth-bytes-per-s", type=float, default=1.25e6, help="the blocking scenario's link")
    parser.add_argument("--latency-s", type=float, default=0.05)
    parser.add_argument("--bandwidth-bytes-per-s", type=float, default=12.5e6)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--val-batches", type=int, default=4)
    parser.add_argument("--scenarios", default="peers,stragglers", help="which scenarios: peers, stragglers")
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a smoke run (~2 min)")
    parser.add_argument("--cache-dir", default=str(ROOT / "bench" / "results" / "cache"))
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "algorithms.json"))
    args = parser.parse_args()
    args.algorithms = [a for a in args.algorithms.split(",") if a]
    unknown = sorted(set(args.algorithms) - set(ENTRIES))
    if unknown:
        parser.error(f"unknown algorithms {unknown}; choose from {sorted(ENTRIES)}")
    args.matched_bytes_per_s = {}
    if args.quick:
        args.bytes_inner_steps, args.overlap_steps = 5, 2
        args.peers, args.steps, args.inner_steps = 4, 40, 10
        args.straggler_peers, args.straggler_steps, args.straggler_inner_steps = 8, 20, 10
        args.batch_size, args.seq_len, args.eval_every, args.val_batches = 4, 32, 10, 2
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    corpus = load_corpus(DataConfig(cache_dir=args.cache_dir))
    val = validation_batches(corpus.val, batch_size=8, seq_len=args.seq_len, n_batches=args.val_batches)
    scenarios = {
        "peers": Scenario(f"{args.peers} peers", args.peers, args.steps, args.inner_steps),
        "stragglers": Scenario(f"{args.straggler_peers} peers, 1 in 4 3x slower", args.straggler_peers,
                               args.straggler_steps, args.straggler_inner_steps, slow_every=4, slow_factor=3.0),
        "bytes": Scenario(f"bytes: {args.peers} peers, H={args.bytes_inner_steps}", args.peers, args.steps,
                          args.bytes_inner_steps, entries=BYTES_ENTRIES),
        "blocking": Scenario(f"blocking: {args.peers} peers, H={args.bytes_inner_steps}, "
                             f"{args.slow_bandwidth_bytes_per_s * 8 / 1e6:g} Mbit/s", args.peers, args.steps,
                             args.bytes_inner_steps, entries=BLOCKING_ENTRIES,
                             bandwidth_bytes_per_s=args.slow_bandwidth_bytes_per_s),
    }
    chosen = [s for s in args.scenarios.split(",") if s]
    if not chosen or set(chosen) - set(scenarios):
        parser.error(f"--scenarios must name some of {sorted(scenarios)}, got {args.scenarios!r}")
    results = []
    for scenario in (scenarios[name] for name in chosen):
        print(f"{scenario.name} ...", flush=True)
        results.append(bench_scenario(args, scenario, corpus, val))
    result = {
        "bench": "algorithms",
        "device": "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": args.threads,
        "args": vars(args),
        "params": build_model(model_config(args.preset), seed=0).num_parameters(),
        "scenarios": results,
        "total_s": time.perf_counter() - t0,
    }
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    _summary(result)
    print(f"wrote {path}")


def _summary(result: dict) -> None:
    for sc in result["scenarios"]:
        s = sc["scenario"]
        outer = s["inner_steps"] * s["step_time_s"]
        print(f"\n{s['name']}: {s['steps']} steps per peer, H={s['inner_steps']} (one outer step = {outer:.0f} s)")
        print(f"{'algorithm':>18} {'loss p0':>8} {'loss mean':>9} {'loss avg-w':>10} {'vs DiLoCo':>9} "
              f"{'MB sent/peer':>12} {'x fewer B':>9} {'blocked %':>9} {'max wait s':>10} {'finish s':>8} "
              f"{'all-reduce':>10}")
        for name, r in sc["algorithms"].items():
            print(f"{name:>18} {r['final_val_loss_peer0']:>8.4f} {r['final_val_loss_mean_over_peers']:>9.4f} "
                  f"{r['final_val_loss_averaged_weights']:>10.4f} {r.get('loss_vs_diloco', float('nan')):>9.3f} "
                  f"{r['bytes_sent_per_peer'] / 1e6:>12.2f} {r.get('bytes_vs_diloco', float('nan')):>9.1f} "
                  f"{100 * r['blocked_fraction']:>9.2f} {r['max_wait_s']:>10.1f} "
                  f"{r['virtual_s_to_finish']:>8.0f} {r['all_reduce_calls']:>10}")
        _goals(sc["algorithms"])
        print("  val loss (peer 0) vs tokens / MB sent per peer:")
        names = list(sc["algorithms"])
        for k in range(len(sc["algorithms"][names[0]]["curve"])):
            row = [sc["algorithms"][n]["curve"][k] for n in names if k < len(sc["algorithms"][n]["curve"])]
            cells = "  ".join(f"{n} {p['val_loss']:.3f} @{p['bytes_sent_per_peer'] / 1e6:.1f}MB" for n, p in zip(names, row))
            print(f"  {row[0]['tokens']:>9} tok  {cells}")


def _goals(runs: dict) -> None:
    """Issue 19's three goals, where this scenario ran what they compare."""
    base = runs.get("diloco")
    if base is None:
        return
    for name in ("sparseloco", "sparseloco-overlap"):
        r = runs.get(name)
        if r:
            rel = [r["final_val_loss_mean_over_peers"] / runs[b]["final_val_loss_mean_over_peers"] - 1
                   for b in ("diloco", "diloco-avg") if b in runs]
            print(f"  goal {name}: val loss {', '.join(f'{100 * x:+.2f} %' for x in rel)} vs DiLoCo fp32 "
                  f"(defaults{', averaging' if len(rel) > 1 else ''}) [<= +2 %], "
                  f"{r['bytes_vs_diloco']:.1f}x fewer bytes [>= 20x]")
    if "streaming" in runs:
        print(f"  goal overlap: blocked {100 * runs['streaming']['blocked_fraction']:.2f} % of wall time [< 5 %], "
              f"vs {100 * base['blocked_fraction']:.2f} % without overlap")
    r = runs.get("dadao-budget")
    if r:
        print(f"  goal A2CiD2 at DiLoCo's bytes ({r['bytes_vs_diloco']:.2f}x): val loss "
              f"{100 * (r['loss_vs_diloco'] - 1):+.2f} % vs DiLoCo fp32 [<= +3 %]")


if __name__ == "__main__":
    main()
