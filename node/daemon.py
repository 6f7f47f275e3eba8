"""The daemon: one per machine and data dir. Owns the host, the API and the node's services.

Start-up order: take the data-dir lock (a second instance fails here with a clear message), load
or create the identity, start the libp2p host, serve the API, start the services (training
worker supervisor, …), then write ``node.json`` and report ready. Shutdown (Ctrl+C, SIGTERM,
``hyphae node leave``) runs the same steps backwards: services are cancelled and save their state,
the API stops, the host closes its connections and saves the peer book, ``node.json`` is removed,
the lock released. Every step is bounded so the whole stop takes well under 5 s.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import Callable
from typing import Any, Protocol

from aiohttp import web

from hyphae.protocol.admission import Admission
from hyphae.protocol.host import Host, open_host
from hyphae.protocol.identity import load_or_create_identity

from .api import build_app, start_api
from .config import NodeConfig, config_to_json
from .datadir import DataDir
from .run_admission import load_admission
from .version import AGENT, __version__

__all__ = ["Daemon", "Service"]

log = logging.getLogger(__name__)

SERVICE_STOP_S = 4.0


class Service(Protocol):
    """A long-running part of the daemon (e.g. the training supervisor).

    ``run`` works until cancelled; on cancellation it saves what it must within
    :data:`SERVICE_STOP_S` seconds.
    """

    name: str

    async def run(self) -> None: ...

    def api_routes(self) -> list[Callable[[web.Application], None]]: ...


class Daemon:
    def __init__(self, config: NodeConfig, *, services: list[Callable[[Daemon], Service]] | None = None) -> None:
        self.config = config
        self.datadir = DataDir(config.data_dir)
        self.host: Host | None = None
        self.admission: Admission | None = None
        self._control_seen: dict[str, tuple[float, int]] = {}
        self.api_url: str | None = None
        self.started_at = time.time()
        self._stop = asyncio.Event()
        self.stop_reason = ""
        self.exit_code = 0
        self._service_factories = services or []
        self.services: list[Service] = []

    def request_stop(self, reason: str, *, exit_code: int = 0) -> None:
        """Ask the daemon to stop cleanly (idempotent, callable from signal handlers).

        ``exit_code`` is what ``hyphae node join`` exits with (2: a setting must be fixed)."""
        if not self._stop.is_set():
            (log.error if exit_code else log.info)("stopping: %s", reason)
            self.stop_reason = reason
            self.exit_code = exit_code
            self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def run(self, *, on_ready: Callable[[dict[str, Any]], None] | None = None) -> None:
        """Run until :meth:`request_stop`; raise if start-up fails (nothing is left running)."""
        self.datadir.lock()
        try:
            identity = load_or_create_identity(self.datadir.identity_key)
            roles = ("trainer",) if self.config.train else ("network",)
            self.admission, creator = load_admission(self.config)
            if creator is not None and self.config.run_owner is None:
                self.config = dataclasses.replace(self.config, run_owner=creator)
            async with open_host(identity, self.config.host, agent=AGENT, roles=roles,
                                 peerbook_path=self.datadir.peerbook, admission=self.admission) as host:
                self.host = host
                self.services = [make(self) for make in self._service_factories]
                await self._serve(on_ready)
        finally:
            self.datadir.remove_node_json()
            self.datadir.unlock()

    async def _serve(self, on_ready: Callable[[dict[str, Any]], None] | None) -> None:
        api = self.config.api
        app = build_app(self, token=self.datadir.api_token(), bind_host=api.host, access=self.config.api_access,
                        tokens_for_reads=not api.is_loopback)  # the CLI always sends the token: it can stop us
        runner, self.api_url = await start_api(app, api.host, api.port)
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(svc.run(), name=svc.name) for svc in self.services]
                info = self.ready_info()
                self.datadir.write_node_json(info)
                if on_ready is not None:
                    on_ready(info)
                log.info("ready", extra={"peer_id": info["peer_id"], "api": self.api_url})
                await self._wait_stop_or_service_exit(tasks)
                for task in tasks:
                    task.cancel()
                done, late = await asyncio.wait(tasks, timeout=SERVICE_STOP_S) if tasks else (set(), set())
                for task in late:
                    log.warning("service %s did not stop within %.0f s", task.get_name(), SERVICE_STOP_S)
        finally:
            await runner.cleanup()

    async def _wait_stop_or_service_exit(self, tasks: list[asyncio.Task[None]]) -> None:
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            done, _ = await asyncio.wait([stop, *tasks], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        for task in done:
            if task is not stop and task.exception() is not None:
                raise task.exception()

    def ready_info(self) -> dict[str, Any]:
        return {
            "peer_id": self.host.peer_id,
            "multiaddrs": self.host.addrs,
            "api_url": self.api_url,
            "pid": os.getpid(),
            "version": __version__,
            "started_at": self.started_at,
            "data_dir": str(self.datadir.root),
        }

    # ---- what the API shows ----------------------------------------------------------------

    async def node_info(self) -> dict[str, Any]:
        peers = await self.host.peers()
        reach = await self.host.reachability()
        return {
            **self.ready_info(),
            "addrs": self.host.addrs,
            "uptime_s": round(time.time() - self.started_at, 1),
            "network": self.config.host.network,
            "reachability": reach.get("state", "unknown"),
            "relay_addrs": reach.get("relay_addrs", []),
            "connections_by_path": {path: sum(p.connection == path for p in peers) for path in ("direct", "relayed")},
            "run_admission": self.admission.describe() if self.admission else {"closed": False},
            "roles": ["trainer"] if self.config.train else ["network"],
            "connections": len(peers),
            "routing_table_size": self.host.routing_table_size(),
            "config": config_to_json(self.config),
        }

    async def peers_info(self) -> list[dict[str, Any]]:
        """Connected peers; ``path`` refines ``connection``: a direct connection that hole
        punching made is ``hole-punched``."""
        punched = (await self.host.reachability()).get("hole_punching", {}).get("peers", {})
        rows = [p.to_json() for p in await self.host.peers()]
        for row in rows:
            was_punched = punched.get(row["peer_id"], {}).get("state") == "direct"
            row["path"] = "hole-punched" if row["connection"] == "direct" and was_punched else row["connection"]
        return rows

    def api_routes(self) -> list[Callable[[web.Application], None]]:
        from .dashboard import dashboard_routes
        from .metrics import metrics_route

        own = [dashboard_routes(self), metrics_route(self)]
        return own + [route for svc in self.services for route in svc.api_routes()]

    def service(self, name: str) -> Service | None:
        """The running service called ``name`` (e.g. "runstate", "training"), if any."""
        return next((svc for svc in self.services if svc.name == name), None)

    async def _control_traffic(self) -> list[dict[str, Any]]:
        """The control plane's bytes per peer (libp2p connections), with the rate since last asked."""
        now, rows = time.monotonic(), []
        last, self._control_seen = self._control_seen, {}
        for p in await self.host.peers():
            total = p.bytes_in + p.bytes_out
            before = last.get(p.peer_id)
            rate = (total - before[1]) / (now - before[0]) if before and now > before[0] and total >= before[1] else 0.0
            self._control_seen[p.peer_id] = (now, total)
            rows.append({"plane": "control", "peer": p.peer_id, "sent": p.bytes_out, "received": p.bytes_in,
                         "rate_bps": round(rate, 1)})
        return rows

    async def metric_extras(self) -> dict[str, Any]:
        """What services add to the dashboard and /metrics: each may offer ``status()``
        returning a dict whose keys (``training``, ``run``, ``traffic``, ``links``,
        ``counters``) are merged here."""
        extras: dict[str, Any] = {"traffic": await self._control_traffic(), "links": [], "counters": {},
                                  "downloads": []}
        for svc in self.services:
            status = getattr(svc, "status", None)
            if status is None:
                continue
            for key, value in (await status()).items():
                if key in ("traffic", "links", "downloads"):
                    extras[key].extend(value)
                elif key == "counters":
                    extras["counters"].update(value)
                else:
                    extras[key] = value
        return extras
