"""Network-namespace testnets: a public "internet", private LANs behind NAT routers, impaired links.

Why namespaces: there is no Docker engine on CI machines, and NAT traversal can only be proven
against real NATs. Every host here is a Linux network namespace joined by veth pairs; routers do
``iptables MASQUERADE`` like a home router::

      p1, p2 ... (public hosts, 198.51.100.10+)          198.51.100.0/24 = the "internet"
        |                                                (a bridge in the <prefix>-inet namespace)
      [ br0 ]-----------+---------------------+
                        |                     |
                  ra wan0 .101          rb wan0 .102     routers: MASQUERADE out of wan0, drop
                  ra lan0 10.1.0.1      rb lan0 10.2.0.1 unsolicited inbound (no RST: like most
                        |                     |           home routers), forward replies only
                  a1 10.1.0.10          b1 10.2.0.10

A segment of kind ``"cone"`` is plain MASQUERADE (Linux keeps the source port when it is free: a
port-preserving NAT that hole punching defeats); ``"symmetric"`` adds ``--random-fully`` (a new
random port for every mapping, so the port a peer observed is not the one the next connection
gets: hole punching fails, as it does behind real symmetric NATs). Addresses are RFC 5737
(198.51.100.0/24) and RFC 1918 (10.k.0.0/24), and they exist only inside the namespaces; the
root namespace gets no interface, route or rule, so nothing here can reach a real host.

Links into the internet can be impaired (delay, loss, rate: :class:`Netem`) by tc netem, or,
where the kernel has no netem, by an NFQUEUE link emulator in each namespace (``links.py``).

Ownership and cleanup: every namespace is named ``hynat-<pid>-<hex>-<host>`` — the creating
process id and a random tag — so a run only ever touches its own. :class:`Testnet` is a context
manager, registers an ``atexit`` hook, and turns SIGTERM into an exit while it is up (so a
terminated run unwinds through its cleanup too). What even that misses (SIGKILL) is removed by
the next :class:`Testnet` to start: it first deletes ``hynat-<pid>-…`` namespaces whose creating
process is gone (:func:`cleanup_stale`). A testnet the CLI leaves up is named
``hynat-kept-<hex>-…`` and stays until ``down`` (or ``cleanup --all``).

Talking to processes inside: :meth:`Testnet.popen` runs a command in a namespace
(``ip netns exec``), and :meth:`Testnet.connect` opens a TCP socket *from inside* a namespace
(a helper thread enters it with ``setns(2)``; the socket keeps its namespace when used from any
thread). Tests use that to reach a daemon's HTTP API bound to 127.0.0.1 inside its namespace,
without giving the root namespace any route into the testnet.

CLI (root)::

    python deploy/netns/harness.py plan [--segments cone,symmetric] [--delay-ms 50 --loss-pct 1]
    python deploy/netns/harness.py up   [same options]   # builds one, leaves it, prints its hosts
    python deploy/netns/harness.py list                  # our testnets: prefix, hosts, creator state
    python deploy/netns/harness.py down PREFIX           # removes one (kills what runs inside)
    python deploy/netns/harness.py cleanup [--all]       # removes stale ones (--all: every one of ours)

Then e.g. ``ip netns exec hynat-kept-1a2b-a1 python -m hyphae.cli node join --bootstrap …``.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if str(Path(__file__).resolve().parent) not in sys.path:  # loaded by path too (node/scenarios/_nat.py)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from links import LinkImpairment, Netem, netem_commands  # noqa: E402 — needs the path above

__all__ = ["Netem", "Segment", "Topology", "HostInfo", "Plan", "plan", "Testnet", "cleanup_stale",
           "namespaces_of", "PREFIX"]

PREFIX = "hynat"
INTERNET = "198.51.100"  # RFC 5737 TEST-NET-2: our "public internet", inside the namespaces only
_CLONE_NEWNET = 0x40000000
_SEGMENT_NAMES = "abcdefgh"


@dataclass(frozen=True)
class Segment:
    """A private LAN behind one NAT router."""

    kind: str = "cone"
    """``"cone"`` (MASQUERADE, port-preserving) or ``"symmetric"`` (MASQUERADE --random-fully)."""
    hosts: int = 1

    def __post_init__(self) -> None:
        if self.kind not in ("cone", "symmetric"):
            raise ValueError(f"segment kind must be 'cone' or 'symmetric', got {self.kind!r}")
        if not 1 <= self.hosts <= 50:
            raise ValueError(f"a segment holds 1-50 hosts, got {self.hosts}")


@dataclass(frozen=True)
class Topology:
    public_hosts: int = 2
    segments: tuple[Segment, ...] = (Segment("cone"), Segment("cone"), Segment("symmetric"))
    netem: Netem | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.public_hosts <= 80:
            raise ValueError(f"public_hosts must be 1-80, got {self.public_hosts}")
        if len(self.segments) > len(_SEGMENT_NAMES):
            raise ValueError(f"at most {len(_SEGMENT_NAMES)} private segments, got {len(self.segments)}")


@dataclass(frozen=True)
class HostInfo:
    name: str
    ns: str
    ip: str
    role: str
    """``"public"``, ``"private"``, ``"router"`` or ``"switch"``."""
    segment: str | None = None
    nat: str | None = None
    """The NAT kind in front of a private host."""
    wan_ip: str | None = None
    """A router's (and its private hosts') address on the internet."""


@dataclass
class Plan:
    prefix: str
    hosts: dict[str, HostInfo] = field(default_factory=dict)
    commands: list[list[str]] = field(default_factory=list)
    impair: list[list[str]] = field(default_factory=list)
    """The netem commands of the topology's link impairment (see links.py for the fallback)."""

    def shell(self) -> str:
        return "\n".join(["#!/bin/sh", "set -e"] + [shlex.join(c) for c in self.commands + self.impair]) + "\n"


def new_prefix(*, kept: bool = False) -> str:
    """Our creator's pid (or ``kept``: no creator to outlive) and a random tag."""
    return f"{PREFIX}-{'kept' if kept else os.getpid()}-{secrets.token_hex(2)}"


def plan(prefix: str, topology: Topology) -> Plan:
    """The commands that build ``topology`` under ``prefix`` (pure: runs nothing)."""
    p = Plan(prefix)
    ns = lambda name: f"{prefix}-{name}"  # noqa: E731
    inet = ns("inet")
    run = p.commands.append

    def add_ns(name: str) -> str:
        run(["ip", "netns", "add", ns(name)])
        run(["ip", "-n", ns(name), "link", "set", "lo", "up"])
        return ns(name)

    add_ns("inet")
    p.hosts["inet"] = HostInfo("inet", inet, "", "switch")
    run(["ip", "-n", inet, "link", "add", "br0", "type", "bridge"])
    run(["ip", "-n", inet, "link", "set", "br0", "up"])
    impaired: list[tuple[str, str]] = []  # (namespace, device) of every link into the bridge

    def attach(name: str, dev: str, ip: str) -> None:
        port = f"p-{name}"
        run(["ip", "-n", inet, "link", "add", port, "type", "veth", "peer", "name", dev, "netns", ns(name)])
        run(["ip", "-n", inet, "link", "set", port, "master", "br0", "up"])
        run(["ip", "-n", ns(name), "addr", "add", f"{ip}/24", "dev", dev])
        run(["ip", "-n", ns(name), "link", "set", dev, "up"])
        impaired.extend([(inet, port), (ns(name), dev)])

    for i in range(1, topology.public_hosts + 1):
        name, ip = f"p{i}", f"{INTERNET}.{9 + i}"
        add_ns(name)
        attach(name, "eth0", ip)
        p.hosts[name] = HostInfo(name, ns(name), ip, "public")
    for k, segment in enumerate(topology.segments, start=1):
        seg = _SEGMENT_NAMES[k - 1]
        router, wan_ip, lan = f"r{seg}", f"{INTERNET}.{100 + k}", f"10.{k}.0"
        add_ns(router)
        attach(router, "wan0", wan_ip)
        p.hosts[router] = HostInfo(router, ns(router), wan_ip, "router", seg, segment.kind, wan_ip)
        r = ns(router)
        run(["ip", "-n", r, "link", "add", "lan0", "type", "bridge"])
        run(["ip", "-n", r, "addr", "add", f"{lan}.1/24", "dev", "lan0"])
        run(["ip", "-n", r, "link", "set", "lan0", "up"])
        run(["ip", "netns", "exec", r, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
        masquerade = ["-j", "MASQUERADE"] + (["--random-fully"] if segment.kind == "symmetric" else [])
        ipt = ["ip", "netns", "exec", r, "iptables", "-w"]
        run(ipt + ["-t", "nat", "-A", "POSTROUTING", "-o", "wan0"] + masquerade)
        for chain in ("FORWARD", "INPUT"):  # only replies come in; the rest is dropped silently
            run(ipt + ["-A", chain, "-i", "wan0", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED",
                       "-j", "ACCEPT"])
            run(ipt + ["-A", chain, "-i", "wan0", "-j", "DROP"])
        for j in range(1, segment.hosts + 1):
            name, ip = f"{seg}{j}", f"{lan}.{9 + j}"
            add_ns(name)
            run(["ip", "-n", r, "link", "add", f"l-{name}", "type", "veth", "peer", "name", "eth0", "netns", ns(name)])
            run(["ip", "-n", r, "link", "set", f"l-{name}", "master", "lan0", "up"])
            run(["ip", "-n", ns(name), "addr", "add", f"{ip}/24", "dev", "eth0"])
            run(["ip", "-n", ns(name), "link", "set", "eth0", "up"])
            run(["ip", "-n", ns(name), "route", "add", "default", "via", f"{lan}.1"])
            p.hosts[name] = HostInfo(name, ns(name), ip, "private", seg, segment.kind, wan_ip)
    if topology.netem is not None and topology.netem.args():
        # Not run by Testnet.up (links.LinkImpairment falls back to an NFQUEUE emulator where the
        # kernel has no netem); listed for `plan`, whose script assumes netem.
        p.impair = netem_commands(impaired, topology.netem)
    return p


# ---- namespaces and their processes -------------------------------------------------------------

def namespaces_of(prefix: str) -> list[str]:
    """Namespaces whose name starts with ``prefix-`` (``ip netns list``)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [n for n in names if n.startswith(prefix + "-")]


def _kill_inside(namespace: str) -> None:
    """SIGKILL what still runs in one of our namespaces (our own processes, by pid)."""
    out = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True, check=False).stdout
    for pid in (int(p) for p in out.split() if p.isdigit()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def delete_namespaces(names: list[str]) -> None:
    for name in names:
        _kill_inside(name)
    for name in names:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def testnets() -> dict[str, list[str]]:
    """Our namespaces by testnet prefix (``hynat-<pid|kept>-<hex>``)."""
    out: dict[str, list[str]] = {}
    for name in namespaces_of(PREFIX):
        parts = name.split("-")
        if len(parts) > 3:
            out.setdefault("-".join(parts[:3]), []).append(name)
    return out


def _creator(prefix: str) -> str:
    """``"alive"``, ``"gone"`` (stale) or ``"kept"`` (left up by the CLI)."""
    tag = prefix.split("-")[1]
    if tag == "kept":
        return "kept"
    return "alive" if tag.isdigit() and _alive(int(tag)) else "gone"


def cleanup_stale(*, everything: bool = False) -> list[str]:
    """Remove testnets whose creator is gone (every one of ours, kept ones too, if ``everything``)."""
    stale = [n for prefix, names in testnets().items() if everything or _creator(prefix) == "gone" for n in names]
    delete_namespaces(stale)
    return stale


def _setns_thread(namespace: str, work: Any) -> Any:
    """Run ``work()`` in a short-lived thread that entered ``namespace`` (setns is per thread)."""
    box: dict[str, Any] = {}

    def body() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/var/run/netns/{namespace}", os.O_RDONLY)
            try:
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({namespace}): {os.strerror(err)}")
            finally:
                os.close(fd)
            box["result"] = work()
        except BaseException as exc:  # noqa: BLE001 — handed back to the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=body, name=f"setns-{namespace}", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


class Testnet:
    """A topology of namespaces, built on entry and always removed on exit.

    Args:
        topology: what to build.
        keep: leave it in place on exit (the CLI's ``up``); atexit cleanup is skipped too.
    """

    __test__ = False  # a name pytest would otherwise try to collect as a test class

    def __init__(self, topology: Topology | None = None, *, keep: bool = False, prefix: str | None = None) -> None:
        self.topology = topology or Topology()
        self.prefix = prefix or new_prefix(kept=keep)
        self.plan = plan(self.prefix, self.topology)
        self.hosts = self.plan.hosts
        self.keep = keep
        self._procs: list[subprocess.Popen[Any]] = []
        self._up = False
        self._sigterm: Any = None
        self.links = LinkImpairment(self)

    def __enter__(self) -> Testnet:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.keep:
            self.down()

    def up(self) -> None:
        """Build the topology (first removing stale testnets of killed runs); on failure, undo it."""
        cleanup_stale()
        if not self.keep:
            atexit.register(self.down)
            self._exit_on_sigterm()
        self._up = True
        try:
            for cmd in self.plan.commands:
                done = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    raise RuntimeError(f"testnet command failed ({done.returncode}): {shlex.join(cmd)}\n"
                                       f"{done.stderr.strip()}")
            self.links.apply(self.topology.netem)
        except BaseException:
            self.down()
            raise

    def down(self) -> None:
        """Stop what we started, kill what is left inside, delete the namespaces. Idempotent."""
        if not self._up:
            return
        self._up = False
        for proc in self._procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        for proc in self._procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
        delete_namespaces(namespaces_of(self.prefix))
        for proc in self._procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(2)
        with contextlib.suppress(Exception):
            atexit.unregister(self.down)
        if self._sigterm is not None:
            with contextlib.suppress(ValueError):  # not the main thread any more: leave it
                signal.signal(signal.SIGTERM, self._sigterm)
            self._sigterm = None

    def _exit_on_sigterm(self) -> None:
        """SIGTERM (a CI job cancelled, ``timeout``) would skip atexit: make it an exit, which
        unwinds through ``with Testnet`` and atexit. Only where nobody handles SIGTERM yet."""
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            self._sigterm = signal.SIG_DFL
            signal.signal(signal.SIGTERM, _sigterm_exit)

    # ---- using it ------------------------------------------------------------------------------

    def ns(self, host: str) -> str:
        return self.hosts[host].ns

    def ip(self, host: str) -> str:
        return self.hosts[host].ip

    def argv(self, host: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns(host), *argv]

    def run(self, host: str, argv: list[str], *, timeout_s: float = 30.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(host, argv), capture_output=True, text=True, timeout=timeout_s, check=False)

    def popen(self, host: str, argv: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside ``host``'s namespace; it is stopped by :meth:`down`."""
        proc = subprocess.Popen(self.argv(host, argv), **kwargs)
        self._procs.append(proc)
        return proc

    def connect(self, host: str, addr: tuple[str, int], timeout_s: float = 5.0) -> socket.socket:
        """A TCP socket connected to ``addr`` from inside ``host``'s namespace."""
        def work() -> socket.socket:
            sock = socket.create_connection(addr, timeout=timeout_s)
            return sock
        return _setns_thread(self.ns(host), work)

    def set_netem(self, netem: Netem | None) -> None:
        """Change (or remove) the impairment of every link into the internet, on the fly."""
        self.links.apply(netem)


def _sigterm_exit(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def _topology_from_args(args: argparse.Namespace) -> Topology:
    segments = tuple(Segment(kind, args.hosts_per_segment) for kind in args.segments.split(",") if kind)
    netem = Netem(args.delay_ms, 0.0, args.loss_pct, args.rate_mbit) if (args.delay_ms or args.loss_pct
                                                                           or args.rate_mbit) else None
    return Topology(args.public, segments, netem)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("plan", "up"):
        p = sub.add_parser(name)
        p.add_argument("--public", type=int, default=2)
        p.add_argument("--segments", default="cone,cone,symmetric", help="NAT kinds, comma-separated")
        p.add_argument("--hosts-per-segment", type=int, default=1)
        p.add_argument("--delay-ms", type=float, default=0.0)
        p.add_argument("--loss-pct", type=float, default=0.0)
        p.add_argument("--rate-mbit", type=float, default=0.0)
    sub.add_parser("list")
    down = sub.add_parser("down")
    down.add_argument("prefix", help="as `up` or `list` print it: hynat-<pid|kept>-<hex>")
    clean = sub.add_parser("cleanup")
    clean.add_argument("--all", action="store_true", help=f"every {PREFIX}-* namespace, not only stale ones")
    args = parser.parse_args(argv)
    if args.cmd == "plan":
        sys.stdout.write(plan(new_prefix(), _topology_from_args(args)).shell())
    elif args.cmd == "up":
        net = Testnet(_topology_from_args(args), keep=True)
        net.up()
        json.dump({"prefix": net.prefix, "hosts": {n: vars(h) for n, h in net.hosts.items()}}, sys.stdout, indent=1)
        sys.stdout.write("\n")
    elif args.cmd == "list":
        for prefix, names in sorted(testnets().items()):
            hosts = " ".join(n[len(prefix) + 1:] for n in sorted(names))
            sys.stdout.write(f"{prefix}  creator {_creator(prefix)}  {hosts}\n")
    elif args.cmd == "down":
        if args.prefix not in testnets():
            parser.error(f"no testnet {args.prefix!r}; `list` shows ours")
        delete_namespaces(namespaces_of(args.prefix))
    else:
        for name in cleanup_stale(everything=args.all):
            sys.stdout.write(f"removed {name}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
