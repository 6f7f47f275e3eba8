"""Impairment of the links into a testnet's "internet": tc netem, or an NFQUEUE emulator without it.

Every host on the internet (public hosts' ``eth0``, routers' ``wan0``) is one link into the
bridge. :class:`Netem` says what each link does to each direction of traffic, so a packet
between two of them crosses two links (delay and loss twice, as with two real access lines).

* **netem** where the kernel has ``sch_netem``: a ``tc qdisc … netem`` on both ends of each link
  (the host's device and the bridge port), each delaying what it sends.
* **NFQUEUE** where it does not (``tc`` answers "Specified qdisc kind is unknown", as on the CI
  machines): in each host's namespace, iptables *mangle* rules send what leaves through the
  link (POSTROUTING, queue 0) and what comes in through it (PREROUTING, queue 1) to a queue,
  and the pure-Python link emulator of ``node/scenarios/_nfqueue.py`` (the one the ``wan``
  scenario uses on loopback) holds, drops and paces them, one process per namespace. The mangle
  table matters: an ACCEPT verdict there only ends that table, so a router's filter rules (drop
  unsolicited inbound) still apply; on a router the rules see forwarded and NATed traffic too
  (mangle runs before NAT's POSTROUTING and after conntrack). ``--queue-bypass`` lets packets
  through while no emulator is bound. Jitter needs netem.

:class:`LinkImpairment` picks the mechanism once (by trying netem on the first link), applies a
:class:`Netem`, changes it on the fly, and removes it. Its processes run inside the testnet's
namespaces, so :meth:`harness.Testnet.down` stops them with everything else.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Netem", "LinkImpairment", "netem_commands", "nfqueue_rules", "EMULATOR"]

EMULATOR = Path(__file__).resolve().parents[2] / "node" / "scenarios" / "_nfqueue.py"
EGRESS_QUEUE, INGRESS_QUEUE = 0, 1
READY_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Netem:
    """Impairment of every link into the internet bridge, applied in both directions."""

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss_pct: float = 0.0
    rate_mbit: float = 0.0
    """0: no rate limit."""

    def __post_init__(self) -> None:
        for name in ("delay_ms", "jitter_ms", "loss_pct", "rate_mbit"):
            if getattr(self, name) < 0:
                raise ValueError(f"netem {name} must be >= 0, got {getattr(self, name)}")
        if self.loss_pct >= 100:
            raise ValueError(f"netem loss_pct must be < 100, got {self.loss_pct}")

    def args(self) -> list[str]:
        out: list[str] = []
        if self.delay_ms > 0:
            out += ["delay", f"{self.delay_ms}ms"] + ([f"{self.jitter_ms}ms"] if self.jitter_ms > 0 else [])
        if self.loss_pct > 0:
            out += ["loss", f"{self.loss_pct}%"]
        if self.rate_mbit > 0:
            out += ["rate", f"{self.rate_mbit}mbit"]
        return out

    def shape(self) -> dict[str, float]:
        """The emulator's ``LinkShape`` fields (raises ValueError for what only netem can do)."""
        if self.jitter_ms > 0:
            raise ValueError("jitter needs tc netem, which this kernel does not have; set jitter_ms=0")
        return {"delay_ms": self.delay_ms, "loss": self.loss_pct / 100.0, "rate_mbit": self.rate_mbit}


def netem_commands(links: list[tuple[str, str]], netem: Netem) -> list[list[str]]:
    """``tc`` commands that put ``netem`` on each ``(namespace, device)``."""
    return [["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "netem", *netem.args()]
            for ns, dev in links]


def nfqueue_rules(ns: str, dev: str, *, action: str = "-A") -> list[list[str]]:
    """iptables rules sending ``dev``'s traffic in ``ns`` to the emulator's two queues."""
    ipt = ["ip", "netns", "exec", ns, "iptables", "-w", "-t", "mangle", action]
    tail = ["-j", "NFQUEUE", "--queue-bypass", "--queue-num"]
    return [ipt + ["POSTROUTING", "-o", dev] + tail + [str(EGRESS_QUEUE)],
            ipt + ["PREROUTING", "-i", dev] + tail + [str(INGRESS_QUEUE)]]


def _run(cmd: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"link command failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr.strip()}")
    return done


class LinkImpairment:
    """The impairment of one testnet's internet links (see the module docstring).

    Args:
        net: the :class:`harness.Testnet` (its ``hosts``, ``ns()`` and ``popen()`` are used).
        mode: ``"netem"``, ``"nfqueue"``, or None to try netem first and fall back.
    """

    def __init__(self, net: Any, mode: str | None = None) -> None:
        if mode not in (None, "netem", "nfqueue"):
            raise ValueError(f"mode must be 'netem', 'nfqueue' or None, got {mode!r}")
        self.net = net
        self.mode = mode
        self.netem: Netem | None = None
        self._emulators: dict[str, subprocess.Popen[str]] = {}

    def host_links(self) -> list[tuple[str, str, str]]:
        """``(host, namespace, device)`` of each host on the internet."""
        return [(h.name, h.ns, "eth0" if h.role == "public" else "wan0")
                for h in self.net.hosts.values() if h.role in ("public", "router")]

    def bridge_links(self) -> list[tuple[str, str]]:
        """``(namespace, device)`` of both ends of each link (netem delays what each end sends)."""
        inet = self.net.ns("inet")
        return [(ns, dev) for _, ns, dev in self.host_links()] + [(inet, f"p-{h}") for h, _, _ in self.host_links()]

    def apply(self, netem: Netem | None) -> None:
        """Impair every link by ``netem`` (None or all zero: no impairment)."""
        if netem is None or not netem.args():
            self.clear()
            return
        if self.mode is None:
            self.mode = "netem" if self._netem_works() else "nfqueue"
        if self.mode == "netem":
            self.clear()
            for cmd in netem_commands(self.bridge_links(), netem):
                _run(cmd)
        elif self._emulators:
            self._reshape(netem)
        else:
            self._start_emulators(netem)
        self.netem = netem

    def clear(self) -> None:
        """Remove the impairment (qdiscs, or the emulators and their rules). Idempotent."""
        if self.mode == "netem":
            for ns, dev in self.bridge_links():
                _run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root"], check=False)
        for host, proc in list(self._emulators.items()):
            _, ns, dev = next(link for link in self.host_links() if link[0] == host)
            for cmd in nfqueue_rules(ns, dev, action="-D"):
                _run(cmd, check=False)
            _stop(proc)
            del self._emulators[host]
        self.netem = None

    def _netem_works(self) -> bool:
        """Try netem on the first link; False when the kernel has no sch_netem."""
        ns, dev = self.bridge_links()[0]
        base = ["ip", "netns", "exec", ns, "tc", "qdisc"]
        done = _run(base + ["add", "dev", dev, "root", "netem", "delay", "1ms"], check=False)
        if done.returncode == 0:
            _run(base + ["del", "dev", dev, "root"], check=False)
            return True
        if "unknown" in done.stderr.lower() or "no such file" in done.stderr.lower():
            return False
        raise RuntimeError(f"tc netem failed for another reason than a missing qdisc: {done.stderr.strip()}")

    def _start_emulators(self, netem: Netem) -> None:
        shape = netem.shape()
        if not EMULATOR.exists():
            raise RuntimeError(f"no netem and no link emulator at {EMULATOR} (a source checkout is needed)")
        for i, (host, ns, dev) in enumerate(self.host_links()):
            argv = [sys.executable, str(EMULATOR), "--queue", str(EGRESS_QUEUE), "--queue", str(INGRESS_QUEUE),
                    "--delay-ms", str(shape["delay_ms"]), "--loss", str(shape["loss"]),
                    "--rate-mbit", str(shape["rate_mbit"]), "--seed", str(100 * i)]
            # A kept testnet (the CLI's `up`) outlives this process: its emulators run until
            # `down` kills what is in the namespaces. Otherwise they also end with our stdin pipe.
            # Detached from our stdin, stderr and session too: a caller waiting for our output
            # (`harness.py up` run by a script) must not wait for them as well.
            follow = not getattr(self.net, "keep", False)
            detached = {} if follow else {"stderr": subprocess.DEVNULL, "start_new_session": True}
            proc = self.net.popen(host, argv + (["--stdin"] if follow else []),
                                  stdin=subprocess.PIPE if follow else subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, text=True, bufsize=1, **detached)
            self._emulators[host] = proc
            _await_ready(proc, host)
            for cmd in nfqueue_rules(ns, dev):
                _run(cmd)

    def _reshape(self, netem: Netem) -> None:
        line = json.dumps(netem.shape()) + "\n"
        for host, proc in self._emulators.items():
            if proc.stdin is None:
                raise RuntimeError("the emulators of a kept testnet cannot be reshaped; take it down and up")
            try:
                proc.stdin.write(line)
                proc.stdin.flush()
            except OSError as exc:
                raise RuntimeError(f"the link emulator of {host} is gone: {exc}") from exc


def _await_ready(proc: subprocess.Popen[str], host: str) -> None:
    """Wait for the emulator's ``ready`` line (its queues are bound), or fail with its story."""
    ready, _, _ = select.select([proc.stdout], [], [], READY_TIMEOUT_S)
    line = proc.stdout.readline() if ready else ""
    if line.strip() != "ready":
        _stop(proc)
        raise RuntimeError(f"the link emulator in {host} did not start (exit {proc.poll()}): {line.strip()!r}")


def _stop(proc: subprocess.Popen[str]) -> None:
    """EOF on stdin: the emulator releases what it holds and exits; killed if it does not."""
    try:
        if proc.stdin is not None:
            proc.stdin.close()
        else:
            proc.terminate()
        proc.wait(5)
    except (OSError, subprocess.TimeoutExpired):
        proc.kill()
        proc.wait(5)
