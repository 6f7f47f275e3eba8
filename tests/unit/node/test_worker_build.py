"""What a worker builds from its Setup: model, tokenizer and data, chosen by the documented rules."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

from hyphae.node import ipc, worker_build
from hyphae.node.data_shards import member_shard
from hyphae.training import BatchStream, SimNetwork, run_virtual
from hyphae.training.text_stream import TextStream


def _setup(tmp_path: Path, **changes) -> ipc.Setup:
    base = dict(peer_id="12D3KooWB", preset="tiny", algorithm="diloco", algorithm_config={}, max_steps=0, seed=0,
                data="", cache_dir=str(tmp_path / "cache"), checkpoint_dir=str(tmp_path / "dd" / "checkpoints"),
                device="cpu", batch_size=2, seq_len=16, log_every=1, eval_every=0, checkpoint_every=0)
    (tmp_path / "dd").mkdir(exist_ok=True)
    return ipc.Setup(**{**base, **changes})


def _build(setup: ipc.Setup, members=("12D3KooWA", "12D3KooWB", "12D3KooWC")) -> worker_build.Built:
    """Build as member `setup.peer_id` of a run whose other live members are `members`."""
    net = SimNetwork()
    for peer in sorted(set(members) | {setup.peer_id}):
        comm = net.add_peer(peer)
        if peer == setup.peer_id:
            mine = comm
    return run_virtual(worker_build.build(setup, member_shard=lambda: member_shard(mine, worker_build.data_id(setup))))


def _jsonl(path: Path, docs: int = 3000) -> Path:
    rng = np.random.default_rng(0)
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(["ab", "cd", "ef"], 12))}) + "\n"
                            for _ in range(docs)))
    return path


def test_a_presets_vocabulary_is_the_tokenizers_rounded_up_to_64() -> None:
    assert worker_build.fit_vocab(256) == 256
    assert worker_build.fit_vocab(300) == 320
    assert worker_build.fit_vocab(50257) == 50304


def test_no_data_is_the_byte_level_builtin_corpus(tmp_path: Path) -> None:
    built = _build(_setup(tmp_path))
    assert isinstance(built.batches, BatchStream) and built.tokenizer is None
    assert built.model.config.vocab_size == 256


def test_jsonl_data_is_streamed_from_this_members_shard_and_the_shard_is_kept(tmp_path: Path) -> None:
    setup = _setup(tmp_path, data=str(_jsonl(tmp_path / "c.jsonl")), preset="llama-20m")
    built = _build(setup)
    assert isinstance(built.batches, TextStream)
    assert built.batches.state_dict()["shard"] == "1/3"  # B is second of A, B, C
    assert built.model.config.arch == "llama" and len(built.val) == worker_build.EVAL_BATCHES
    # Restarted after a member left: the same shard, so its checkpointed position stays valid.
    again = _build(setup, members=("12D3KooWB",))
    assert again.batches.state_dict()["shard"] == "1/3"
    assert json.loads((tmp_path / "dd" / "data-shard.json").read_text())["member"] == [1, 3]


def test_a_tokenizer_without_data_or_with_bin_shards_is_refused(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(["ab cd ef"] * 50, trainer=trainers.BpeTrainer(vocab_size=300, show_progress=False))
    tok.save(str(tmp_path / "tok.json"))
    with pytest.raises(ValueError, match="give --data"):
        _build(_setup(tmp_path, tokenizer=str(tmp_path / "tok.json")))
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "train.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="drop --tokenizer"):
        _build(_setup(tmp_path, tokenizer=str(tmp_path / "tok.json"), data=str(shards)))


def test_a_small_plain_text_file_without_a_tokenizer_is_the_byte_corpus_as_before(tmp_path: Path) -> None:
    """The scenarios train on one small corpus.txt: too few records for a streamed held-out split."""
    text = tmp_path / "corpus.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 3000)
    built = _build(_setup(tmp_path, data=str(text)))
    assert isinstance(built.batches, BatchStream) and built.val


def test_the_builtin_corpus_is_read_from_this_members_shard_of_the_runs_table(tmp_path: Path) -> None:
    built = _build(_setup(tmp_path))
    assert built.batches.shard == (1, 3)  # B is second of A, B, C
    alone = _build(_setup(tmp_path), members=())
    assert alone.batches.shard == (0, 1)
