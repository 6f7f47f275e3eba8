"""A node's identity: one Ed25519 key, kept in the data dir, from which the peer id derives.

The key is stored as PKCS#8 PEM (readable by openssl) with mode 0600 and written atomically, so a
crash while creating it never leaves a half-written key behind. The peer id is the libp2p peer id
of the public key (an identity multihash), which means a signature can be checked from the peer
id alone: no key exchange is needed to verify who wrote a message.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from libp2p.crypto.ed25519 import Ed25519PrivateKey as _Libp2pPrivateKey
from libp2p.crypto.ed25519 import Ed25519PublicKey as _Libp2pPublicKey
from libp2p.crypto.keys import KeyPair, KeyType
from libp2p.peer.id import ID

from .atomic import atomic_write_bytes
from .errors import ConfigError

__all__ = ["Identity", "load_or_create_identity", "create_identity", "verify_signature", "KEY_FILE_NAME"]

KEY_FILE_NAME = "identity.key"


@dataclass(frozen=True)
class Identity:
    """An Ed25519 key pair and the peer id it implies."""

    private_key: ed25519.Ed25519PrivateKey

    @property
    def seed(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )

    @property
    def public_bytes(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @property
    def peer_id(self) -> str:
        return ID.from_pubkey(_Libp2pPublicKey.from_bytes(self.public_bytes)).to_base58()

    def libp2p_keypair(self) -> KeyPair:
        """The same key in py-libp2p's types, for the host's Noise handshake."""
        private = _Libp2pPrivateKey.new(self.seed)
        return KeyPair(private, private.get_public_key())

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data)

    @classmethod
    def generate(cls) -> Identity:
        return cls(ed25519.Ed25519PrivateKey.generate())

    def to_pem(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    @classmethod
    def from_pem(cls, pem: bytes, *, source: str = "key") -> Identity:
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{source} is not a PEM private key ({exc}); move it away to create a new one") from exc
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise ConfigError(f"{source} holds a {type(key).__name__}, hyphae needs an Ed25519 key")
        return cls(key)


def create_identity(path: Path, *, overwrite: bool = False) -> Identity:
    """Generate a new key and store it at ``path`` (0600).

    Raises:
        ConfigError: ``path`` exists and ``overwrite`` is false (a peer id must never be
            replaced by accident: peers and run state refer to it).
    """
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} already exists; pass --force to replace it (this changes the peer id)")
    identity = Identity.generate()
    atomic_write_bytes(path, identity.to_pem(), mode=0o600)
    return identity


def load_or_create_identity(path: Path) -> Identity:
    """Load the key at ``path``, creating it on first start."""
    if not path.exists():
        return create_identity(path)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        os.chmod(path, 0o600)  # tighten a key someone loosened; it is ours to protect
    return Identity.from_pem(path.read_bytes(), source=str(path))


def verify_signature(peer_id: str, data: bytes, signature: bytes) -> bool:
    """Check that ``signature`` over ``data`` was made by the key behind ``peer_id``.

    Returns False (never raises) for a malformed peer id, a non-Ed25519 key or a bad signature:
    callers treat all of those as "not signed by that peer".
    """
    try:
        public = ID.from_base58(peer_id).extract_public_key()
    except Exception:  # noqa: BLE001 — any decoding failure means "not verifiable"
        return False
    if public is None or public.get_type() != KeyType.Ed25519:
        return False
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(public.to_bytes()).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True
