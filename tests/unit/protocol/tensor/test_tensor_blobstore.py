"""Blob storage: ids are hashes of manifests, chunks are verified before they are kept or served,
writes are atomic, memory stays within its bound, and a damaged file is never served."""

import os

import pytest

from hyphae.protocol.errors import ProtocolViolation
from hyphae.protocol.tensor.blobstore import BlobStore, Manifest, check_blob_id
from hyphae.protocol.tensor.errors import BlobCorrupt

CHUNK = 4096


def test_id_is_the_hash_of_the_manifest_and_checks_it(tmp_path) -> None:
    data = os.urandom(3 * CHUNK + 5)
    store = BlobStore(tmp_path, chunk_bytes=CHUNK)
    blob_id = store.put(data)
    manifest = Manifest.of(data, CHUNK)
    assert check_blob_id(blob_id) == manifest.blob_id and manifest.chunks == 4
    assert Manifest.from_bytes(manifest.to_bytes(), blob_id) == manifest
    forged = Manifest(manifest.size, CHUNK, (b"\x00" * 32,) + manifest.hashes[1:])
    with pytest.raises(BlobCorrupt, match="does not hash"):
        Manifest.from_bytes(forged.to_bytes(), blob_id)
    assert store.read(blob_id) == data and store.read_chunk(blob_id, 3) == data[3 * CHUNK:]


def test_malformed_manifest_is_refused(tmp_path) -> None:
    import hashlib

    bad = b"hyphae-blob/1" + b"\x00" * 12 + b"x" * 31
    with pytest.raises(ProtocolViolation):
        Manifest.from_bytes(bad, hashlib.sha256(bad).hexdigest())


def test_partial_chunks_are_verified_kept_and_assembled(tmp_path) -> None:
    data = os.urandom(5 * CHUNK)
    manifest = Manifest.of(data, CHUNK)
    store = BlobStore(tmp_path / "b", chunk_bytes=CHUNK)
    store.begin_partial(manifest)
    with pytest.raises(BlobCorrupt):
        store.put_chunk(manifest.blob_id, 0, b"x" * CHUNK)
    for i in (4, 0, 2):
        store.put_chunk(manifest.blob_id, i, data[i * CHUNK:(i + 1) * CHUNK])
    assert store.held(manifest.blob_id) == {0, 2, 4} and not store.has(manifest.blob_id)
    assert store.read_chunk(manifest.blob_id, 2) == data[2 * CHUNK:3 * CHUNK]
    assert store.read_chunk(manifest.blob_id, 1) is None
    # A restarted node sees what it had.
    again = BlobStore(tmp_path / "b", chunk_bytes=CHUNK)
    assert again.held(manifest.blob_id) == {0, 2, 4}
    for i in (1, 3):
        again.put_chunk(manifest.blob_id, i, data[i * CHUNK:(i + 1) * CHUNK])
    again.finish(manifest.blob_id)
    assert again.has(manifest.blob_id) and again.read(manifest.blob_id) == data
    assert not (tmp_path / "b" / "partial" / manifest.blob_id).exists()


def test_damaged_files_are_never_served(tmp_path) -> None:
    data = os.urandom(2 * CHUNK)
    store = BlobStore(tmp_path, chunk_bytes=CHUNK, memory_bytes=0)
    blob_id = store.put(data)
    path = tmp_path / f"{blob_id}.blob"
    raw = bytearray(path.read_bytes())
    raw[10] ^= 1
    path.write_bytes(bytes(raw))
    assert store.read_chunk(blob_id, 0) is None and store.read_chunk(blob_id, 1) == data[CHUNK:]
    with pytest.raises(BlobCorrupt, match="damaged"):
        store.read(blob_id)
    assert not store.has(blob_id)


def test_memory_cache_stays_within_its_bound(tmp_path) -> None:
    store = BlobStore(tmp_path, chunk_bytes=CHUNK, memory_bytes=3 * CHUNK)
    ids = [store.put(os.urandom(CHUNK)) for _ in range(5)]
    assert store._cached_bytes <= 3 * CHUNK and ids[-1] in store._cache and ids[0] not in store._cache
    assert all(store.has(i) for i in ids)  # evicted from memory, still on disk


@pytest.mark.parametrize("bad", ["", "xyz", "A" * 64, "0" * 63, None])
def test_blob_ids_are_checked(bad) -> None:
    with pytest.raises(ValueError):
        check_blob_id(bad)


def test_a_manifest_declaring_chunks_over_the_limit_is_refused() -> None:
    import hashlib

    from hyphae.protocol.tensor.blobstore import MAX_CHUNK_BYTES

    huge = Manifest(MAX_CHUNK_BYTES + 1, MAX_CHUNK_BYTES + 1, (b"\x00" * 32,))  # one chunk held whole in memory
    raw = huge.to_bytes()
    with pytest.raises(ProtocolViolation, match="inconsistent"):
        Manifest.from_bytes(raw, hashlib.sha256(raw).hexdigest())


def test_a_file_is_stored_as_a_link_not_a_copy_and_checked_when_its_path_is_asked(tmp_path) -> None:
    data = os.urandom(5 * CHUNK + 7)
    src = tmp_path / "state.bin"
    src.write_bytes(data)
    store = BlobStore(tmp_path / "b", chunk_bytes=CHUNK)
    blob_id = store.put_file(src)
    assert blob_id == Manifest.of(data, CHUNK).blob_id
    path = store.path(blob_id)
    assert os.stat(path).st_ino == os.stat(src).st_ino and path.read_bytes() == data  # one copy on disk
    again = BlobStore(tmp_path / "b", chunk_bytes=CHUNK)  # a restart: nothing is trusted unchecked
    raw = bytearray(data)
    raw[3] ^= 1
    path.unlink()
    path.write_bytes(bytes(raw))
    with pytest.raises(BlobCorrupt, match="damaged"):
        again.path(blob_id)
    assert not again.has(blob_id) and src.read_bytes() == data  # the caller's file is untouched
