"""``run_scenario``: set a scenario up, run it, clean everything up, write the report.

Cleanup is an ExitStack: whatever the scenario did or however it failed, every daemon it
started is stopped and joined, the link emulator's thread is joined, and the iptables chains are
removed. An unexpected error becomes the report's ``error`` (the report is still written), so a
CI log always has the events and checks that led up to it.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import tempfile
import threading
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

from ._cluster import Cluster, Placement, ScenarioError, require_tools
from ._engine import Run, ScenarioOptions, training_toml, write_corpus
from ._library import churn, partition, scale, wan
from ._netfilter import Firewall
from ._nfqueue import Delayer, LinkShape
from ._report import Report

__all__ = ["run_scenario", "SCENARIOS", "Scenario"]

log = logging.getLogger(__name__)

GIDS_PER_RUN = 100


@dataclass(frozen=True)
class Scenario:
    script: Callable[[Run], None]
    needs_root: bool
    firewall: bool
    link_emulator: bool
    about: str
    placement: Callable[[ExitStack, ScenarioOptions], Placement] | None = None
    """Builds where the nodes run (namespaces) and registers its teardown; None: loopback."""
    tools: tuple[str, ...] = ()
    """System tools it runs (checked before anything starts: :class:`MissingTool`)."""


SCENARIOS: dict[str, Scenario] = {
    "churn": Scenario(churn, False, False, False, "kill and add 30% of the trainers during training"),
    "partition": Scenario(partition, True, True, False, "split the testnet in two with iptables on lo, then heal",
                          tools=("iptables",)),
    "wan": Scenario(wan, True, True, True, "40 ms + 1% loss, then 100 ms + 3%, on every link (NFQUEUE)",
                    tools=("iptables",)),
    "scale": Scenario(scale, False, False, False, "N nodes: mesh, run state, progress, API latency, RSS, CPU"),
}


def _register_nat() -> None:
    try:
        from ._nat import nat, nat_placement
    except ImportError:  # the network-namespace harness (deploy/netns) is not there yet
        return
    SCENARIOS["nat"] = Scenario(nat, True, False, False, "two NATs and a relay in network namespaces",
                                placement=nat_placement, tools=("ip", "iptables", "tc", "sysctl"))


_register_nat()


def _stop_on_sigterm(cleanup: ExitStack) -> None:
    """Make SIGTERM unwind the scenario like Ctrl+C (KeyboardInterrupt), so its cleanup runs:
    by default SIGTERM ends Python at once and leaves the daemons, rules and namespaces behind.
    Only the main thread can install handlers; elsewhere the caller's handling stands."""
    if threading.current_thread() is not threading.main_thread():
        return

    def interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    cleanup.callback(signal.signal, signal.SIGTERM, previous)


def run_settings(options: ScenarioOptions) -> dict[str, object]:
    return {**asdict(options), "cpus": os.cpu_count()}


def _start_delayer(pid: int) -> Delayer:
    for attempt in range(20):
        queue = 7000 + (pid + attempt) % 1000
        try:
            return Delayer(queue, LinkShape(), seed=pid).start()
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise ScenarioError(f"cannot bind NFQUEUE {queue}: {exc}; is this root?") from None
    raise ScenarioError("NFQUEUE 7000-7999 are all in use; stop other scenario runs")


def run_scenario(name: str, *, root: Path | None = None, options: ScenarioOptions | None = None,
                 json_path: Path | None = None) -> Report:
    """Run scenario ``name``; return its report (also written to ``root/report.json`` and ``json_path``).

    Raises:
        MissingTool: a system tool it needs is not installed (nothing started).
        ScenarioError: unknown scenario, or it needs root and this is not root (nothing started).
    """
    if name not in SCENARIOS:
        raise ScenarioError(f"unknown scenario {name!r}; choose one of {', '.join(sorted(SCENARIOS))}")
    scenario = SCENARIOS[name]
    require_tools(scenario.tools)
    is_root = os.geteuid() == 0
    if scenario.needs_root and not is_root:
        raise ScenarioError(f"scenario {name} needs root (iptables / network namespaces); run it with sudo")
    options = options or ScenarioOptions()
    root = Path(root).expanduser().resolve() if root else Path(tempfile.mkdtemp(prefix=f"hyphae-{name}-"))
    root.mkdir(parents=True, exist_ok=True)
    config = root / "training.toml"
    config.write_text(training_toml(options, write_corpus(root / "corpus.txt")))
    pid = os.getpid()
    gid_base = 1_000_000 + (pid % 100_000) * GIDS_PER_RUN if is_root else None
    env = {"OMP_NUM_THREADS": str(options.torch_threads), "MKL_NUM_THREADS": str(options.torch_threads)}
    report = Report(name, topology="netns" if scenario.placement else "loopback",
                    settings={"dir": str(root), **run_settings(options)})
    cluster: Cluster | None = None
    with ExitStack() as cleanup:
        _stop_on_sigterm(cleanup)
        try:
            placement = scenario.placement(cleanup, options) if scenario.placement else None
            cluster = Cluster(root, config, gid_base=None if placement else gid_base, env=env, placement=placement)
            run = Run(report, cluster, options)
            if scenario.firewall:
                run.firewall = cleanup.enter_context(Firewall(str(pid), (gid_base, gid_base + GIDS_PER_RUN - 1)))
            if scenario.link_emulator:
                run.delayer = _start_delayer(pid)
                cleanup.callback(run.delayer.close)
                run.firewall.shape(run.delayer.queue)
            cleanup.callback(cluster.close)  # LIFO: the daemons stop before the rules and namespaces go
            scenario.script(run)
        except Exception as exc:  # noqa: BLE001 - any failure must still produce the report
            log.exception("scenario %s failed", name)
            report.error = f"{type(exc).__name__}: {exc}"
        finally:
            if cluster is not None:
                report.nodes = cluster.describe()
                report.measurements["api"] = {"calls": cluster.api_calls, "failures": cluster.api_failures,
                                              "slowest_answer_s": round(cluster.api_latency_max_s, 3)}
    report.write(root / "report.json")
    if json_path is not None:
        report.write(Path(json_path))
    return report
