"""Built-in data: the stdlib corpus, file splits, per-peer streams, .bin shard validation."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hyphae.training import BatchStream, DataConfig, load_corpus, stream_key, validation_batches
from hyphae.training._bin_shards import LLMC_MAGIC, ShardError


def _text_corpus(tmp_path: Path, n_files: int = 40) -> Path:
    root = tmp_path / "texts"
    root.mkdir()
    for i in range(n_files):
        # every file is unique and long enough for windows, so membership can be checked exactly
        (root / f"f{i:03d}.txt").write_text(f"<file {i:03d}>" + f" token{i:03d}" * 40)
    return root


def _write_llmc(path: Path, tokens: np.ndarray, *, version: int = 1, count: int | None = None) -> None:
    header = np.zeros(256, dtype="<i4")
    header[:3] = (LLMC_MAGIC, version, len(tokens) if count is None else count)
    path.write_bytes(header.tobytes() + tokens.astype("<u2").tobytes())


def test_stdlib_corpus_is_found_from_the_interpreter_and_split_one_file_in_twenty(tmp_path: Path) -> None:
    corpus = load_corpus(DataConfig(cache_dir=str(tmp_path)))
    assert corpus.vocab_size == 256
    assert corpus.train_tokens > 10_000_000  # the stdlib is ~30 MB of Python
    assert 0.02 < corpus.val_tokens / (corpus.train_tokens + corpus.val_tokens) < 0.10
    assert b"def " in corpus.train[0][:100_000].tobytes()


def test_cached_stdlib_corpus_opens_fast_and_matches_the_uncached_one(tmp_path: Path) -> None:
    first = load_corpus(DataConfig(cache_dir=str(tmp_path)))
    written = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    again = load_corpus(DataConfig(cache_dir=str(tmp_path)))
    # Fast because nothing is rebuilt: the cache is mapped as it is, not rewritten (a wall-clock
    # bound here failed under load; tests check what happens, bench/ measures speed).
    assert written and {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == written
    assert isinstance(again.train[0], np.memmap)
    assert again.fingerprint == first.fingerprint
    assert np.array_equal(again.val[0], first.val[0])


def test_validation_files_never_appear_in_training(tmp_path: Path) -> None:
    corpus = load_corpus(DataConfig(source=str(_text_corpus(tmp_path)), val_every=20))
    train = corpus.train[0].tobytes()
    val = corpus.val[0].tobytes()
    for i in range(40):
        marker = f"<file {i:03d}>".encode()
        in_val = i % 20 == 19
        assert (marker in val) == in_val and (marker in train) != in_val, i


def test_single_text_file_holds_out_its_tail(tmp_path: Path) -> None:
    path = tmp_path / "one.txt"
    path.write_bytes(bytes(range(256)) * 40)
    corpus = load_corpus(DataConfig(source=str(path), val_fraction=0.1))
    assert corpus.val_tokens == 1024 and corpus.train_tokens == 10240 - 1024
    assert corpus.train[0].tobytes() + corpus.val[0].tobytes() == path.read_bytes()


def test_missing_source_names_the_path_and_the_alternative() -> None:
    with pytest.raises(ValueError, match="does not exist; use 'stdlib'"):
        load_corpus(DataConfig(source="/no/such/dir"))
    with pytest.raises(ValueError, match="unknown DataConfig key"):
        DataConfig.from_dict({"sauce": "stdlib"})


def test_a_peer_stream_is_reproducible_and_resumes_from_its_position(tmp_path: Path) -> None:
    tokens = (np.arange(5000) % 251).astype(np.uint8)
    a = BatchStream([tokens], batch_size=4, seq_len=16, seed=1, stream="peer-a")
    batches = [a.next() for _ in range(5)]
    b = BatchStream([tokens], batch_size=4, seq_len=16, seed=1, stream="peer-a")
    b.load_state_dict({"position": 3, "key_low": a.state_dict()["key_low"]})
    assert torch.equal(b.next()[0], batches[3][0])
    x, y = batches[0]
    assert x.dtype == torch.int64 and x.shape == (4, 16)
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one


def test_two_peers_get_different_streams_unless_given_the_same_id() -> None:
    tokens = np.random.default_rng(0).integers(0, 256, 100_000).astype(np.uint8)
    def first(seed: int, stream: int | str) -> torch.Tensor:
        return BatchStream([tokens], batch_size=8, seq_len=32, seed=seed, stream=stream).next()[0]
    assert not torch.equal(first(0, 0), first(0, 1))
    assert not torch.equal(first(0, "peer-a"), first(0, "peer-b"))
    assert not torch.equal(first(0, 0), first(1, 0))
    assert torch.equal(first(0, "peer-a"), first(0, "peer-a"))
    assert stream_key(0, 3) != stream_key(0, "3")


def test_state_of_another_stream_is_refused() -> None:
    tokens = np.zeros(100, dtype=np.uint8)
    a = BatchStream([tokens], batch_size=1, seq_len=8, seed=0, stream=0)
    b = BatchStream([tokens], batch_size=1, seq_len=8, seed=0, stream=1)
    with pytest.raises(ValueError, match="different stream"):
        b.load_state_dict(a.state_dict())


def test_shards_confine_streams_to_disjoint_slices() -> None:
    tokens = np.arange(10_000, dtype=np.uint16)  # token value == its position
    starts = []
    for k in range(4):
        s = BatchStream([tokens], batch_size=64, seq_len=8, seed=0, stream=k, shard=(k, 4))
        starts.append({int(v) for _ in range(10) for v in s.next()[0][:, 0]})
    for k in range(4):
        assert all(k * 2498 <= v < (k + 1) * 2498 for v in starts[k])


def test_validation_batches_are_fixed_and_spread_over_the_split() -> None:
    tokens = np.arange(20_000, dtype=np.uint16)
    a = validation_batches([tokens], batch_size=4, seq_len=8, n_batches=5)
    b = validation_batches([tokens], batch_size=4, seq_len=8, n_batches=5)
    assert len(a) == 5 and all(torch.equal(x, y) for (x, _), (y, _) in zip(a, b))
    firsts = torch.cat([x[:, 0] for x, _ in a])
    assert firsts.min() == 0 and firsts.max() > 19_000


def test_llmc_shards_load_and_val_shard_is_held_out(tmp_path: Path) -> None:
    _write_llmc(tmp_path / "data_train_000.bin", np.arange(1000) % 50000)
    _write_llmc(tmp_path / "data_val_000.bin", np.arange(300))
    corpus = load_corpus(DataConfig(source=str(tmp_path)), min_tokens=17)
    assert corpus.train_tokens == 1000 and corpus.val_tokens == 300
    assert corpus.vocab_size == 1000
    with pytest.raises(ValueError, match="vocab_size >= 1000"):
        corpus.check_vocab(256)


def test_raw_nanogpt_shard_without_val_holds_out_its_tail(tmp_path: Path) -> None:
    path = tmp_path / "train.bin"
    path.write_bytes(np.arange(2000, dtype="<u2").tobytes())
    corpus = load_corpus(DataConfig(source=str(path), val_fraction=0.05), min_tokens=17)
    assert corpus.train_tokens == 1900 and corpus.val_tokens == 100
    assert int(corpus.val[0][0]) == 1900


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.write_bytes(b""), "empty .bin shard"),
        (lambda p: p.write_bytes(b"\x01\x02\x03"), "not a whole number of uint16"),
        (lambda p: _write_llmc(p, np.arange(100), version=7), "version 7 is not supported"),
        (lambda p: _write_llmc(p, np.arange(100), count=150), "header says 150 tokens"),
        (lambda p: p.write_bytes(np.array([LLMC_MAGIC, 1], "<i4").tobytes()), "shorter than the 1024-byte header"),
    ],
)
def test_malformed_bin_shards_are_rejected_with_the_file_and_the_fix(tmp_path: Path, make, message: str) -> None:
    path = tmp_path / "bad.bin"
    make(path)
    with pytest.raises(ShardError, match=message) as err:
        load_corpus(DataConfig(source=str(path)), min_tokens=2)
    assert str(path) in str(err.value)


def test_shard_shorter_than_one_window_is_an_error(tmp_path: Path) -> None:
    _write_llmc(tmp_path / "tiny.bin", np.arange(10))
    with pytest.raises(ShardError, match="shorter than one training window"):
        load_corpus(DataConfig(source=str(tmp_path)), min_tokens=129)


def test_bin_shards_are_scanned_once_then_opened_from_the_cached_index(tmp_path: Path) -> None:
    shards, cache = tmp_path / "shards", tmp_path / "cache"
    shards.mkdir()
    _write_llmc(shards / "a_train.bin", np.arange(1000) % 700)
    _write_llmc(shards / "b_val.bin", np.arange(300))
    config = DataConfig(source=str(shards), cache_dir=str(cache))
    assert load_corpus(config, min_tokens=17).vocab_size == 700
    index = cache / "bin-index.json"
    data = json.loads(index.read_text())
    assert sorted(v["max_token"] for v in data["shards"].values()) == [299, 699]
    # The next start believes the index instead of scanning: a planted value shows through.
    for entry in data["shards"].values():
        entry["max_token"] = 4242
    index.write_text(json.dumps(data))
    assert load_corpus(config, min_tokens=17).vocab_size == 4243
    # A shard rewritten in place (new size and mtime) is scanned again.
    _write_llmc(shards / "a_train.bin", np.arange(1200) % 900)
    assert load_corpus(config, min_tokens=17).vocab_size == 4243  # the val shard's entry still says 4242
    assert json.loads(index.read_text())["shards"][str((shards / "a_train.bin").resolve())]["max_token"] == 899


def test_an_unreadable_bin_index_is_rebuilt(tmp_path: Path) -> None:
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "bin-index.json").write_text("{not json")
    _write_llmc(tmp_path / "train.bin", np.arange(500) % 300)
    corpus = load_corpus(DataConfig(source=str(tmp_path / "train.bin"), cache_dir=str(tmp_path / "cache")),
                         min_tokens=17)
    assert corpus.vocab_size == 300
    assert json.loads((tmp_path / "cache" / "bin-index.json").read_text())["version"] == 1


def test_batch_stream_reshard_moves_its_windows_and_keeps_its_position() -> None:
    tokens = np.arange(10_000, dtype=np.uint16)
    stream = BatchStream([tokens], batch_size=16, seq_len=8, seed=0, stream="p", shard=(0, 2))
    stream.next()
    assert int(stream.next()[0][:, 0].max()) < 5000
    stream.reshard((1, 2))
    assert stream.position == 2 and stream.shard == (1, 2)
    assert int(stream.next()[0][:, 0].min()) >= 4990
    with pytest.raises(ValueError, match="shard"):
        stream.reshard((3, 2))
    assert stream.shard == (1, 2)
