"""Scripted testnet scenarios: churn, partition, wan, nat, scale (``hyphae testnet scenario``).

A scenario starts a topology of real daemons (loopback processes, or network namespaces for
``nat``), runs a tiny training run on it, injects events on a schedule (kill, restart and add
nodes; partition and heal; change link delay and loss) and checks invariants between them: the
run state converges, training progresses on live members, checkpoints verify and restarts
resume at or after the last one, restarted and new nodes catch up. The result is a JSON report
of timestamped events and checks with what was measured.
"""

from ._cluster import MissingTool, ScenarioError
from ._engine import ScenarioOptions
from ._report import Report
from ._runner import SCENARIOS, run_scenario

__all__ = ["run_scenario", "SCENARIOS", "ScenarioOptions", "ScenarioError", "MissingTool", "Report"]
