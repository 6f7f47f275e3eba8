"""Wire formats of the run state: signed envelopes and the anti-entropy request/reply.

Pure: no I/O, no clocks. Everything that arrives is untrusted; every decoder here checks types,
sizes and ranges and raises :class:`ProtocolViolation` (never anything else) on bad input.

An :class:`Envelope` is the only unit of change that ever crosses the network, whether by pubsub
or in a sync reply: one author's pycrdt update for one *stream* ``(author, section)``, numbered by
``(epoch, seq)`` and signed by the author's Ed25519 key over a canonical encoding that also binds
the run name, so an envelope can never be replayed into another run or another stream.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from typing import Any

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519
from libp2p.crypto.keys import KeyType
from libp2p.peer.id import ID

from ..errors import ProtocolViolation
from ..identity import Identity
from ..wire import decode_body, expect_map

__all__ = [
    "SYNC_PROTOCOL",
    "WIRE_VERSION",
    "MAX_UPDATE_BYTES",
    "MAX_ENVELOPE_BYTES",
    "MAX_SYNC_FRAME_BYTES",
    "Envelope",
    "Head",
    "SyncRequest",
    "SyncReply",
    "topic_for",
    "check_run_name",
    "check_peer_id",
    "sign_envelope",
    "decode_envelope",
    "verify_envelope",
    "parse_sync_request",
    "parse_sync_reply",
]

WIRE_VERSION = 1
SYNC_PROTOCOL = "/hyphae/runsync/1"
_DOMAIN = b"hyphae/runstate/1"

MAX_UPDATE_BYTES = 256 * 1024
"""A snapshot of the largest section (see rules) must fit, with room to spare."""
MAX_ENVELOPE_BYTES = MAX_UPDATE_BYTES + 1024
MAX_SYNC_FRAME_BYTES = 4 * 1024 * 1024
"""Frame limit of ``/hyphae/runsync/1``: a reply is filled up to ``max_reply_bytes`` (well below)."""
MAX_PEER_ID_CHARS = 128
MAX_STREAMS_IN_HEADS = 65536
MAX_ENVELOPES_PER_REPLY = 4096
MAX_EPOCH = (1 << 63) - 1
MAX_SEQ = (1 << 31) - 1
TIP_BYTES = 8

_RUN_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SECTION_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_PEER_RE = re.compile(r"^[1-9A-HJ-NP-Za-km-z]{1,128}$")  # base58


def check_run_name(run: str) -> str:
    """Return ``run`` if it is a valid run name, else raise ValueError saying what is allowed."""
    if not isinstance(run, str) or not _RUN_RE.match(run):
        raise ValueError(f"run name must be 1-64 characters of A-Z a-z 0-9 . _ - (starting with a letter "
                         f"or digit), got {run!r}")
    return run


def check_peer_id(peer_id: str, what: str = "peer id") -> str:
    """Return ``peer_id`` if it is an Ed25519 libp2p peer id (``12D3KooW...``), else raise
    ValueError naming ``what``: only such ids can be checked against signatures."""
    if not isinstance(peer_id, str) or not _PEER_RE.match(peer_id) or _public_key(peer_id) is None:
        raise ValueError(f"{what} must be an Ed25519 peer id like 12D3KooW..., got {str(peer_id)[:80]!r}")
    return peer_id


def topic_for(run: str) -> str:
    """The pubsub topic that carries ``run``'s envelopes."""
    return f"/hyphae/run/{check_run_name(run)}/1"


@functools.lru_cache(maxsize=4096)
def _public_key(peer_id: str) -> ed25519.Ed25519PublicKey | None:
    """The Ed25519 key inside ``peer_id`` (an identity multihash), cached: parsing costs more
    than the signature check itself."""
    try:
        public = ID.from_base58(peer_id).extract_public_key()
    except Exception:  # noqa: BLE001 — any decoding failure means "not a verifiable peer id"
        return None
    if public is None or public.get_type() != KeyType.Ed25519:
        return None
    try:
        return ed25519.Ed25519PublicKey.from_public_bytes(public.to_bytes())
    except ValueError:
        return None


@dataclass(frozen=True)
class Envelope:
    """One signed change to one stream. ``seq == 0`` is the epoch's snapshot (the whole section
    as a fresh pycrdt document); ``seq >= 1`` are delta updates on top of it, in order."""

    run: str
    author: str
    section: str
    epoch: int
    seq: int
    update: bytes
    sig: bytes

    @property
    def key(self) -> tuple[str, str]:
        return (self.author, self.section)

    @property
    def is_snapshot(self) -> bool:
        return self.seq == 0

    def signed_bytes(self) -> bytes:
        return _signed_bytes(self.run, self.author, self.section, self.epoch, self.seq, self.update)

    @functools.cached_property
    def digest(self) -> bytes:
        """16 bytes identifying this exact envelope (content and signature)."""
        return hashlib.sha256(self.signed_bytes() + self.sig).digest()[:16]

    def encode(self) -> bytes:
        return self._encoded

    @functools.cached_property
    def _encoded(self) -> bytes:
        return msgpack.packb({"v": WIRE_VERSION, "r": self.run, "a": self.author, "s": self.section,
                              "e": self.epoch, "n": self.seq, "u": self.update, "g": self.sig},
                             use_bin_type=True)

    @property
    def size_bytes(self) -> int:
        return len(self.update) + len(self.sig) + len(self.author) + len(self.run) + len(self.section) + 24


def _signed_bytes(run: str, author: str, section: str, epoch: int, seq: int, update: bytes) -> bytes:
    # A msgpack array of fixed types is a canonical encoding: one byte string per envelope.
    return msgpack.packb([_DOMAIN, run, author, section, epoch, seq, update], use_bin_type=True)


def sign_envelope(identity: Identity, run: str, section: str, epoch: int, seq: int, update: bytes, *,
                  author: str | None = None) -> Envelope:
    """Build and sign an envelope authored by ``identity``.

    Args:
        author: ``identity.peer_id`` if the caller has it at hand (deriving it costs more than
            signing).

    Raises:
        ValueError: a field is out of range (the message names it and the limit).
    """
    author = author or identity.peer_id
    _check_fields(run, author, section, epoch, seq, update, exc=ValueError)
    sig = identity.sign(_signed_bytes(run, author, section, epoch, seq, update))
    return Envelope(run, author, section, epoch, seq, bytes(update), sig)


def verify_envelope(envelope: Envelope) -> bool:
    """True if ``envelope.sig`` was made by the key behind ``envelope.author`` (never raises)."""
    key = _public_key(envelope.author)
    if key is None:
        return False
    try:
        key.verify(envelope.sig, envelope.signed_bytes())
    except (InvalidSignature, ValueError):
        return False
    return True


def _check_fields(run: Any, author: Any, section: Any, epoch: Any, seq: Any, update: Any,
                  *, exc: type[Exception]) -> None:
    if not isinstance(run, str) or not _RUN_RE.match(run):
        raise exc(f"envelope run name {run!r} is not a valid run name")
    if not isinstance(author, str) or not _PEER_RE.match(author):
        raise exc(f"envelope author must be a base58 peer id of at most {MAX_PEER_ID_CHARS} characters")
    if not isinstance(section, str) or not _SECTION_RE.match(section):
        raise exc(f"envelope section {section!r} must match {_SECTION_RE.pattern}")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not 1 <= epoch <= MAX_EPOCH:
        raise exc(f"envelope epoch must be an int in 1..2**63-1, got {epoch!r}")
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq <= MAX_SEQ:
        raise exc(f"envelope seq must be an int in 0..2**31-1, got {seq!r}")
    if not isinstance(update, (bytes, bytearray)) or len(update) > MAX_UPDATE_BYTES:
        size = len(update) if isinstance(update, (bytes, bytearray)) else type(update).__name__
        raise exc(f"envelope update must be bytes of at most {MAX_UPDATE_BYTES}, got {size}; "
                  f"compact the section (a new epoch) to shrink it")


_ENVELOPE_FIELDS = {"v": int, "r": str, "a": str, "s": str, "e": int, "n": int, "u": bytes, "g": bytes}


def decode_envelope(data: bytes) -> Envelope:
    """Decode one envelope from bytes (pubsub payload or a sync reply entry).

    The signature is *not* checked here (see :func:`verify_envelope`): decoding is pure
    syntax, so a fuzzer can drive it without keys.

    Raises:
        ProtocolViolation: malformed msgpack, wrong or missing fields, values out of range.
    """
    if not isinstance(data, (bytes, bytearray)):
        raise ProtocolViolation(f"an envelope must be bytes, got {type(data).__name__}")
    if len(data) > MAX_ENVELOPE_BYTES:
        raise ProtocolViolation(f"envelope is {len(data)} bytes, limit {MAX_ENVELOPE_BYTES}")
    message = expect_map(decode_body(bytes(data)), _ENVELOPE_FIELDS, what="run state envelope")
    if message["v"] != WIRE_VERSION:
        raise ProtocolViolation(f"run state envelope version {message['v']} is not {WIRE_VERSION}; "
                                f"upgrade hyphae on one side")
    _check_fields(message["r"], message["a"], message["s"], message["e"], message["n"], message["u"],
                  exc=ProtocolViolation)
    if len(message["g"]) != 64:
        raise ProtocolViolation(f"envelope signature must be 64 bytes (Ed25519), got {len(message['g'])}")
    return Envelope(message["r"], message["a"], message["s"], message["e"], message["n"],
                    bytes(message["u"]), bytes(message["g"]))


# ---- anti-entropy --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Head:
    """How far one stream has got on a replica: its epoch, last contiguous seq, and the first
    bytes of the last envelope's digest (so two replicas can tell a fork from a lag)."""

    epoch: int
    seq: int
    tip: bytes

    def to_wire(self) -> list[Any]:
        return [self.epoch, self.seq, self.tip]


Heads = dict[tuple[str, str], Head]


@dataclass(frozen=True)
class SyncRequest:
    """"Here is how far I am on every stream; send me what I lack." """

    run: str
    heads: Heads

    def to_wire(self) -> dict[str, Any]:
        grouped: dict[str, dict[str, list[Any]]] = {}
        for (author, section), head in self.heads.items():
            grouped.setdefault(author, {})[section] = head.to_wire()
        return {"v": WIRE_VERSION, "run": self.run, "heads": grouped}


@dataclass(frozen=True)
class SyncReply:
    """Signed envelopes the requester lacks (re-verified by it one by one, exactly as if they
    came by pubsub). ``more``: the reply was cut at its size budget, ask again. ``behind``: the
    responder saw in the request that the requester holds things it lacks."""

    run: str
    envelopes: list[bytes]
    more: bool
    behind: bool

    def to_wire(self) -> dict[str, Any]:
        return {"v": WIRE_VERSION, "run": self.run, "envelopes": self.envelopes, "more": self.more,
                "behind": self.behind}


def _check_version_and_run(message: dict[str, Any], what: str) -> None:
    if message["v"] != WIRE_VERSION:
        raise ProtocolViolation(f"{what} version {message['v']} is not {WIRE_VERSION}; upgrade hyphae on one side")
    if not _RUN_RE.match(message["run"]):
        raise ProtocolViolation(f"{what} names an invalid run {message['run'][:80]!r}")


def parse_sync_request(message: Any) -> SyncRequest:
    """Check a decoded ``/hyphae/runsync/1`` request.

    Raises:
        ProtocolViolation: wrong shape, too many streams, values out of range.
    """
    message = expect_map(message, {"v": int, "run": str, "heads": dict}, what="runsync request")
    _check_version_and_run(message, "runsync request")
    heads: Heads = {}
    for author, sections in message["heads"].items():
        if not isinstance(author, str) or not _PEER_RE.match(author):
            raise ProtocolViolation("runsync request heads: author must be a base58 peer id")
        if not isinstance(sections, dict):
            raise ProtocolViolation(f"runsync request heads for {author[:60]} must be a map of sections")
        for section, head in sections.items():
            if not isinstance(section, str) or not _SECTION_RE.match(section):
                raise ProtocolViolation(f"runsync request heads: bad section name {str(section)[:40]!r}")
            heads[(author, section)] = _parse_head(head)
            if len(heads) > MAX_STREAMS_IN_HEADS:
                raise ProtocolViolation(f"runsync request lists more than {MAX_STREAMS_IN_HEADS} streams")
    return SyncRequest(message["run"], heads)


def _parse_head(head: Any) -> Head:
    if (not isinstance(head, list) or len(head) != 3 or not all(isinstance(x, int) and not isinstance(x, bool)
                                                                 for x in head[:2])
            or not isinstance(head[2], bytes)):
        raise ProtocolViolation("runsync head must be [epoch:int, seq:int, tip:bytes]")
    epoch, seq, tip = head
    if not 1 <= epoch <= MAX_EPOCH or not 0 <= seq <= MAX_SEQ or len(tip) != TIP_BYTES:
        raise ProtocolViolation(f"runsync head out of range (epoch {epoch}, seq {seq}, tip {len(tip)} bytes)")
    return Head(epoch, seq, bytes(tip))


def parse_sync_reply(message: Any) -> SyncReply:
    """Check a decoded ``/hyphae/runsync/1`` reply (its envelopes are decoded later, one by one).

    Raises:
        ProtocolViolation: wrong shape or too many entries.
    """
    message = expect_map(message, {"v": int, "run": str, "envelopes": list, "more": bool, "behind": bool},
                         what="runsync reply")
    _check_version_and_run(message, "runsync reply")
    envelopes = message["envelopes"]
    if len(envelopes) > MAX_ENVELOPES_PER_REPLY:
        raise ProtocolViolation(f"runsync reply carries {len(envelopes)} envelopes, limit {MAX_ENVELOPES_PER_REPLY}")
    if not all(isinstance(e, bytes) for e in envelopes):
        raise ProtocolViolation("runsync reply envelopes must all be byte strings")
    return SyncReply(message["run"], envelopes, message["more"], message["behind"])


def decode_sync_request_bytes(body: bytes) -> SyncRequest:
    """Decode a request from a raw frame body (for tests and fuzzing; the Host decodes frames)."""
    return parse_sync_request(decode_body(body))


def decode_sync_reply_bytes(body: bytes) -> SyncReply:
    """Decode a reply from a raw frame body (for tests and fuzzing)."""
    return parse_sync_reply(decode_body(body))
