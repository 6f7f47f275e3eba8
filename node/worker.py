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
import asyncio
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path

import torch

from hyphae.training import (
    BatchStream,
    Callback,
    CheckpointStore,
    DataConfig,
    EvalInfo,
    LoopConfig,
    Manifest,
    StepInfo,
    build_model,
    load_corpus,
    model_config,
    resume,
    save_checkpoint,
    train,
    validation_batches,
)
from hyphae.training.algorithms import build_strategy

from . import ipc
from .worker_comm import DaemonComm

__all__ = ["main", "connect_address"]

log = logging.getLogger("hyphae.worker")

EVAL_BATCHES = 8


def connect_address(address: str) -> socket.socket:
    """Connect to the daemon's IPC socket (Linux abstract names start with '@')."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect("\0" + address[1:] if address.startswith("@") else address)
    return sock


class _Reporter(Callback):
    """Sends log lines, evals and checkpoints to the daemon as they happen."""

    def __init__(self, comm: DaemonComm, tokens_per_step: int) -> None:
        self._comm = comm
        self._tokens_per_step = tokens_per_step
        self._last = (time.perf_counter(), 0)

    async def on_log(self, info: StepInfo) -> None:
        now, last_tokens = time.perf_counter(), self._last[1]
        rate = (info.tokens - last_tokens) / max(now - self._last[0], 1e-9)
        self._last = (now, info.tokens)
        await self._comm.send_message(ipc.Progress(kind="log", step=info.step, tokens=info.tokens,
                                                   elapsed_s=info.elapsed_s, loss=info.loss, tokens_per_s=rate))

    async def on_eval(self, info: EvalInfo) -> None:
        await self._comm.send_message(ipc.Progress(kind="eval", step=info.step, tokens=info.tokens,
                                                   elapsed_s=info.elapsed_s, val_loss=info.val_loss))

    async def on_checkpoint(self, manifest: Manifest) -> None:
        await self._comm.send_message(ipc.Progress(kind="checkpoint", step=manifest.step, tokens=0,
                                                   elapsed_s=0.0, checkpoint=manifest.weights_sha256))


async def _run(address: str, index: int) -> int:
    reader, writer = await asyncio.open_unix_connection(sock=connect_address(address))
    await ipc.send(writer, ipc.WorkerHello(index=index, pid=os.getpid()))
    setup = await ipc.recv(reader)
    if not isinstance(setup, ipc.Setup):
        raise RuntimeError(f"expected setup from the daemon, got {type(setup).__name__}")
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    comm = DaemonComm(reader, writer, peer_id=setup.peer_id, on_stop=lambda reason: stop.set())
    comm.start()
    try:
        return await _train(setup, comm, stop)
    finally:
        await comm.aclose()
        writer.close()


async def _train(setup: ipc.Setup, comm: DaemonComm, stop: asyncio.Event) -> int:
    torch.manual_seed(setup.seed)
    config = model_config(setup.preset)
    model = build_model(config, seed=setup.seed, device=setup.device)  # identical init on every peer
    data = DataConfig(source=setup.data or "stdlib", cache_dir=setup.cache_dir)
    corpus = load_corpus(data, min_tokens=config.context_length + 1)
    seq_len = min(setup.seq_len, config.context_length)
    batches = BatchStream(corpus.train, batch_size=setup.batch_size, seq_len=seq_len, seed=setup.seed,
                          stream=setup.peer_id)
    val = validation_batches(corpus.val, batch_size=setup.batch_size, seq_len=seq_len, n_batches=EVAL_BATCHES)
    strategy = build_strategy(setup.algorithm, model, comm, setup.algorithm_config)
    store = CheckpointStore(Path(setup.checkpoint_dir))
    start = resume(store, strategy, batches)
    if start:
        await comm.send_message(ipc.Progress(kind="resumed", step=start, tokens=0, elapsed_s=0.0))
    loop = LoopConfig(max_steps=setup.max_steps or None, log_every=setup.log_every,
                      eval_every=setup.eval_every, checkpoint_every=setup.checkpoint_every)
    if loop.max_steps is not None and start >= loop.max_steps:
        await comm.send_message(ipc.Progress(kind="done", step=start, tokens=0, elapsed_s=0.0))
        return 0
    reporter = _Reporter(comm, setup.batch_size * seq_len)
    steps = _StepCounter(start)
    training = asyncio.ensure_future(train(strategy, batches, loop, val_set=val, checkpoints=store,
                                           callbacks=[reporter, steps], start_step=start))
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait([training, stopper], return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    if training.done():
        result = training.result()
        await comm.send_message(ipc.Progress(kind="done", step=start + result.steps, tokens=result.tokens,
                                             elapsed_s=result.elapsed_s))
        return 0
    training.cancel()
    await asyncio.gather(training, return_exceptions=True)
    manifest = save_checkpoint(store, steps.done, strategy, batches)
    log.info("stopped at step %d; checkpoint %s saved", steps.done, manifest.weights_sha256[:12])
    await comm.send_message(ipc.Progress(kind="checkpoint", step=steps.done, tokens=0, elapsed_s=0.0,
                                         checkpoint=manifest.weights_sha256))
    return 0


class _StepCounter(Callback):
    """Knows how many steps are complete, so a stop mid-run checkpoints the right step."""

    def __init__(self, start: int) -> None:
        self.done = start

    async def on_step(self, step: int) -> None:
        self.done = step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hyphae-worker")
    parser.add_argument("--socket", required=True, help="daemon IPC address ('@name' = abstract)")
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format=f"%(asctime)s worker{args.index} %(levelname)s %(name)s: %(message)s")
    logging.getLogger("libp2p").setLevel(logging.ERROR)
    return asyncio.run(_run(args.socket, args.index))


if __name__ == "__main__":
    sys.exit(main())
