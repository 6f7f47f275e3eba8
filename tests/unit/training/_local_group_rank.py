"""One process of the local-group tests (test_local_group.py starts it; not a test itself).

    python _local_group_rank.py train --algorithm ddp --rank R --world 2 --port P --out W.safetensors
    python _local_group_rank.py train --algorithm ddp --world 1 --out W.safetensors   # the oracle
    python _local_group_rank.py comm --rank R --world 2 --port P --out R.json

``train``: rank R of a gloo group trains a micro GPT on batches of B from its own stream, the
single-peer run in an in-memory SimNetwork; ``--world 1`` trains one process on the union batch
2B of the same two streams. ``comm``: both ranks make the same Comm calls; the JSON records what
each saw (and what rank R's own SimComm saw).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

import numpy as np
import torch
from safetensors.torch import save_file

from hyphae.training import (
    DDP,
    AdamWConfig,
    BatchStream,
    Callback,
    DDPConfig,
    DiLoCo,
    DiLoCoConfig,
    SPES,
    LoopConfig,
    ModelConfig,
    NoLoCo,
    NoLoCoConfig,
    SPESConfig,
    PeerUnavailable,
    SimNetwork,
    Strategy,
    build_model,
    train,
)
from hyphae.training.comm import BlobUnavailable
from hyphae.training.noloco import InnerAdamConfig
from hyphae.training.local_group import LocalGroup, LocalGroupComm, LocalGroupConfig, LocalGroupSync

CONFIG = ModelConfig(vocab_size=256, context_length=16, n_layer=2, n_head=2, d_model=32)
OPT = AdamWConfig(lr=3e-3, warmup_steps=0, weight_decay=0.1, grad_clip=0.5)
TOKENS = np.random.default_rng(0).integers(0, 256, 50_000).astype(np.uint8)
BATCH = 4


def _stream(rank: int) -> BatchStream:
    return BatchStream([TOKENS], batch_size=BATCH, seq_len=16, seed=0, stream=f"node/{rank}")


class _Union:
    """The batches of ranks 0..n-1 side by side: what one process on the union batch sees."""

    def __init__(self, n: int) -> None:
        self.streams = [_stream(r) for r in range(n)]
        self.batch_size, self.seq_len = BATCH * n, 16

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [s.next() for s in self.streams]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def state_dict(self) -> dict[str, int]:
        return {"position": self.streams[0].position}


def _strategy(algorithm: str, comm) -> Strategy:  # noqa: ANN001 - any Comm
    if algorithm == "spes":  # load balancing is not linear in the batch; the rest of an MoE step is
        model = build_model(CONFIG.replace(n_experts=4, top_k=2, load_balance_coef=0.0), seed=1)
        return SPES(model, comm, SPESConfig(optimizer=OPT, sync_steps=2))
    model = build_model(CONFIG, seed=1)
    if algorithm == "ddp":
        return DDP(model, comm, DDPConfig(optimizer=OPT))
    if algorithm == "noloco":
        return NoLoCo(model, comm, NoLoCoConfig(inner=InnerAdamConfig(lr=3e-3, warmup_steps=0, grad_clip=0.5),
                                                inner_steps=2))
    return DiLoCo(model, comm, DiLoCoConfig(inner=OPT, inner_steps=2, outer_lr=0.7, outer_momentum=0.9))


class _FirstGradients(Callback):
    """Keeps the gradients step 0 is taken on (after the group averaged them)."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    async def on_gradients(self, step: int, strategy: Strategy) -> None:
        if step == 0:
            self.grads = {f"grad.{n}": p.grad.clone() for n, p in strategy.model.named_parameters()}


async def _train(args: argparse.Namespace) -> None:
    comm = SimNetwork().add_peer()
    callbacks = []
    if args.world == 1:
        batches = _Union(2)
    else:
        group = LocalGroup(LocalGroupConfig(rank=args.rank, world=args.world, port=args.port, timeout_s=60))
        comm = LocalGroupComm(comm, group)
        batches = _stream(args.rank)
        callbacks.append(LocalGroupSync(group))
    first = _FirstGradients()
    strategy = _strategy(args.algorithm, comm)
    await train(strategy, batches, LoopConfig(max_steps=args.steps, log_every=args.steps),
                callbacks=[*callbacks, first])
    save_file({n: p.detach().contiguous() for n, p in strategy.model.named_parameters()} | first.grads, args.out)


async def _comm(args: argparse.Namespace) -> None:
    inner = SimNetwork().add_peer()
    group = LocalGroup(LocalGroupConfig(rank=args.rank, world=args.world, port=args.port, timeout_s=60))
    comm = LocalGroupComm(inner, group)
    seen: dict[str, object] = {"peer_id": comm.peer_id, "members": await comm.members()}
    await comm.state_set("k", {"pair": (1, 2), "rank": args.rank})  # rank 0's value is the one written
    seen["state"] = await comm.state_get("k")
    digest = await comm.put_tensors({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3),
                                     "m": torch.tensor([True, False])})
    got = await comm.get_tensors(digest, timeout_s=5)
    seen["tensors"] = {n: [str(t.dtype), list(t.shape), t.tolist()] for n, t in sorted(got.items())}
    for name, call in (("exchange", comm.exchange("nobody", {"x": torch.ones(1)}, tag="t", timeout_s=1)),
                       ("get_blob", comm.get_blob("00" * 32, timeout_s=1))):
        try:
            await call
            seen[name] = "no error"
        except (PeerUnavailable, BlobUnavailable) as exc:
            seen[name] = [type(exc).__name__, str(exc)]
    values = await asyncio.gather(*(comm.state_get(k) for k in ("k", "none", "k")))  # concurrent calls
    seen["gathered"] = values
    seen["now_equal_across_calls"] = comm.now()
    seen["own_comm_state"] = await inner.state_get("k")  # what this rank itself wrote: only rank 0 did
    group.close()
    with open(args.out, "w") as f:
        json.dump(seen, f, sort_keys=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["train", "comm"])
    parser.add_argument("--algorithm", choices=["ddp", "diloco", "noloco", "spes"], default="ddp")
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--world", type=int, default=1)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    asyncio.run(_train(args) if args.mode == "train" else _comm(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
