"""The run state as a daemon service: the node joins (or creates) one run and replicates it.

``RunStateService`` opens the run named in the config with the daemon's host and data dir
(``DATA_DIR/runs/<run>/runstate.msgpack``), writes this node's member entry (addresses, roles,
hardware, version), and runs heartbeats, anti-entropy and saving (:mod:`hyphae.protocol.runstate`).
If nobody has created the run a few seconds after start, this node creates it and owns it.

API:

* ``GET /api/v1/run``: the replicated state as JSON (run, owner, config, members with
  live/suspect/gone, progress, experts, checkpoints, counts);
* ``POST /api/v1/run/config`` with ``{"set": {"key": value, ...}}``: owner only.

The client half (:func:`run_show`, :func:`run_config_set`, :func:`parse_config_pairs`) is what
``hyphae run show`` and ``hyphae run config set`` use.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import platform
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from hyphae.protocol.errors import ConfigError, HyphaeError
from hyphae.protocol.runstate import RunState, RunStateConfig, RunStateNode, RunStore, SyncConfig, WriteRejected
from hyphae.protocol.runstate.store import FILE_NAME
from hyphae.protocol.runstate.wire import check_run_name

from .api import read_json
from .client import ApiClient, NotRunning
from .version import AGENT, __version__

if TYPE_CHECKING:
    from .daemon import Daemon

__all__ = ["RunStateService", "DEFAULT_RUN", "runstate_service", "run_show", "run_config_set",
           "parse_config_pairs", "hardware_summary", "run_state_path"]

log = logging.getLogger(__name__)

DEFAULT_RUN = "default"
MAX_CONFIG_BODY_BYTES = 64 * 1024


def run_state_path(data_dir: Path, run: str) -> Path:
    """Where a run's state lives in a data dir."""
    return Path(data_dir) / "runs" / check_run_name(run) / FILE_NAME


def hardware_summary() -> dict[str, Any]:
    """What peers may want to know about this machine (no torch: counted from the OS)."""
    summary: dict[str, Any] = {"cpus": os.cpu_count() or 1, "machine": platform.machine(),
                               "system": platform.system(), "python": platform.python_version()}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                summary["memory_bytes"] = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    gpus = Path("/proc/driver/nvidia/gpus")
    summary["nvidia_gpus"] = len(list(gpus.iterdir())) if gpus.is_dir() else 0
    return summary


class RunStateService:
    """A daemon :class:`~hyphae.node.daemon.Service` that keeps this node in one run.

    Args:
        daemon: the daemon (its host must be started).
        run: the run name; default ``daemon.config.run`` or :data:`DEFAULT_RUN`.
        owner: pin the run owner's peer id; default ``daemon.config.run_owner`` (None: the
            earliest creator owns the run).
        sync: replication timing; default creates the run if none is found.
        initial_config: config this node writes if it creates the run.
    """

    name = "runstate"

    def __init__(self, daemon: Daemon, *, run: str | None = None, owner: str | None = None,
                 sync: SyncConfig | None = None, initial_config: Mapping[str, Any] | None = None) -> None:
        self.daemon = daemon
        run = run or getattr(daemon.config, "run", None) or DEFAULT_RUN
        owner = owner or getattr(daemon.config, "run_owner", None)
        host = daemon.host
        self.state = RunState(run, host.identity, config=RunStateConfig(owner=owner))
        self.store = RunStore(run_state_path(daemon.datadir.root, run))
        sync = sync or SyncConfig(create_if_missing=True)
        if initial_config:
            sync = dataclasses.replace(sync, initial_config=dict(initial_config))
        self.node = RunStateNode(host, self.state, store=self.store, config=sync)

    async def run(self) -> None:
        """Replicate until cancelled; the member entry is written once the saved state is loaded
        (so it continues this member's history instead of starting a new one)."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self.node.run())
            await self.node.ready.wait()
            host = self.daemon.host
            self.state.set_member(addrs=list(host.addrs), agent=AGENT, version=__version__,
                                  roles=["trainer"] if self.daemon.config.train else ["network"],
                                  hardware=hardware_summary())
            log.info("joined run %s (owner %s)", self.state.run, self.state.owner() or "not known yet")

    async def status(self) -> dict[str, Any]:
        """The run for the dashboard and /metrics: name, owner, membership, config, experts."""
        view = self.state.view()
        counts = view["counts"]
        spes_owners = {k.rsplit("/", 1)[1]: v for k, v in self.state.newest("algo", "spes/owner/").items()}
        run = {"name": view["run"], "owner": view["owner"], "config": view["config"], "live": counts["live"],
               "suspect": counts["suspect"], "gone": counts["gone"], "experts": view["experts"] or spes_owners,
               "members": [{"peer_id": m.get("peer_id"), "status": m.get("status"), "roles": m.get("roles", [])}
                           for m in view["members"]]}
        # state.version counts every envelope applied (local writes and received updates).
        counters = {"crdt_updates_applied": self.state.version, "crdt_updates_rejected": counts["rejected"]}
        return {"run": run, "counters": counters}

    def api_routes(self) -> list[Callable[[web.Application], None]]:
        return [self._add_routes]

    def _add_routes(self, app: web.Application) -> None:
        app.router.add_get("/api/v1/run", self._get_run)
        app.router.add_post("/api/v1/run/config", self._post_config)

    async def _get_run(self, _: web.Request) -> web.Response:
        return web.json_response(self.state.view())

    async def _post_config(self, request: web.Request) -> web.Response:
        body = await read_json(request, limit=MAX_CONFIG_BODY_BYTES)  # 413/400 on a bad body
        values = body.get("set") if isinstance(body, dict) else None
        if not isinstance(values, dict) or not values:
            return _error(400, 'body must be {"set": {"key": value, ...}} with at least one key')
        owner = self.state.owner()
        if owner is None:
            return _error(409, f"run {self.state.run} has no known owner yet; wait for the node to sync or create it")
        if owner != self.state.peer_id:
            return _error(403, f"only the run owner {owner} may change the config of run {self.state.run}; "
                               f"this node is {self.state.peer_id}")
        try:
            self.state.set_config(values)
        except (WriteRejected, ValueError) as exc:
            return _error(400, str(exc))
        return web.json_response({"ok": True, "config": self.state.run_config()})


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def runstate_service(daemon: Daemon) -> RunStateService:
    """The service factory to register with the daemon (reads ``run``/``run_owner`` from its config)."""
    return RunStateService(daemon)


# ---- the client side (used by the CLI) --------------------------------------------------------


def parse_config_pairs(pairs: list[str]) -> dict[str, Any]:
    """``["lr=0.1", "algorithm=diloco", 'layers=[1,2]']`` -> values; a VALUE that parses as JSON
    is taken as JSON (numbers, true/false, null, lists, maps), anything else as a string.

    Raises:
        ConfigError: an item has no ``=`` or an empty key.
    """
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"expected KEY=VALUE, got {pair!r}")
        try:
            value: Any = json.loads(text)
        except ValueError:
            value = text
        out[key.strip()] = value
    return out


def run_show(client: ApiClient) -> dict[str, Any]:
    """The run state as the daemon behind ``client`` sees it."""
    return client.get("/api/v1/run")


def run_config_set(client: ApiClient, values: Mapping[str, Any]) -> dict[str, Any]:
    """Ask the daemon (which must own the run) to set config ``values``.

    Raises:
        HyphaeError: the daemon refused (not the owner, a rule broken); the message says why.
        NotRunning: no daemon answers.
    """
    body = json.dumps({"set": dict(values)}).encode()
    req = urllib.request.Request(client.base_url.rstrip("/") + "/api/v1/run/config", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    if client.token:
        req.add_header("Authorization", f"Bearer {client.token}")
    try:
        with urllib.request.urlopen(req, timeout=client.timeout_s) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("error", "")
        except ValueError:
            message = ""
        raise HyphaeError(f"setting the run config failed (HTTP {exc.code}): {message or exc.reason}") from None
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        raise NotRunning(f"the daemon at {client.base_url} does not answer ({exc})") from None
