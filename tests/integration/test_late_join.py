"""A node that joins a DiLoCo run in progress ends its first outer step holding the members' φ.

Three daemons train; a fourth starts mid-run. It must take the run's agreed outer state (φ of an
outer step, the outer Nesterov momentum, that step's number) rather than one member's in-progress
weights, so that its first outer step gives bit-for-bit the members' φ (θ = φ right after an
outer step, so the checkpoint weights of that step are φ), and its validation loss two outer
steps later is the members'.
"""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import pytest
import torch

from hyphae.node.testing import DaemonProcess, sync_wait

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

H = 5
CONFIG = f"""
[training]
algorithm = "diloco"
batch_size = 4
seq_len = 64
log_every = {H}
eval_every = {H}
checkpoint_every = {H}
[training.algorithm_config]
inner_steps = {H}
timeout_s = 6.0
"""


class Manifests:
    """Every checkpoint manifest each node wrote, collected while they run (only 3 are kept)."""

    def __init__(self, nodes: list[DaemonProcess]) -> None:
        self.nodes = nodes
        self.seen: dict[str, dict[int, str]] = {}

    def poll(self) -> None:
        for n in self.nodes:
            root = n.data_dir / "checkpoints"
            for path in root.glob("step-*/manifest.json") if root.exists() else ():
                try:
                    m = json.loads(path.read_text())
                except (OSError, ValueError):
                    continue  # being written or pruned
                self.seen.setdefault(n.data_dir.name, {})[m["step"]] = m["weights_sha256"]

    def steps(self, name: str) -> list[int]:
        return sorted(self.seen.get(name, {}))


def _step(d: DaemonProcess) -> int:
    for attempt in range(5):
        try:
            return d.api("/api/v1/training")["step"]
        except TimeoutError:
            if attempt == 4:
                raise
    return 0


def _val_losses(d: DaemonProcess) -> dict[int, float]:
    return {int(s): float(v) for s, v in re.findall(r"step (\d+)  validation loss ([0-9.]+)", d.log())}


def _joined_at(d: DaemonProcess) -> int | None:
    found = re.search(r"took the run's weights at step (\d+)", d.log())
    return int(found.group(1)) if found else None


def test_a_diloco_joiner_matches_the_members_phi_bit_for_bit_after_its_first_outer_step(tmp_path: Path) -> None:
    config = tmp_path / "diloco.toml"
    config.write_text(CONFIG)
    args = ["--config", str(config)]
    nodes = [DaemonProcess(tmp_path / "m0", args, train=True).start()]
    try:
        for i in (1, 2):
            nodes.append(DaemonProcess(tmp_path / f"m{i}", [*args, "--bootstrap", nodes[0].multiaddr],
                                       train=True).start())
        members = list(nodes)
        manifests = Manifests(nodes)
        sync_wait(lambda: all(_step(n) >= 2 * H for n in members), 180, "two outer steps on every member")
        joiner = DaemonProcess(tmp_path / "joiner", [*args, "--bootstrap", nodes[0].multiaddr], train=True).start()
        nodes.append(joiner)

        def joiner_done() -> bool:
            manifests.poll()
            start = _joined_at(joiner)
            return start is not None and any(s >= start + 3 * H for s in manifests.steps("joiner"))

        sync_wait(joiner_done, 240, "the joiner three outer steps past its join", interval_s=0.02)
        for n in nodes:
            n.signal(signal.SIGINT)
        for n in nodes:
            n.wait(60)
        manifests.poll()
    finally:
        for n in nodes:
            n.kill()

    start = _joined_at(joiner)
    assert start is not None and start % H == 0 and start >= 2 * H, joiner.log()[-3000:]
    first = start + H  # the joiner's first outer step
    theirs = {name: seen.get(first) for name, seen in manifests.seen.items() if name != "joiner"}
    assert manifests.seen["joiner"].get(first) is not None, manifests.seen
    assert set(theirs.values()) == {manifests.seen["joiner"][first]}, (first, manifests.seen)

    later = start + 2 * H
    val = {n.data_dir.name: _val_losses(n).get(later) for n in nodes}
    ref = [v for name, v in val.items() if name != "joiner" and v is not None]
    assert ref and val["joiner"] is not None, val
    assert abs(val["joiner"] - ref[0]) <= 0.01 * ref[0], val

    # The outer momentum came along too: at a step every node checkpointed, φ and the Nesterov
    # buffers of the joiner equal a member's.
    common = set(manifests.seen["joiner"]).intersection(*(manifests.seen[n.data_dir.name] for n in members))
    last = max(s for s in common if all((n.data_dir / "checkpoints" / f"step-{s:08d}").exists()
                                        for n in (joiner, members[0])))
    a, b = (torch.load(n.data_dir / "checkpoints" / f"step-{last:08d}" / "state.pt", weights_only=True)["strategy"]
            for n in (joiner, members[0]))
    assert all(torch.equal(a["slow"][k], b["slow"][k]) for k in b["slow"])
    momenta = [(a["outer"]["state"][i]["momentum_buffer"], b["outer"]["state"][i]["momentum_buffer"])
               for i in b["outer"]["state"]]
    assert momenta and all(torch.equal(x, y) for x, y in momenta)
