"""One node's run state: its replica of every stream, its own writers, and the views. No I/O.

:class:`RunState` is synchronous and owned by one asyncio loop: writes return at once with the
signed envelope already applied locally (listeners hand it to the network), received envelopes
are applied in the order their rules need, and views are computed from the replica on demand.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..identity import Identity
from .doc import (checkpoint_index, config_writers, effective_config, encode_entry, expert_owners,
                  new_section_doc, run_owner, section_map)
from .log import Outcome, Replica
from .membership import GONE, LIVE, SUSPECT, MembershipConfig, member_status
from .rules import WRITERS_KEY, RuleContext, SectionRule, WriteRejected, default_rules
from .wire import Envelope, SyncReply, SyncRequest, check_peer_id, check_run_name, sign_envelope

__all__ = ["RunState", "RunStateConfig", "Received"]

log = logging.getLogger(__name__)

Listener = Callable[[Sequence[Envelope], bool], None]
_CONTEXT_SECTIONS = frozenset({"genesis", "config"})
_REJECTION_MEMORY = 4096


@dataclass(frozen=True, kw_only=True)
class RunStateConfig:
    """How one node holds a run's state."""

    owner: str | None = None
    """Pin the run owner's peer id. Unpinned, the author of the earliest genesis owns the run
    (trust on first use: fine for cooperative runs and testnets, not against a hostile member)."""
    membership: MembershipConfig = field(default_factory=MembershipConfig)
    """Heartbeat timeouts (live / suspect / gone)."""
    rules: Mapping[str, SectionRule] = field(default_factory=default_rules)
    """The write rules, one per section (see :mod:`.rules`)."""
    max_streams: int = 16384
    """Streams held at most; bounds what a flood of new identities can cost."""

    def __post_init__(self) -> None:
        if self.max_streams < 1:
            raise ValueError(f"max_streams must be >= 1, got {self.max_streams}")
        if "member" not in self.rules:
            raise ValueError("the rule table needs a 'member' section (membership is built on it)")
        if self.owner is not None:
            check_peer_id(self.owner, "owner")


@dataclass
class Received:
    """What a batch of received envelopes did."""

    applied: list[Envelope] = field(default_factory=list)
    rejected: list[tuple[Envelope, str]] = field(default_factory=list)


class _Writer:
    """This node's open epoch of one of its sections: a live pycrdt doc that produces deltas."""

    def __init__(self, identity: Identity, author: str, run: str, section: str, epoch: int,
                 value: Mapping[str, Any]) -> None:
        self.identity, self.author, self.run, self.section, self.epoch = identity, author, run, section, epoch
        self.doc = new_section_doc(value)
        self.seq = 0
        self.log_bytes = 0

    def snapshot(self) -> Envelope:
        update = self.doc.get_update()
        self.log_bytes = len(update)
        return sign_envelope(self.identity, self.run, self.section, self.epoch, 0, update, author=self.author)

    def delta(self, encoded: Mapping[str, str], delete: Iterable[str]) -> Envelope:
        before = self.doc.get_state()
        root = section_map(self.doc)
        with self.doc.transaction():
            for key, text in encoded.items():
                root[key] = text
            for key in delete:
                if key in root:
                    del root[key]
        update = self.doc.get_update(before)
        self.seq += 1
        self.log_bytes += len(update)
        return sign_envelope(self.identity, self.run, self.section, self.epoch, self.seq, update,
                             author=self.author)

    def due_for_compaction(self, rule: SectionRule) -> bool:
        return self.seq >= rule.compact_after_deltas or self.log_bytes >= rule.max_state_bytes // 2


class RunState:
    """A run's replicated state as one node holds it.

    Args:
        run: the run name (``/hyphae/run/<run>/1`` is its topic).
        identity: this node's key; it signs every local write.
        config: owner pin, timeouts, rules.
        clock: wall clock in seconds (tests pass a fake one).
    """

    def __init__(self, run: str, identity: Identity, *, config: RunStateConfig | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.run = check_run_name(run)
        self.identity = identity
        self.peer_id = identity.peer_id
        self.config = config or RunStateConfig()
        self.clock = clock
        self.replica = Replica(run, self.config.rules, max_streams=self.config.max_streams)
        self.version = 0
        """Bumped on every applied envelope (persistence saves when it moved)."""
        self.rejected_count = 0
        self._writers: dict[str, _Writer] = {}
        self._last_epoch = 0
        self._listeners: list[Listener] = []
        self._heard_live: dict[str, float] = {}
        self._rejected: OrderedDict[bytes, str] = OrderedDict()
        self._ctx: RuleContext | None = None
        self.precheck_context: RuleContext = self.context()
        """The latest context, replaced (never mutated) on change: safe to read from another
        thread (the pubsub validator in the libp2p thread)."""

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(envelopes, local)`` after envelopes are applied (local: our writes)."""
        self._listeners.append(listener)

    # ---- context -----------------------------------------------------------------------------

    def context(self) -> RuleContext:
        if self._ctx is None:
            owner = run_owner(self.replica.values("genesis"), self.config.owner)
            writers = config_writers(self.replica.values("config").get(owner, {})) if owner else {}
            self._ctx = RuleContext(self.run, owner, writers, clock_ms=self._now_ms)
            self.precheck_context = self._ctx
        return self._ctx

    def _after_apply(self, applied: Sequence[Envelope], local: bool) -> None:
        if not applied:
            return
        self.version += len(applied)
        if any(env.section in _CONTEXT_SECTIONS for env in applied):
            before = self._ctx
            self._ctx = None
            if self.context() != before:
                self._rejected.clear()  # what the old context refused may pass now
        for listener in list(self._listeners):
            try:
                listener(applied, local)
            except Exception:  # noqa: BLE001 — a broken listener must not break replication
                log.exception("run state listener failed")

    # ---- writing -----------------------------------------------------------------------------

    def write(self, section: str, set: Mapping[str, Any] | None = None,
              delete: Iterable[str] = ()) -> Envelope | None:
        """Change this node's own ``section``: set entries, delete entries. Returns the signed
        envelope (already applied locally and passed to listeners), or None if nothing changed.

        Raises:
            ValueError: unknown section, or a value that is not plain JSON.
            WriteRejected: the change breaks the section's rule (nothing was written).
        """
        rule = self.config.rules.get(section)
        if rule is None:
            raise ValueError(f"unknown section {section!r}; known: {', '.join(sorted(self.config.rules))}")
        encoded = {key: encode_entry(value) for key, value in (set or {}).items()}
        stream = self.replica.streams.get((self.peer_id, section))
        old = stream.value if stream else {}
        new = dict(old)
        new.update({key: json.loads(text) for key, text in encoded.items()})
        deleted = [key for key in delete if key in new]
        for key in deleted:
            del new[key]
        if new == old and stream is not None:
            return None
        ctx = self.context()
        rule.check(self.peer_id, old, new, ctx)
        writer = self._writers.get(section)
        if writer is None or stream is None or writer.epoch != stream.epoch or writer.due_for_compaction(rule):
            writer = _Writer(self.identity, self.peer_id, self.run, section, self._next_epoch(stream), new)
            env = writer.snapshot()
        else:
            env = writer.delta(encoded, deleted)
        offer = self.replica.offer(env, ctx, verified=True)
        if offer.outcome is not Outcome.APPLIED:
            self._writers.pop(section, None)  # the doc holds the refused change; start afresh next time
            raise WriteRejected(offer.reason or f"local write was {offer.outcome.value}")
        self._writers[section] = writer
        self._after_apply(offer.applied, local=True)
        return env

    def _next_epoch(self, stream: Any) -> int:
        epoch = max(int(self.clock() * 1000), self._last_epoch + 1, (stream.epoch + 1) if stream else 1)
        self._last_epoch = epoch
        return epoch

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    def create_run(self, created_ms: int | None = None) -> Envelope | None:
        """Write this node's genesis (it owns the run if its genesis is the earliest)."""
        if (self.peer_id, "genesis") in self.replica.streams:
            return None
        return self.write("genesis", {"created_ms": self._now_ms() if created_ms is None else created_ms})

    def set_member(self, **fields: Any) -> Envelope | None:
        """Write this node's member entry (addrs, roles, hardware, version, agent, ...)."""
        old = self.value("member", self.peer_id)
        now = self._now_ms()
        return self.write("member", {**fields, "joined_ms": old.get("joined_ms", now), "last_seen_ms": now,
                                     "left": False})

    def heartbeat(self) -> Envelope | None:
        """Refresh ``last_seen_ms`` (no-op before :meth:`set_member`)."""
        stream = self.replica.streams.get((self.peer_id, "member"))
        if stream is None:
            return None
        fields: dict[str, Any] = {"last_seen_ms": self._now_ms()}
        if stream.value.get("left"):
            fields["left"] = False
        return self.write("member", fields)

    def leave(self) -> Envelope | None:
        """Mark this node as gone (a clean stop), so others drop it at once."""
        if (self.peer_id, "member") not in self.replica.streams:
            return None
        return self.write("member", {"last_seen_ms": self._now_ms(), "left": True})

    def set_progress(self, values: Mapping[str, Any]) -> Envelope | None:
        return self.write("progress", values)

    def set_config(self, values: Mapping[str, Any]) -> Envelope | None:
        """Set run config keys (owner, or a delegate for its keys)."""
        mine = self.value("config", self.peer_id)
        ts = max([self._now_ms()] + [int(e.get("ts", 0)) + 1 for e in mine.values() if isinstance(e, dict)])
        return self.write("config", {key: {"v": value, "ts": ts} for key, value in values.items()})

    def delegate_config(self, key: str, peers: Iterable[str]) -> Envelope | None:
        """Let ``peers`` write config ``key`` too (owner only)."""
        current = dict(self.value("config", self.peer_id).get(WRITERS_KEY, {}).get("v", {}))
        current[key] = sorted(set(peers))
        return self.write("config", {WRITERS_KEY: {"v": current, "ts": self._now_ms()}})

    def claim_experts(self, experts: Iterable[int], since: int) -> Envelope | None:
        return self.write("experts", {str(int(e)): {"since": int(since)} for e in experts})

    def release_experts(self, experts: Iterable[int]) -> Envelope | None:
        return self.write("experts", delete=[str(int(e)) for e in experts])

    def add_checkpoint(self, ident: str, *, step: int, digest: str, size_bytes: int,
                       kind: str = "model") -> Envelope | None:
        return self.write("checkpoints", {ident: {"step": step, "hash": digest, "size_bytes": size_bytes,
                                                  "kind": kind}})

    def add_blob(self, digest: str, size_bytes: int) -> Envelope | None:
        return self.write("blobs", {digest: size_bytes})

    def append_zo(self, step: int, scalars: bytes) -> Envelope | None:
        """Publish this node's 1-byte ZO scalars of ``step``."""
        return self.write("zo_log", {str(int(step)): bytes(scalars).hex()})

    def truncate_zo(self, before_step: int) -> Envelope | None:
        """Drop this node's ZO entries before ``before_step`` (after a snapshot boundary)."""
        old = self.value("zo_log", self.peer_id)
        return self.write("zo_log", delete=[k for k in old if int(k) < before_step])

    # ---- receiving ---------------------------------------------------------------------------

    def receive(self, envelopes: Iterable[Envelope]) -> Received:
        """Apply envelopes from the network or the disk (verified, rule-checked, in dependency
        order, whatever order they come in)."""
        out = Received()
        rules = self.config.rules
        batch = sorted(envelopes, key=lambda e: (rules[e.section].priority if e.section in rules else 1 << 30,
                                                 e.author, e.section, e.epoch, e.seq))
        for env in batch:
            if env.digest in self._rejected:
                continue
            offer = self.replica.offer(env, self.context())
            if offer.outcome is Outcome.REJECTED:
                self._reject(env, offer.reason)
                out.rejected.append((env, offer.reason))
            elif offer.outcome is Outcome.DROPPED:
                log.debug("dropped %s envelope from %s: %s", env.section, env.author, offer.reason)
            if offer.applied:
                out.applied.extend(offer.applied)
                self._after_apply(offer.applied, local=False)
        for env in out.applied:
            if env.author == self.peer_id:
                writer = self._writers.get(env.section)
                if writer is not None and env.epoch > writer.epoch:
                    log.warning("another process writes %s as this peer id (epoch %d > ours %d); the next "
                                "write starts a newer epoch", env.section, env.epoch, writer.epoch)
                    self._writers.pop(env.section)
        return out

    def note_alive(self, peer_id: str) -> None:
        """``peer_id`` just talked to us (published, asked or answered a sync): live evidence
        that does not depend on its clock (see :mod:`.membership`)."""
        self._heard_live[peer_id] = self.clock()

    def _reject(self, env: Envelope, reason: str) -> None:
        self.rejected_count += 1
        self._rejected[env.digest] = reason
        while len(self._rejected) > _REJECTION_MEMORY:
            self._rejected.popitem(last=False)
        log.warning("rejected %s envelope from %s (epoch %d seq %d): %s", env.section, env.author,
                    env.epoch, env.seq, reason)

    # ---- anti-entropy ------------------------------------------------------------------------

    def sync_request(self) -> SyncRequest:
        return SyncRequest(self.run, self.replica.heads())

    def answer(self, request: SyncRequest, max_bytes: int) -> SyncReply:
        """What a peer at ``request.heads`` lacks, as signed envelopes (never raw state)."""
        if request.run != self.run:
            return SyncReply(request.run, [], False, False)
        envelopes, more = self.replica.missing_for(request.heads, max_bytes)
        return SyncReply(self.run, [env.encode() for env in envelopes], more, self.replica.lacks(request.heads))

    def envelopes(self) -> list[Envelope]:
        """Everything held, for the data dir."""
        return list(self.replica.envelopes())

    # ---- views -------------------------------------------------------------------------------

    def value(self, section: str, author: str) -> dict[str, Any]:
        stream = self.replica.streams.get((author, section))
        return copy.deepcopy(stream.value) if stream else {}

    def owner(self) -> str | None:
        return self.context().owner

    def run_config(self) -> dict[str, Any]:
        return effective_config(self.replica.values("config"), self.owner())

    def members(self, now_s: float | None = None) -> dict[str, dict[str, Any]]:
        """Every member not forgotten: its entry plus ``status`` and ``age_s``, by peer id."""
        now = self.clock() if now_s is None else now_s
        cfg = self.config.membership
        out: dict[str, dict[str, Any]] = {}
        for peer, entry in sorted(self.replica.values("member").items()):
            status, age = member_status(entry, now, self._heard_live.get(peer), cfg)
            if status == GONE and age > cfg.forget_after_s:
                continue
            out[peer] = {**entry, "peer_id": peer, "status": status,
                         "age_s": None if age == float("inf") else round(age, 3)}
        return out

    def live_members(self, now_s: float | None = None) -> list[str]:
        """Live members sorted by peer id: what algorithms pair and shard by."""
        return [peer for peer, m in self.members(now_s).items() if m["status"] == LIVE]

    def expert_owners(self) -> dict[int, str]:
        return expert_owners(self.replica.values("experts"), self.live_members())

    def checkpoints(self) -> list[dict[str, Any]]:
        return checkpoint_index(self.replica.values("checkpoints"), self.replica.values("blobs"),
                                self.live_members())

    def progress(self) -> dict[str, dict[str, Any]]:
        return copy.deepcopy(dict(sorted(self.replica.values("progress").items())))

    def zo_log(self, peer: str) -> dict[int, bytes]:
        return {int(k): bytes.fromhex(v) for k, v in sorted(self.value("zo_log", peer).items(), key=lambda kv: int(kv[0]))}

    def newest(self, section: str, prefix: str = "") -> dict[str, Any]:
        """Merge a ``key -> {"v", "ts"}`` section over every author: for each key the entry with
        the largest (ts, author) wins, so every replica that holds the same envelopes agrees.
        A winning ``v`` of None means the key was deleted."""
        best: dict[str, tuple[int, str, Any]] = {}
        for author, value in self.replica.values(section).items():
            for key, entry in value.items():
                if not key.startswith(prefix) or not isinstance(entry, dict):
                    continue
                rank = (int(entry.get("ts", 0)), author)
                if key not in best or rank > best[key][:2]:
                    best[key] = (*rank, entry.get("v"))
        return {key: v for key, (_, _, v) in best.items() if v is not None}

    def view(self) -> dict[str, Any]:
        """The whole state as JSON, for the API and ``hyphae run show``."""
        members = self.members()
        statuses = [m["status"] for m in members.values()]
        owner = self.owner()
        zo = {peer: {"entries": len(v), "first_step": min(map(int, v)) if v else None,
                     "last_step": max(map(int, v)) if v else None}
              for peer, v in sorted(self.replica.values("zo_log").items())}
        return {
            "run": self.run,
            "self": self.peer_id,
            "owner": owner,
            "owner_pinned": self.config.owner is not None,
            "is_owner": owner == self.peer_id,
            "config": self.run_config(),
            "members": list(members.values()),
            "live_members": [p for p, m in members.items() if m["status"] == LIVE],
            "progress": self.progress(),
            "experts": {str(e): p for e, p in self.expert_owners().items()},
            "checkpoints": self.checkpoints(),
            "zo_log": zo,
            "counts": {"members": len(members), "live": statuses.count(LIVE), "suspect": statuses.count(SUSPECT),
                       "gone": statuses.count(GONE), "rejected": self.rejected_count, **self.replica.stats()},
        }
