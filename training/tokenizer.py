"""Tokenizers for user text: byte-level (the default) or a BPE `tokenizer.json` read from disk.

Nothing is downloaded: `load_tokenizer` takes None (bytes), a `tokenizer.json` file, or a
directory holding one (a Hugging Face model directory).

Document separators. `HFTokenizer` ends every document with the tokenizer's own end-of-text
token when it has one (from a sibling `tokenizer_config.json`, else a well-known special token
such as `<|endoftext|>` or `</s>`). `ByteTokenizer` keeps the 256-byte vocabulary every byte
model here already uses, and reserves byte 0 (NUL) as its end-of-document id: NUL does not
occur in real text, so the model can learn it as a boundary without growing the embedding.
A NUL inside a document still encodes as 0 (rare enough not to matter); pass `eos_id=None`
to concatenate documents with no separator, as the file corpora of `data.py` do.
"""

from __future__ import annotations

import hashlib
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

# Special tokens tried, in order, when no tokenizer_config.json names them.
_EOS_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>", "[SEP]")
_BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>", "[CLS]")


class Tokenizer(ABC):
    """Text to token ids and back; what the streaming data needs from a tokenizer.

    Attributes:
        vocab_size: every id is < vocab_size (the model's vocab_size must be at least this).
        eos_id: id appended after each document, or None for no separator.
        bos_id: id the tokenizer uses to open a document, or None. The data stream only uses
            it when there is no eos_id (one separator per document is enough).
    """

    vocab_size: int
    eos_id: int | None
    bos_id: int | None

    @abstractmethod
    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, with no special tokens added."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids` (special tokens included as text)."""

    @property
    @abstractmethod
    def fingerprint(self) -> str:
        """Identifies the vocabulary and separators; a data position is only valid under it."""

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        """`encode_batch` as int32 arrays (the stream's fast path; override when cheaper)."""
        return [np.asarray(ids, dtype=np.int32) for ids in self.encode_batch(texts)]


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens (vocabulary 256); byte 0 ends a document unless `eos_id=None`.

    Args:
        eos_id: the byte that separates documents (0..255), or None for none.

    Raises:
        ValueError: eos_id is not a byte value.
    """

    bos_id = None
    vocab_size = 256

    def __init__(self, *, eos_id: int | None = 0) -> None:
        if eos_id is not None and not (isinstance(eos_id, int) and 0 <= eos_id < 256):
            raise ValueError(f"ByteTokenizer eos_id must be a byte value 0..255 or None, got {eos_id!r}")
        self.eos_id = eos_id

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(text.encode("utf-8")) for text in texts]

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32) for text in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    @property
    def fingerprint(self) -> str:
        return f"bytes:eos={self.eos_id}"

    def __repr__(self) -> str:
        return f"ByteTokenizer(eos_id={self.eos_id})"


class HFTokenizer(Tokenizer):
    """A `tokenizers` tokenizer (BPE, WordPiece, Unigram) read from a `tokenizer.json`.

    Args:
        path: the tokenizer.json file.
        eos_token / bos_token: override the separator tokens by their text (e.g. "</s>");
            None finds them in a sibling tokenizer_config.json or among the special tokens.

    Raises:
        ValueError: the file is missing or not a tokenizer, or a named token is not in it.
    """

    def __init__(self, path: str | Path, *, eos_token: str | None = None, bos_token: str | None = None) -> None:
        from tokenizers import Tokenizer as _Tokenizer  # lazy: only runs that use BPE pay the import

        self.path = Path(path)
        try:
            raw = self.path.read_bytes()
            self._tok = _Tokenizer.from_str(raw.decode("utf-8"))
        except OSError as exc:
            raise ValueError(f"cannot read tokenizer file {self.path}: {exc}") from exc
        except Exception as exc:  # tokenizers raises plain Exception on a malformed file
            raise ValueError(f"{self.path} is not a valid tokenizer.json ({exc})") from exc
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        config = _sibling_config(self.path)
        self.eos_id = self._special(eos_token, config.get("eos_token"), _EOS_NAMES, "eos")
        self.bos_id = self._special(bos_token, config.get("bos_token"), _BOS_NAMES, "bos")
        self._fingerprint = "hf:" + hashlib.sha256(raw).hexdigest()[:32] + f":eos={self.eos_id}:bos={self.bos_id}"
        logger.info(
            "tokenizer %s: vocab %d, eos %s, bos %s", self.path, self.vocab_size, self.eos_id, self.bos_id
        )

    def _special(self, override: str | None, configured: Any, names: tuple[str, ...], what: str) -> int | None:
        if override is not None:
            found = self._tok.token_to_id(override)
            if found is None:
                raise ValueError(f"{what} token {override!r} is not in {self.path}; pick one of its tokens")
            return int(found)
        if isinstance(configured, dict):  # {"content": "</s>", ...} in newer configs
            configured = configured.get("content")
        if isinstance(configured, str) and self._tok.token_to_id(configured) is not None:
            return int(self._tok.token_to_id(configured))
        specials = {t.content for t in self._tok.get_added_tokens_decoder().values() if t.special}
        for name in names:
            if name in specials:
                return int(self._tok.token_to_id(name))
        return None

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # encode_batch_fast (tokenizers >= 0.20) skips the character offsets we never use
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [e.ids for e in encode(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def _sibling_config(path: Path) -> dict[str, Any]:
    """The tokenizer_config.json next to `path`, or {} when there is none or it is unreadable."""
    config_path = path.parent / "tokenizer_config.json"
    if not config_path.is_file():
        return {}
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        logger.warning("ignoring unreadable %s (%s)", config_path, exc)
        return {}
    return data if isinstance(data, dict) else {}


def load_tokenizer(path: str | Path | None) -> Tokenizer:
    """The tokenizer at `path`: None (or "bytes") is byte-level, else a tokenizer.json or its folder.

    Raises:
        ValueError: the path does not exist, the folder holds no tokenizer.json, or the file is
            not a tokenizer (the message says what was found).
    """
    if path is None or str(path) in ("bytes", "byte"):
        return ByteTokenizer()
    where = Path(path)
    if where.is_dir():
        candidate = where / "tokenizer.json"
        if not candidate.is_file():
            present = sorted(p.name for p in where.iterdir())[:10]
            hint = " (a sentencepiece tokenizer.model must first be converted to tokenizer.json)" if (
                where / "tokenizer.model"
            ).exists() else ""
            raise ValueError(f"no tokenizer.json in {where}{hint}; found {present}")
        where = candidate
    elif not where.is_file():
        raise ValueError(f"tokenizer {str(path)!r} does not exist; give a tokenizer.json, its folder, or None for bytes")
    return HFTokenizer(where)
