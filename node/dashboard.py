"""The dashboard: one HTML page at ``/`` that live-updates from server-sent events.

No build step: the page is static HTML/JS/CSS in ``node/static`` (charts by the vendored uPlot).
``GET /api/v1/dashboard`` returns everything the page shows in one JSON object and
``GET /api/v1/events`` streams the same object every second (SSE). The API token, when one is
required, is checked for the page, its assets and the stream alike (``?token=`` works for all, so
a browser can open ``http://host:port/?token=...``).
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


def dashboard_routes(daemon: Daemon) -> Any:
    async def page(_: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "index.html")

    async def state(_: web.Request) -> web.Response:
        return web.json_response(await dashboard_state(daemon))

    async def events(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        try:
            while not daemon.stopping:
                payload = json.dumps(await dashboard_state(daemon), default=str)
                await resp.write(f"data: {payload}\n\n".encode())
                await asyncio.sleep(EVENT_INTERVAL_S)
        except (ConnectionResetError, ConnectionError):
            pass  # the browser went away
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
