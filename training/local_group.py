"""`LocalGroup`: a node's N local workers (one per GPU, or N CPU workers) train as one member.

The workers run the same strategy code in lockstep and stay bit-identical:

- after each forward/backward they average their gradients over torch.distributed on the node
  (NCCL on GPUs, gloo on CPUs; one all-reduce per bucket), so N workers with batch B each step
  exactly like one worker on the union batch N x B (`LocalGroupSync`, a loop `Callback`);
- only rank 0 talks to the run: `LocalGroupComm` (_local_group_comm.py) makes rank 0's Comm
  calls and broadcasts every outcome (tensors, plain values, errors, the clock), so the other
  ranks make no network call and see bit-identical results, and every rank takes the same
  branches of the same code.

That holds for strategies whose Comm calls follow from their code and their Comm results
(DDP, DiLoCo, NoLoCo, SPES). Background work on its own timer (A²CiD²'s gossip) or steps
without gradients (ZO) would drift apart; the daemon refuses them with several workers.

Every collective runs in one thread of the group (`LocalGroup.run`), in the order the ranks
ask for them, so the event loop keeps serving IPC while a rank waits for the others.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from hyphae.training._local_group_comm import LocalGroupComm
from hyphae.training.checkpoint import CheckpointError, CheckpointStore
from hyphae.training.data import BatchStream
from hyphae.training.loop import Callback, resume
from hyphae.training.strategy import Strategy

__all__ = ["LocalGroupConfig", "LocalGroup", "LocalGroupComm", "LocalGroupSync", "GroupStopped", "resume_in_group"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, kw_only=True, slots=True)
class LocalGroupConfig:
    """Where this worker sits in its node's group."""

    rank: int
    """This worker's rank; rank 0 talks to the run, checkpoints and reports."""

    world: int
    """Workers on this node."""

    port: int
    """TCP port of the group's rendezvous store on `host` (the daemon picks a free one)."""

    device: str = "cpu"
    """This worker's device ("cpu" or "cuda:i"): "cuda" devices reduce over NCCL, the CPU over gloo."""

    host: str = "127.0.0.1"
    """Rendezvous address: the group never leaves the machine."""

    timeout_s: float = 1800.0
    """How long a collective waits for the other workers before failing. A dead worker fails it
    at once (its sockets close); this bounds a live one that hangs. It must outlast rank 0's
    longest Comm call, which the others wait for in a broadcast (a joiner's weight download,
    a slow outer all-reduce)."""

    bucket_bytes: int = 25 << 20
    """Gradients are flattened into buckets of about this size, one all-reduce each."""

    def __post_init__(self) -> None:
        if not isinstance(self.world, int) or self.world < 1:
            raise ValueError(f"world must be an int >= 1, got {self.world!r}")
        if not isinstance(self.rank, int) or not 0 <= self.rank < self.world:
            raise ValueError(f"rank must be in [0, {self.world}), got {self.rank!r}")
        if not isinstance(self.port, int) or not 0 < self.port < 65536:
            raise ValueError(f"port must be a TCP port in 1..65535, got {self.port!r}")
        if not self.device.startswith(("cpu", "cuda")):
            raise ValueError(f"device must be 'cpu' or 'cuda:i', got {self.device!r}")
        if self.timeout_s <= 0 or self.bucket_bytes <= 0:
            raise ValueError(f"timeout_s and bucket_bytes must be > 0, got {self.timeout_s}, {self.bucket_bytes}")


def _init_thread(threads: int, device: torch.device) -> None:
    torch.set_num_threads(threads)  # OpenMP's count is per thread (see loop._Compute)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # the current device is per thread too


class LocalGroup:
    """torch.distributed among the workers of one node (this process's default group).

    Creating it blocks until all `world` workers have joined (at most `timeout_s`).

    Raises:
        RuntimeError / DistBackendError: the other workers did not join in time.
    """

    def __init__(self, config: LocalGroupConfig) -> None:
        self.config = config
        self.rank, self.world = config.rank, config.world
        self.device = torch.device(config.device)
        self.backend = "nccl" if self.device.type == "cuda" else "gloo"
        # Without this, gloo and NCCL look up the host name's address, which may not exist or
        # not be this machine's loopback; the group never leaves the machine.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
        _init_thread(torch.get_num_threads(), self.device)
        timeout = datetime.timedelta(seconds=config.timeout_s)
        store = dist.TCPStore(config.host, config.port, config.world, is_master=config.rank == 0, timeout=timeout)
        dist.init_process_group(self.backend, store=store, rank=config.rank, world_size=config.world, timeout=timeout)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="hyphae-local-group", initializer=_init_thread,
                                        initargs=(torch.get_num_threads(), self.device))
        logger.info("local group: rank %d of %d on %s (%s)", self.rank, self.world, self.device, self.backend)

    @property
    def is_leader(self) -> bool:
        """Rank 0: the worker that talks to the run, checkpoints and reports progress."""
        return self.rank == 0

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run the blocking collective `fn(*args)` in the group's thread (FIFO: in call order).

        Cancelling the caller does not stop the collective: the other ranks are in it too."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # ---- collectives (blocking; call them in the same order on every rank) -----------------

    def sync_gradients(self, params: Sequence[nn.Parameter], stop: bool = False) -> bool:
        """Replace every gradient by its mean over the group; returns whether any rank asked to stop.

        A parameter that got a gradient on some rank only (an MoE expert no local token chose)
        gets zeros on the others first, as one process would see on the union batch; one
        without a gradient anywhere keeps None. The stop wish rides along in the same
        collective, so all ranks agree on the step they stop after without another round trip.
        """
        has = torch.tensor([p.grad is not None for p in params] + [stop], dtype=torch.uint8, device=self.device)
        dist.all_reduce(has, op=dist.ReduceOp.MAX)
        flags = has.tolist()
        grads: list[torch.Tensor] = []
        for p, present in zip(params, flags):
            if present and p.grad is None:
                p.grad = torch.zeros_like(p)
            if present:
                grads.append(p.grad)  # type: ignore[arg-type]
        for bucket in _buckets(grads, self.config.bucket_bytes):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat)
            flat.div_(self.world)
            offset = 0
            for g in bucket:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
        return bool(flags[-1])

    def broadcast_bytes(self, data: torch.Tensor | None) -> torch.Tensor:
        """Rank 0's uint8 buffer on every rank (rank 0 passes it, the others None)."""
        size = torch.tensor([0 if data is None else data.numel()], dtype=torch.int64, device=self.device)
        dist.broadcast(size, 0)
        if data is not None:
            buf = data.to(self.device)
        else:
            buf = torch.empty(int(size.item()), dtype=torch.uint8, device=self.device)
        if buf.numel():
            dist.broadcast(buf, 0)
        return buf

    def share_float(self, value: float) -> float:
        """Rank 0's `value` on every rank (float64: exact for clocks and step numbers)."""
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.broadcast(t, 0)
        return float(t.item())

    def share_int(self, value: int) -> int:
        """Rank 0's `value` on every rank."""
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.broadcast(t, 0)
        return int(t.item())

    def broadcast_module(self, module: nn.Module) -> None:
        """Overwrite every rank's parameters and buffers with rank 0's, in place."""
        for t in module.state_dict().values():
            if t.device == self.device:
                dist.broadcast(t, 0)
            else:  # a CPU buffer on a GPU worker: NCCL only moves device tensors
                moved = t.to(self.device)
                dist.broadcast(moved, 0)
                t.copy_(moved)

    def close(self) -> None:
        """Leave the group; idempotent. A collective still waiting in the thread fails there."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        if dist.is_initialized():
            dist.destroy_process_group()


def _buckets(tensors: Sequence[torch.Tensor], bucket_bytes: int) -> list[list[torch.Tensor]]:
    """Consecutive runs of one dtype and device, each about `bucket_bytes` (the same on every rank)."""
    out: list[list[torch.Tensor]] = []
    size = 0
    for t in tensors:
        if out and (out[-1][0].dtype, out[-1][0].device) == (t.dtype, t.device) and size < bucket_bytes:
            out[-1].append(t)
        else:
            out.append([t])
            size = 0
        size += t.numel() * t.element_size()
    return out


class GroupStopped(Exception):
    """The group agreed to stop after `step` (every rank raises it from the same step)."""

    def __init__(self, step: int) -> None:
        super().__init__(f"the local group stopped after step {step}")
        self.step = step


class LocalGroupSync(Callback):
    """The loop hooks of a group: average the gradients each step, stop together.

    Args:
        group: this node's group.
        stop_requested: polled once a step; when any rank says True, every rank raises
            `GroupStopped` from `on_step` of the same step (nothing is left half-done).
    """

    def __init__(self, group: LocalGroup, *, stop_requested: Callable[[], bool] = lambda: False) -> None:
        self.group = group
        self._stop_requested = stop_requested
        self._stop = False

    async def on_gradients(self, step: int, strategy: Strategy) -> None:
        params = [p for p in strategy.model.parameters() if p.requires_grad]
        self._stop = await self.group.run(self.group.sync_gradients, params, self._stop_requested())

    async def on_step(self, step: int) -> None:
        if self._stop:
            raise GroupStopped(step)


class _PositionOnly:
    """Takes only the position from rank 0's data state: each rank keeps its own stream."""

    def __init__(self, batches: BatchStream) -> None:
        self._batches = batches

    def load_state_dict(self, state: dict[str, int]) -> None:
        target = int(state["position"])
        if isinstance(self._batches, BatchStream):
            self._batches.position = target  # its batches are a function of the position alone
            return
        # A streamed text source (TextStream) is positioned by what it has read: draw the batches
        # this rank drew before, so it resumes exactly (costs re-reading its shard that far).
        while self._batches.position < target:
            self._batches.next()


def resume_in_group(group: LocalGroup, store: CheckpointStore, strategy: Strategy, batches: BatchStream) -> int:
    """`resume` on every rank from rank 0's checkpoint store; returns the step (0 if none).

    Only rank 0 writes checkpoints. The others load the same one (weights, strategy, RNG) and
    the data position, but keep their own stream: the ranks draw different batches.

    Raises:
        CheckpointError: as `resume`, or rank 0 resumed from another step than this rank could
            load (the store changed under the group).
    """
    mine = resume(store, strategy, batches if group.is_leader else _PositionOnly(batches))  # type: ignore[arg-type]
    step = group.share_int(mine)
    if step != mine:
        raise CheckpointError(f"rank {group.rank} resumed at step {mine}, rank 0 at {step}; restart the group")
    return step
