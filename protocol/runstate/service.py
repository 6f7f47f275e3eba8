"""The run state on the network: pubsub for deltas, ``/hyphae/runsync/1`` anti-entropy, saving.

:class:`RunStateNode` binds a :class:`~.state.RunState` to a :class:`~hyphae.protocol.host.Host`:

* local writes are published on ``/hyphae/run/<run>/1`` as signed envelopes;
* received envelopes (pubsub) are verified and rule-checked before they are applied. A pubsub
  validator in the libp2p thread already refuses envelopes with a bad signature or a config
  write by a non-owner, so gossipsub does not forward them either;
* every ``anti_entropy_interval_s`` (jittered), on every new connection, and whenever a peer's
  request shows it holds more than we do, the node pulls from one peer: it sends its heads, the
  peer answers with the signed envelopes it lacks. Envelopes learned that way are re-published
  (a few at most), so a repair made by one node reaches its pubsub neighbours at once;
* ``last_seen_ms`` heartbeats every ``heartbeat_interval_s``, carried by anti-entropy only
  (``quiet_sections``); the state is saved every
  ``save_interval_s`` when it changed, and on a clean stop (after announcing the leave).

Untrusted peers: each peer may make :data:`SYNC_RATE` runsync requests and each author publish
:data:`ENVELOPE_RATE` envelopes (over it they are refused: the pubsub validator drops, so does
not forward, and anti-entropy carries anything honest later). Violations are reported to the
host's score table (:func:`~hyphae.protocol.scoring.scores_for`): malformed requests, replies
and envelopes, bad signatures and rate overruns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import weakref
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ClosedError, PeerError, ProtocolViolation
from ..host import Host
from ..ratelimit import KeyedLimiter, RateLimit
from ..scoring import Severity, scores_for
from .rules import WriteRejected
from .state import RunState
from .store import RunStore
from .wire import (MAX_SYNC_FRAME_BYTES, SYNC_PROTOCOL, Envelope, decode_envelope, parse_sync_reply,
                   parse_sync_request, topic_for, verify_envelope)

__all__ = ["SyncConfig", "RunStateNode", "open_run_state", "make_pubsub_validator"]

log = logging.getLogger(__name__)

LinkFilter = Callable[[str], bool]
_RECEIVE_CHUNK = 64
_MAX_SYNC_ROUNDS = 16
SYNC_RATE = RateLimit(rate_per_s=10.0, burst=40.0)
"""runsync requests one peer may make (honest: ~1/s, a catch-up up to 16 back to back)."""
ENVELOPE_RATE = RateLimit(rate_per_s=50.0, burst=200.0)
"""Envelopes one author may publish (honest: a few per second; a repair republishes <= 32)."""


@dataclass(frozen=True, kw_only=True)
class SyncConfig:
    """Timing of one node's replication."""

    anti_entropy_interval_s: float = 1.0
    """Pull from one random member this often (±25 % jitter)."""
    sync_timeout_s: float = 5.0
    """Deadline of one pull (request and reply)."""
    heartbeat_interval_s: float = 2.0
    """Refresh this node's ``last_seen_ms`` this often (keep well under ``suspect_after_s``)."""
    save_interval_s: float = 2.0
    """Save the state to disk this often when it changed."""
    max_reply_bytes: int = 1 << 20
    """Envelope bytes in one sync reply; the requester asks again for the rest."""
    republish_max: int = 32
    """Re-publish envelopes learned by sync when a pull brought at most this many (a repair, not
    a catch-up); 0 turns it off."""
    create_if_missing: bool = False
    """Write a genesis (create the run) if none is known ``create_after_s`` after start."""
    create_after_s: float = 3.0
    """Time to learn an existing run from peers before creating one."""
    initial_config: Mapping[str, Any] = field(default_factory=dict)
    """Config the creator writes when it creates the run."""
    announce_leave: bool = True
    """On a clean stop, mark this member as left (others drop it at once)."""
    quiet_sections: tuple[str, ...] = ("member",)
    """Sections pushed by pubsub only when this process first writes them (a join, a restart):
    their deltas and later compaction snapshots travel by anti-entropy. Heartbeats pushed by pubsub would cost O(N^2) deliveries a second network-wide
    (measured: ~15 ms of CPU per delivery in py-libp2p 0.8.1 at 8 nodes), pulled they cost O(N)."""

    def __post_init__(self) -> None:
        for name in ("anti_entropy_interval_s", "sync_timeout_s", "heartbeat_interval_s", "save_interval_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 < self.max_reply_bytes <= MAX_SYNC_FRAME_BYTES // 2:
            raise ValueError(f"max_reply_bytes must be in 1..{MAX_SYNC_FRAME_BYTES // 2}, got {self.max_reply_bytes}")


_HOST_RUNS: weakref.WeakKeyDictionary[Host, dict[str, RunStateNode]] = weakref.WeakKeyDictionary()


def _serving(host: Host) -> dict[str, RunStateNode]:
    """The runs replicated on ``host``; the first registers the one ``/hyphae/runsync/1``
    handler, which hands each request to the node of the run it names."""
    runs = _HOST_RUNS.get(host)
    if runs is None:
        runs = _HOST_RUNS[host] = {}

        limiter = KeyedLimiter(SYNC_RATE)

        async def dispatch(peer_id: str, message: Any) -> Any:
            scores = scores_for(host)
            if not limiter.allow(peer_id):
                scores.report(peer_id, "runsync.rate", Severity.MINOR, f"over {SYNC_RATE.rate_per_s:g} requests/s")
                raise PeerError(f"runsync: more than {SYNC_RATE.rate_per_s:g} requests/s from {peer_id}")
            run = message.get("run") if isinstance(message, dict) else None
            node = runs.get(run) if isinstance(run, str) else None
            try:
                if node is None:
                    raise ProtocolViolation(f"runsync request for run {str(run)[:64]!r}, which this node does not hold")
                return await node._on_sync(peer_id, message)
            except ProtocolViolation as exc:
                scores.report(peer_id, "runsync.malformed", Severity.MAJOR, str(exc))
                raise

        host.serve(SYNC_PROTOCOL, dispatch, max_frame_bytes=MAX_SYNC_FRAME_BYTES)
    return runs


class _Raw:
    """The one attribute :func:`make_pubsub_validator` reads from a gossipsub message."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


def make_pubsub_validator(state: RunState) -> Callable[[Any, Any], bool]:
    """A gossipsub topic validator: True only for envelopes worth forwarding.

    Runs in the libp2p thread, so it only reads immutable things (``state.precheck_context`` is
    replaced, never mutated). Checks what does not need the replica: syntax, run, section,
    signature, and that a config write comes from the owner or a delegate.
    """
    run, sections = state.run, frozenset(state.config.rules)

    def validate(_forwarder: Any, message: Any) -> bool:
        try:
            env = decode_envelope(bytes(message.data))
        except ProtocolViolation:
            return False
        if env.run != run or env.section not in sections or not verify_envelope(env):
            return False
        if env.section == "config":
            ctx = state.precheck_context
            if ctx.owner is not None and env.author != ctx.owner and not any(
                    env.author in peers for peers in ctx.config_writers.values()):
                return False
        return True

    return validate


class RunStateNode:
    """Replicates one :class:`RunState` over one :class:`Host` until cancelled.

    Args:
        host: a started host.
        state: the run state (loaded from ``store`` when :meth:`run` starts).
        config: timing.
        store: where to save; None keeps it in memory only.
        link_filter: ``peer_id -> bool``: peers to ignore when it returns False (their pubsub
            messages, envelopes they authored, their sync requests). Tests and benchmarks use it
            to cut a network in two; settable at any time.
    """

    def __init__(self, host: Host, state: RunState, *, config: SyncConfig | None = None,
                 store: RunStore | None = None, link_filter: LinkFilter | None = None) -> None:
        self.host = host
        self.state = state
        self.config = config or SyncConfig()
        self.store = store
        self.link_filter = link_filter
        self.topic = topic_for(state.run)
        self.ready = asyncio.Event()
        self.graceful = True
        """False makes the stop behave like a crash: no leave announcement, no final save."""
        self.stats: dict[str, int] = {"syncs": 0, "sync_failures": 0, "from_sync": 0, "from_pubsub": 0,
                                      "published": 0, "republished": 0, "bytes_published": 0, "malformed": 0}
        self._outbox: asyncio.Queue[Envelope] = asyncio.Queue()
        self._kick = asyncio.Event()
        self._kicked: set[str] = set()
        self._syncing: set[str] = set()
        self._group: asyncio.TaskGroup | None = None
        self._announced: set[str] = set()
        self._running = False

    def _allowed(self, peer_id: str) -> bool:
        return self.link_filter is None or self.link_filter(peer_id)

    # ---- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Load, subscribe, serve sync, and replicate until cancelled. On cancellation (clean
        stop) announce the leave and save, each bounded to about a second."""
        if self.store is not None:
            applied = self.store.load(self.state)
            log.info("run %s: loaded %d envelopes from %s", self.state.run, applied, self.store.path)
        self.state.add_listener(self._on_applied)
        await self.host.subscribe(self.topic, self._on_message, validator=self._gossip_validator())
        runs = _serving(self.host)
        if self.state.run in runs:
            raise ValueError(f"run {self.state.run!r} is already replicated on this host")
        runs[self.state.run] = self
        self.host.add_listener(self._on_peer_event)
        self._running = True
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                group.create_task(self._publisher())
                group.create_task(self._anti_entropy())
                group.create_task(self._heartbeats())
                if self.store is not None:
                    group.create_task(self._saver())
                if self.config.create_if_missing or self.state.config.owner == self.state.peer_id:
                    group.create_task(self._create_when_missing())
                for peer in await self.host.topic_peers(self.topic):
                    self.kick(peer)
                self.ready.set()
        finally:
            self._running = False
            self.host.remove_listener(self._on_peer_event)
            _serving(self.host).pop(self.state.run, None)
            await self._stop()

    def _gossip_validator(self) -> Callable[[str, bytes], bool]:
        """The topic validator (libp2p thread): rate per author, then :func:`make_pubsub_validator`;
        refusals are scored (a bad signature or undecodable bytes as major)."""
        check, limiter, scores, me = make_pubsub_validator(self.state), KeyedLimiter(ENVELOPE_RATE), \
            scores_for(self.host), self.state.peer_id

        def validate(author: str, data: bytes) -> bool:
            if author == me:
                return True
            if not limiter.allow(author):
                scores.report(author, "runstate.rate", Severity.MINOR, f"over {ENVELOPE_RATE.rate_per_s:g} envelopes/s")
                return False
            if check(None, _Raw(data)):
                return True
            try:
                forged = not verify_envelope(decode_envelope(data))
            except ProtocolViolation:
                forged = True
            scores.report(author, "runstate.invalid", Severity.MAJOR if forged else Severity.MINOR,
                          "undecodable or badly signed envelope" if forged else "envelope refused by the precheck")
            return False

        return validate

    async def _stop(self) -> None:
        if not self.graceful:
            return
        if self.config.announce_leave:
            env = self.state.leave()
            if env is not None:
                with contextlib.suppress(Exception):  # best effort: peers time us out anyway
                    async with asyncio.timeout(1.0):
                        await self.host.publish(self.topic, env.encode())
        if self.store is not None:
            try:
                self.store.save(self.state)
            except OSError as exc:
                log.warning("could not save the run state to %s: %s", self.store.path, exc)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                await self.host.unsubscribe(self.topic)

    # ---- publishing --------------------------------------------------------------------------

    def _on_applied(self, envelopes: Sequence[Envelope], local: bool) -> None:
        if not local or not self._running:
            return
        for env in envelopes:
            if env.section in self.config.quiet_sections:
                # Only the first snapshot of this process is news (a join or a restart); later
                # ones are compactions, and deltas are heartbeats: anti-entropy brings those.
                if env.seq != 0 or env.section in self._announced:
                    continue
                self._announced.add(env.section)
            self._outbox.put_nowait(env)

    async def _publisher(self) -> None:
        while True:
            env = await self._outbox.get()
            data = env.encode()
            try:
                await self.host.publish(self.topic, data)
            except Exception as exc:  # noqa: BLE001 — py-libp2p raises its own types; sync repairs it
                log.info("publishing a %s envelope failed (%s); anti-entropy will carry it", env.section, exc)
                continue
            self.stats["published"] += 1
            self.stats["bytes_published"] += len(data)

    # ---- receiving ---------------------------------------------------------------------------

    def _on_message(self, publisher: str, data: bytes) -> None:
        if not self._running or not self._allowed(publisher):
            return
        try:
            env = decode_envelope(data)
        except ProtocolViolation as exc:
            self.stats["malformed"] += 1
            log.info("dropping a malformed run state message from %s: %s", publisher, exc)
            return
        if not self._allowed(env.author):
            return
        self.state.note_alive(publisher)
        received = self.state.receive([env])
        self.stats["from_pubsub"] += len(received.applied)

    # ---- anti-entropy ------------------------------------------------------------------------

    def kick(self, peer_id: str) -> None:
        """Pull from ``peer_id`` as soon as possible."""
        if peer_id != self.state.peer_id:
            self._kicked.add(peer_id)
            self._kick.set()

    def _on_peer_event(self, kind: str, peer_id: str) -> None:
        if kind == "connected" and self._running and self._allowed(peer_id):
            self.kick(peer_id)

    async def _anti_entropy(self) -> None:
        interval = self.config.anti_entropy_interval_s
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval * random.uniform(0.75, 1.25)):
                    await self._kick.wait()
            self._kick.clear()
            targets, self._kicked = self._kicked, set()
            if not targets:
                try:
                    peers = [p for p in await self.host.topic_peers(self.topic) if self._allowed(p)]
                except (PeerError, ClosedError) as exc:
                    log.debug("no topic peers this round: %s", exc)
                    peers = []
                targets = {random.choice(peers)} if peers else set()
            for peer in targets - self._syncing:
                self._syncing.add(peer)
                self._group.create_task(self._sync_task(peer))

    async def _sync_task(self, peer_id: str) -> None:
        try:
            await self.sync_with(peer_id)
        except (PeerError, TimeoutError, ClosedError) as exc:
            self.stats["sync_failures"] += 1
            log.debug("runsync with %s failed: %r", peer_id, exc)
        except Exception:  # noqa: BLE001 — a bug in one pull must not stop replication
            self.stats["sync_failures"] += 1
            log.exception("runsync with %s failed", peer_id)
        finally:
            self._syncing.discard(peer_id)

    async def sync_with(self, peer_id: str) -> int:
        """Pull what ``peer_id`` has and we lack; return how many envelopes were applied.

        Raises:
            PeerError: the peer cannot be reached or broke the protocol.
            TimeoutError: no reply within ``sync_timeout_s``.
        """
        if not self._allowed(peer_id):
            return 0
        total = 0
        for _ in range(_MAX_SYNC_ROUNDS):
            request = self.state.sync_request()
            async with asyncio.timeout(self.config.sync_timeout_s):
                raw = await self.host.request(peer_id, SYNC_PROTOCOL, request.to_wire(),
                                              max_frame_bytes=MAX_SYNC_FRAME_BYTES)
            try:
                reply = parse_sync_reply(raw)
                if reply.run != self.state.run:
                    raise ProtocolViolation(f"asked about run {self.state.run!r}, the reply is about {reply.run!r}")
            except ProtocolViolation as exc:
                scores_for(self.host).report(peer_id, "runsync.bad_reply", Severity.MAJOR, str(exc))
                raise
            envelopes = []
            malformed = 0
            for data in reply.envelopes:
                try:
                    env = decode_envelope(data)
                except ProtocolViolation as exc:
                    malformed += 1
                    log.info("skipping a malformed envelope in a sync reply from %s: %s", peer_id, exc)
                    continue
                if self._allowed(env.author):
                    envelopes.append(env)
            if malformed:
                self.stats["malformed"] += malformed
                scores_for(self.host).report(peer_id, "runsync.bad_envelope", Severity.MAJOR,
                                             f"{malformed} malformed envelope(s) in one reply")
            self.state.note_alive(peer_id)
            applied = await self._receive_in_chunks(envelopes)
            total += len(applied)
            repaired = [env for env in applied if env.section not in self.config.quiet_sections]
            if repaired and len(applied) <= self.config.republish_max:
                for env in repaired:
                    self._outbox.put_nowait(env)
                self.stats["republished"] += len(repaired)
            if not reply.more:
                break
        self.stats["syncs"] += 1
        self.stats["from_sync"] += total
        return total

    async def _receive_in_chunks(self, envelopes: list[Envelope]) -> list[Envelope]:
        """Apply a big batch without holding the loop for long (pubsub keeps flowing)."""
        rules = self.state.config.rules
        envelopes.sort(key=lambda e: (rules[e.section].priority if e.section in rules else 1 << 30,
                                      e.author, e.section, e.epoch, e.seq))
        applied: list[Envelope] = []
        for start in range(0, len(envelopes), _RECEIVE_CHUNK):
            applied += self.state.receive(envelopes[start:start + _RECEIVE_CHUNK]).applied
            if start + _RECEIVE_CHUNK < len(envelopes):
                await asyncio.sleep(0)
        return applied

    async def _on_sync(self, peer_id: str, message: Any) -> Any:
        if not self._running or not self._allowed(peer_id):
            raise PeerError("not serving runsync to this peer now")
        request = parse_sync_request(message)
        self.state.note_alive(peer_id)
        reply = self.state.answer(request, self.config.max_reply_bytes)
        if reply.behind:
            self.kick(peer_id)
        return reply.to_wire()

    # ---- periodic work -----------------------------------------------------------------------

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_interval_s)
            self.state.heartbeat()

    async def _saver(self) -> None:
        while True:
            await asyncio.sleep(self.config.save_interval_s)
            data = self.store.snapshot(self.state)
            if data is not None:
                try:
                    await asyncio.to_thread(self.store.write, data)
                except OSError as exc:
                    log.warning("could not save the run state to %s: %s", self.store.path, exc)

    async def _create_when_missing(self) -> None:
        if self.state.config.owner != self.state.peer_id:
            await asyncio.sleep(self.config.create_after_s)
        if self.state.owner() is None or self.state.owner() == self.state.peer_id:
            created = self.state.create_run()
            if created is not None:
                log.info("created run %s (owner %s)", self.state.run, self.state.peer_id)
            if self.config.initial_config and self.state.owner() == self.state.peer_id \
                    and not self.state.value("config", self.state.peer_id):
                try:
                    self.state.set_config(self.config.initial_config)
                except (WriteRejected, ValueError) as exc:
                    log.warning("initial run config refused: %s", exc)


@contextlib.asynccontextmanager
async def open_run_state(host: Host, state: RunState, **kwargs: Any) -> AsyncIterator[RunStateNode]:
    """Run a :class:`RunStateNode` for the body; yields once it is subscribed and serving.

    Keyword arguments go to :class:`RunStateNode`. Leaving the body stops it (cleanly, unless
    ``node.graceful`` was set False to simulate a crash).
    """
    node = RunStateNode(host, state, **kwargs)
    async with asyncio.TaskGroup() as group:
        task = group.create_task(node.run())
        await node.ready.wait()
        try:
            yield node
        finally:
            task.cancel()
