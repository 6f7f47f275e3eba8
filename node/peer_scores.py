"""Acting on peer scores: disconnect a peer whose misbehaviour score crossed the threshold,
keep it out while banned, and show every score in the API.

The protocol handlers only report violations (:mod:`hyphae.protocol.scoring`); this service is
the one place that acts on them. A flagged peer is disconnected at once (the score table tells
this service from whatever thread reported), then banned for ``ban_s``: if it connects again
within that time — it passes hello like anyone — it is disconnected again right after.

API: ``GET /api/v1/peers/scores`` → ``{"peers": {peer_id: {"score", "violations", "last",
"last_detail", "last_at", "banned", "banned_until", "disconnects"}}, "disconnect_below",
"half_life_s", "ban_s", "disconnected"}``, worst first.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from hyphae.protocol.errors import ClosedError, PeerError
from hyphae.protocol.scoring import PeerScores, scores_for

if TYPE_CHECKING:
    from .daemon import Daemon

__all__ = ["PeerScoreService", "peer_score_service"]

log = logging.getLogger(__name__)

CHECK_INTERVAL_S = 1.0


class PeerScoreService:
    """A daemon :class:`~hyphae.node.daemon.Service` that disconnects peers with bad scores.

    Args:
        daemon: the daemon (its host must be started).
        check_interval_s: how often flagged peers are looked for even without a nudge.
    """

    name = "peer_scores"

    def __init__(self, daemon: Daemon, *, check_interval_s: float = CHECK_INTERVAL_S) -> None:
        if not check_interval_s > 0:
            raise ValueError(f"check_interval_s must be > 0, got {check_interval_s!r}")
        self.daemon = daemon
        self.scores: PeerScores = scores_for(daemon.host)
        self.check_interval_s = check_interval_s
        self.disconnected = 0
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._rebanned: set[str] = set()

    async def run(self) -> None:
        """Disconnect flagged and returning banned peers until cancelled (nothing to save)."""
        self._loop = asyncio.get_running_loop()
        host = self.daemon.host
        self.scores.add_listener(self._on_flagged)
        host.add_listener(self._on_peer_event)
        try:
            while True:
                try:
                    async with asyncio.timeout(self.check_interval_s):
                        await self._wake.wait()
                except TimeoutError:
                    pass
                self._wake.clear()
                for peer in self.scores.over_threshold():
                    await self._disconnect(peer, f"score {self.scores.score(peer):.0f} <= "
                                                 f"{self.scores.config.disconnect_below:.0f}")
                    self.scores.mark_disconnected(peer)
                for peer in list(self._rebanned):
                    self._rebanned.discard(peer)
                    await self._disconnect(peer, "still banned")
        finally:
            host.remove_listener(self._on_peer_event)
            self.scores.remove_listener(self._on_flagged)

    def _on_flagged(self, peer_id: str, score: float) -> None:
        """Called by the score table in the reporting thread: wake the loop, nothing more."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wake.set)

    def _on_peer_event(self, kind: str, peer_id: str) -> None:
        if kind == "connected" and self.scores.is_banned(peer_id):
            self._rebanned.add(peer_id)
            self._wake.set()

    async def _disconnect(self, peer_id: str, reason: str) -> None:
        log.warning("disconnecting %s: %s (last violation: %s)", peer_id, reason,
                    self.scores.scores().get(peer_id, {}).get("last", "?"))
        try:
            await self.daemon.host.disconnect(peer_id)
        except (PeerError, ClosedError) as exc:
            log.debug("disconnecting %s: %s", peer_id, exc)
        self.disconnected += 1

    # ---- API -------------------------------------------------------------------------------

    def view(self) -> dict[str, Any]:
        cfg = self.scores.config
        return {"peers": self.scores.scores(), "disconnect_below": cfg.disconnect_below,
                "half_life_s": cfg.half_life_s, "ban_s": cfg.ban_s, "disconnected": self.disconnected}

    def api_routes(self) -> list[Callable[[web.Application], None]]:
        return [self._add_routes]

    def _add_routes(self, app: web.Application) -> None:
        app.router.add_get("/api/v1/peers/scores", self._get_scores)

    async def _get_scores(self, _: web.Request) -> web.Response:
        return web.json_response(self.view())

    async def status(self) -> dict[str, Any]:
        """Counters for the dashboard and /metrics."""
        return {"counters": {"peer_violations_reported": self.scores.reports,
                             "peers_disconnected_for_score": self.disconnected}}


def peer_score_service(daemon: Daemon) -> PeerScoreService:
    """The service factory to register with the daemon."""
    return PeerScoreService(daemon)
