"""Tokenizers: byte-level by default, BPE from a tokenizer.json trained here (nothing downloaded)."""

import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from hyphae.training import ByteTokenizer, HFTokenizer, load_tokenizer

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "théta", "ωmega", "naïve", "café"]


def _texts(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))) for _ in range(n)]


def train_bpe(directory: Path, *, specials: tuple[str, ...] = ("<|endoftext|>",), vocab_size: int = 300) -> Path:
    """Train a small byte-level BPE on generated text and save it as directory/tokenizer.json."""
    tok = RawTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(specials), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_texts(), trainer)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "tokenizer.json"
    tok.save(str(path))
    return path


def test_byte_tokenizer_is_utf8_with_nul_as_document_separator() -> None:
    tok = load_tokenizer(None)
    assert isinstance(tok, ByteTokenizer)
    assert (tok.vocab_size, tok.eos_id, tok.bos_id) == (256, 0, None)
    text = "héllo ωmega"
    ids = tok.encode_batch([text, ""])
    assert ids == [list(text.encode("utf-8")), []]
    assert tok.decode(ids[0]) == text
    assert [a.tolist() for a in tok.encode_arrays([text])] == [ids[0]]


def test_byte_tokenizer_without_separator_and_bad_eos_is_refused() -> None:
    assert ByteTokenizer(eos_id=None).eos_id is None
    assert ByteTokenizer(eos_id=None).fingerprint != ByteTokenizer().fingerprint
    with pytest.raises(ValueError, match="0..255"):
        ByteTokenizer(eos_id=256)


def test_bpe_tokenizer_loads_from_file_and_from_its_folder_and_round_trips(tmp_path: Path) -> None:
    path = train_bpe(tmp_path / "model")
    from_file, from_dir = load_tokenizer(str(path)), load_tokenizer(tmp_path / "model")
    assert isinstance(from_file, HFTokenizer)
    texts = _texts(20, seed=1)
    ids = from_file.encode_batch(texts)
    assert ids == from_dir.encode_batch(texts)
    assert [from_file.decode(i) for i in ids] == texts
    assert all(0 <= t < from_file.vocab_size for row in ids for t in row)
    assert sum(map(len, ids)) < sum(len(t.encode()) for t in texts) / 2  # merges learned: BPE compresses
    assert from_file.vocab_size == 300
    assert from_file.eos_id == RawTokenizer.from_file(str(path)).token_to_id("<|endoftext|>")
    assert from_file.fingerprint == from_dir.fingerprint


def test_bpe_eos_comes_from_tokenizer_config_json_when_present(tmp_path: Path) -> None:
    path = train_bpe(tmp_path, specials=("<s>", "</s>", "<unk>"))
    plain = load_tokenizer(path)
    assert (plain.eos_id, plain.bos_id) == (1, 0)  # found by their well-known names
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": {"content": "<unk>"}, "bos_token": "</s>"})
    )
    configured = load_tokenizer(path)
    assert (configured.eos_id, configured.bos_id) == (2, 1)
    assert configured.fingerprint != plain.fingerprint


def test_bpe_without_special_tokens_has_no_eos(tmp_path: Path) -> None:
    tok = load_tokenizer(train_bpe(tmp_path, specials=()))
    assert tok.eos_id is None and tok.bos_id is None


def test_missing_or_broken_tokenizers_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(tmp_path / "nope.json")
    (tmp_path / "tokenizer.model").write_bytes(b"spm")
    with pytest.raises(ValueError, match="no tokenizer.json.*sentencepiece"):
        load_tokenizer(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text("{not a tokenizer")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        load_tokenizer(bad)
    with pytest.raises(ValueError, match="not in"):
        HFTokenizer(train_bpe(tmp_path / "m"), eos_token="<|nope|>")
