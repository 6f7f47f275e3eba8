"""Checkpoints: round trip, exact resume, atomicity under a crash, hash checks, no unpickling."""

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hyphae.training import (
    AdamWConfig,
    BatchStream,
    CheckpointCorrupt,
    CheckpointError,
    CheckpointStore,
    DiLoCo,
    DiLoCoConfig,
    LoopConfig,
    ModelConfig,
    SimNetwork,
    build_model,
    resume,
    run_virtual,
    train,
)

TOKENS = np.random.default_rng(2).integers(0, 256, 20_000).astype(np.uint8)
CFG = DiLoCoConfig(inner=AdamWConfig(lr=3e-3, warmup_steps=2), inner_steps=2)


def _save(store: CheckpointStore, step: int, value: float = 1.0):
    return store.save(
        step=step, algorithm="ddp", model_config={"d_model": 8},
        weights={"w": torch.full((4,), value)}, state={"step": step, "nested": {"t": torch.arange(3)}},
    )


def test_checkpoint_round_trips_weights_state_and_manifest(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    manifest = _save(store, 10, 2.5)
    ckpt = store.load()
    assert ckpt.manifest == manifest and ckpt.manifest.step == 10
    assert ckpt.manifest.model_config == {"d_model": 8}
    assert torch.equal(ckpt.weights["w"], torch.full((4,), 2.5))
    assert torch.equal(ckpt.state["nested"]["t"], torch.arange(3))
    assert len(manifest.weights_sha256) == 64


def test_only_the_last_k_checkpoints_are_kept(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep_last=2)
    for step in (1, 2, 3, 4):
        _save(store, step)
    assert store.steps() == [3, 4]


def test_resaving_a_step_replaces_it(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    _save(store, 5, 1.0)
    _save(store, 5, 7.0)
    assert store.steps() == [5]
    assert store.load(5).weights["w"][0].item() == 7.0


def test_hash_mismatch_is_detected_and_resume_falls_back_to_an_older_checkpoint(
    tmp_path: Path, micro_config: ModelConfig
) -> None:
    comm = SimNetwork().add_peer()
    strategy = DiLoCo(build_model(micro_config, seed=0), comm, CFG)
    batches = BatchStream([TOKENS], batch_size=2, seq_len=16, seed=0)
    store = CheckpointStore(tmp_path)
    run_virtual(train(strategy, batches, LoopConfig(max_steps=4, checkpoint_every=2), checkpoints=store))
    assert store.steps() == [2, 4]
    path = store.path_of(4) / "weights.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorrupt, match="does not match the manifest"):
        store.load(4)
    fresh = DiLoCo(build_model(micro_config, seed=0), comm, CFG)
    assert resume(store, fresh, BatchStream([TOKENS], batch_size=2, seq_len=16, seed=0)) == 2


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path: Path, micro_config: ModelConfig) -> None:
    def fresh():
        comm = SimNetwork().add_peer()
        return DiLoCo(build_model(micro_config, seed=3), comm, CFG), BatchStream([TOKENS], batch_size=2, seq_len=16, seed=9)

    straight, batches = fresh()
    run_virtual(train(straight, batches, LoopConfig(max_steps=7)))

    store = CheckpointStore(tmp_path)
    first, batches = fresh()
    run_virtual(train(first, batches, LoopConfig(max_steps=3, checkpoint_every=3), checkpoints=store))
    second, batches = fresh()
    start = resume(store, second, batches)
    assert start == 3 and batches.position == 3
    run_virtual(train(second, batches, LoopConfig(max_steps=7), start_step=start))

    for p, q in zip(straight.model.parameters(), second.model.parameters()):
        assert torch.equal(p, q)
    assert second.outer_steps == straight.outer_steps == 3


def test_resume_refuses_a_checkpoint_of_another_algorithm_or_model(tmp_path: Path, micro_config: ModelConfig) -> None:
    store = CheckpointStore(tmp_path)
    _save(store, 1)
    comm = SimNetwork().add_peer()
    strategy = DiLoCo(build_model(micro_config), comm, CFG)
    with pytest.raises(CheckpointError, match="written by 'ddp'"):
        resume(store, strategy, BatchStream([TOKENS], batch_size=1, seq_len=8, seed=0))


def test_resume_reads_a_manifest_written_before_the_llama_fields_existed(tmp_path: Path, micro_config: ModelConfig) -> None:
    store = CheckpointStore(tmp_path)
    first = DiLoCo(build_model(micro_config, seed=3), SimNetwork().add_peer(), CFG)
    run_virtual(train(first, BatchStream([TOKENS], batch_size=2, seq_len=16, seed=9), LoopConfig(max_steps=2, checkpoint_every=2), checkpoints=store))
    manifest_path = store.path_of(2) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    new_fields = ("arch", "n_kv_head", "head_dim", "qkv_bias", "tie_embeddings", "rope_theta", "norm_eps", "activation_checkpointing")
    manifest["model_config"] = {k: v for k, v in manifest["model_config"].items() if k not in new_fields}
    manifest_path.write_text(json.dumps(manifest))
    second = DiLoCo(build_model(micro_config, seed=4), SimNetwork().add_peer(), CFG)
    assert resume(store, second, BatchStream([TOKENS], batch_size=2, seq_len=16, seed=9)) == 2
    llama = DiLoCo(build_model(micro_config.replace(arch="llama")), SimNetwork().add_peer(), CFG)
    with pytest.raises(CheckpointError, match="differs from this run's"):
        resume(store, llama, BatchStream([TOKENS], batch_size=2, seq_len=16, seed=9))


def test_a_crash_mid_write_leaves_the_previous_checkpoint_loadable(tmp_path: Path) -> None:
    store_dir, marker = tmp_path / "ckpt", tmp_path / "mid-write"
    script = textwrap.dedent(
        """
        import sys, time, torch
        from hyphae.training import checkpoint as ck
        store = ck.CheckpointStore(sys.argv[1])
        store.save(step=1, algorithm="ddp", model_config={}, weights={"w": torch.ones(1000)}, state={"s": 1})
        original = ck._write_file
        def crashing_write(path, data):
            if path.name == "state.pt":
                with open(path, "wb") as f:
                    f.write(data[: len(data) // 2])
                    f.flush()
                open(sys.argv[2], "w").close()
                time.sleep(120)
            original(path, data)
        ck._write_file = crashing_write
        store.save(step=2, algorithm="ddp", model_config={}, weights={"w": torch.zeros(1000)}, state={"s": 2})
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(store_dir), str(marker)])
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, "writer exited before the crash point"
            assert time.monotonic() < deadline, "writer never reached the crash point"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    store = CheckpointStore(store_dir)
    assert store.steps() == [1]
    assert any(p.name.startswith(".tmp-") for p in store_dir.iterdir())  # the torn write
    assert torch.equal(store.load().weights["w"], torch.ones(1000))
    _save(store, 3)
    assert not any(p.name.startswith(".tmp-") for p in store_dir.iterdir())


def test_a_directory_without_manifest_is_not_a_checkpoint(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    _save(store, 1)
    torn = tmp_path / "step-00000002"
    torn.mkdir()
    (torn / "weights.pt").write_bytes(b"partial")
    assert store.steps() == [1] and store.load().manifest.step == 1


def test_loading_never_unpickles_arbitrary_objects(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    manifest = _save(store, 1)
    path = store.path_of(1) / "state.pt"
    torch.save({"evil": asyncio.Event()}, path)  # an arbitrary class instance
    meta_path = store.path_of(1) / "manifest.json"
    meta = json.loads(meta_path.read_text())
    meta["state_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="weights-only"):
        store.load(manifest.step)


def test_missing_checkpoint_and_bad_keep_last_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        CheckpointStore(tmp_path).load()
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointStore(tmp_path, keep_last=0)
