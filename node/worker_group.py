"""The daemon's side of a node's worker group: which devices, which port, and the processes.

A node trains with one worker per GPU (``--gpus all|0,1``) or ``--workers N`` CPU workers. The
workers form a local group (:mod:`hyphae.training.local_group`): they reduce their gradients
among themselves and only worker 0 talks to the daemon's Comm, so the node is one member of
the run. The group lives and dies as one: when a worker exits, the others are stopped and the
whole group restarts from worker 0's latest checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import socket
import sys
from collections.abc import Awaitable, Callable

from hyphae.protocol.errors import ConfigError

from . import ipc
from .training_config import GROUP_UNSUPPORTED, TrainConfig, parse_gpus

__all__ = ["worker_devices", "free_port", "node_totals", "WorkerProcesses"]

log = logging.getLogger(__name__)

STOP_GRACE_S = 2.5
"""How long a lone worker gets to checkpoint and exit after it is asked to stop."""
GROUP_STOP_GRACE_S = 5.0
"""The same for a group: its workers first agree at a step boundary, then worker 0 saves."""
KILL_AFTER_S = 1.0


AUTO_DEVICE = "auto"
"""A lone worker's device: "cuda:0" where torch sees a GPU, else "cpu" (resolved by the worker)."""


def worker_devices(config: TrainConfig) -> list[str]:
    """One device per worker: ``cuda:i`` for each GPU of ``gpus``, else ``workers`` CPU workers
    (a lone worker gets AUTO_DEVICE: GPU 0 where there is one, as before).

    Raises:
        ConfigError: GPUs asked for on a machine where torch sees none, an index that is not
            there, or several workers for an algorithm that cannot run in lockstep.
    """
    gpus = parse_gpus(config.gpus)
    if gpus == ():
        if config.workers == 1:
            # The worker picks GPU 0 or the CPU itself: importing torch here would hold up the
            # daemon's start by seconds (testnets of daemons started in turn drift apart).
            return [AUTO_DEVICE]
        devices = ["cpu"] * config.workers
    else:
        import torch  # only when GPUs are asked for: the daemon otherwise never loads torch

        if not torch.cuda.is_available():
            build = f"torch {torch.__version__}" + (", a CPU-only build" if torch.version.cuda is None else "")
            raise ConfigError(f"--gpus {config.gpus} needs CUDA, and torch sees no GPU on this machine ({build}); "
                              "leave out --gpus, or use --workers N for N CPU workers")
        count = torch.cuda.device_count()
        missing = [i for i in gpus or () if i >= count]
        if missing:
            raise ConfigError(f"--gpus {config.gpus}: GPU {missing[0]} is not there; this machine has {count} "
                              f"(0..{count - 1})")
        devices = [f"cuda:{i}" for i in (gpus if gpus is not None else range(count))]
    if len(devices) > 1 and config.algorithm in GROUP_UNSUPPORTED:
        raise ConfigError(f"algorithm {config.algorithm!r} cannot run on {len(devices)} workers of one node "
                          f"({GROUP_UNSUPPORTED[config.algorithm]}); use one worker, or another algorithm")
    return devices


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for the group's rendezvous (it binds it moments later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def node_totals(progress: ipc.Progress, workers: int) -> ipc.Progress:
    """The node's tokens in worker 0's report: each of the ``workers`` trains as many as it does."""
    if workers <= 1:
        return progress
    rate = None if progress.tokens_per_s is None else progress.tokens_per_s * workers
    return dataclasses.replace(progress, tokens=progress.tokens * workers, tokens_per_s=rate)


class WorkerProcesses:
    """The worker processes of one start of the group; index i is rank i."""

    def __init__(self, procs: list[asyncio.subprocess.Process]) -> None:
        self.procs = procs

    @classmethod
    async def spawn(cls, address: str, count: int) -> WorkerProcesses:
        """Start ``count`` workers that connect back to ``address``."""
        procs = []
        for index in range(count):
            procs.append(await asyncio.create_subprocess_exec(
                sys.executable, "-m", "hyphae.node.worker", "--socket", address, "--index", str(index),
                stdin=asyncio.subprocess.DEVNULL,
            ))
        return cls(procs)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def live_index(self, pid: int) -> int | None:
        """The index of the live worker with this pid, or None."""
        return next((i for i, p in enumerate(self.procs) if p.pid == pid and p.returncode is None), None)

    async def wait_first(self) -> tuple[int, int]:
        """Wait until a worker exits; returns its index and exit code."""
        waits = {asyncio.ensure_future(p.wait()): i for i, p in enumerate(self.procs)}
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        index = min(waits[w] for w in done)
        return index, self.procs[index].returncode  # type: ignore[return-value]

    async def wait_all(self, timeout_s: float) -> bool:
        """Wait for every worker to exit, at most ``timeout_s``; True if they did."""
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.gather(*(p.wait() for p in self.procs))
            return True
        except TimeoutError:
            return False

    async def stop(self, ask: Callable[[int], Awaitable[None]]) -> None:
        """Ask each live worker to stop (``ask(index)``: it checkpoints), then SIGTERM, then SIGKILL."""
        live = [i for i, p in enumerate(self.procs) if p.returncode is None]
        if not live:
            return
        for i in live:
            with contextlib.suppress(Exception):
                await ask(i)
        grace_s = STOP_GRACE_S if len(self.procs) == 1 else GROUP_STOP_GRACE_S
        for sig, wait_s in ((None, grace_s), (signal.SIGTERM, KILL_AFTER_S), (signal.SIGKILL, 5.0)):
            if sig is not None:
                for p in self.procs:
                    if p.returncode is None:
                        with contextlib.suppress(ProcessLookupError):
                            p.send_signal(sig)
            if await self.wait_all(wait_s):
                return
            log.warning("training worker(s) %s did not stop%s", [i for i, p in enumerate(self.procs)
                                                                  if p.returncode is None],
                        "" if sig is None else f" after {sig.name}")
