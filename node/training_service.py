"""The daemon's training service: starts the worker, serves its Comm, restarts it if it dies.

It runs one worker (GPU 0 if CUDA is present, else the CPU), or a group: one worker per GPU of
``--gpus``, or ``--workers N`` CPU workers (:mod:`.worker_group`). A group's workers reduce
among themselves and only worker 0 calls the Comm or reports progress, so the node is one
member of the run; one worker exiting restarts the whole group. The worker talks to the daemon over a Linux abstract Unix socket
(no path-length limit, nothing left on disk) with typed messages (:mod:`.ipc`), tensors in
shared memory (:mod:`.shm`). Any local user can connect to an abstract socket, so a connection
is served only if the kernel says (``SO_PEERCRED``) it comes from our uid and from the pid of
the worker this service spawned; anything else is logged and closed before a byte is read.

A worker that crashes is logged and restarted from its latest checkpoint, with backoff. On
shutdown the worker is asked to stop (it checkpoints), then SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import numpy as np
from aiohttp import web

from hyphae.protocol.errors import EndOfStream, ProtocolViolation

from . import ipc
from .comm_backend import CommBackend, CommFailure, Tensors
from .shm import Attachments, SegmentPool, numpy_views, write_numpy
from .worker_group import WorkerProcesses, free_port, node_totals, worker_devices

if TYPE_CHECKING:
    from .daemon import Daemon

__all__ = ["TrainingService"]

log = logging.getLogger(__name__)

STOP_GRACE_S = 2.5
MAX_BACKOFF_S = 30.0
PROGRESS_LOG_EVERY_S = 10.0


class TrainingService:
    """Runs and supervises the training worker of this daemon."""

    name = "training"

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.config = daemon.config.training
        self.backend = CommBackend(daemon)
        self.address = f"@hyphae-{os.getpid()}-{secrets.token_hex(4)}"
        self.state = "starting"
        self.restarts = 0
        self.worker_pid: int | None = None
        self.latest: dict[str, Any] = {}
        self.history: deque[dict[str, Any]] = deque(maxlen=2000)
        self.evals: deque[dict[str, Any]] = deque(maxlen=500)
        self.algorithm_state: dict[str, Any] = {}
        self._proc: asyncio.subprocess.Process | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._group = WorkerProcesses([])
        self._devices: list[str] = []
        self._group_port = 0
        self._writers: dict[int, asyncio.StreamWriter] = {}
        self._finished = False
        self._failed = ""
        self._pool = SegmentPool(f"hyd{os.getpid() % 100000}")
        self._attached = Attachments()
        self._last_progress_log = 0.0

    # ---- lifecycle -------------------------------------------------------------------------

    async def run(self) -> None:
        self._devices = worker_devices(self.config)  # a ConfigError (no GPU for --gpus) stops the daemon
        await self.backend.start()
        server = await asyncio.start_unix_server(self._on_worker, path="\0" + self.address[1:])
        try:
            await self._supervise()
        finally:
            await self._stop_worker()
            server.close()
            self._pool.close()
            self._attached.close()

    async def _supervise(self) -> None:
        backoff = 1.0
        while True:
            self.state = "running"
            self._group_port = free_port() if len(self._devices) > 1 else 0
            self._group = await WorkerProcesses.spawn(self.address, len(self._devices))
            self._proc = self._group.procs[0]
            self.worker_pid = self._proc.pid
            started = time.monotonic()
            index, code = await self._group.wait_first()
            if self._failed:
                self.state = "failed"
                self.latest.update(error=self._failed)
                self.daemon.request_stop(f"training cannot start: {self._failed}", exit_code=2)
                await asyncio.Event().wait()
            if self._finished:
                await self._group.wait_all(STOP_GRACE_S)  # a group's workers end at the same step
                self.state = "done"
                log.info("training finished at step %s", self.latest.get("step"))
                if self.config.max_steps:
                    self.daemon.request_stop("training reached --max-steps")
                await asyncio.Event().wait()  # stay up (serving the API) until the daemon stops
            if time.monotonic() - started > 60:
                backoff = 1.0
            self.restarts += 1
            self.state = "restarting"
            which = "" if len(self._devices) == 1 else f" {index} of {len(self._devices)}"
            log.error("training worker%s exited with code %s; restarting from the latest checkpoint in %.0f s",
                      which, code, backoff)
            await self._stop_worker()  # the rest of a group
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_S)

    async def _stop_worker(self) -> None:
        """Ask every live worker to stop (it checkpoints), then SIGTERM, then SIGKILL."""
        if all(p.returncode is not None for p in self._group.procs):
            return
        self.state = "stopping"
        await self._group.stop(self._ask_stop)

    async def _ask_stop(self, index: int) -> None:
        writer = self._writers.get(index)
        if writer is not None:
            await ipc.send(writer, ipc.Stop(reason="the daemon is stopping"))

    # ---- IPC -------------------------------------------------------------------------------

    async def _on_worker(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index: int | None = None
        try:
            if not self._is_our_worker(writer):
                return
            hello = await ipc.recv(reader)
            index = self._group.live_index(hello.pid) if isinstance(hello, ipc.WorkerHello) else None
            if index is None or index != hello.index:
                log.warning("refusing an IPC connection that is not our worker")
                index = None
                return
            self._writers[index] = writer
            if index == 0:
                self._writer = writer
            await ipc.send(writer, self._setup(index))
            async with asyncio.TaskGroup() as calls:
                await self._read_worker(reader, writer, calls, leader=index == 0)
        except (EndOfStream, ConnectionError):
            pass
        finally:
            if index is not None and self._writers.get(index) is writer:
                del self._writers[index]
            if self._writer is writer:
                self._writer = None
            writer.close()

    def _is_our_worker(self, writer: asyncio.StreamWriter) -> bool:
        """True if the kernel says the connecting process is the worker we spawned (same uid)."""
        try:
            pid, uid, _ = ipc.peer_credentials(writer)
        except ProtocolViolation as exc:
            log.warning("refusing an IPC connection: %s", exc)
            return False
        live = [p.pid for p in self._group.procs if p.returncode is None]
        worker = live[0] if len(live) == 1 else (live or None)
        if uid != os.getuid() or pid not in live:
            log.warning("refusing an IPC connection from pid %d uid %d: not the worker this daemon started "
                        "(pid %s, uid %d)", pid, uid, worker, os.getuid())
            return False
        return True

    async def _read_worker(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                           calls: asyncio.TaskGroup, *, leader: bool = True) -> None:
        """Dispatch the worker's messages until it disconnects; calls run concurrently.

        Only a group's worker 0 (the leader) speaks for the node: the others' calls are refused
        and their progress reports dropped (they mirror worker 0's)."""
        while True:
            try:
                message = await ipc.recv(reader)
            except EndOfStream:
                return
            except ProtocolViolation as exc:
                log.error("the worker broke the IPC protocol, dropping its connection: %s", exc)
                return
            if isinstance(message, ipc.Call) and not leader:
                await ipc.send(writer, ipc.Reply(id=message.id, error={
                    "kind": "PermissionError", "message": "only worker 0 of a node's group calls the Comm"}))
            elif isinstance(message, ipc.Call):
                calls.create_task(self._serve_call(message, writer))
            elif isinstance(message, ipc.Progress) and not leader:
                pass
            elif isinstance(message, ipc.Progress):
                self._on_progress(message)
            elif isinstance(message, ipc.Release):
                self._pool.release(message.shm)

    def _setup(self, index: int = 0) -> ipc.Setup:
        cfg = self.config
        root = self.daemon.datadir.root
        return ipc.Setup(
            peer_id=self.daemon.host.peer_id, preset=cfg.preset, algorithm=cfg.algorithm,
            algorithm_config=dict(cfg.algorithm_config), max_steps=cfg.max_steps, seed=cfg.seed,
            data=str(cfg.data) if cfg.data else "", cache_dir=str(root / "cache"),
            checkpoint_dir=str(root / "checkpoints"), device=self._devices[index], batch_size=cfg.batch_size,
            seq_len=cfg.seq_len, log_every=cfg.log_every, eval_every=cfg.eval_every,
            checkpoint_every=cfg.checkpoint_every, init_from=cfg.init_from, threads=cfg.threads,
            rank=index, world=len(self._devices), group_port=self._group_port,
            model_dir=str(cfg.model or ""), tokenizer=str(cfg.tokenizer or ""), text_field=cfg.text_field,
            grad_accum=cfg.grad_accum, precision=cfg.precision,
            activation_checkpointing=cfg.activation_checkpointing, compile=cfg.compile,
        )

    async def _serve_call(self, call: ipc.Call, writer: asyncio.StreamWriter) -> None:
        try:
            tensors: Tensors = {}
            if call.shm:
                views = numpy_views(self._attached.get(call.shm), call.tensors)
                tensors = {r.name: (r.dtype, r.shape, views[r.name].copy()) for r in call.tensors}
            result, out = await self._dispatch(call.method, call.args, tensors)
            shm, refs = write_numpy(out, self._pool) if out else ("", [])
            reply = ipc.Reply(id=call.id, result=result, shm=shm, tensors=refs)
        except CommFailure as exc:
            reply = ipc.Reply(id=call.id, error={"kind": exc.kind, "message": str(exc), "peer": exc.peer})
        except TimeoutError as exc:
            reply = ipc.Reply(id=call.id, error={"kind": "TimeoutError", "message": str(exc) or "timed out"})
        except (KeyError, TypeError, ValueError) as exc:
            reply = ipc.Reply(id=call.id, error={"kind": "ValueError", "message": f"{call.method}: {exc}"})
        with contextlib.suppress(ConnectionError):
            await ipc.send(writer, reply)

    async def _dispatch(self, method: str, args: dict[str, Any], tensors: Tensors) -> tuple[Any, Tensors]:
        b = self.backend
        if method == "members":
            return await b.members(), {}
        if method == "all_reduce":
            out, included = await b.all_reduce(list(args["group"]), str(args["tag"]), tensors,
                                               str(args["op"]), float(args["timeout_s"]))
            return {"included": included}, out
        if method == "exchange":
            return None, await b.exchange(str(args["peer"]), str(args["tag"]), tensors, float(args["timeout_s"]))
        if method == "publish":
            return await b.publish(str(args["topic"]), int(args["step"]), bytes(args["value"])), {}
        if method == "collect":
            return await b.collect(str(args["topic"]), int(args["step"]), list(args["peers"]),
                                   float(args["timeout_s"])), {}
        if method == "put_blob":
            dtype, _, data = tensors["blob"]
            if dtype != "uint8" or len(tensors) != 1:
                raise CommFailure("ValueError", "put_blob takes exactly one uint8 tensor named 'blob'")
            return await b.put_blob(data.tobytes()), {}
        if method == "get_blob":
            data = await b.get_blob(str(args["digest"]), float(args["timeout_s"]))
            return None, {"blob": ("uint8", (len(data),), np.frombuffer(data, dtype=np.uint8))}
        if method == "state_get":
            return await b.state_get(str(args["key"])), {}
        if method == "state_set":
            return await b.state_set(str(args["key"]), args["value"]), {}
        if method == "state_items":
            return await b.state_items(str(args["prefix"])), {}
        if method == "refuse":
            return b.refuse(str(args["peer"]), str(args["reason"])), {}
        raise CommFailure("ValueError", f"unknown Comm method {method!r}")

    # ---- progress --------------------------------------------------------------------------

    def _on_progress(self, p: ipc.Progress) -> None:
        now = time.time()
        p = node_totals(p, len(self._devices))
        if p.kind == "log":
            self.latest.update(step=p.step, loss=p.loss, tokens=p.tokens, tokens_per_s=p.tokens_per_s, at=now)
            self.history.append({"step": p.step, "loss": p.loss, "tokens": p.tokens, "tokens_per_s": p.tokens_per_s, "t": now})
            self.algorithm_state.update(p.metrics)
            if now - self._last_progress_log >= PROGRESS_LOG_EVERY_S:
                self._last_progress_log = now
                log.info("step %d  loss %.4f  %.0f tokens/s", p.step, p.loss or 0.0, p.tokens_per_s or 0.0)
        elif p.kind == "eval":
            self.latest.update(val_loss=p.val_loss, val_step=p.step)
            self.evals.append({"step": p.step, "val_loss": p.val_loss, "tokens": p.tokens, "t": now})
            log.info("step %d  validation loss %.4f", p.step, p.val_loss or 0.0)
        elif p.kind == "checkpoint":
            self.latest.update(checkpoint_step=p.step, checkpoint=p.checkpoint)
        elif p.kind == "joined":
            self.latest.update(step=p.step, joined_at=p.step)
            log.info("took the run's weights at step %d (%s); training from there", p.step, p.checkpoint)
        elif p.kind == "resumed":
            self.latest.update(step=p.step, resumed_from=p.step)
            log.info("training resumed from the checkpoint at step %d", p.step)
        elif p.kind == "failed":
            self._failed = p.message or "the worker gave no reason"
            log.error("training cannot start: %s", self._failed)
        elif p.kind == "done":
            self._finished = True
            self.latest.update(step=p.step)

    def snapshot(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "algorithm": self.config.algorithm,
            "preset": self.config.preset,
            "max_steps": self.config.max_steps,
            "step": self.latest.get("step", 0),
            "loss": self.latest.get("loss"),
            "val_loss": self.latest.get("val_loss"),
            "tokens": self.latest.get("tokens", 0),
            "tokens_per_s": self.latest.get("tokens_per_s"),
            "checkpoint_step": self.latest.get("checkpoint_step"),
            "worker_pid": self.worker_pid,
            "worker_restarts": self.restarts,
            "error": self.latest.get("error"),
            "workers": len(self._devices),
            "worker_pids": self._group.pids,
            "members": None,
            "algorithm_state": dict(self.algorithm_state),
            "history": list(self.history)[-500:],
            "evals": list(self.evals),
        }

    async def status(self) -> dict[str, Any]:
        data = self.snapshot()
        data["members"] = await self.backend.members()
        return {"training": data}

    def api_routes(self) -> list[Any]:
        async def training(_: web.Request) -> web.Response:
            return web.json_response((await self.status())["training"])

        return [lambda app: app.router.add_get("/api/v1/training", training)]
