"""The scenario invariants as pure functions: what counts as converged, progressing, verified."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from hyphae.node.scenarios import ScenarioError, ScenarioOptions, _checks, run_scenario
from hyphae.node.scenarios._checks import meshed, progressed, run_state_converged, verify_checkpoints
from hyphae.node.scenarios._engine import training_toml
from hyphae.node.config import load_config


def view(owner: str, live: list[str], config: dict | None = None, suspect: tuple[str, ...] = ()) -> dict:
    members = [{"peer_id": p, "status": "live"} for p in live] + [{"peer_id": p, "status": "suspect"} for p in suspect]
    return {"run": "default", "owner": owner, "config": config or {}, "members": members}


def test_run_state_converges_only_when_all_agree_and_see_every_live_node() -> None:
    peers = {"a": "A", "b": "B"}
    assert run_state_converged({"a": view("A", ["A", "B"]), "b": view("A", ["A", "B"], suspect=("C",))}, peers)[0]
    holds, measured = run_state_converged({"a": view("A", ["A"]), "b": view("A", ["A", "B"])}, peers)
    assert not holds and measured["not_seen_live"] == {"a": ["b"]}
    holds, measured = run_state_converged({"a": view("A", ["A", "B"]), "b": view("B", ["A", "B"])}, peers)
    assert not holds and measured["owners"] == ["A", "B"]
    assert not run_state_converged({"a": view("A", ["A", "B"], {"lr": 1}), "b": view("A", ["A", "B"])}, peers)[0]
    assert not run_state_converged({"a": view("A", ["A", "B"]), "b": OSError("down")}, peers)[0]


def test_mesh_is_full_or_at_least_min_peers() -> None:
    peers = {"a": "A", "b": "B", "c": "C"}
    lists = {"a": {"peers": [{"peer_id": "B", "agent": "x"}, {"peer_id": "C", "agent": "x"}]},
             "b": {"peers": [{"peer_id": "A", "agent": "x"}]},
             "c": {"peers": [{"peer_id": "A", "agent": "x"}, {"peer_id": "B", "agent": ""}]}}
    holds, measured = meshed(lists, peers)
    assert not holds and measured["short_of_peers"] == {"b": 1, "c": 1}
    assert meshed(lists, peers, min_peers=1)[0]


def test_progress_needs_min_increase_on_every_node() -> None:
    assert progressed({"a": 4, "b": 4}, {"a": {"step": 8}, "b": {"step": 9}}, min_increase=4)[0]
    holds, measured = progressed({"a": 4, "b": 4}, {"a": {"step": 8}, "b": {"step": 6}}, min_increase=4)
    assert not holds and measured["not_progressing"] == ["b"]
    assert not progressed({"a": 4}, {"a": OSError("down")})[0]


def _checkpoint(root: Path, step: int, weights: bytes, state: bytes, *, lie: bool = False) -> None:
    d = root / f"step-{step:08d}"
    d.mkdir(parents=True)
    (d / "weights.pt").write_bytes(weights)
    (d / "state.pt").write_bytes(state)
    manifest = {"step": step, "weights_sha256": hashlib.sha256(weights).hexdigest(),
                "state_sha256": hashlib.sha256(b"other" if lie else state).hexdigest()}
    (d / "manifest.json").write_text(json.dumps(manifest))


def test_checkpoints_verify_against_their_manifest(tmp_path: Path) -> None:
    _checkpoint(tmp_path, 4, b"w4", b"s4")
    _checkpoint(tmp_path, 8, b"w8", b"s8", lie=True)
    (tmp_path / ".tmp-123").mkdir()  # a save cut short by a kill is not a checkpoint
    good, bad = verify_checkpoints(tmp_path)
    assert good == [4] and bad == ["step-00000008: state.pt sha256 mismatch"]
    assert verify_checkpoints(tmp_path / "missing") == ([], [])


def test_scenario_training_config_is_one_the_daemon_accepts(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("x" * 1000)
    path = tmp_path / "t.toml"
    path.write_text(training_toml(ScenarioOptions(), corpus))
    training = load_config(file=path, env={}).training
    assert (training.batch_size, training.seq_len, training.algorithm) == (4, 64, "diloco")
    assert training.algorithm_config == {"inner_steps": 4, "timeout_s": 8.0}


def test_unknown_scenario_is_refused_before_anything_starts(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="unknown scenario 'nope'; choose one of"):
        run_scenario("nope", root=tmp_path)
    assert not any(tmp_path.iterdir())


def test_a_checkpoint_pruned_while_read_is_skipped_and_a_missing_file_is_not(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _checkpoint(tmp_path, 4, b"w4", b"s4")
    _checkpoint(tmp_path, 8, b"w8", b"s8")
    _checkpoint(tmp_path, 12, b"w12", b"s12")
    (tmp_path / "step-00000012" / "state.pt").unlink()  # damage: the dir stays, a file is gone
    real_sha256 = _checks._sha256

    def prune_step_4_midway(path: Path) -> str:
        if path == tmp_path / "step-00000004" / "state.pt":  # the worker prunes as the check reads
            (tmp_path / "step-00000004").rename(tmp_path / ".old-00000004")
        return real_sha256(path)

    monkeypatch.setattr(_checks, "_sha256", prune_step_4_midway)
    good, bad = verify_checkpoints(tmp_path)
    assert good == [8] and bad == ["step-00000012: state.pt unreadable (No such file or directory)"]
