"""Persistence: atomic saves, loads that re-verify everything, and a file that stays bounded."""

from __future__ import annotations

import dataclasses

import msgpack

from hyphae.protocol.runstate.state import RunState
from hyphae.protocol.runstate.store import RunStore, encode_file


def test_a_saved_state_loads_back_identically(tmp_path, ids, clock) -> None:
    state = RunState("run-1", ids[0], clock=clock)
    state.create_run()
    state.set_member(addrs=["/ip4/1.2.3.4/tcp/1"])
    state.set_config({"lr": 0.1})
    store = RunStore(tmp_path / "runs" / "run-1" / "runstate.msgpack")
    assert store.save(state) and not store.save(state)  # unchanged: nothing written
    assert (store.path.stat().st_mode & 0o777) == 0o600
    again = RunState("run-1", ids[0], clock=clock)
    assert RunStore(store.path).load(again) == 3
    assert again.replica.fingerprint() == state.replica.fingerprint()
    assert again.run_config() == {"lr": 0.1}


def test_loading_reverifies_every_envelope(tmp_path, ids, clock) -> None:
    state = RunState("run-1", ids[0], clock=clock)
    state.set_member(addrs=[])
    state.set_progress({"step": 1})
    member, progress = state.envelopes()
    tampered = dataclasses.replace(progress, update=progress.update[:-1] + b"\x01")
    path = tmp_path / "state.msgpack"
    path.write_bytes(encode_file("run-1", [member, tampered]))
    loaded = RunState("run-1", ids[1], clock=clock)
    assert RunStore(path).load(loaded) == 1
    assert loaded.value("progress", ids[0].peer_id) == {}


def test_a_corrupt_file_is_moved_aside_and_the_node_starts_empty(tmp_path, ids, clock) -> None:
    path = tmp_path / "state.msgpack"
    path.write_bytes(b"\x00not msgpack at all")
    assert RunStore(path).load(RunState("run-1", ids[0], clock=clock)) == 0
    assert not path.exists() and path.with_suffix(".corrupt").exists()
    path.write_bytes(msgpack.packb({"v": 1, "run": "other-run", "envelopes": []}))
    assert RunStore(path).load(RunState("run-1", ids[0], clock=clock)) == 0
    assert path.with_suffix(".corrupt").exists()


def test_ten_thousand_updates_leave_a_small_file(tmp_path, ids, clock) -> None:
    """Heartbeats, progress and a ZO log truncated at snapshot boundaries, 10k writes in all:
    compaction keeps the file (and so every sync payload) bounded."""
    state = RunState("run-1", ids[0], clock=clock)
    state.set_member(addrs=["/ip4/127.0.0.1/tcp/4101"], roles=["trainer"], hardware={"cpus": 2})
    store = RunStore(tmp_path / "state.msgpack")
    sizes = []
    for step in range(1, 3334):
        clock.advance(0.5)
        state.heartbeat()
        state.set_progress({"step": step, "loss": 3.0 - step / 10_000})
        state.append_zo(step, bytes([step % 256] * 4))
        if step % 100 == 0:
            state.truncate_zo(before_step=step - 100)  # keep the log since the last ZO snapshot
        if step % 500 == 0:
            store.save(state)
            sizes.append(store.last_size_bytes)
    assert state.version > 10_000
    assert max(sizes) < 64 * 1024, sizes
    assert sizes[-1] < 2 * sizes[0], sizes  # flat, not growing with the run
