"""kill -9 a training daemon 20 times at random moments: nothing is ever half-written, and every
restart resumes from the newest complete checkpoint and keeps training.

One daemon trains the tiny model with a checkpoint every step, so most of its training time is
spent writing checkpoints (and announcing their weights: blobs and a run-state write). Each round
starts the daemon, waits a delay drawn from a seeded RNG — a quarter of the rounds somewhere in
daemon or worker startup (before ``node.json``, during the torch import or the resume), half
aimed at a checkpoint write (a few ms after its temp directory appears), the rest anywhere in
training — then kills it, either

* the whole family at once (daemon and worker SIGKILLed together, as the OOM killer or a power
  cut would): whatever the worker was writing stops mid-write; or
* the daemon alone: its worker must notice (PR_SET_PDEATHSIG, then a bounded graceful stop) and
  exit on its own.

After every kill, once no process of the family is left, every file the daemon keeps must parse:
the identity key (same peer id every time), peers.json, the run state, node.json, and every
checkpoint the store lists must load with its sha256 matching its manifest. The newest complete
checkpoint never goes backwards, and a restart that gets as far as resuming resumes from exactly
that one.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hyphae.node.testing import DaemonProcess, sync_wait
from hyphae.protocol.identity import Identity
from hyphae.protocol.runstate.store import decode_file
from hyphae.training.checkpoint import CheckpointStore

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(420)]

KILLS = 20
SEED = 20261126
STARTUP_SHARE = 0.25
"""Share of kills aimed at startup: uniform in [0, STARTUP_S) after the spawn. The daemon is up
after ~1 s, the worker (torch import, resume) trains from ~4-5 s on a 2-core machine."""
STARTUP_S = 5.0
AIMED_SHARE = 0.5
AIMED_S = 0.03
"""Share of kills aimed at a checkpoint write: once the round has checkpointed, wait for the next
``.tmp-step-*`` directory to appear, then kill uniform in [0, AIMED_S) later — mid-file, between
files, at the rename or in the prune."""
TRAINING_S = 1.5
"""The remaining kills land uniform in [0, TRAINING_S) after the round's first new checkpoint:
anywhere in a step, the checkpoint or the announcement of its weights (blobs, run state)."""
ORPHAN_DEADLINE_S = 20.0
"""A worker whose daemon died must be gone by then (its own timer ends it after 10 s)."""
RUN = "default"

TOML = """
[training]
algorithm = "ddp"
batch_size = 2
seq_len = 32
log_every = 1
eval_every = 0
checkpoint_every = 1
"""

RESUMED = re.compile(r"training resumed from the checkpoint at step (\d+)")


@dataclass
class Tally:
    """What the kills hit, for the summary line."""

    family: int = 0
    daemon_only: int = 0
    training: int = 0
    during_write: int = 0
    during_atomic_write: int = 0
    resumes_checked: int = 0
    delays_s: list[float] = field(default_factory=list)


def test_kill_9_at_random_moments_never_leaves_a_half_written_file_and_always_resumes(tmp_path: Path) -> None:
    config = tmp_path / "crash.toml"
    config.write_text(TOML)
    daemon = DaemonProcess(tmp_path / "node", ["--config", str(config)], train=True)
    store = CheckpointStore(daemon.data_dir / "checkpoints")
    rng = random.Random(SEED)
    tally = Tally()
    peer_id: str | None = None
    newest = 0
    try:
        for round_no in range(KILLS):
            log_start = len(daemon.log())
            _start_and_kill(daemon, store, rng, tally, newest, round_no)
            sync_wait(lambda: not daemon.family(), ORPHAN_DEADLINE_S, f"round {round_no}: the worker to exit")
            peer_id = _check_files(daemon.data_dir, store, peer_id)
            tally.resumes_checked += _check_resume(daemon.log()[log_start:], newest, round_no)
            latest = store.latest_step() or 0
            assert latest >= newest, f"round {round_no}: newest checkpoint went back from {newest} to {latest}"
            newest = latest
        _restart_resumes_and_trains(daemon, newest, peer_id)
        tally.resumes_checked += 1
    finally:
        daemon.kill_family()
    log = daemon.log()
    assert "skipping corrupt checkpoint" not in log and "no loadable checkpoint" not in log
    print(f"\ncrash safety: {KILLS} kills ({tally.family} daemon+worker, {tally.daemon_only} daemon only; "
          f"{KILLS - tally.training} in startup, {tally.training} while training), "
          f"{tally.during_write} with a checkpoint being written, {tally.during_atomic_write} during another "
          f"file's atomic write, {tally.resumes_checked} resumes checked, "
          f"newest checkpoint step {newest}; delays {tally.delays_s}")
    assert tally.during_write >= 1, "no kill landed during a checkpoint write; the test proves little"
    shutil.rmtree(daemon.data_dir / "blobs", ignore_errors=True)  # every checkpoint's weights: GBs


def _start_and_kill(daemon: DaemonProcess, store: CheckpointStore, rng: random.Random, tally: Tally,
                    newest: int, round_no: int) -> None:
    """Start the daemon, wait a random moment (in startup, or while checkpoints are written),
    SIGKILL it (with its worker, or alone) and note whether a checkpoint write was cut."""
    stale, stale_files = _temp_dirs(store), _atomic_temps(daemon.data_dir)
    daemon.spawn()
    phase = rng.random()
    if phase < STARTUP_SHARE:
        delay = rng.uniform(0.0, STARTUP_S)  # daemon or worker still starting
    else:  # training: wait for this round's first checkpoint, then a little more
        sync_wait(lambda: (store.latest_step() or 0) > newest or daemon.proc.poll() is not None, 90,
                  f"round {round_no}: a new checkpoint")
        tally.training += 1
        if phase < STARTUP_SHARE + AIMED_SHARE:  # aim: as soon as a checkpoint write begins
            before = _temp_dirs(store)
            sync_wait(lambda: _temp_dirs(store) - before or daemon.proc.poll() is not None, 30,
                      f"round {round_no}: a checkpoint write to begin", interval_s=0.002)
            delay = rng.uniform(0.0, AIMED_S)
        else:
            delay = rng.uniform(0.0, TRAINING_S)
    tally.delays_s.append(round(delay, 2))
    time.sleep(delay)
    if rng.random() < 2 / 3:
        daemon.kill_family()
        tally.family += 1
    else:
        daemon.kill()
        tally.daemon_only += 1
    if _temp_dirs(store) - stale:
        tally.during_write += 1  # a checkpoint was being written (or pruned) when the kill landed
    if _atomic_temps(daemon.data_dir) - stale_files:
        tally.during_atomic_write += 1  # a blob, run-state or key file was being replaced


def _atomic_temps(data_dir: Path) -> set[Path]:
    """Temp files of protocol.atomic's writes (``.<name>.<random>.tmp``), left by a cut write."""
    return set(data_dir.rglob(".*.tmp")) if data_dir.is_dir() else set()


def _temp_dirs(store: CheckpointStore) -> set[str]:
    if not store.directory.is_dir():
        return set()
    return {p.name for p in store.directory.iterdir() if p.name.startswith(".tmp-")}


def _check_files(data_dir: Path, store: CheckpointStore, peer_id: str | None) -> str | None:
    """Every file the daemon keeps is absent or whole; returns the peer id (fixed once known)."""
    key = data_dir / "identity.key"
    if key.exists():
        found = Identity.from_pem(key.read_bytes(), source=str(key)).peer_id
        assert peer_id in (None, found), f"the peer id changed from {peer_id} to {found}"
        peer_id = found
    for name in ("peers.json", "node.json"):
        if (data_dir / name).exists():
            assert isinstance(json.loads((data_dir / name).read_text()), dict), name
    state_file = data_dir / "runs" / RUN / "runstate.msgpack"
    if state_file.exists():
        decode_file(state_file.read_bytes(), RUN)  # raises on a torn file
    set_aside = sorted(str(p.relative_to(data_dir)) for p in data_dir.rglob("*.corrupt"))
    assert not set_aside, f"the daemon found torn files and set them aside: {set_aside}"
    if store.directory.is_dir():
        for step_dir in store.directory.glob("step-*"):
            assert (step_dir / "manifest.json").is_file(), f"{step_dir.name} has no manifest"
    for step in store.steps():
        store.load(step)  # verifies both files against the manifest's sha256
    return peer_id


def _check_resume(log: str, newest: int, round_no: int) -> int:
    """If this round's worker got as far as resuming, it resumed from the newest checkpoint."""
    resumed = [int(s) for s in RESUMED.findall(log)]
    if newest == 0:
        assert not resumed, f"round {round_no}: resumed from {resumed} with no checkpoint on disk"
        return 0
    if not resumed:
        assert "took the run's weights" not in log, f"round {round_no}: ignored its own checkpoints"
        return 0
    assert resumed == [newest], f"round {round_no}: resumed from {resumed}, newest complete was {newest}"
    return 1


def _restart_resumes_and_trains(daemon: DaemonProcess, newest: int, peer_id: str | None) -> None:
    log_start = len(daemon.log())
    daemon.start()
    assert daemon.peer_id == peer_id
    sync_wait(lambda: RESUMED.search(daemon.log()[log_start:]), 90, "the last restart to resume")
    assert _check_resume(daemon.log()[log_start:], newest, KILLS) == 1
    sync_wait(lambda: (daemon.api("/api/v1/training")["checkpoint_step"] or 0) >= newest + 5, 90,
              "five more checkpoints after the last restart")
