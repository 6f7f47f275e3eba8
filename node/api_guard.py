"""What keeps web pages out of the local API: a Host check, a CSRF wall, and CORS only on request.

A page the volunteer opens in a browser can send requests to ``127.0.0.1`` (a form or a
``no-cors`` fetch needs no preflight), and a page whose DNS name is re-pointed at 127.0.0.1 (DNS
rebinding) can even read the answers, because the browser thinks the API is that page's own
origin. Jupyter, Syncthing and Ollama closed the same two holes the same way:

1. **Host check** (every route, the event stream and ``/metrics`` included): the ``Host`` a
   request is addressed to must be a loopback address, ``localhost``, a name in
   ``[api] allowed_hosts`` or the address the API binds to. A rebinding page's requests carry
   its own name, so they get a 403. Bound to a wildcard (``0.0.0.0``) any IP literal is accepted
   too: nobody can re-point an IP literal, and every request there needs the token anyway.
2. **State-changing requests** (anything but GET/HEAD/OPTIONS) need an ``Origin`` (or, without
   one, a ``Referer``) that is the API's own origin or one in ``[api] cors_origins``, or neither
   (command-line tools send none); and the API token (``Authorization: Bearer``) or the
   per-daemon CSRF token, which only a same-origin page can read (``GET /api/v1/csrf``), in
   ``X-Hyphae-CSRF``. Bodies must be ``Content-Type: application/json``: the content types a page
   may send cross-origin without a preflight never pass.
3. **CORS headers** only for origins the user listed in ``[api] cors_origins``.

Tokens are compared in constant time and never logged (the access log is off: a ``?token=`` in
a URL would land in it).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web

from .config import ApiAccess, host_name

__all__ = ["ApiGuard", "CSRF_HEADER", "WILDCARD_HOSTS"]

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

CSRF_HEADER = "X-Hyphae-CSRF"
WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
CORS_MAX_AGE_S = 600


def _refuse(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _header_host(value: str) -> str | None:
    """The host part of a ``Host`` header (``name``, ``name:port``, ``[v6]:port``), normalised."""
    if value.startswith("["):
        end = value.find("]")
        name, rest = (value[: end + 1], value[end + 1:]) if end > 0 else (value, "")
    else:
        name, _, port = value.partition(":")
        rest = f":{port}" if port else ""
    if rest and not (rest.startswith(":") and rest[1:].isdigit()):
        return None
    try:
        return host_name(name)
    except ValueError:
        return None


def _origin_of(url: str) -> str | None:
    """``scheme://netloc`` of a URL as a browser writes it in ``Origin`` (lower case)."""
    parts = urllib.parse.urlsplit(url)
    if not parts.scheme or not parts.netloc:
        return None
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}".lower()


@dataclass(kw_only=True)
class ApiGuard:
    """The checks, for one daemon's API (see the module docstring for why each exists)."""

    token: str
    """``DATA_DIR/api.token``: what the CLI and other tools send."""
    csrf_token: str
    """A per-process secret the dashboard page reads same-origin and sends on its POSTs."""
    bind_host: str
    """The address the API listens on."""
    access: ApiAccess = field(default_factory=ApiAccess)
    """``[api] allowed_hosts`` (more names the Host check accepts) and ``cors_origins``."""
    tokens_for_reads: bool = False
    """True when bound beyond loopback: every request needs the API token, reads included."""
    max_body_bytes: int = 64 * 1024
    """Bodies announced as larger get a 413 before anything reads them."""

    def __post_init__(self) -> None:
        bound = self.bind_host.strip("[]").lower()
        self._wildcard = bound in WILDCARD_HOSTS
        extra = set(self.access.allowed_hosts)
        if not self._wildcard:
            extra.add(host_name(bound))
        self._hosts = frozenset(extra)
        self._cors = frozenset(self.access.cors_origins)

    def host_allowed(self, host: str) -> bool:
        if _loopback(host) or host in self._hosts:
            return True
        if self._wildcard:
            try:
                ipaddress.ip_address(host)
                return True
            except ValueError:
                return False
        return False

    def middleware(self) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
        @web.middleware
        async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
            refused = self.check(request)
            if refused is not None:
                return refused
            return await handler(request)

        return guard

    def check(self, request: web.Request) -> web.StreamResponse | None:
        """The refusal for ``request``, or None when it may reach its handler."""
        raw_host = request.headers.get("Host", "")
        host = _header_host(raw_host)
        if host is None or not self.host_allowed(host):
            return _refuse(403, f"Host {raw_host[:100]!r} is not this node's API; use http://127.0.0.1:PORT/ "
                                f"or add the name to [api] allowed_hosts")
        origin = request.headers.get("Origin")
        if request.method == "OPTIONS" and origin is not None and "Access-Control-Request-Method" in request.headers:
            return self._preflight(origin)
        if request.content_length is not None and request.content_length > self.max_body_bytes:
            return _refuse(413, f"body is {request.content_length} bytes, limit {self.max_body_bytes}")
        if self.tokens_for_reads and not self._bearer_ok(request, query=True):
            return _refuse(401, "missing or wrong API token (see DATA_DIR/api.token)")
        if request.method in SAFE_METHODS:
            return None
        source = origin
        if source is None and request.headers.get("Referer"):
            source = _origin_of(request.headers["Referer"]) or "unparsable Referer"
        if source is not None and not self._origin_ok(source.lower(), raw_host):
            return _refuse(403, f"cross-origin {request.method} from {source[:100]!r} refused; the dashboard's "
                                f"own origin or [api] cors_origins only")
        if not (self._bearer_ok(request, query=False) or _same(request.headers.get(CSRF_HEADER, ""), self.csrf_token)):
            return _refuse(403, f"{request.method} needs 'Authorization: Bearer <DATA_DIR/api.token>' or the "
                                f"{CSRF_HEADER} token from GET /api/v1/csrf")
        if request.body_exists and request.content_type != "application/json":
            return _refuse(415, f"request bodies must be Content-Type: application/json, "
                                f"got {request.content_type[:60]!r}")
        return None

    def _bearer_ok(self, request: web.Request, *, query: bool) -> bool:
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            return _same(auth.removeprefix("Bearer ").strip(), self.token)
        return query and _same(request.query.get("token", ""), self.token)

    def _origin_ok(self, origin: str, raw_host: str) -> bool:
        return origin == f"http://{raw_host.lower()}" or origin in self._cors

    def _preflight(self, origin: str) -> web.Response:
        if origin.lower() not in self._cors:
            return _refuse(403, f"origin {origin[:100]!r} is not in [api] cors_origins")
        return web.Response(status=204, headers={
            "Access-Control-Allow-Origin": origin, "Vary": "Origin",
            "Access-Control-Allow-Methods": "GET, POST", "Access-Control-Max-Age": str(CORS_MAX_AGE_S),
            "Access-Control-Allow-Headers": f"Authorization, Content-Type, {CSRF_HEADER}"})

    async def add_cors_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        """``on_response_prepare``: CORS headers for a listed origin (streamed answers included)."""
        origin = request.headers.get("Origin")
        if origin is not None and origin.lower() in self._cors:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Vary"] = "Origin"

    def install(self, app: web.Application) -> None:
        """Put the checks in front of every route of ``app`` and add ``GET /api/v1/csrf``."""
        app.middlewares.append(self.middleware())
        if self._cors:
            app.on_response_prepare.append(self.add_cors_headers)

        async def csrf(_: web.Request) -> web.Response:
            # Readable only same-origin: no CORS header for it, and a rebinding page fails the Host check.
            return web.Response(text=json.dumps({"csrf_token": self.csrf_token, "header": CSRF_HEADER}),
                                content_type="application/json",
                                headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"})

        app.router.add_get("/api/v1/csrf", csrf)
