"""Identity: made once, kept 0600, same peer id after every restart, signatures verifiable from it."""

import stat

import pytest

from hyphae.protocol.errors import ConfigError
from hyphae.protocol.identity import Identity, create_identity, load_or_create_identity, verify_signature


def test_key_is_created_0600_and_peer_id_is_stable(tmp_path) -> None:
    path = tmp_path / "identity.key"
    first = load_or_create_identity(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_identity(path).peer_id == first.peer_id
    assert first.peer_id.startswith("12D3KooW")


def test_libp2p_keypair_gives_the_same_peer_id() -> None:
    from libp2p.peer.id import ID

    ident = Identity.generate()
    assert ID.from_pubkey(ident.libp2p_keypair().public_key).to_base58() == ident.peer_id


def test_create_refuses_to_overwrite_without_force(tmp_path) -> None:
    path = tmp_path / "identity.key"
    old = create_identity(path)
    with pytest.raises(ConfigError, match="--force"):
        create_identity(path)
    assert create_identity(path, overwrite=True).peer_id != old.peer_id


def test_loosened_permissions_are_tightened(tmp_path) -> None:
    path = tmp_path / "identity.key"
    create_identity(path)
    path.chmod(0o644)
    load_or_create_identity(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_corrupt_key_gives_a_clear_error(tmp_path) -> None:
    path = tmp_path / "identity.key"
    path.write_bytes(b"not a key")
    with pytest.raises(ConfigError, match="not a PEM private key"):
        load_or_create_identity(path)


def test_signature_verifies_against_peer_id_only() -> None:
    a, b = Identity.generate(), Identity.generate()
    sig = a.sign(b"update")
    assert verify_signature(a.peer_id, b"update", sig)
    assert not verify_signature(b.peer_id, b"update", sig)
    assert not verify_signature(a.peer_id, b"tampered", sig)
    assert not verify_signature("not-a-peer-id", b"update", sig)
