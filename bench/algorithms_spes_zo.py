"""Benchmark of SPES and shared-seed ZO (issue 8): memory, bytes on the wire, replay speed.

Run from the repository root (about 8-12 minutes on one CPU core with the defaults):

    . .venv/bin/activate && python bench/algorithms_spes_zo.py

    python bench/algorithms_spes_zo.py --threads 1 --seed 0 --json bench/results/algorithms_spes_zo.json

Four measurements, in one run so they share the machine's state:

1. SPES vs full-MoE DiLoCo, `--peers` simulated peers (SimNetwork, virtual time) on the built-in
   stdlib corpus, MoE preset `--moe-preset`, same seed, same per-peer data streams, the same sync
   interval (`--sync-steps`: SPES's sync, DiLoCo's H). Reported: validation loss vs total
   tokens; optimizer state bytes per node, **measured** as the sum of the bytes of every tensor
   the optimizer holds (DiLoCo's outer momentum and slow weights reported beside it); payload
   bytes each node uploads per sync as the SimComm counts them (all-reduce ring + the expert
   blobs it served), next to the §1 formula.
2. ZO bytes on the wire: `--zo-peers` peers, `--zo-perturbations` projected gradients per step;
   payload bytes each peer publishes per step and per projected gradient (target <= 2; the step
   number is the publish key, so there is no per-message header to amortise in the payload).
3. ZO fine-tuning: a dense `--zo-preset` model pretrained `--pretrain-steps` AdamW steps, then
   `--zo-steps` ZO steps on `--zo-peers` peers; validation loss before and after.
4. Replay speed: `--replay-updates` logged updates replayed (canonical order, fused
   `zo_apply_` batches) on a `--replay-preset` model (~10M parameters), against a torch copy of
   the same tensors timed in the same run: per-update time / copy time, and its inverse as the
   fraction of copy bandwidth one update achieves.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hyphae.kernels import derive_seed
from hyphae.training import (
    AdamWConfig,
    BatchStream,
    Callback,
    DataConfig,
    DiLoCo,
    DiLoCoConfig,
    EvalInfo,
    LoopConfig,
    SimNetwork,
    build_adamw,
    build_model,
    evaluate,
    load_corpus,
    model_config,
    run_virtual,
    train,
    validation_batches,
)
from hyphae.training._experts import sync_bytes
from hyphae.training._zo_log import Entry, replay_
from hyphae.training.spes import SPES, SPESConfig, optimizer_state_bytes
from hyphae.training.zo import ZO, ZOConfig

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 = one CPU core)")
    p.add_argument("--peers", type=int, default=4, help="simulated peers for SPES and DiLoCo")
    p.add_argument("--moe-preset", default="tiny-moe")
    p.add_argument("--steps", type=int, default=200, help="steps per peer, SPES and DiLoCo")
    p.add_argument("--sync-steps", type=int, default=50, help="SPES sync interval = DiLoCo H")
    p.add_argument("--merge-interval", type=int, default=100, help="SPES merge warm-up interval")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--val-batches", type=int, default=4)
    p.add_argument("--zo-peers", type=int, default=4)
    p.add_argument("--zo-preset", default="tiny")
    p.add_argument("--zo-perturbations", type=int, default=8, help="m for the bytes measurement")
    p.add_argument("--zo-bytes-steps", type=int, default=10)
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--zo-steps", type=int, default=100)
    p.add_argument("--zo-lr", type=float, default=1e-3)
    p.add_argument("--replay-preset", default="small", help="~10.8M parameters")
    p.add_argument("--replay-updates", type=int, default=10_000)
    p.add_argument("--copy-repeats", type=int, default=7)
    p.add_argument("--cache-dir", default=str(ROOT / "bench" / "results" / "cache"))
    p.add_argument("--json", default=str(ROOT / "bench" / "results" / "algorithms_spes_zo.json"))
    return p.parse_args(argv)


# --- 1. SPES vs DiLoCo ---------------------------------------------------------------------------


async def _moe_run(args: argparse.Namespace, corpus, val, algorithm: str) -> dict[str, Any]:
    cfg = model_config(args.moe_preset)
    opt = AdamWConfig(lr=3e-3, warmup_steps=20)
    net = SimNetwork(latency_s=0.05)
    comms = net.add_peers(args.peers)
    strategies = []
    for comm in comms:
        model = build_model(cfg, seed=args.seed)
        if algorithm == "spes":
            strategies.append(SPES(model, comm, SPESConfig(optimizer=opt, sync_steps=args.sync_steps,
                                                           merge_interval=args.merge_interval)))
        else:
            strategies.append(DiLoCo(model, comm, DiLoCoConfig(inner=opt, inner_steps=args.sync_steps)))
    tokens_per_step = args.batch_size * args.seq_len * args.peers
    curve = [{"step": 0, "tokens": 0, "val_loss": evaluate(strategies[0].model, val)}]

    class Curve(Callback):
        async def on_eval(self, info: EvalInfo) -> None:
            curve.append({"step": info.step, "tokens": info.step * tokens_per_step, "val_loss": info.val_loss})

    loops = []
    for i, (strategy, comm) in enumerate(zip(strategies, comms)):
        batches = BatchStream(corpus.train, batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed,
                              stream=comm.peer_id)
        config = LoopConfig(max_steps=args.steps, log_every=args.eval_every,
                            eval_every=args.eval_every if i == 0 else 0)
        loops.append(train(strategy, batches, config, val_set=val, callbacks=[Curve()] if i == 0 else []))
    t0 = time.perf_counter()
    await asyncio.gather(*loops)
    wall = time.perf_counter() - t0
    syncs = args.steps // args.sync_steps
    sent = [c.traffic().sent_bytes / syncs for c in comms]
    received = [c.traffic().received_bytes / syncs for c in comms]
    out: dict[str, Any] = {
        "curve": curve,
        "wall_s": wall,
        "syncs": syncs,
        "upload_bytes_per_sync_mean": statistics.mean(sent),
        "upload_bytes_per_sync_max": max(sent),
        "download_bytes_per_sync_mean": statistics.mean(received),
    }
    if algorithm == "spes":
        out["optimizer_state_bytes_per_node"] = [optimizer_state_bytes(s.optimizer) for s in strategies]
        out["owned_experts_per_node"] = [list(s.owned) for s in strategies]
        out["merges"] = strategies[0].merges
    else:
        out["optimizer_state_bytes_per_node"] = [optimizer_state_bytes(s.inner) for s in strategies]
        out["outer_state_bytes_per_node"] = [
            optimizer_state_bytes(s.outer) + sum(t.numel() * t.element_size() for t in s.slow.values())
            for s in strategies
        ]
    return out


def bench_spes_vs_diloco(args: argparse.Namespace, corpus) -> dict[str, Any]:
    val = validation_batches(corpus.val, batch_size=8, seq_len=args.seq_len, n_batches=args.val_batches)
    cfg = model_config(args.moe_preset)
    out: dict[str, Any] = {"preset": args.moe_preset, "params": cfg.num_parameters(), "peers": args.peers}
    for algorithm in ("spes", "diloco"):
        out[algorithm] = run_virtual(_moe_run(args, corpus, val, algorithm))
        print(f"  {algorithm}: {out[algorithm]['wall_s']:.0f} s", flush=True)
    owned = len(out["spes"]["owned_experts_per_node"][0])
    formula = sync_bytes(cfg, n_nodes=args.peers, owned=owned)
    out["formula"] = {
        "shared_bytes": formula.shared_bytes,
        "expert_bytes": formula.expert_bytes,
        "allreduce_each_way": formula.allreduce_each_way,
        "expert_download": formula.expert_download,
        "server_upload": formula.server_upload,
        "server_download": formula.server_download,
        "p2p_download": formula.allreduce_each_way + formula.expert_download,
    }
    spes_mem = statistics.mean(out["spes"]["optimizer_state_bytes_per_node"])
    diloco_mem = statistics.mean(out["diloco"]["optimizer_state_bytes_per_node"])
    out["optimizer_memory_ratio_spes_over_diloco"] = spes_mem / diloco_mem
    shared = formula.shared_bytes
    experts = cfg.n_experts * formula.expert_bytes
    out["optimizer_memory_ratio_expected"] = (shared + experts * owned / cfg.n_experts) / (shared + experts)
    out["upload_ratio_spes_over_diloco"] = (
        out["spes"]["upload_bytes_per_sync_mean"] / out["diloco"]["upload_bytes_per_sync_mean"]
    )
    return out


# --- 2 + 3. ZO -----------------------------------------------------------------------------------


def bench_zo_bytes(args: argparse.Namespace) -> dict[str, Any]:
    cfg = model_config(args.zo_preset).replace(context_length=32)
    tokens = np.random.default_rng(args.seed).integers(0, 256, 100_000).astype(np.uint8)
    net = SimNetwork(latency_s=0.05)
    m = args.zo_perturbations
    peers = [ZO(build_model(cfg, seed=args.seed), c, ZOConfig(perturbations=m, snapshot_steps=5))
             for c in net.add_peers(args.zo_peers)]

    async def main() -> None:
        await asyncio.gather(*(
            train(z, BatchStream([tokens], batch_size=4, seq_len=32, seed=args.seed, stream=i),
                  LoopConfig(max_steps=args.zo_bytes_steps))
            for i, z in enumerate(peers)
        ))

    run_virtual(main())
    sent = [z.comm.traffic().sent_bytes for z in peers]
    received = [z.comm.traffic().received_bytes for z in peers]
    steps = args.zo_bytes_steps
    return {
        "peers": args.zo_peers,
        "perturbations_per_step": m,
        "steps": steps,
        "payload_bytes_sent_per_peer_step": statistics.mean(sent) / steps,
        "payload_bytes_per_projected_gradient": statistics.mean(sent) / (steps * m),
        "payload_bytes_received_per_peer_step": statistics.mean(received) / steps,
        "target_bytes_per_projected_gradient": 2.0,
        "hashes_agree_at_last_boundary": len({z.last_hash for z in peers}) == 1,
    }


def bench_zo_finetune(args: argparse.Namespace, corpus) -> dict[str, Any]:
    cfg = model_config(args.zo_preset).replace(context_length=args.seq_len)
    model = build_model(cfg, seed=args.seed)
    opt_cfg = AdamWConfig(lr=3e-3, warmup_steps=20)
    opt = build_adamw(model.named_parameters(), opt_cfg)
    stream = BatchStream(corpus.train, batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed,
                         stream="pretrain")
    val = validation_batches(corpus.val, batch_size=8, seq_len=args.seq_len, n_batches=args.val_batches)
    t0 = time.perf_counter()
    for step in range(args.pretrain_steps):
        for group in opt.param_groups:
            group["lr"] = opt_cfg.lr_at(step)
        model(*stream.next()).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    pretrain_s = time.perf_counter() - t0
    before = evaluate(model, val)
    net = SimNetwork(latency_s=0.05)
    peers = []
    for comm in net.add_peers(args.zo_peers):
        replica = build_model(cfg, seed=args.seed)
        replica.load_state_dict(model.state_dict())
        peers.append(ZO(replica, comm, ZOConfig(lr=args.zo_lr, snapshot_steps=50)))
    curve = [{"step": 0, "val_loss": before}]

    class Curve(Callback):
        async def on_eval(self, info: EvalInfo) -> None:
            curve.append({"step": info.step, "val_loss": info.val_loss})

    async def main() -> None:
        await asyncio.gather(*(
            train(z, BatchStream(corpus.train, batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed + 1,
                                 stream=i),
                  LoopConfig(max_steps=args.zo_steps, log_every=25, eval_every=25 if i == 0 else 0),
                  val_set=val, callbacks=[Curve()] if i == 0 else [])
            for i, z in enumerate(peers)
        ))

    t0 = time.perf_counter()
    run_virtual(main())
    return {
        "preset": args.zo_preset,
        "params": cfg.num_parameters(),
        "pretrain_steps": args.pretrain_steps,
        "pretrain_s": pretrain_s,
        "zo_steps": args.zo_steps,
        "zo_lr": args.zo_lr,
        "zo_wall_s": time.perf_counter() - t0,
        "val_loss_before": before,
        "val_loss_after": evaluate(peers[0].model, val),
        "curve": curve,
        "bytes_sent_per_peer": statistics.mean(z.comm.traffic().sent_bytes for z in peers),
    }


# --- 4. Replay speed -----------------------------------------------------------------------------


def bench_replay(args: argparse.Namespace) -> dict[str, Any]:
    model = build_model(model_config(args.replay_preset), seed=args.seed)
    params = [p.detach() for p in model.parameters()]
    numel = sum(p.numel() for p in params)
    source = [p.clone() for p in params]
    rng = np.random.default_rng(args.seed)
    peers_per_step = 16
    entries = [
        Entry(i // peers_per_step, f"peer-{i % peers_per_step:04d}", bytes([int(rng.integers(0, 256))]))
        for i in range(args.replay_updates)
    ]

    def copy_once() -> float:
        t0 = time.perf_counter()
        for p, s in zip(params, source):
            p.copy_(s)
        return time.perf_counter() - t0

    copy_once()  # warm-up
    copies = [copy_once() for _ in range(args.copy_repeats)]
    replay_(params, entries[:64], lr=1e-4, seed_of=lambda t, p, j: derive_seed("bench", t, p, j))  # warm-up
    t0 = time.perf_counter()
    applied = replay_(params, entries, lr=1e-4, seed_of=lambda t, p, j: derive_seed("bench", t, p, j))
    replay_s = time.perf_counter() - t0
    copies += [copy_once() for _ in range(args.copy_repeats)]  # bracket the replay
    copy_s = statistics.median(copies)
    per_update = replay_s / applied
    return {
        "preset": args.replay_preset,
        "params": numel,
        "updates": applied,
        "replay_s": replay_s,
        "updates_per_s": applied / replay_s,
        "copy_median_s": copy_s,
        "copy_p90_s": float(np.percentile(copies, 90)),
        "copy_gb_per_s": 2 * 4 * numel / copy_s / 1e9,
        "per_update_over_copy": per_update / copy_s,
        "ratio_vs_copy": copy_s / per_update,
    }


# --- driver --------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement; returns the JSON-able result (also what `main` writes)."""
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    corpus = load_corpus(DataConfig(cache_dir=args.cache_dir))
    print("SPES vs DiLoCo ...", flush=True)
    spes = bench_spes_vs_diloco(args, corpus)
    print("ZO bytes ...", flush=True)
    zo_bytes = bench_zo_bytes(args)
    print("ZO fine-tuning ...", flush=True)
    zo_finetune = bench_zo_finetune(args, corpus)
    print("replay ...", flush=True)
    replay = bench_replay(args)
    return {
        "bench": "algorithms_spes_zo",
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": args.threads,
        "args": dict(vars(args)),
        "spes_vs_diloco": spes,
        "zo_bytes": zo_bytes,
        "zo_finetune": zo_finetune,
        "replay": replay,
        "total_s": time.perf_counter() - t0,
    }


def summary(result: dict[str, Any]) -> None:
    s = result["spes_vs_diloco"]
    print(f"\nSPES vs DiLoCo ({s['preset']}, {s['params'] / 1e6:.2f}M params, {s['peers']} peers, "
          f"sync every {result['args']['sync_steps']} steps):")
    print(f"{'step':>6} {'tokens':>9} {'spes':>8} {'diloco':>8}")
    for a, b in zip(s["spes"]["curve"], s["diloco"]["curve"]):
        print(f"{a['step']:>6} {a['tokens']:>9} {a['val_loss']:>8.4f} {b['val_loss']:>8.4f}")
    mib = 2**20
    spes_mib = statistics.mean(s["spes"]["optimizer_state_bytes_per_node"]) / mib
    print(f"optimizer state per node: spes {spes_mib:.2f} MiB, "
          f"diloco {statistics.mean(s['diloco']['optimizer_state_bytes_per_node']) / mib:.2f} MiB (+ outer "
          f"{statistics.mean(s['diloco']['outer_state_bytes_per_node']) / mib:.2f} MiB); ratio "
          f"{s['optimizer_memory_ratio_spes_over_diloco']:.3f} (expected {s['optimizer_memory_ratio_expected']:.3f})")
    print(f"upload per sync per node: spes {s['spes']['upload_bytes_per_sync_mean'] / mib:.2f} MiB mean, "
          f"{s['spes']['upload_bytes_per_sync_max'] / mib:.2f} max; diloco "
          f"{s['diloco']['upload_bytes_per_sync_mean'] / mib:.2f} MiB; ratio {s['upload_ratio_spes_over_diloco']:.3f}")
    z = result["zo_bytes"]
    print(f"\nZO payload: {z['payload_bytes_sent_per_peer_step']:.1f} bytes per peer-step, "
          f"{z['payload_bytes_per_projected_gradient']:.2f} per projected gradient (target <= 2), "
          f"hashes agree: {z['hashes_agree_at_last_boundary']}")
    f = result["zo_finetune"]
    print(f"ZO fine-tuning ({f['preset']}, {result['args']['zo_peers']} peers, {f['zo_steps']} steps, "
          f"lr {f['zo_lr']}): val {f['val_loss_before']:.4f} -> {f['val_loss_after']:.4f}")
    r = result["replay"]
    print(f"replay of {r['updates']} updates on {r['params'] / 1e6:.1f}M params: {r['replay_s']:.1f} s "
          f"({r['updates_per_s']:.0f} updates/s); copy {r['copy_median_s'] * 1e3:.2f} ms "
          f"({r['copy_gb_per_s']:.1f} GB/s); one update = {r['per_update_over_copy']:.2f} copies "
          f"(ratio_vs_copy {r['ratio_vs_copy']:.3f})")
    print(f"total {result['total_s']:.0f} s")


def main() -> None:
    args = parse_args()
    result = run(args)
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    summary(result)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
