"""Behaviour of ``/hyphae/hello/1`` (trio side): answer hellos, send ours, judge theirs.

A peer sends one hello per connection; one that opens hello streams faster than
:data:`HELLO_RATE`, or more than :data:`MAX_OPEN_PER_PEER` at once (each could hold a task for
:data:`HELLO_TIMEOUT_S`), has the extra streams reset at once, and every refusal or malformed
hello is reported to the local node's score table (:func:`~hyphae.protocol.scoring.scores_for`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from ..admission import Admission
from ..errors import NotAdmitted, PeerError, ProtocolViolation
from ..ratelimit import KeyedLimiter, KeyedSlots, RateLimit
from ..scoring import PeerScores, Severity, scores_for
from ..stream import TrioFramedStream, libp2p_errors_as_peer_errors
from .wire import MAX_FRAME_BYTES, PROTOCOL_ID, Hello

__all__ = ["HelloService"]

log = logging.getLogger(__name__)

HELLO_TIMEOUT_S = 10.0
HELLO_RATE = RateLimit(rate_per_s=1.0, burst=10.0)
MAX_OPEN_PER_PEER = 2
MAX_OPEN = 256


class HelloService:
    """Exchanges hellos and reports each outcome to ``on_result(peer_id, hello_or_error)``.

    A result is either a :class:`Hello` from a peer of our network (and, in a closed run, an
    admitted one), or a :class:`PeerError` saying why the peer should be dropped (wrong network,
    not admitted, malformed hello, no answer). ``local(peer_id)`` is our hello to that peer.
    """

    def __init__(self, local: Callable[[str], Hello], on_result: Callable[[str, Hello | PeerError], None], *,
                 me: str = "", admission: Admission | None = None) -> None:
        self._local = local
        self._on_result = on_result
        self._me = me
        self._admission = admission
        self._rate = KeyedLimiter(HELLO_RATE)
        self._open = KeyedSlots(per_key=MAX_OPEN_PER_PEER, total=MAX_OPEN)
        self._own_scores: PeerScores | None = None

    def _judge(self, peer_id: str, hello: Hello) -> Hello | PeerError:
        ours = self._local(peer_id)
        if hello.network != ours.network:
            return NotAdmitted(f"peer is on network {hello.network!r}, we are on {ours.network!r}")
        if self._admission is not None and self._admission.closed:
            refusal = self._admission.refusal(peer_id, self._me, ours.network, hello.proof)
            if refusal is not None:
                return NotAdmitted(f"not admitted: {refusal}")
        return hello

    def _scores(self, stream: INetStream) -> PeerScores:
        """The local node's score table (its peer id is on the stream's connection)."""
        try:
            return scores_for(str(stream.muxed_conn.secured_conn.get_local_peer()))
        except AttributeError:  # a muxer without the secure connection at hand
            if self._own_scores is None:
                self._own_scores = PeerScores()
            return self._own_scores

    async def handle(self, stream: INetStream) -> None:
        """Inbound: read their hello, answer with ours (within the per-peer limits)."""
        peer_id = str(stream.muxed_conn.peer_id)
        if not self._rate.allow(peer_id) or not self._open.acquire(peer_id):
            self._scores(stream).report(peer_id, "hello.rate", Severity.MINOR, "too many hello streams")
            log.info("hello from %s refused: more than the per-peer hello limits", peer_id)
            with contextlib.suppress(Exception):
                await stream.reset()
            return
        try:
            await self._handle(stream)
        finally:
            self._open.release(peer_id)

    async def _handle(self, stream: INetStream) -> None:
        framed = TrioFramedStream(stream, max_frame_bytes=MAX_FRAME_BYTES)
        try:
            with trio.fail_after(HELLO_TIMEOUT_S):
                theirs = Hello.from_wire(await framed.recv())
                verdict = self._judge(framed.peer_id, theirs)
                if isinstance(verdict, PeerError):  # a refused peer learns nothing about us
                    self._scores(stream).report(framed.peer_id, "hello.refused", Severity.MINOR, str(verdict))
                    await framed.reset()
                    self._on_result(framed.peer_id, verdict)
                    return
                await framed.send(self._local(framed.peer_id).to_wire())
            self._on_result(framed.peer_id, verdict)
        except ProtocolViolation as exc:
            log.warning("hello from %s violates the protocol, closing: %s", framed.peer_id, exc)
            self._scores(stream).report(framed.peer_id, "hello.malformed", Severity.MAJOR, str(exc))
            await framed.reset()
            self._on_result(framed.peer_id, exc)
        except (PeerError, trio.TooSlowError) as exc:
            log.debug("hello from %s failed: %s", framed.peer_id, exc)
            await framed.reset()
        finally:
            await framed.close()

    async def exchange(self, host: IHost, peer_id: str) -> Hello | PeerError:
        """Outbound: open a hello stream to ``peer_id`` and trade hellos."""
        framed: TrioFramedStream | None = None
        try:
            with trio.fail_after(HELLO_TIMEOUT_S):
                with libp2p_errors_as_peer_errors("cannot open hello stream"):
                    raw = await host.new_stream(ID.from_base58(peer_id), [TProtocol(PROTOCOL_ID)])
                framed = TrioFramedStream(raw, max_frame_bytes=MAX_FRAME_BYTES)
                theirs = Hello.from_wire(await framed.request(self._local(peer_id).to_wire()))
            result: Hello | PeerError = self._judge(peer_id, theirs)
        except ProtocolViolation as exc:
            log.warning("hello reply from %s violates the protocol: %s", peer_id, exc)
            result = exc
        except PeerError as exc:
            result = exc
        except trio.TooSlowError:
            result = PeerError(f"no hello from {peer_id} within {HELLO_TIMEOUT_S:.0f} s")
        finally:
            if framed is not None:
                await framed.close()
        self._on_result(peer_id, result)
        return result
