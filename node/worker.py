"""The training worker process: ``python -m hyphae.node.worker --socket ADDR --index I``.

Started and supervised by the daemon (one per local GPU, one on the CPU where there is none). It
connects back over the IPC socket, receives its :class:`~.ipc.Setup`, builds the model, data and
strategy, resumes from the newest local checkpoint, and runs :func:`hyphae.training.train` with a
:class:`~.worker_comm.DaemonComm`. Progress goes to the daemon as :class:`~.ipc.Progress`.

A :class:`~.ipc.Stop` from the daemon (or losing the daemon) cancels the loop, saves a
checkpoint and exits 0. SIGINT is ignored: Ctrl+C in the terminal reaches the whole process
group, and it is the daemon's job to stop its workers in order.
"""

from __future__ import annotations

import argparse
import dataclasses
import asyncio
import logging
import os
import signal
import socket
import sys
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import torch

from hyphae.training import (
    BatchStream,
    Callback,
    CheckpointStore,
    EvalInfo,
    LoopConfig,
    Manifest,
    StepInfo,
    save_checkpoint,
    train,
)
from hyphae.training.algorithms import build_strategy
from hyphae.training.comm import CommClosed, CommError
from hyphae.training.robust import is_finite

from . import data_shards, ipc, worker_build
from .worker_comm import DaemonComm
from .worker_group import AUTO_DEVICE
from .worker_rank import WorkerRank

__all__ = ["main", "connect_address"]

log = logging.getLogger("hyphae.worker")



def connect_address(address: str) -> socket.socket:
    """Connect to the daemon's IPC socket (Linux abstract names start with '@')."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect("\0" + address[1:] if address.startswith("@") else address)
    return sock


# What each algorithm can say about itself, read off the strategy for the dashboard: name ->
# attribute. Absent attributes are skipped, so every strategy reports what it has.
_STATUS_ATTRS = {
    "outer_steps": "outer_steps", "local_only_steps": "local_only_steps", "last_group": "last_group",
    "gossips": "gossips", "failed_gossips": "failed_gossips", "last_gossip_failure": "last_failure",
    "owned_experts": "owned", "sync_rounds": "rounds",
    "merges": "merges", "zo_next_step": "next_step", "zo_snapshot_step": "snapshot_step",
    "zo_weights_hash": "last_hash", "zo_updates_applied": "updates_applied", "failed_rounds": "failed_rounds",
    "rejected_updates": "rejected_updates", "refused_peers": "rejected_peers",
}


def algorithm_status(strategy: object) -> dict[str, Any]:
    """Plain-data status of ``strategy`` (numbers, strings, short lists) for the daemon."""
    out: dict[str, Any] = {}
    for name, attr in _STATUS_ATTRS.items():
        value = getattr(strategy, attr, None)
        if isinstance(value, bool | int | float | str):
            out[name] = value
        elif isinstance(value, list | tuple | set | frozenset) and len(value) <= 64:
            items = sorted(value) if isinstance(value, set | frozenset) else list(value)
            if all(isinstance(v, int | str) for v in items):
                out[name] = items
    return out


class _Reporter(Callback):
    """Sends log lines, evals and checkpoints to the daemon as they happen."""

    def __init__(self, comm: DaemonComm, strategy: Any, preset: str) -> None:
        self._comm = comm
        self._strategy = strategy
        self._preset = preset
        self._last = (time.perf_counter(), 0)

    async def on_log(self, info: StepInfo) -> None:
        now, last_tokens = time.perf_counter(), self._last[1]
        rate = (info.tokens - last_tokens) / max(now - self._last[0], 1e-9)
        self._last = (now, info.tokens)
        metrics = {k: v for k, v in info.metrics.items() if k != "lr"} | algorithm_status(self._strategy)
        await self._comm.send_message(ipc.Progress(kind="log", step=info.step, tokens=info.tokens,
                                                   elapsed_s=info.elapsed_s, loss=info.loss, tokens_per_s=rate,
                                                   metrics=metrics))

    async def on_eval(self, info: EvalInfo) -> None:
        await self._comm.send_message(ipc.Progress(kind="eval", step=info.step, tokens=info.tokens,
                                                   elapsed_s=info.elapsed_s, val_loss=info.val_loss))

    async def on_checkpoint(self, manifest: Manifest) -> None:
        await self._comm.send_message(ipc.Progress(kind="checkpoint", step=manifest.step, tokens=0,
                                                   elapsed_s=0.0, checkpoint=manifest.weights_sha256))
        await announce_weights(self._comm, self._strategy, manifest.step, self._preset)


async def announce_weights(comm: DaemonComm, strategy: Any, step: int, preset: str) -> None:
    """Offer this node's weights to the run (a blob, named in the run state) for joiners."""
    weights = {n: t.detach().cpu() for n, t in strategy.model.state_dict().items()}
    digest = await comm.put_tensors(weights)
    await comm.state_set(f"{RUN_CHECKPOINTS}{comm.peer_id}", {
        "step": step, "weights": digest, "algorithm": strategy.algorithm, "preset": preset,
    })


async def _run(address: str, index: int) -> int:
    reader, writer = await asyncio.open_unix_connection(sock=connect_address(address))
    await ipc.send(writer, ipc.WorkerHello(index=index, pid=os.getpid()))
    setup = await ipc.recv(reader)
    if not isinstance(setup, ipc.Setup):
        raise RuntimeError(f"expected setup from the daemon, got {type(setup).__name__}")
    global _STOP_EVENT, _LOOP
    stop = asyncio.Event()
    _STOP_EVENT, _LOOP = stop, asyncio.get_running_loop()
    comm = DaemonComm(reader, writer, peer_id=setup.peer_id, on_stop=lambda reason: stop.set())
    comm.start()
    try:
        return await _train(setup, comm, stop)
    finally:
        await comm.aclose()
        writer.close()


async def _train(setup: ipc.Setup, comm: DaemonComm, stop: asyncio.Event) -> int:
    if setup.device == AUTO_DEVICE:
        setup = dataclasses.replace(setup, device="cuda:0" if torch.cuda.is_available() else "cpu")
    if setup.threads:
        torch.set_num_threads(setup.threads)
    torch.manual_seed(setup.seed)
    rank = await WorkerRank.open(setup)  # one of the node's workers (a lone worker: rank 0 of 1)
    share = rank.group.share_int if rank.group is not None else (lambda value: value)
    try:
        built = await worker_build.build(setup, share_int=share, local_rank=rank.rank, local_world=max(1, setup.world),
                                         member_shard=lambda: data_shards.member_shard(comm, worker_build.data_id(setup)))
    except ValueError as exc:  # a setting the user must fix: restarting would fail again
        return await _cannot_train(comm, exc)
    model, batches, val = built.model, built.batches, built.val
    store = CheckpointStore(Path(setup.checkpoint_dir))
    fresh = not store.steps()
    joined = 0
    if fresh and (setup.init_from or setup.algorithm not in OUTER_STATE_ALGORITHMS):
        joined = await _initial_weights(setup, comm, model) if rank.leader else 0  # given weights, or DDP's
    joined = await rank.share_weights(model, joined)
    # The strategy is built after the weights are in place: slow weights start from them.
    try:
        strategy = _strategy(setup, model, rank.comm(comm))
    except ValueError as exc:  # an unknown algorithm_config key, bf16 on a GPU without it, ...
        return await _cannot_train(comm, exc)
    start = rank.resume(store, strategy, batches)
    if start:
        await comm.send_message(ipc.Progress(kind="resumed", step=start, tokens=0, elapsed_s=0.0))
    else:  # a fresh node (or one whose checkpoints would not load) enters the run
        strategy, start = await _join(setup, comm, rank, model, strategy, joined)
        if start:  # a member that was there all along would be this far into its data stream
            enter_data_at(batches, start, setup.grad_accum)
    loop = rank.loop(LoopConfig(max_steps=setup.max_steps or None, log_every=setup.log_every,
                                grad_accum_steps=setup.grad_accum,
                                eval_every=setup.eval_every, checkpoint_every=setup.checkpoint_every,
                                compute_in_thread=True))
    if loop.max_steps is not None and start >= loop.max_steps:
        await comm.send_message(ipc.Progress(kind="done", step=start, tokens=0, elapsed_s=0.0))
        return 0
    reporter = _Reporter(comm, strategy, worker_build.model_label(setup))
    steps = _StepCounter(start)
    every: list[Callback] = [steps]
    if isinstance(batches, BatchStream):  # follow the run's shard table (a text stream keeps its shard)
        every.append(data_shards.ShardKeeper(strategy.comm, batches, worker_build.data_id(setup),
                                             every=setup.log_every, local_rank=rank.rank,
                                             local_world=max(1, setup.world)))
    training = asyncio.ensure_future(train(strategy, batches, loop, val_set=val, checkpoints=store,
                                           callbacks=rank.callbacks([reporter], every, stop), start_step=start))
    stopper = asyncio.ensure_future(rank.stop_signal(stop).wait())
    await asyncio.wait([training, stopper], return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    if training.done() and not rank.stopped_together(training):
        result = training.result()
        await comm.send_message(ipc.Progress(kind="done", step=start + result.steps, tokens=result.tokens,
                                             elapsed_s=result.elapsed_s))
        return 0
    training.cancel()
    await asyncio.gather(training, return_exceptions=True)
    if not rank.leader:
        return 0  # rank 0 saves the group's checkpoint
    manifest = save_checkpoint(store, steps.done, strategy, batches)
    log.info("stopped at step %d; checkpoint %s saved", steps.done, manifest.weights_sha256[:12])
    await comm.send_message(ipc.Progress(kind="checkpoint", step=steps.done, tokens=0, elapsed_s=0.0,
                                         checkpoint=manifest.weights_sha256))
    return 0


def _strategy(setup: ipc.Setup, model: torch.nn.Module, comm: Any) -> Any:
    return build_strategy(setup.algorithm, model, comm, setup.algorithm_config,
                          precision=setup.precision)  # type: ignore[arg-type]  # checked by the daemon


async def _join(setup: ipc.Setup, comm: DaemonComm, rank: WorkerRank, model: torch.nn.Module, strategy: Any,
                joined: int) -> tuple[Any, int]:
    """A fresh node's entry into the run: (the strategy to train, the run step to start at; 0 = the start).

    ``joined``: the step of the weights `_initial_weights` already loaded (given weights, DDP).
    Otherwise the strategy takes the run's own state (`Strategy.catch_up`: the DiLoCo family's
    outer state at the next outer step, SPES's synced weights, ZO's snapshot and log) on every
    local rank alike (their Comm mirrors rank 0's). Members that put no outer state (an older
    version) leave a joiner to a member's weights, as before, with a strategy rebuilt on them.
    """
    if joined:
        strategy.join_at(joined)
        return strategy, joined
    caught = await strategy.catch_up()
    if caught:
        if rank.leader:
            await comm.send_message(ipc.Progress(kind="joined", step=caught, tokens=0, elapsed_s=0.0,
                                                 checkpoint=_JOINED_FROM.get(setup.algorithm, "the run's state")))
        return strategy, caught
    if setup.algorithm not in OUTER_STATE_ALGORITHMS or setup.algorithm not in CATCH_UP_ALGORITHMS:
        return strategy, 0
    joined = await rank.share_weights(model, await _initial_weights(setup, comm, model) if rank.leader else 0)
    if not joined:
        return strategy, 0
    strategy = _strategy(setup, model, rank.comm(comm))  # φ starts from the weights just loaded
    strategy.join_at(joined)
    return strategy, joined


def enter_data_at(batches: Any, step: int, grad_accum: int) -> None:
    """Put a joiner's batch stream where a member's would be after ``step`` steps (``BatchStream``
    batches are a pure function of their index; a text stream starts its shard at the beginning)."""
    if isinstance(batches, BatchStream):
        batches.position = step * max(1, grad_accum)


SETUP_FAILED = 3
"""Exit code of a worker whose settings cannot work (the daemon does not restart it)."""


async def _cannot_train(comm: DaemonComm, exc: ValueError) -> int:
    """Tell the daemon why these settings cannot train (it stops the node with the message)."""
    log.error("cannot train: %s", exc)
    await comm.send_message(ipc.Progress(kind="failed", step=0, tokens=0, elapsed_s=0.0, message=str(exc)[:2000]))
    return SETUP_FAILED

CATCH_UP_ALGORITHMS = ("ddp", "diloco", "noloco", "dadao")
"""Algorithms whose joiners can start from a member's weights (SPES and ZO have their own joins)."""
OUTER_STATE_ALGORITHMS = ("diloco", "noloco", "dadao", "spes")
"""Algorithms whose joiners take the run's own state through the strategy (`Strategy.catch_up`):
the DiLoCo family's outer state of an outer step (training/_join.py), SPES's synced weights."""
_JOINED_FROM = {"diloco": "the run's φ and outer momentum", "noloco": "a member's φ and momentum",
                "dadao": "a member's x and x̃", "spes": "the run's synced weights", "zo": "the run's snapshot and log"}
RUN_CHECKPOINTS = "ckpt/"
FETCH_TIMEOUT_S = 300.0


async def _initial_weights(setup: ipc.Setup, comm: DaemonComm, model: torch.nn.Module) -> int:
    """Load the weights a fresh node starts from; return the step they belong to (0: seeded init).

    ``init_from`` names a checkpoint directory or "run"; otherwise a node joining a run in
    progress takes the newest weights its members announced for this algorithm and preset.
    """
    if setup.init_from and setup.init_from != "run":
        ckpt = CheckpointStore(Path(setup.init_from)).load(map_location=setup.device)
        model.load_state_dict(ckpt.weights)
        log.info("initialised from %s (step %d)", ckpt.path, ckpt.manifest.step)
        await comm.send_message(ipc.Progress(kind="joined", step=0, tokens=0, elapsed_s=0.0,
                                             checkpoint=f"init from {ckpt.path}"))
        return 0
    if setup.init_from != "run" and setup.algorithm not in CATCH_UP_ALGORITHMS:
        return 0
    records = await comm.state_items(RUN_CHECKPOINTS)
    usable = [r for r in records.values() if isinstance(r, dict) and r.get("preset") == worker_build.model_label(setup)
              and (setup.init_from == "run" or r.get("algorithm") == setup.algorithm)
              and isinstance(r.get("weights"), str) and isinstance(r.get("step"), int)]
    if not usable:
        return 0
    newest, weights = await _fetch_checked(comm, model, records, usable)
    if newest is None:
        return 0
    model.load_state_dict(weights)
    step = 0 if setup.init_from == "run" else newest["step"]
    await comm.send_message(ipc.Progress(kind="joined", step=step, tokens=0, elapsed_s=0.0,
                                         checkpoint=f"weights {newest['weights'][:12]} of step {newest['step']}"))
    return step


async def _fetch_checked(comm: DaemonComm, model: torch.nn.Module, records: dict[str, Any],
                         usable: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, dict[str, torch.Tensor]]:
    """The newest believable checkpoint record and its weights, checked before anything loads them.

    A record's step is only its author's claim, and a joiner takes the highest: so a step above
    the median (low) of the members' recorded steps is not believed (a member claiming step 10^9
    would otherwise always be picked), and the fetched tensors must be finite with this model's
    names and shapes. A record that fails is skipped, its author reported, and the next one tried.
    """
    believable = statistics.median_low(r["step"] for r in usable)
    expected = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    for record in sorted((r for r in usable if r["step"] <= believable),
                         key=lambda r: (r["step"], r["weights"]), reverse=True):
        author = next((k[len(RUN_CHECKPOINTS):] for k, v in records.items() if v is record), "")
        try:
            weights = await comm.get_tensors(record["weights"], timeout_s=FETCH_TIMEOUT_S)
        except CommClosed:
            raise
        except (CommError, TimeoutError) as exc:
            log.warning("the run's weights %s (step %d) are unavailable (%s)", record["weights"][:12], record["step"], exc)
            continue
        shapes = {n: tuple(t.shape) for n, t in weights.items()}
        why = ("names or shapes differ from this model" if shapes != expected
               else "" if is_finite(weights) else "NaN/Inf values")
        if not why:
            return record, weights
        log.warning("refusing the run's weights %s of step %d from %s: %s", record["weights"][:12], record["step"],
                    author or "?", why)
        if author:
            await comm.refuse(author, f"checkpoint {record['weights'][:12]}: {why}")
    return None, {}


class _StepCounter(Callback):
    """Knows how many steps are complete, so a stop mid-run checkpoints the right step."""

    def __init__(self, start: int) -> None:
        self.done = start

    async def on_step(self, step: int) -> None:
        self.done = step


ORPHAN_EXIT_S = 10.0


def _die_with_the_daemon() -> None:
    """Make sure a worker never outlives its daemon.

    Linux sends this process SIGTERM when its parent dies (PR_SET_PDEATHSIG). The handler is a
    plain Python one, so it runs even while the event loop is busy; it asks for the graceful
    stop (checkpoint) and arms a timer that ends the process regardless after ORPHAN_EXIT_S.
    """
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        log.debug("no PR_SET_PDEATHSIG here; relying on the IPC socket closing")


def _on_sigterm(signum: int, frame: Any) -> None:
    timer = threading.Timer(ORPHAN_EXIT_S, lambda: os._exit(1))
    timer.daemon = True
    timer.start()
    stop = _STOP_EVENT
    loop = _LOOP
    if stop is not None and loop is not None and not loop.is_closed():
        loop.call_soon_threadsafe(stop.set)
    else:
        os._exit(0)


_STOP_EVENT: asyncio.Event | None = None
_LOOP: asyncio.AbstractEventLoop | None = None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hyphae-worker")
    parser.add_argument("--socket", required=True, help="daemon IPC address ('@name' = abstract)")
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _on_sigterm)
    _die_with_the_daemon()
    if os.getppid() == 1:
        return 1  # the daemon died before we could ask to be told
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format=f"%(asctime)s worker{args.index} %(levelname)s %(name)s: %(message)s")
    logging.getLogger("libp2p").setLevel(logging.ERROR)
    return asyncio.run(_run(args.socket, args.index))


if __name__ == "__main__":
    sys.exit(main())
