"""The local HTTP API (aiohttp): ``/api/v1/...`` JSON for tools and the dashboard.

Bound to 127.0.0.1 by default. When it binds anywhere else every request must carry the token
from ``DATA_DIR/api.token`` (``Authorization: Bearer <token>`` or ``?token=``): the API can stop the
node, so it is never open to the network by accident.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from .daemon import Daemon

__all__ = ["build_app", "start_api"]

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _token_middleware(token: str | None) -> Any:
    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if token is not None:
            given = request.query.get("token", "")
            auth = request.headers.get("Authorization", "")
            if auth.startswith("Bearer "):
                given = auth.removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), token.encode()):
                return web.json_response({"error": "missing or wrong API token (see DATA_DIR/api.token)"},
                                         status=401)
        return await handler(request)

    return check


def build_app(daemon: Daemon, *, token: str | None) -> web.Application:
    app = web.Application(middlewares=[_token_middleware(token)])

    async def node(_: web.Request) -> web.Response:
        return web.json_response(await daemon.node_info())

    async def peers(_: web.Request) -> web.Response:
        return web.json_response({"peers": await daemon.peers_info()})

    async def leave(_: web.Request) -> web.Response:
        daemon.request_stop("leave requested over the API")
        return web.json_response({"ok": True, "stopping": True})

    app.router.add_get("/api/v1/node", node)
    app.router.add_get("/api/v1/peers", peers)
    app.router.add_post("/api/v1/node/leave", leave)
    for extra in daemon.api_routes():
        extra(app)
    return app


async def start_api(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, str]:
    """Start serving; return the runner (to clean up) and the base URL with the real port."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise OSError(f"cannot serve the API on {host}:{port} ({exc.strerror}); "
                      f"pick another with --api {host}:0") from exc
    bound = site._server.sockets[0].getsockname()  # the real port when 0 was asked for
    shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    return runner, f"http://{shown}:{bound[1]}"
