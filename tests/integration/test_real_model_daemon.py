"""A user's own model through `hyphae node join`: a local Hugging Face Llama directory with its
BPE tokenizer, trained on a jsonl corpus by a real daemon and its worker, exported back with
`hyphae export --hf`, and loaded by transformers. Nothing is downloaded: the model is a random
one transformers builds here, the tokenizer is trained here on the corpus."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import _hf_import
import pytest
import torch

from hyphae.node.testing import DaemonProcess

transformers = _hf_import.import_transformers()

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

WORDS = "the cat sat on a mat and then it ran to see the dog who was not there so it sat again".split()


def _corpus(path: Path, docs: int = 1500) -> Path:
    gen = torch.Generator().manual_seed(0)
    with path.open("w") as f:
        for d in range(docs):
            n = int(torch.randint(10, 60, (1,), generator=gen))
            idx = torch.randint(0, len(WORDS), (n,), generator=gen).tolist()
            f.write(json.dumps({"id": d, "content": " ".join(WORDS[i] for i in idx)}) + "\n")
        f.write("not json at all\n")  # a bad line is skipped, never a crash
    return path


def _tokenizer(corpus: Path, out: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    texts = [json.loads(line)["content"] for line in corpus.read_text().splitlines() if line.startswith("{")]
    tok.train_from_iterator(texts, trainer=trainer)
    tok.save(str(out))
    return out


def _hf_model(directory: Path, vocab: int) -> Path:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    transformers.LlamaForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    return directory


@pytest.fixture
def user_files(tmp_path: Path) -> dict[str, Path]:
    corpus = _corpus(tmp_path / "corpus.jsonl")
    model = tmp_path / "my-llama"
    tok = _tokenizer(corpus, tmp_path / "tokenizer.json")
    _hf_model(model, json.loads(tok.read_text())["model"]["vocab"].__len__())
    (model / "tokenizer.json").write_bytes(tok.read_bytes())
    return {"corpus": corpus, "model": model, "tokenizer": tok}


def _run_join(tmp_path: Path, *args: str, timeout_s: float = 240) -> tuple[int, str]:
    data_dir = tmp_path / "node"
    node = DaemonProcess(data_dir, list(args), train=True).spawn()
    code = node.wait(timeout_s)
    return code, node.log()


def test_a_local_hf_llama_trains_on_jsonl_and_exports_back_to_transformers(tmp_path, user_files) -> None:
    cfg = tmp_path / "train.toml"
    cfg.write_text(f"""
[training]
model = "{user_files['model']}"
data = "{user_files['corpus']}"
text_field = "content"
batch_size = 2
seq_len = 32
grad_accum = 2
max_steps = 8
log_every = 2
eval_every = 4
checkpoint_every = 4
[training.algorithm_config]
inner_steps = 4
""")
    code, log = _run_join(tmp_path, "--config", str(cfg))
    assert code == 0, log[-3000:]
    assert "validation loss" in log and "training finished at step 8" in log, log[-3000:]
    ckpt = tmp_path / "node" / "checkpoints" / "step-00000008"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["model_config"]["arch"] == "llama" and manifest["model_config"]["n_kv_head"] == 2
    shard = json.loads((tmp_path / "node" / "data-shard.json").read_text())
    assert shard == {"data": str(user_files["corpus"]), "member": [0, 1]}

    out = tmp_path / "exported"
    export = subprocess.run([sys.executable, "-m", "hyphae.cli", "export", "--hf", str(out),
                             "--data-dir", str(tmp_path / "node"), "--tokenizer", str(user_files["tokenizer"])],
                            capture_output=True, text=True, timeout=120, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert export.returncode == 0, export.stderr
    trained = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    start = transformers.AutoModelForCausalLM.from_pretrained(user_files["model"]).eval()
    x = torch.randint(0, trained.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        after, before = trained(x).logits, start(x).logits
    assert torch.isfinite(after).all()
    assert not torch.equal(after, before)  # the daemon trained the user's model, and the export carries it
    assert (out / "tokenizer.json").read_bytes() == user_files["tokenizer"].read_bytes()


@pytest.mark.parametrize("case", ["tokenizer-without-data", "unknown-algorithm-key"])
def test_a_setting_that_cannot_work_stops_the_node_with_a_message_not_a_restart_loop(
        tmp_path, user_files, case: str) -> None:
    if case == "tokenizer-without-data":  # the model dir brings a BPE tokenizer; the built-in corpus is bytes
        args, expect = ["--model", str(user_files["model"])], "give --data"
    else:
        cfg = tmp_path / "bad.toml"
        cfg.write_text("[training.algorithm_config]\ninner_stepz = 3\n")
        args, expect = ["--config", str(cfg)], "inner_stepz"
    code, log = _run_join(tmp_path, *args, "--max-steps", "4", timeout_s=120)
    assert code == 2, log[-3000:]
    assert "training cannot start" in log and expect in log, log[-3000:]
    assert "restarting from the latest checkpoint" not in log
