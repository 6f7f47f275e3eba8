"""What a worker does differently as one rank of its node's group (:mod:`.worker_group`).

A lone worker is rank 0 of 1 and every method here passes straight through. In a group of N:

- each rank reads its own data stream (``<peer id>/<rank>``), so the node sees N x batch_size;
- rank 0 alone talks to the run (joins, announces, reports, checkpoints); the others hand their
  strategy a :class:`~hyphae.training.local_group.LocalGroupComm` that mirrors rank 0's calls;
- rank 0's weights are broadcast once at start (a joiner fetched them from the run), and on a
  restart every rank loads rank 0's newest checkpoint;
- a stop is agreed at a step boundary (:class:`~hyphae.training.local_group.LocalGroupSync`), so
  no rank is left waiting in a collective the others will never enter.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from hyphae.training import BatchStream, Callback, CheckpointStore, Comm, LoopConfig, Strategy, resume
from hyphae.training.local_group import (
    GroupStopped,
    LocalGroup,
    LocalGroupComm,
    LocalGroupConfig,
    LocalGroupSync,
    resume_in_group,
)

from . import ipc

__all__ = ["WorkerRank"]


class WorkerRank:
    """This worker's place in its node's group (`group` is None for a lone worker)."""

    def __init__(self, setup: ipc.Setup, group: LocalGroup | None) -> None:
        self.setup, self.group = setup, group
        self.rank = setup.rank if group is not None else 0

    @classmethod
    async def open(cls, setup: ipc.Setup) -> WorkerRank:
        """Join the node's group (blocks until every worker has joined); alone, nothing to join."""
        if setup.world <= 1:
            return cls(setup, None)
        if setup.device.startswith("cuda"):
            # The current device is per thread and starts at GPU 0; kernels follow their tensors'
            # device, but a bare "cuda" or synchronize() would land on GPU 0 in every worker.
            torch.cuda.set_device(setup.device)
        config = LocalGroupConfig(rank=setup.rank, world=setup.world, port=setup.group_port, device=setup.device)
        return cls(setup, await asyncio.to_thread(LocalGroup, config))

    @property
    def leader(self) -> bool:
        """Rank 0: talks to the run, reports progress, writes checkpoints."""
        return self.rank == 0

    def stream(self) -> str:
        """This worker's data stream id: the peer id, plus the rank in a group."""
        return self.setup.peer_id if self.group is None else f"{self.setup.peer_id}/{self.rank}"

    def comm(self, comm: Comm) -> Comm:
        """The Comm to hand the strategy."""
        return comm if self.group is None else LocalGroupComm(comm, self.group)

    async def share_weights(self, model: nn.Module, joined: int) -> int:
        """Give every rank rank 0's weights and its join step (what `_initial_weights` returned there)."""
        if self.group is None:
            return joined
        await self.group.run(self.group.broadcast_module, model)
        return await self.group.run(self.group.share_int, joined)

    def resume(self, store: CheckpointStore, strategy: Strategy, batches: BatchStream) -> int:
        """`resume`; in a group, every rank from rank 0's checkpoint (see `resume_in_group`)."""
        if self.group is None:
            return resume(store, strategy, batches)
        return resume_in_group(self.group, store, strategy, batches)

    def loop(self, loop: LoopConfig) -> LoopConfig:
        """Only rank 0 evaluates and checkpoints: the others hold the same weights."""
        return loop if self.leader else dataclasses.replace(loop, eval_every=0, checkpoint_every=0)

    def callbacks(self, leader: Sequence[Callback], every: Sequence[Callback], stop: asyncio.Event) -> list[Callback]:
        """`leader` callbacks (reports) on rank 0 only, `every` on all ranks, and the group's sync last."""
        own = [*leader, *every] if self.leader else list(every)
        if self.group is not None:
            own.append(LocalGroupSync(self.group, stop_requested=stop.is_set))
        return own

    def stop_signal(self, stop: asyncio.Event) -> asyncio.Event:
        """What the worker waits on to cancel training: its stop event alone; in a group, nothing
        (the ranks stop together through `GroupStopped` at a step boundary instead)."""
        return stop if self.group is None else asyncio.Event()

    @staticmethod
    def stopped_together(training: asyncio.Future[object]) -> bool:
        """Whether the training task ended because the group agreed to stop."""
        return training.done() and not training.cancelled() and isinstance(training.exception(), GroupStopped)

    def close(self) -> None:
        if self.group is not None:
            self.group.close()
