"""Who may join a closed run: a run secret (proved, never sent) and/or a signed allowlist.

An open run admits every peer of the network. A closed run admits a peer only if

* it proves it knows the run secret: in its hello it sends ``HMAC(K, sender | receiver | network)``
  where ``K = HKDF(secret, run)``. The proof names both ends, and Noise has already proved who
  the sender is, so a proof cannot be replayed by anyone else or towards anyone else, and the
  secret itself never crosses the wire (not even encrypted); and/or
* its peer id is on an allowlist signed by the run's creator (the owner's Ed25519 key, which is
  inside the owner's peer id, so anyone can check the file without asking anyone).

Admission is judged once per connection, in the hello (:mod:`.hello`); a peer that fails is
disconnected, and every hyphae protocol handler and pubsub topic answers only admitted peers
(see :class:`~hyphae.protocol.host.Host`), so a non-member cannot write the run state, open a
tensor-plane session or fetch a blob. py-libp2p's pubsub itself exchanges nothing with a peer
before its hello passed (:mod:`._pubsub_gate`), so a non-member cannot read the run's gossip.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from libp2p.peer.id import ID

from .atomic import atomic_write_json
from .identity import Identity, verify_signature

__all__ = ["Admission", "AdmissionError", "make_allowlist", "load_allowlist", "ALLOWLIST_FORMAT"]

ALLOWLIST_FORMAT = "hyphae-allowlist/1"
PROOF_BYTES = 32
MIN_SECRET_BYTES = 16
MAX_ALLOWLIST_PEERS = 100_000


class AdmissionError(ValueError):
    """A secret or allowlist that cannot be used (says what to fix)."""


def _run_key(secret: bytes, run: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=b"hyphae run admission v1",
                info=run.encode()).derive(secret)


@dataclass(frozen=True, repr=False)
class Admission:
    """The admission policy of the run this node is in. ``repr`` never shows the key."""

    run: str
    key: bytes | None = None
    """HKDF of the run secret (None: no secret asked for)."""
    allowlist: frozenset[str] | None = None
    """Peer ids admitted by the creator's signed list (None: no list)."""

    @classmethod
    def closed_by(cls, run: str, *, secret: bytes | None = None, allowlist: frozenset[str] | None = None) -> Admission:
        if secret is not None and len(secret) < MIN_SECRET_BYTES:
            raise AdmissionError(f"the run secret is {len(secret)} bytes; use at least {MIN_SECRET_BYTES} "
                                 "(e.g. `openssl rand -hex 32`)")
        return cls(run=run, key=None if secret is None else _run_key(secret, run), allowlist=allowlist)

    @property
    def closed(self) -> bool:
        return self.key is not None or self.allowlist is not None

    def describe(self) -> dict[str, object]:
        """For the API: how the run is closed (never the secret)."""
        return {"closed": self.closed, "secret": self.key is not None,
                "allowlist": None if self.allowlist is None else len(self.allowlist)}

    def proof(self, sender: str, receiver: str, network: str) -> bytes:
        """What ``sender`` puts in its hello to ``receiver`` (empty without a secret)."""
        if self.key is None:
            return b""
        return hmac.new(self.key, _transcript(sender, receiver, network), hashlib.sha256).digest()

    def refusal(self, peer: str, me: str, network: str, proof: bytes) -> str | None:
        """Why ``peer`` (whose hello to ``me`` carried ``proof``) is not admitted; None if it is."""
        if self.allowlist is not None and peer not in self.allowlist:
            return f"peer is not on the allowlist of run {self.run!r}"
        if self.key is not None:
            expected = hmac.new(self.key, _transcript(peer, me, network), hashlib.sha256).digest()
            if not proof:
                return f"run {self.run!r} is closed and the peer sent no proof of its secret"
            if not hmac.compare_digest(proof, expected):
                return f"the peer's proof of the secret of run {self.run!r} is wrong"
        return None

    def __repr__(self) -> str:
        return f"Admission(run={self.run!r}, secret={self.key is not None}, allowlist={self.allowlist is not None})"


def _is_peer_id(text: str) -> bool:
    try:
        return ID.from_base58(text).extract_public_key() is not None
    except Exception:  # noqa: BLE001 — anything unparsable is not a peer id
        return False


def _transcript(sender: str, receiver: str, network: str) -> bytes:
    return b"\0".join((b"hyphae-hello-proof", sender.encode(), receiver.encode(), network.encode()))


# ---- the signed allowlist ------------------------------------------------------------------------

def _allowlist_bytes(run: str, owner: str, peers: list[str]) -> bytes:
    return json.dumps({"format": ALLOWLIST_FORMAT, "run": run, "owner": owner, "peers": peers},
                      sort_keys=True, separators=(",", ":")).encode()


def make_allowlist(identity: Identity, run: str, peers: list[str], path: Path) -> None:
    """Write ``path``: ``peers`` (plus the creator) admitted to ``run``, signed by ``identity``."""
    for peer in peers:
        if not _is_peer_id(peer):
            raise AdmissionError(f"{peer!r} is not a peer id (they look like 12D3KooW...; `hyphae node status` shows one)")
    members = sorted(set(peers) | {identity.peer_id})
    signature = identity.sign(_allowlist_bytes(run, identity.peer_id, members))
    atomic_write_json(path, {"format": ALLOWLIST_FORMAT, "run": run, "owner": identity.peer_id,
                             "peers": members, "signature": base64.b64encode(signature).decode()})


def load_allowlist(path: Path, run: str, owner: str | None) -> tuple[str, frozenset[str]]:
    """Read and check ``path``: returns ``(creator peer id, admitted peer ids)``.

    Raises:
        AdmissionError: unreadable, another run, another owner than ``owner``, or a bad signature.
    """
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise AdmissionError(f"cannot read the allowlist {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise AdmissionError(f"the allowlist {path} is not JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != ALLOWLIST_FORMAT:
        raise AdmissionError(f"{path} is not a hyphae allowlist (make one with `hyphae run allowlist`)")
    peers, creator, signature = data.get("peers"), data.get("owner"), data.get("signature")
    if not (isinstance(peers, list) and all(isinstance(p, str) for p in peers) and isinstance(creator, str)
            and isinstance(signature, str) and len(peers) <= MAX_ALLOWLIST_PEERS):
        raise AdmissionError(f"the allowlist {path} is malformed (peers, owner and signature are required)")
    if data.get("run") != run:
        raise AdmissionError(f"the allowlist {path} is for run {data.get('run')!r}, this node is in run {run!r}")
    if owner is not None and creator != owner:
        raise AdmissionError(f"the allowlist {path} was made by {creator}, but the run owner is {owner}")
    try:
        raw = base64.b64decode(signature, validate=True)
    except ValueError:
        raise AdmissionError(f"the allowlist {path} has a signature that is not base64") from None
    if not verify_signature(creator, _allowlist_bytes(run, creator, peers), raw):
        raise AdmissionError(f"the allowlist {path} is not signed by {creator} (edited after signing?)")
    return creator, frozenset(peers) | {creator}
