"""The local HTTP API (aiohttp): ``/api/v1/...`` JSON for tools and the dashboard.

Bound to 127.0.0.1 by default. When it binds anywhere else every request must carry the token
from ``DATA_DIR/api.token`` (``Authorization: Bearer <token>`` or ``?token=``): the API can stop the
node, so it is never open to the network by accident.

Request bodies are read with :func:`read_json`: bounded in bytes whatever ``Content-Length`` says
(chunked bodies included), UTF-8 JSON only, nesting bounded — a malformed body is a 400/413 with
a JSON reason, never a 500.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from .daemon import Daemon

__all__ = ["build_app", "start_api", "read_json", "MAX_JSON_BODY_BYTES", "MAX_JSON_DEPTH"]

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

MAX_JSON_BODY_BYTES = 64 * 1024
MAX_JSON_DEPTH = 32


class _BodyTooLarge(web.HTTPClientError):
    status_code = 413


def _json_error(status: int, message: str) -> web.HTTPException:
    cls = _BodyTooLarge if status == 413 else web.HTTPBadRequest
    return cls(text=json.dumps({"error": message}), content_type="application/json")


async def read_json(request: web.Request, *, limit: int = MAX_JSON_BODY_BYTES, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """The request's JSON body, read without trusting it.

    Raises:
        web.HTTPRequestEntityTooLarge: more than ``limit`` bytes (announced or sent).
        web.HTTPBadRequest: not UTF-8 JSON, or nested deeper than ``max_depth``.
    """
    if request.content_length is not None and request.content_length > limit:
        raise _json_error(413, f"body is {request.content_length} bytes, limit {limit}")
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await request.content.readany()
        if not chunk:
            break
        size += len(chunk)
        if size > limit:
            raise _json_error(413, f"body is over {limit} bytes, limit {limit}")
        chunks.append(chunk)
    try:
        value = json.loads(b"".join(chunks).decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise _json_error(400, f"body must be UTF-8 JSON ({type(exc).__name__})") from None
    if _depth(value) > max_depth:
        raise _json_error(400, f"body nests deeper than {max_depth} levels")
    return value


def _depth(value: Any) -> int:
    """Nesting depth of a decoded JSON value, iteratively (no recursion on hostile input)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return deepest


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
    app = web.Application(middlewares=[_token_middleware(token)], client_max_size=MAX_JSON_BODY_BYTES)

    async def node(_: web.Request) -> web.Response:
        return web.json_response(await daemon.node_info())

    async def peers(_: web.Request) -> web.Response:
        return web.json_response({"peers": await daemon.peers_info()})

    async def reachability(_: web.Request) -> web.Response:
        return web.json_response(await daemon.host.reachability())

    async def leave(_: web.Request) -> web.Response:
        daemon.request_stop("leave requested over the API")
        return web.json_response({"ok": True, "stopping": True})

    app.router.add_get("/api/v1/node", node)
    app.router.add_get("/api/v1/peers", peers)
    app.router.add_get("/api/v1/reachability", reachability)
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
