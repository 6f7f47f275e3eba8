"""The daemon's training service: starts the worker, serves its Comm, restarts it if it dies.

One worker process per local GPU is the design; this service runs one worker (GPU 0 if CUDA is
present, else the CPU) — several workers per node need per-worker peer ids and a local reduce
first, which is future work. The worker talks to the daemon over a Linux abstract Unix socket
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
import signal
import sys
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from aiohttp import web

from hyphae.protocol.errors import EndOfStream, ProtocolViolation

from . import ipc
from .comm_backend import CommBackend, CommFailure, Tensors
from .shm import Attachments, SegmentPool, numpy_views, write_numpy

if TYPE_CHECKING:
    from .daemon import Daemon

__all__ = ["TrainingService"]

log = logging.getLogger(__name__)

STOP_GRACE_S = 2.5
KILL_AFTER_S = 1.0
MAX_BACKOFF_S = 30.0
PROGRESS_LOG_EVERY_S = 10.0


def _device() -> str:
    try:
        import torch

        return "cuda:0" if torch.cuda.is_available() else "cpu"
    except ImportError:  # pragma: no cover - torch is a dependency
        return "cpu"


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
        self._finished = False
        self._pool = SegmentPool(f"hyd{os.getpid() % 100000}")
        self._attached = Attachments()
        self._last_progress_log = 0.0

    # ---- lifecycle -------------------------------------------------------------------------

    async def run(self) -> None:
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
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "hyphae.node.worker", "--socket", self.address, "--index", "0",
                stdin=asyncio.subprocess.DEVNULL,
            )
            self.worker_pid = self._proc.pid
            started = time.monotonic()
            code = await self._proc.wait()
            if self._finished:
                self.state = "done"
                log.info("training finished at step %s", self.latest.get("step"))
                if self.config.max_steps:
                    self.daemon.request_stop("training reached --max-steps")
                await asyncio.Event().wait()  # stay up (serving the API) until the daemon stops
            if time.monotonic() - started > 60:
                backoff = 1.0
            self.restarts += 1
            self.state = "restarting"
            log.error("training worker exited with code %s; restarting from the latest checkpoint in %.0f s",
                      code, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_S)

    async def _stop_worker(self) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        self.state = "stopping"
        with contextlib.suppress(Exception):
            if self._writer is not None:
                await ipc.send(self._writer, ipc.Stop(reason="the daemon is stopping"))
        for sig, wait_s in ((None, STOP_GRACE_S), (signal.SIGTERM, KILL_AFTER_S), (signal.SIGKILL, 5.0)):
            if sig is not None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)
            try:
                async with asyncio.timeout(wait_s):
                    await proc.wait()
                return
            except TimeoutError:
                log.warning("training worker did not stop%s", "" if sig is None else f" after {sig.name}")

    # ---- IPC -------------------------------------------------------------------------------

    async def _on_worker(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if not self._is_our_worker(writer):
                return
            hello = await ipc.recv(reader)
            if not isinstance(hello, ipc.WorkerHello) or self._proc is None or hello.pid != self._proc.pid:
                log.warning("refusing an IPC connection that is not our worker")
                return
            self._writer = writer
            await ipc.send(writer, self._setup())
            async with asyncio.TaskGroup() as calls:
                await self._read_worker(reader, writer, calls)
        except (EndOfStream, ConnectionError):
            pass
        finally:
            self._writer = None
            writer.close()

    def _is_our_worker(self, writer: asyncio.StreamWriter) -> bool:
        """True if the kernel says the connecting process is the worker we spawned (same uid)."""
        try:
            pid, uid, _ = ipc.peer_credentials(writer)
        except ProtocolViolation as exc:
            log.warning("refusing an IPC connection: %s", exc)
            return False
        worker = self._proc.pid if self._proc is not None and self._proc.returncode is None else None
        if uid != os.getuid() or pid != worker:
            log.warning("refusing an IPC connection from pid %d uid %d: not the worker this daemon started "
                        "(pid %s, uid %d)", pid, uid, worker, os.getuid())
            return False
        return True

    async def _read_worker(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                           calls: asyncio.TaskGroup) -> None:
        """Dispatch the worker's messages until it disconnects; calls run concurrently."""
        while True:
            try:
                message = await ipc.recv(reader)
            except EndOfStream:
                return
            except ProtocolViolation as exc:
                log.error("the worker broke the IPC protocol, dropping its connection: %s", exc)
                return
            if isinstance(message, ipc.Call):
                calls.create_task(self._serve_call(message, writer))
            elif isinstance(message, ipc.Progress):
                self._on_progress(message)
            elif isinstance(message, ipc.Release):
                self._pool.release(message.shm)

    def _setup(self) -> ipc.Setup:
        cfg = self.config
        root = self.daemon.datadir.root
        return ipc.Setup(
            peer_id=self.daemon.host.peer_id, preset=cfg.preset, algorithm=cfg.algorithm,
            algorithm_config=dict(cfg.algorithm_config), max_steps=cfg.max_steps, seed=cfg.seed,
            data=str(cfg.data) if cfg.data else "", cache_dir=str(root / "cache"),
            checkpoint_dir=str(root / "checkpoints"), device=_device(), batch_size=cfg.batch_size,
            seq_len=cfg.seq_len, log_every=cfg.log_every, eval_every=cfg.eval_every,
            checkpoint_every=cfg.checkpoint_every, init_from=cfg.init_from, threads=cfg.threads,
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
            return await b.put_blob(bytes(args["data"])), {}
        if method == "get_blob":
            return await b.get_blob(str(args["digest"]), float(args["timeout_s"])), {}
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
