"""The dashboard: one HTML page at ``/`` that live-updates from server-sent events.

No build step: the page is static HTML/JS/CSS in ``node/static`` (charts by the vendored uPlot).
``GET /api/v1/dashboard`` returns everything the page shows in one JSON object and
``GET /api/v1/events`` streams the same object every second (SSE). The API token, when one is
required, is checked for the page, its assets and the stream alike (``?token=`` works for all, so
a browser can open ``http://host:port/?token=...``). The page's actions (its Leave button) POST
with the CSRF token it reads from ``GET /api/v1/csrf`` (see :mod:`.api_guard`).

At most :data:`MAX_EVENT_CLIENTS` streams are served at once (more get a 503 with
``Retry-After``), and all of them share one snapshot per interval, so a page (or a script) that
opens a thousand streams costs neither memory nor a thousand snapshots a second.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from .daemon import Daemon

__all__ = ["dashboard_routes", "hardware_summary"]

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
EVENT_INTERVAL_S = 1.0
MAX_EVENT_CLIENTS = 32
EVENT_RETRY_AFTER_S = 5


def hardware_summary() -> dict[str, Any]:
    """What this machine brings (no torch import: the daemon stays light)."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        memory = None
    return {"cpus": os.cpu_count(), "memory_bytes": memory, "machine": platform.machine(),
            "system": platform.system(), "python": platform.python_version()}


async def dashboard_state(daemon: Daemon) -> dict[str, Any]:
    node = await daemon.node_info()
    node.pop("config", None)
    node["hardware"] = hardware_summary()
    extras = await daemon.metric_extras()
    return {
        "node": node,
        "peers": await daemon.peers_info(),
        "training": extras.get("training"),
        "run": extras.get("run"),
        "traffic": extras.get("traffic", []),
        "links": extras.get("links", []),
        "downloads": extras.get("downloads", []),
    }


class _SharedSnapshot:
    """One SSE payload per interval for every stream (computed by whichever stream asks first)."""

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon
        self._lock = asyncio.Lock()
        self._payload = b""
        self._at = float("-inf")

    async def get(self) -> bytes:
        async with self._lock:
            now = asyncio.get_running_loop().time()
            if now - self._at >= EVENT_INTERVAL_S / 2:
                state = json.dumps(await dashboard_state(self._daemon), default=str)
                self._payload, self._at = f"data: {state}\n\n".encode(), now
            return self._payload


def dashboard_routes(daemon: Daemon) -> Any:
    snapshot = _SharedSnapshot(daemon)
    streams = 0

    async def page(_: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "index.html")

    async def state(_: web.Request) -> web.Response:
        return web.json_response(await dashboard_state(daemon))

    async def events(request: web.Request) -> web.StreamResponse:
        nonlocal streams
        if streams >= MAX_EVENT_CLIENTS:
            return web.json_response({"error": f"{MAX_EVENT_CLIENTS} event streams are open, the most served at "
                                               f"once; retry later"},
                                     status=503, headers={"Retry-After": str(EVENT_RETRY_AFTER_S)})
        streams += 1
        try:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await resp.prepare(request)
            while not daemon.stopping:
                await resp.write(await snapshot.get())
                await asyncio.sleep(EVENT_INTERVAL_S)
        except (ConnectionResetError, ConnectionError):
            pass  # the browser went away
        finally:
            streams -= 1
        return resp

    async def openapi(_: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "openapi.json")

    def add(app: web.Application) -> None:
        app.router.add_get("/", page)
        app.router.add_get("/api/v1/dashboard", state)
        app.router.add_get("/api/v1/events", events)
        app.router.add_get("/api/v1/openapi.json", openapi)
        app.router.add_static("/static/", STATIC, follow_symlinks=False)

    return add
