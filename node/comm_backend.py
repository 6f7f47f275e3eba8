"""The daemon's side of its workers' `Comm`: each call a worker makes is answered here.

Tensors arrive as raw bytes in shared memory (name -> (dtype, shape, bytes)) and leave the same
way; nothing here imports torch. What each call does on the network:

* ``members``: this node plus every connected hyphae peer whose hello says it trains.
* ``publish``/``collect``: small values over the network's scalar pubsub topic. What peers
  publish there is untrusted: a pubsub validator (libp2p thread) refuses malformed messages and
  authors over :data:`SCALAR_RATE`, so neither is forwarded; the store keeps the *first* value of
  each (topic, step, author) — a second, different one is equivocation, scored severe — only
  within a window around this node's own step of the topic, for at most
  :data:`MAX_SCALAR_TOPICS` topics, so a peer can neither grow memory without bound nor wipe
  the slots others are collecting by announcing a step far ahead.
* ``exchange``/``all_reduce``: through the tensor plane (:mod:`.tensor_service`); a group of
  just this node is reduced locally.
* ``put_blob``/``get_blob``: named by sha256 for the Comm; stored locally and in the tensor
  plane's blob service, whose manifest id the run state maps from the sha256, so any peer can
  fetch (from every holder at once) and verify it. Only the most recently used blobs are kept
  (:class:`BlobBudget`); older ones are deleted here, with the run-state record this node wrote
  for them, and fetched again from others if asked for.
* ``state_*``: the run state's ``algo`` section (each member writes its own entries; a read
  merges everyone's, newest write winning).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import msgpack
import numpy as np

from hyphae.protocol.atomic import atomic_write_bytes
from hyphae.protocol.errors import ProtocolViolation
from hyphae.protocol.ratelimit import KeyedLimiter, RateLimit
from hyphae.protocol.runstate import WriteRejected
from hyphae.protocol.scoring import Severity, scores_for
from hyphae.protocol.wire import decode_body, expect_map

from .tensor_bytes import from_float64, to_float64

if TYPE_CHECKING:
    from .daemon import Daemon

__all__ = ["BlobBudget", "CommBackend", "CommFailure", "Tensors", "Collectives"]

log = logging.getLogger(__name__)

Tensors = dict[str, tuple[str, tuple[int, ...], np.ndarray]]
"""name -> (dtype, shape, raw bytes as a uint8 array)."""

SCALAR_RETENTION_STEPS = 1024
"""Slots this far behind this node's own step of a topic are dropped."""
SCALAR_AHEAD_STEPS = 1024
"""Values for steps further ahead of this node's own step are refused (not stored)."""
MAX_SCALAR_BYTES = 1024
MAX_SCALAR_TOPICS = 16
"""Topics with stored values; beyond it the least recently used topic this node never used
itself is dropped (an algorithm uses one or two)."""
MAX_TOPIC_CHARS = 64
MAX_SCALAR_STEP = (1 << 62) - 1
SCALAR_RATE = RateLimit(rate_per_s=50.0, burst=200.0)
"""Per author. ZO publishes one message per training step (a step takes >= ~0.1 s)."""


@dataclass(frozen=True)
class BlobBudget:
    """How many blobs a node keeps on disk; beyond it the least recently used are deleted.

    Every checkpoint a worker announces, every ZO snapshot and every SPES expert sync passes
    through ``put_blob``; kept forever, a tiny-model run reached 386 MB after 58 checkpoints.
    Apart from the blobs the run state still names (always kept), the algorithms ask for
    recent blobs only, so a few syncs' worth is enough, and a deleted blob can still be fetched
    from peers that hold it while its record lasts.
    """

    max_blobs: int = 24
    """A few syncs of SPES's 8 experts plus checkpoints and ZO snapshots. Blobs the run state
    still names count too but are never deleted, so they alone may exceed it."""
    max_bytes: int = 2 << 30
    """Of the local copies; the tensor plane keeps a second copy of each, so disk use is about
    twice this. The blob just written or fetched is kept even if it alone is larger."""

    def __post_init__(self) -> None:
        if self.max_blobs < 1 or self.max_bytes < 0:
            raise ValueError(f"max_blobs must be >= 1 and max_bytes >= 0, got {self.max_blobs}, {self.max_bytes}")


class CommFailure(Exception):
    """An expected failure to report to the worker as the Comm exception ``kind``."""

    def __init__(self, kind: str, message: str, peer: str = "") -> None:
        super().__init__(message)
        self.kind, self.peer = kind, peer


class Collectives(Protocol):
    """Multi-peer tensor operations (the tensor plane implements these)."""

    async def exchange(self, peer: str, tag: str, tensors: Tensors, timeout_s: float) -> Tensors: ...

    async def all_reduce(self, group: list[str], tag: str, tensors: Tensors, op: str,
                         timeout_s: float) -> tuple[Tensors, list[str]]: ...


def reduce_locally(contributions: list[Tensors], op: str) -> Tensors:
    """Mean or sum of contributions in float64, cast back; the same input gives the same bits."""
    first = contributions[0]
    out: Tensors = {}
    for name, (dtype, shape, _) in first.items():
        total = np.zeros(int(np.prod(shape)) if shape else 1, dtype=np.float64)
        for contrib in contributions:
            total += to_float64(contrib[name][2], dtype)
        if op == "mean":
            total /= len(contributions)
        out[name] = (dtype, shape, from_float64(total, dtype))
    return out


class CommBackend:
    """Answers worker Comm calls for one daemon."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.blob_dir: Path = daemon.datadir.root / "blobs" / "local"
        self.blob_budget = BlobBudget()
        self._plane_ids: dict[str, str] = {}  # sha256 -> blob-service id of blobs put or fetched here
        self._in_use: Counter[str] = Counter()  # blobs being put or read: never deleted meanwhile
        self._trim_lock = asyncio.Lock()
        self._last_use_ns = 0
        self._state: dict[str, Any] = {}
        self._scalars: dict[tuple[str, int], dict[str, bytes]] = defaultdict(dict)
        self._scalar_event = asyncio.Event()
        self._topic = f"/hyphae/scalars/{daemon.config.host.network}/1"
        self._own_step: dict[str, int] = {}  # topic -> highest step this node published/collected
        self._topic_use: dict[str, None] = {}  # topics with slots, least recently used first
        self._scalar_rate = KeyedLimiter(SCALAR_RATE)
        self.scalar_stats: dict[str, int] = {"accepted": 0, "refused": 0, "equivocations": 0}

    @property
    def peer_id(self) -> str:
        return self.daemon.host.peer_id

    async def start(self) -> None:
        await self.daemon.host.subscribe(self._topic, self._on_scalar, validator=self._validate_scalar)

    def _report(self, peer: str, what: str, severity: Severity, detail: str) -> None:
        scores_for(self.daemon.host).report(peer, what, severity, detail)

    def refuse(self, peer: str, reason: str) -> None:
        """The worker's algorithm refused ``peer``'s contribution (NaN/Inf, wrong tensors): a
        training update rejected as garbage, so a severe violation (two in a row disconnect)."""
        if peer != self.peer_id:
            self._report(peer, "training update refused", Severity.SEVERE, reason[:200])

    # ---- membership ------------------------------------------------------------------------

    @property
    def collectives(self) -> Collectives | None:
        return self.daemon.service("tensor")  # type: ignore[return-value]

    async def members(self) -> list[str]:
        """Live trainers of the run (from the replicated run state), this node included.

        Without a tensor plane nobody else could take part in a round, so then it is this node
        alone; without a run state, the connected peers whose hello says they train."""
        if self.collectives is None:
            return [self.peer_id]
        state = self._run_state()
        if state is not None:
            members = state.members()
            trainers = {p for p in state.live_members() if "trainer" in members.get(p, {}).get("roles", [])}
        else:
            trainers = {p.peer_id for p in await self.daemon.host.peers() if "trainer" in p.roles}
        return sorted(trainers | {self.peer_id})

    # ---- tensors ---------------------------------------------------------------------------

    async def exchange(self, peer: str, tag: str, tensors: Tensors, timeout_s: float) -> Tensors:
        if self.collectives is None:
            raise CommFailure("PeerUnavailable", "this node has no tensor plane", peer)
        return await self.collectives.exchange(peer, tag, tensors, timeout_s)

    async def all_reduce(self, group: list[str], tag: str, tensors: Tensors, op: str,
                         timeout_s: float) -> tuple[Tensors, list[str]]:
        if op not in ("mean", "sum"):
            raise CommFailure("ValueError", f"op must be 'mean' or 'sum', got {op!r}")
        if group == [self.peer_id]:
            return reduce_locally([tensors], op), [self.peer_id]
        if self.collectives is None:
            raise CommFailure("PeerUnavailable", "this node has no tensor plane", group[0])
        return await self.collectives.all_reduce(group, tag, tensors, op, timeout_s)

    # ---- scalars ---------------------------------------------------------------------------

    async def publish(self, topic: str, step: int, value: bytes) -> None:
        if len(value) > MAX_SCALAR_BYTES:
            raise CommFailure("ValueError", f"value is {len(value)} bytes, limit {MAX_SCALAR_BYTES}")
        if not 0 < len(topic) <= MAX_TOPIC_CHARS or not 0 <= step <= MAX_SCALAR_STEP:
            raise CommFailure("ValueError", f"topic must be 1-{MAX_TOPIC_CHARS} characters and step in "
                                            f"0..{MAX_SCALAR_STEP}, got {len(topic)} characters, step {step}")
        self._advance(topic, step)
        self._store_scalar(self.peer_id, topic, step, value)
        payload = msgpack.packb({"topic": topic, "step": step, "value": value}, use_bin_type=True)
        await self.daemon.host.publish(self._topic, payload)

    @staticmethod
    def _parse_scalar(data: bytes) -> dict[str, Any]:
        """Check one scalar message (any failure is a ProtocolViolation naming the field)."""
        if len(data) > MAX_SCALAR_BYTES + MAX_TOPIC_CHARS + 64:
            raise ProtocolViolation(f"scalar message is {len(data)} bytes, limit {MAX_SCALAR_BYTES + MAX_TOPIC_CHARS + 64}")
        msg = expect_map(decode_body(data), {"topic": str, "step": int, "value": bytes}, what="scalar")
        if len(msg["value"]) > MAX_SCALAR_BYTES or not 0 < len(msg["topic"]) <= MAX_TOPIC_CHARS:
            raise ProtocolViolation(f"scalar value of {len(msg['value'])} bytes (limit {MAX_SCALAR_BYTES}) or topic "
                                    f"of {len(msg['topic'])} characters (limit {MAX_TOPIC_CHARS})")
        if not 0 <= msg["step"] <= MAX_SCALAR_STEP:
            raise ProtocolViolation(f"scalar step {msg['step']} outside 0..{MAX_SCALAR_STEP}")
        return msg

    def _validate_scalar(self, author: str, data: bytes) -> bool:
        """Pubsub validator (libp2p thread): refuse, and so never forward, malformed messages and
        authors over their rate. Touches only the thread-safe limiter and score table."""
        if author == self.peer_id:
            return True
        if not self._scalar_rate.allow(author):
            self._report(author, "scalar.rate", Severity.MINOR, f"over {SCALAR_RATE.rate_per_s:g} messages/s")
            return False
        try:
            self._parse_scalar(data)
        except ProtocolViolation as exc:
            self._report(author, "scalar.malformed", Severity.MAJOR, str(exc))
            return False
        return True

    def _on_scalar(self, author: str, data: bytes) -> None:
        try:
            msg = self._parse_scalar(data)
        except ProtocolViolation as exc:
            log.info("dropping a scalar from %s: %s", author, exc)
            return
        topic, step = msg["topic"], msg["step"]
        own = self._own_step.get(topic)
        if own is not None and not own - SCALAR_RETENTION_STEPS <= step <= own + SCALAR_AHEAD_STEPS:
            self.scalar_stats["refused"] += 1
            log.debug("dropping a scalar from %s for step %d of %s, outside this node's window around %d",
                      author, step, topic, own)
            return
        self._store_scalar(author, topic, step, msg["value"])

    def _advance(self, topic: str, step: int) -> None:
        """This node works at ``step`` of ``topic``: move its window, drop stale slots."""
        if step <= self._own_step.get(topic, -1):
            return
        self._own_step[topic] = step
        stale = [k for k in self._scalars if k[0] == topic and not
                 step - SCALAR_RETENTION_STEPS <= k[1] <= step + SCALAR_AHEAD_STEPS]
        for key in stale:
            del self._scalars[key]

    def _store_scalar(self, author: str, topic: str, step: int, value: bytes) -> None:
        slot = self._scalars[(topic, step)]
        first = slot.get(author)
        if first is not None and author != self.peer_id:
            if first != value:
                self.scalar_stats["equivocations"] += 1
                self._report(author, "scalar.equivocation", Severity.SEVERE,
                             f"two different values for {topic} step {step}")
            return  # the first value stands: a peer cannot take back what it said
        slot[author] = value
        self.scalar_stats["accepted"] += 1
        self._topic_use.pop(topic, None)
        self._topic_use[topic] = None
        if topic not in self._own_step and len([k for k in self._scalars if k[0] == topic]) > SCALAR_AHEAD_STEPS:
            del self._scalars[min(k for k in self._scalars if k[0] == topic)]  # no window yet: keep the newest
        while len(self._topic_use) > MAX_SCALAR_TOPICS:
            victim = next((t for t in self._topic_use if t not in self._own_step), None)
            if victim is None:
                break
            del self._topic_use[victim]
            for key in [k for k in self._scalars if k[0] == victim]:
                del self._scalars[key]
        self._scalar_event.set()
        self._scalar_event = asyncio.Event()

    async def collect(self, topic: str, step: int, peers: list[str], timeout_s: float) -> dict[str, bytes]:
        want = set(peers)
        self._advance(topic, step)
        try:
            async with asyncio.timeout(timeout_s):
                while not want <= set(self._scalars.get((topic, step), {})):
                    await self._scalar_event.wait()
        except TimeoutError:
            pass  # a partial answer is a normal outcome
        got = self._scalars.get((topic, step), {})
        return {p: v for p, v in got.items() if p in want}

    # ---- blobs -----------------------------------------------------------------------------

    async def put_blob(self, data: bytes) -> str:
        """Store ``data``; its name for the Comm is its sha256.

        The tensor plane names blobs by their chunk manifest (so a fetcher can verify every
        chunk as it arrives); the run state maps the sha256 to that id for everyone."""
        digest = hashlib.sha256(data).hexdigest()
        path = self.blob_dir / digest
        with self._using(digest):
            if not path.exists():
                await asyncio.to_thread(atomic_write_bytes, path, data)
            await asyncio.to_thread(self._touch, path)
            plane, state = self.collectives, self._run_state()
            if plane is not None and state is not None:
                blob_id = await plane.put_blob(data)
                self._plane_ids[digest] = blob_id
                await self.state_set(f"{BLOB_PREFIX}{digest}", {"id": blob_id, "size": len(data)})
            await self._trim_blobs()
        return digest

    async def get_blob(self, digest: str, timeout_s: float) -> bytes:
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise CommFailure("ValueError", f"{digest!r} is not a sha256 hex digest")
        path = self.blob_dir / digest
        with self._using(digest):
            if path.exists():
                data = await asyncio.to_thread(path.read_bytes)
                fetched = False
            else:
                data, fetched = await self._fetch_blob(digest, timeout_s), True
            if hashlib.sha256(data).hexdigest() != digest:
                raise CommFailure("BlobCorrupt", f"blob {digest} does not hash to its name")
            if not path.exists():
                await asyncio.to_thread(atomic_write_bytes, path, data)
            await asyncio.to_thread(self._touch, path)
            if fetched:
                await self._trim_blobs()
        return data

    async def _fetch_blob(self, digest: str, timeout_s: float) -> bytes:
        record = await self.state_get(f"{BLOB_PREFIX}{digest}")
        plane = self.collectives
        if plane is None or not isinstance(record, dict) or not isinstance(record.get("id"), str):
            raise CommFailure("BlobUnavailable", digest)
        try:
            data = await plane.get_blob(record["id"], timeout_s)
        except TimeoutError:
            raise CommFailure("TimeoutError", f"blob {digest} not fetched within {timeout_s} s") from None
        except CommFailure:
            raise
        except Exception as exc:  # noqa: BLE001 — no provider, a corrupt one, or a dropped fetch
            raise CommFailure("BlobUnavailable", f"{digest}: {exc}") from None
        self._plane_ids[digest] = record["id"]
        return data

    # ---- keeping the blob store bounded --------------------------------------------------

    @contextmanager
    def _using(self, digest: str) -> Iterator[None]:
        """Mark a blob as in use: a trim running meanwhile (another put) must not delete it."""
        self._in_use[digest] += 1
        try:
            yield
        finally:
            self._in_use[digest] -= 1
            if not self._in_use[digest]:
                del self._in_use[digest]

    def _touch(self, path: Path) -> None:
        """Record a use in the file's mtime (so the order survives restarts), strictly later
        than the previous one (the file system's own clock may tick in milliseconds)."""
        self._last_use_ns = max(time.time_ns(), self._last_use_ns + 1)
        os.utime(path, ns=(self._last_use_ns, self._last_use_ns))

    async def _trim_blobs(self) -> None:
        """Delete the least recently used blobs beyond :attr:`blob_budget`; never one in use or
        one the run state still names (see :meth:`_named_in_state`)."""
        async with self._trim_lock:
            keep = set(self._in_use) | self._named_in_state()
            victims = await asyncio.to_thread(_over_budget, self.blob_dir, self.blob_budget, keep)
            for digest in victims:
                await self._delete_blob(digest)

    def _named_in_state(self) -> set[str]:
        """Digests named by the algo section's current values outside the ``blob/`` map: a ZO
        snapshot's weights and pool and the run's θ_0 (put once, at the start, and needed by
        every joiner for as long as the run lasts), the newest checkpoint of each member, the
        current SPES experts. Age says nothing about these; the algorithms delete the records
        they no longer need, which makes their blobs fair game."""
        state = self._run_state()
        named: set[str] = set()
        if state is not None:
            for key, value in state.newest(ALGO_SECTION).items():
                if not key.startswith(BLOB_PREFIX):
                    _collect_digests(value, named)
        return named

    async def _delete_blob(self, digest: str) -> None:
        """Delete a blob here: the local file, the tensor plane's copy and this node's own record
        ``blob/<sha256>`` (others' records of it, and their copies, stay)."""
        key = f"{BLOB_PREFIX}{digest}"
        blob_id = self._plane_ids.pop(digest, None)
        if blob_id is None:  # put or fetched before a restart: the run state still names it
            record = await self.state_get(key)
            blob_id = record.get("id") if isinstance(record, dict) else None
        await asyncio.to_thread((self.blob_dir / digest).unlink, missing_ok=True)
        blobs = getattr(self.collectives, "blobs", None)  # the tensor service's BlobService, once started
        if isinstance(blob_id, str) and blobs is not None:
            try:
                await blobs.remove(blob_id)
            except (OSError, ValueError) as exc:
                log.warning("could not delete blob %s from the tensor plane: %s", blob_id, exc)
        self._delete_own_record(key)
        log.debug("deleted blob %s (over the local budget)", digest)

    def _delete_own_record(self, key: str) -> None:
        """Delete this node's entry ``key`` from the algo section outright.

        Not ``state_set(key, None)``: that writes a tombstone, which stays in this node's section
        (at most 8192 keys, so after enough blobs every state_set would be refused) and would
        hide another member's record of the same blob, newer or not."""
        state = self._run_state()
        if state is None:
            self._state.pop(key, None)
            return
        try:
            state.write(ALGO_SECTION, delete=[key])
        except (WriteRejected, ValueError) as exc:
            log.warning("could not delete the run-state record %s: %s", key, exc)

    # ---- run state -------------------------------------------------------------------------

    def _run_state(self) -> Any:
        svc = self.daemon.service("runstate")
        return None if svc is None else svc.state

    async def state_get(self, key: str) -> Any:
        state = self._run_state()
        if state is None:
            return self._state.get(key)
        return _from_json(state.newest(ALGO_SECTION).get(key))

    async def state_set(self, key: str, value: Any) -> None:
        state = self._run_state()
        if state is None:
            if value is None:
                self._state.pop(key, None)
            else:
                self._state[key] = value
            return
        entry = {"v": _to_json(value), "ts": int(time.time() * 1000)}
        try:
            state.write(ALGO_SECTION, {key: entry})
        except (WriteRejected, ValueError) as exc:
            raise CommFailure("ValueError", f"state_set {key!r}: {exc}") from None

    async def state_items(self, prefix: str) -> dict[str, Any]:
        state = self._run_state()
        if state is None:
            return {k: v for k, v in self._state.items() if k.startswith(prefix)}
        return {k: _from_json(v) for k, v in state.newest(ALGO_SECTION, prefix).items()}


ALGO_SECTION = "algo"
BLOB_PREFIX = "blob/"
_BYTES_TAG = "$bytes"
_HEX = frozenset("0123456789abcdef")


def _collect_digests(value: Any, out: set[str]) -> None:
    """Add every sha256 hex string inside a JSON value to ``out``."""
    if isinstance(value, str):
        if len(value) == 64 and set(value) <= _HEX:
            out.add(value)
    elif isinstance(value, dict):
        for v in value.values():
            _collect_digests(v, out)
    elif isinstance(value, list):
        for v in value:
            _collect_digests(v, out)


def _over_budget(folder: Path, budget: BlobBudget, keep: set[str]) -> list[str]:
    """Blobs in ``folder`` to delete, least recently used (oldest mtime) first: beyond the
    newest ``max_blobs``, or past ``max_bytes`` counted from the newest. ``keep`` is kept and
    counted first (temp files of writes in progress are not blobs: left alone)."""
    found: list[tuple[bool, int, int, str]] = []
    for entry in os.scandir(folder) if folder.exists() else ():
        if len(entry.name) != 64 or not set(entry.name) <= _HEX:
            continue
        try:
            st = entry.stat()
        except FileNotFoundError:
            continue
        found.append((entry.name in keep, st.st_mtime_ns, st.st_size, entry.name))
    found.sort(reverse=True)  # kept ones first, then newest first
    count = total = 0
    for i, (kept, _, size, _) in enumerate(found):
        count, total = count + 1, total + size
        if not kept and (count > budget.max_blobs or total > budget.max_bytes):
            return [name for *_, name in reversed(found[i:])]  # this one and every older one
    return []


def _to_json(value: Any) -> Any:
    """Comm values may hold bytes; the run state holds JSON. Bytes travel as ``{"$bytes": hex}``."""
    if isinstance(value, bytes | bytearray):
        return {_BYTES_TAG: bytes(value).hex()}
    if isinstance(value, list | tuple):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    return value


def _from_json(value: Any) -> Any:
    """Inverse of :func:`_to_json`. Any member can write any algo value, so a malformed
    ``{"$bytes": ...}`` must not make reads fail for everyone: it is returned as it is."""
    if isinstance(value, dict):
        if set(value) == {_BYTES_TAG} and isinstance(value[_BYTES_TAG], str):
            try:
                return bytes.fromhex(value[_BYTES_TAG])
            except ValueError:
                return value
        return {k: _from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value

