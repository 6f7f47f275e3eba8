"""Streamed user text: formats agree, shards partition, validation is held out, resume is exact."""

import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from hyphae.training import (
    DDP,
    BatchStream,
    ByteTokenizer,
    CheckpointStore,
    LoopConfig,
    ModelConfig,
    SimNetwork,
    build_model,
    resume,
    run_virtual,
    train,
    TextStream,
    Tokenizer,
    is_text_source,
    load_corpus,
    load_tokenizer,
    open_text_data,
    text_validation_batches,
)
from hyphae.training import DataConfig
from hyphae.training._text_sources import TXT_RECORD_BYTES, SourceFile, list_sources, read_records

from .test_tokenizer import train_bpe

WORDS = ["river", "stone", "müde", "λόγος", "tree", "雨", "cloud", "a", "the", "of", "emoji🙂"]
REPO = Path(__file__).resolve().parents[3]


def make_docs(n: int, seed: int = 0) -> list[str]:
    """Unique documents: an id tag, then random words with spaces and newlines (unicode included)."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        body = "".join(rng.choice(WORDS) + rng.choice("  \n") for _ in range(rng.randint(3, 40)))
        docs.append(f"<{i:05d}> {body}")
    return docs


def write_layout(root: Path, layout: str, docs: list[str]) -> str:
    """The same documents as one-file-per-doc txt, one jsonl, one parquet (odd row groups), a glob."""
    root.mkdir(parents=True, exist_ok=True)
    if layout in ("txt", "glob"):
        for i, doc in enumerate(docs):
            (root / f"{i:05d}.txt").write_bytes(doc.encode())
        return str(root / "*.txt") if layout == "glob" else str(root)
    if layout == "jsonl":
        path = root / "docs.jsonl"
        path.write_text("".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(docs)))
        return str(path)
    path = root / "docs.parquet"
    pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), path, row_group_size=37)
    return str(path)


def expected_tokens(docs: list[str], tok: Tokenizer, *, shard: tuple[int, int] = (0, 1), val_every: int = 100) -> list[int]:
    """The documented rule, applied by hand: which records a shard trains on, each + eos."""
    k, n = shard
    out: list[int] = []
    for r, doc in enumerate(docs):
        if r % val_every == val_every - 1 or (r - (r + 1) // val_every) % n != k:
            continue
        out += tok.encode_batch([doc])[0] + [tok.eos_id]
    return out


def drawn_tokens(stream: TextStream, batches: int) -> list[int]:
    """The token sequence behind `batches` batches, checking targets are inputs shifted by one."""
    out: list[int] = []
    last_target = None
    for _ in range(batches):
        x, y = stream.next()
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (stream.batch_size, stream.seq_len)
        assert torch.equal(y[:, :-1], x[:, 1:])
        assert torch.equal(y[:-1, -1], x[1:, 0])
        if last_target is not None:
            assert x[0, 0].item() == last_target
        last_target = y[-1, -1].item()
        out += x.flatten().tolist()
    return out


def doc_ids(tokens: list[int], tok: Tokenizer) -> list[int]:
    return [int(m) for m in re.findall(r"<(\d{5})>", tok.decode(tokens))]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return load_tokenizer(train_bpe(tmp_path_factory.mktemp("bpe"), vocab_size=400))


@pytest.mark.parametrize("use_bpe", [False, True], ids=["bytes", "bpe"])
def test_every_format_gives_the_documented_tokens_for_the_same_documents(
    tmp_path: Path, bpe: Tokenizer, use_bpe: bool
) -> None:
    docs = make_docs(250)
    tok = bpe if use_bpe else ByteTokenizer()
    want = expected_tokens(docs, tok)
    streams = {}
    for layout in ("txt", "glob", "jsonl", "parquet"):
        source = write_layout(tmp_path / layout, layout, docs)
        stream = TextStream(source, tokenizer=tok, batch_size=3, seq_len=40)
        n_batches = (len(want) - 1) // (3 * 40)
        streams[layout] = drawn_tokens(stream, n_batches)
        assert stream.epoch == 0
    assert len(want) - 3 * 40 < len(streams["txt"]) <= len(want)
    for layout, got in streams.items():
        assert got == want[: len(got)], layout


def test_shards_are_disjoint_cover_all_training_documents_and_never_validation(tmp_path: Path) -> None:
    docs = make_docs(1000)
    source = write_layout(tmp_path, "jsonl", docs)
    tok = ByteTokenizer()
    seen = []
    for k in range(3):
        stream, val = open_text_data(source, batch_size=4, seq_len=64, shard=(k, 3), val_batches=3)
        tokens: list[int] = []
        while stream.epoch == 0:
            tokens += drawn_tokens(stream, 1)
        want = expected_tokens(docs, tok, shard=(k, 3))
        assert tokens[: len(want)] == want  # the documented rule, token for token
        ids = doc_ids(tokens, tok)
        ids = ids[: ids.index(ids[0], 1)]  # the last batch ran into the second epoch
        assert len(ids) == len(set(ids))
        seen.append(set(ids))
        val_ids = doc_ids([t for x, _ in val for t in x.flatten().tolist()], tok)
        assert val_ids == list(range(99, 1000, 100))[: len(val_ids)] and len(val_ids) >= 2
        assert not seen[-1] & set(val_ids)
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    train_ids = {i for i in range(1000) if i % 100 != 99}
    assert set().union(*seen) == train_ids
    assert max(map(len, seen)) - min(map(len, seen)) <= 1


def test_validation_set_is_the_same_for_every_member_seed_and_call(tmp_path: Path) -> None:
    source = write_layout(tmp_path, "parquet", make_docs(2000))
    _, first = open_text_data(source, batch_size=2, seq_len=32, shard=(0, 4), seed=1, val_batches=5)
    _, second = open_text_data(source, batch_size=2, seq_len=32, shard=(3, 4), seed=9, val_batches=5)
    direct = text_validation_batches(source, batch_size=2, seq_len=32, n_batches=5)
    assert len(first) == 5
    for a, b, c in zip(first, second, direct):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], c[1])
    assert open_text_data(source, batch_size=2, seq_len=32, val_batches=0)[1] == []


def test_too_little_validation_data_or_an_empty_shard_is_a_clear_error(tmp_path: Path) -> None:
    source = write_layout(tmp_path, "jsonl", make_docs(150))
    with pytest.raises(ValueError, match="too few tokens.*val_every"):
        open_text_data(source, batch_size=8, seq_len=256, val_batches=4)
    tiny = write_layout(tmp_path / "tiny", "jsonl", make_docs(3))
    with pytest.raises(ValueError, match="no shard 4/5 records"):
        TextStream(tiny, batch_size=1, seq_len=8, shard=(4, 5)).next()
    with pytest.raises(ValueError, match="no validation records"):
        text_validation_batches(tiny, batch_size=1, seq_len=8, n_batches=1)
    with pytest.raises(ValueError, match="shard must be"):
        TextStream(tiny, batch_size=1, seq_len=8, shard=(5, 5))
    with pytest.raises(ValueError, match="does not exist"):
        TextStream(str(tmp_path / "missing"), batch_size=1, seq_len=8)


@pytest.mark.parametrize("layout", ["txt", "jsonl", "parquet", "mixed"])
def test_resume_from_any_state_gives_the_next_batch_of_the_uninterrupted_stream(tmp_path: Path, layout: str) -> None:
    docs = make_docs(60)
    if layout == "mixed":
        source = str(tmp_path)
        write_layout(tmp_path / "a", "jsonl", docs[:20])
        write_layout(tmp_path / "b", "parquet", docs[20:40])
        (tmp_path / "c.txt").write_text("\n\n".join(docs[40:]) * 60)  # ~400 KB: several txt records
    else:
        source = write_layout(tmp_path, layout, docs)
    reference = TextStream(source, batch_size=4, seq_len=24, shard=(1, 2))
    states, batches = [], []
    for _ in range(90):  # several epochs of the small layouts
        states.append(json.loads(json.dumps(reference.state_dict())))
        batches.append(reference.next())
    assert reference.epoch >= (0 if layout == "mixed" else 2)
    for k in range(0, 90, 7):
        resumed = TextStream(source, batch_size=4, seq_len=24, shard=(1, 2))
        resumed.load_state_dict(states[k])
        assert resumed.state_dict() == states[k]
        for j in range(k, min(k + 3, 90)):
            x, y = resumed.next()
            assert torch.equal(x, batches[j][0]) and torch.equal(y, batches[j][1]), (k, j)
        assert resumed.position == min(k + 3, 90)


def test_a_state_from_another_source_or_config_is_refused(tmp_path: Path) -> None:
    source = write_layout(tmp_path / "d", "jsonl", make_docs(300))
    stream = TextStream(source, batch_size=2, seq_len=16)
    stream.next()
    state = stream.state_dict()
    with pytest.raises(ValueError, match="seq_len: saved 16, now 32"):
        TextStream(source, batch_size=2, seq_len=32).load_state_dict(state)
    with pytest.raises(ValueError, match="shard: saved '0/1', now '0/2'"):
        TextStream(source, batch_size=2, seq_len=16, shard=(0, 2)).load_state_dict(state)
    with pytest.raises(ValueError, match="tokenizer"):
        TextStream(source, tokenizer=ByteTokenizer(eos_id=None), batch_size=2, seq_len=16).load_state_dict(state)
    with Path(source).open("a") as f:
        f.write(json.dumps({"text": "one more"}) + "\n")
    with pytest.raises(ValueError, match="input files"):
        TextStream(source, batch_size=2, seq_len=16).load_state_dict(state)
    fresh = TextStream(source, batch_size=2, seq_len=16)
    for bad in ({"offset": -5}, {"prev": -2}, {"prev": 10**6}, {"skip": "3"}, {"file": 7}):
        with pytest.raises(ValueError, match="out of range|non-integer"):
            TextStream(source, batch_size=2, seq_len=16).load_state_dict({**fresh.state_dict(), **bad})
    other = BatchStream([np.arange(100, dtype=np.uint8)], batch_size=2, seq_len=16, seed=0)
    with pytest.raises(ValueError, match="not a TextStream state"):
        stream.load_state_dict(other.state_dict())


def test_data_position_survives_a_checkpoint_round_trip(tmp_path: Path) -> None:
    source = write_layout(tmp_path / "d", "parquet", make_docs(200))
    stream = TextStream(source, batch_size=2, seq_len=16)
    for _ in range(5):
        stream.next()
    store = CheckpointStore(tmp_path / "ckpt")
    store.save(step=5, algorithm="ddp", model_config={}, weights={}, state={"data": stream.state_dict()})
    resumed = TextStream(source, batch_size=2, seq_len=16)
    resumed.load_state_dict(store.load().state["data"])
    assert torch.equal(resumed.next()[0], stream.next()[0])


def test_the_training_loop_trains_on_a_text_stream_and_resumes_its_data_position(
    tmp_path: Path, micro_config: ModelConfig
) -> None:
    source = write_layout(tmp_path / "d", "jsonl", make_docs(400))
    store = CheckpointStore(tmp_path / "ckpt")

    def member() -> tuple[DDP, TextStream, list]:
        stream, val = open_text_data(source, batch_size=2, seq_len=16, val_batches=2)
        return DDP(build_model(micro_config, seed=0), SimNetwork().add_peer()), stream, val

    strategy, stream, val = member()
    config = LoopConfig(max_steps=6, checkpoint_every=3, eval_every=3)
    result = run_virtual(train(strategy, stream, config, val_set=val, checkpoints=store))
    assert result.steps == 6 and stream.position == 6 and len(result.evals) == 2
    strategy2, stream2, _ = member()
    assert resume(store, strategy2, stream2) == 6
    assert stream2.state_dict() == stream.state_dict()
    assert torch.equal(stream2.next()[0], stream.next()[0])


def test_bad_jsonl_lines_are_skipped_counted_and_logged_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    docs = make_docs(6)
    good = [json.dumps({"text": d}).encode() for d in docs[:4]]
    bad = [b"{broken json", b'{"body": "x"}', b'{"text": 7}', b'["text"]', b"", b'{"text": null}', b"\xff\xfe not utf-8"]
    lines = [good[0], bad[0], good[1], bad[1], bad[2], bad[3], bad[4], good[2], bad[5], bad[6], good[3]]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    stream = TextStream(str(path), batch_size=1, seq_len=8)
    with caplog.at_level(logging.WARNING, logger="hyphae.training.text_stream"):
        tokens: list[int] = []
        while stream.epoch == 0:
            tokens += drawn_tokens(stream, 1)
    assert doc_ids(tokens, ByteTokenizer())[:4] == [0, 1, 2, 3]
    assert stream.bad_records == 7 and stream.state_dict()["bad_records"] == 7
    assert len([r for r in caplog.records if "skipping record" in r.message]) == 1


def test_parquet_without_the_text_column_names_the_columns(tmp_path: Path) -> None:
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"body": ["a", "b"]}), path)
    with pytest.raises(ValueError, match=r"no column 'text' \(columns: \['body'\]\)"):
        TextStream(str(path), batch_size=1, seq_len=2).next()
    stream = TextStream(str(path), batch_size=1, seq_len=2, text_field="body", val_every=50)
    assert stream.next()[0].tolist() == [[ord("a"), 0]]


def test_big_txt_files_are_cut_into_paragraph_aligned_records_that_rebuild_the_file(tmp_path: Path) -> None:
    paragraphs = "\n\n".join(make_docs(2000))
    no_newlines = "ωλ雨🙂" * 30_000  # multi-byte characters only: cuts must fall between characters
    for text in (paragraphs, no_newlines):
        path = tmp_path / "big.txt"
        path.write_text(text, encoding="utf-8")
        src = list_sources(str(path))[0]
        records = list(read_records(src, offset=0, index=0, text_field="text", keep=lambda i: True))
        assert len(records) > 3 and "".join(r.text for r in records) == text
        assert all(len(r.text.encode()) <= TXT_RECORD_BYTES for r in records)
        if text is paragraphs:
            assert all(r.text.endswith("\n\n") for r in records[:-1])
        middle = records[2]
        again = next(read_records(src, offset=middle.offset, index=middle.index, text_field="text", keep=lambda i: True))
        assert again == middle


def test_shuffled_file_order_depends_on_seed_and_epoch_but_not_the_shard_contents(tmp_path: Path) -> None:
    source = write_layout(tmp_path, "txt", make_docs(40))
    tok = ByteTokenizer()

    def epoch_ids(seed: int) -> list[list[int]]:
        stream = TextStream(source, batch_size=1, seq_len=16, seed=seed, shuffle_files=True, shard=(0, 2))
        per_epoch: list[list[int]] = [[], []]
        while stream.epoch < 2:
            e = stream.epoch
            per_epoch[e] += drawn_tokens(stream, 1)
        return [doc_ids(t, tok) for t in per_epoch]

    a, b, again = epoch_ids(1), epoch_ids(2), epoch_ids(1)
    assert a == again
    assert a[0] != b[0] and a[0] != a[1]
    assert set(a[0][1:-1]) <= set(b[0]) and len(set(a[0])) >= 18  # same shard, other order


def test_jsonl_and_parquet_sources_are_routed_to_the_text_stream(tmp_path: Path) -> None:
    jsonl = write_layout(tmp_path / "j", "jsonl", make_docs(3))
    txt = write_layout(tmp_path / "t", "txt", make_docs(3))
    assert is_text_source(jsonl) and is_text_source(str(tmp_path / "t" / "*.txt")) and not is_text_source(txt)
    with pytest.raises(ValueError, match="open_text_data"):
        load_corpus(DataConfig(source=jsonl))


_CHILD = """
import json, os, sys
from hyphae.training import TextStream
stream = TextStream(sys.argv[1], batch_size=4, seq_len=32, shard=(1, 3))
if len(sys.argv) > 3:  # resume from a saved state and write the next batch
    stream.load_state_dict(json.loads(open(sys.argv[3]).read()))
    x, y = stream.next()
    json.dump({"position": stream.position - 1, "x": x.tolist(), "y": y.tolist()}, open(sys.argv[2], "w"))
    sys.exit(0)
while True:  # draw batches forever; after each, publish the state atomically
    stream.next()
    tmp = sys.argv[2] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(stream.state_dict(), f)
    os.replace(tmp, sys.argv[2])
"""


def test_kill_9_mid_run_then_restart_resumes_with_the_exact_next_batch(tmp_path: Path) -> None:
    write_layout(tmp_path / "data" / "j", "jsonl", make_docs(300))
    write_layout(tmp_path / "data" / "p", "parquet", make_docs(300, seed=1))
    (tmp_path / "data" / "z.txt").write_text("\n\n".join(make_docs(1500, seed=2)))  # several records
    source, state_path = str(tmp_path / "data"), tmp_path / "state.json"
    child = subprocess.Popen([sys.executable, "-c", _CHILD, source, str(state_path)], cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if state_path.exists() and json.loads(state_path.read_text())["position"] >= 200:
                break
            assert child.poll() is None, "the streaming child died on its own"
            time.sleep(0.05)
        else:
            pytest.fail("the child drew fewer than 200 batches in 60 s")
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=10) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    state = json.loads(state_path.read_text())
    k = state["position"]
    out = tmp_path / "next.json"
    subprocess.run([sys.executable, "-c", _CHILD, source, str(out), str(state_path)], cwd=REPO, check=True, timeout=120)
    resumed = json.loads(out.read_text())
    reference = TextStream(source, batch_size=4, seq_len=32, shard=(1, 3))
    for _ in range(k):
        reference.next()
    x, y = reference.next()
    assert resumed["position"] == k and resumed["x"] == x.tolist() and resumed["y"] == y.tolist()


_MEMORY_CHILD = """
import sys
def kb(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key))
from hyphae.training import TextStream
stream = TextStream(sys.argv[1], batch_size=8, seq_len=1024, val_every=1000)
before = kb("VmRSS")
tokens = 0
while stream.epoch == 0:
    tokens += stream.next()[0].numel()
print(tokens, kb("VmHWM") - before)
"""


@pytest.mark.slow  # writes and streams 200 MB, ~30 s
def test_a_200_mb_jsonl_streams_end_to_end_with_under_100_mb_rss_growth(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    words = ["".join(map(chr, rng.integers(97, 123, rng.integers(2, 9)))) for _ in range(3000)]
    block = "".join(
        json.dumps({"text": " ".join(rng.choice(words, rng.integers(50, 300)))}) + "\n" for _ in range(2000)
    ).encode()
    path = tmp_path / "big.jsonl"
    with path.open("wb") as f:
        for _ in range(200_000_000 // len(block) + 1):
            f.write(block)
    size = path.stat().st_size
    result = subprocess.run(
        [sys.executable, "-c", _MEMORY_CHILD, str(path)], cwd=REPO, capture_output=True, text=True, timeout=240,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    tokens, growth_kb = map(int, result.stdout.split())
    assert tokens > 0.85 * size  # read end to end: all text minus the JSON syntax and val lines
    assert growth_kb < 100 * 1024, f"RSS grew by {growth_kb / 1024:.0f} MB reading {size / 1e6:.0f} MB"
