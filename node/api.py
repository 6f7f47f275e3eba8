"""The local HTTP API (aiohttp): ``/api/v1/...`` JSON for tools and the dashboard.

Bound to 127.0.0.1 by default. When it binds anywhere else every request must carry the token
from ``DATA_DIR/api.token`` (``Authorization: Bearer <token>`` or ``?token=``): the API can stop the
node, so it is never open to the network by accident. Web pages are kept out by
:mod:`.api_guard` (Host check, CSRF token or API token on every state-changing request, no CORS
unless configured).

Request bodies are read with :func:`read_json`: bounded in bytes whatever ``Content-Length`` says
(chunked bodies included), UTF-8 JSON only, nesting bounded — a malformed body is a 400/413 with
a JSON reason, never a 500.
"""

from __future__ import annotations

import json
import logging
import secrets
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .api_guard import ApiGuard
from .config import ApiAccess

if TYPE_CHECKING:
    from .daemon import Daemon

__all__ = ["build_app", "start_api", "read_json", "MAX_JSON_BODY_BYTES", "MAX_JSON_DEPTH"]

log = logging.getLogger(__name__)

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


def build_app(daemon: Daemon, *, token: str, bind_host: str, access: ApiAccess | None = None,
              tokens_for_reads: bool = False) -> web.Application:
    """The API behind its guard.

    Args:
        token: ``DATA_DIR/api.token``; state-changing requests need it (or the CSRF token).
        bind_host: the address the API listens on (a request addressed to it passes the Host check).
        access: extra Host names and CORS origins (``[api] allowed_hosts``, ``cors_origins``).
        tokens_for_reads: require the token on every request (the API binds beyond loopback).
    """
    app = web.Application(client_max_size=MAX_JSON_BODY_BYTES)
    guard = ApiGuard(token=token, csrf_token=secrets.token_urlsafe(32), bind_host=bind_host,
                     access=access or ApiAccess(), tokens_for_reads=tokens_for_reads,
                     max_body_bytes=MAX_JSON_BODY_BYTES)
    guard.install(app)

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
    runner = web.AppRunner(app, access_log=None)  # keep it off: it would log every ?token=
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
