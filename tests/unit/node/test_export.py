"""`hyphae export --hf`: a real training checkpoint becomes a directory transformers loads, same logits."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import _hf_import
import numpy as np
import pytest
import torch

from hyphae.cli.main import main
from hyphae.node.export import ExportError, export_checkpoint_hf
from hyphae.training import (
    DDP,
    BatchStream,
    CheckpointStore,
    LoopConfig,
    ModelConfig,
    SimNetwork,
    build_model,
    run_virtual,
    save_checkpoint,
    train,
)

transformers = _hf_import.import_transformers()

TOKENS = np.random.default_rng(0).integers(0, 256, 20_000).astype(np.uint8)
LLAMA = ModelConfig(arch="llama", vocab_size=256, context_length=16, n_layer=2, n_head=4, n_kv_head=2, d_model=32)


def _train_and_checkpoint(config: ModelConfig, checkpoints: Path, steps: tuple[int, ...] = (1, 2)) -> dict[int, torch.Tensor]:
    """Train a DDP replica, checkpointing after each of `steps`; the logits on a fixed batch at each."""
    strategy = DDP(build_model(config, seed=0), SimNetwork().add_peer(), precision="fp32")
    batches = BatchStream([TOKENS], batch_size=2, seq_len=16, seed=0)
    store = CheckpointStore(checkpoints)
    x = torch.arange(32).view(2, 16) % 256
    logits = {}
    for step in steps:
        run_virtual(train(strategy, batches, LoopConfig(max_steps=step), start_step=step - 1))
        save_checkpoint(store, step, strategy, batches)
        strategy.model.eval()
        with torch.no_grad():
            logits[step] = strategy.model(x).logits
        strategy.model.train()
    return logits


def _hf_logits(directory: Path) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    with torch.no_grad():
        return model(torch.arange(32).view(2, 16) % 256).logits


def _cli(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    """The real `hyphae` command in its own process."""
    return subprocess.run([sys.executable, "-m", "hyphae.cli", "export", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def _main(*args: str | Path) -> int:
    """`hyphae export ...` in this process (a new one costs seconds); main() resets SIGPIPE."""
    saved = signal.getsignal(signal.SIGPIPE)
    try:
        return main(["export", *map(str, args)])
    finally:
        signal.signal(signal.SIGPIPE, saved)


def test_hyphae_export_hf_writes_the_newest_checkpoint_transformers_loads_with_equal_logits(tmp_path: Path) -> None:
    data_dir = tmp_path / "node"
    logits = _train_and_checkpoint(LLAMA, data_dir / "checkpoints")
    assert not torch.equal(logits[1], logits[2])
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0"}')
    done = _cli("--hf", tmp_path / "out", "--data-dir", data_dir, "--tokenizer", tmp_path / "tokenizer.json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "exported step 2" in done.stdout
    assert torch.equal(_hf_logits(tmp_path / "out"), logits[2])
    assert (tmp_path / "out" / "tokenizer.json").read_text() == '{"version": "1.0"}'

    assert _main("--hf", tmp_path / "old", "--checkpoint", data_dir / "checkpoints" / "step-00000001") == 0
    assert torch.equal(_hf_logits(tmp_path / "old"), logits[1])


def test_a_gpt_checkpoint_exports_as_gpt2_and_an_moe_one_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    gpt = ModelConfig(vocab_size=256, context_length=16, n_layer=1, n_head=2, d_model=16)
    logits = _train_and_checkpoint(gpt, tmp_path / "gpt", steps=(1,))
    assert _main("--hf", tmp_path / "gpt2", "--checkpoint", tmp_path / "gpt") == 0
    assert torch.equal(_hf_logits(tmp_path / "gpt2"), logits[1])

    _train_and_checkpoint(gpt.replace(n_experts=2, top_k=1), tmp_path / "moe", steps=(1,))
    assert _main("--hf", tmp_path / "out", "--checkpoint", tmp_path / "moe") == 1
    assert "mixture-of-experts" in capsys.readouterr().err
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_a_data_dir_without_checkpoints_says_so(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="no checkpoint in .*train first"):
        export_checkpoint_hf(tmp_path / "out", data_dir=tmp_path)
    with pytest.raises(ExportError, match="exactly one"):
        export_checkpoint_hf(tmp_path / "out")
