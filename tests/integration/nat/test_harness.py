"""The network-namespace harness itself (root): impaired links, NAT filtering, cleanup, its CLI."""

from __future__ import annotations

import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import Netem, Segment, Testnet, Topology, namespaces_of

pytestmark = [pytest.mark.root, pytest.mark.tools("ip", "iptables", "tc", "sysctl"), pytest.mark.integration, pytest.mark.timeout(120)]

HARNESS = Path(__file__).resolve().parents[3] / "deploy" / "netns" / "harness.py"
ECHO = ("import socket\ns = socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        "s.bind(('0.0.0.0', 5000))\ns.listen()\nwhile True:\n    c, _ = s.accept()\n"
        "    while (d := c.recv(65536)):\n        c.sendall(d[:1])\n")


def _rtt_ms(net: Testnet, host: str, server: str, n: int = 15) -> float:
    sock = net.connect(host, (net.ip(server), 5000), timeout_s=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    times = []
    for _ in range(n):
        start = time.perf_counter()
        sock.sendall(b"x")
        sock.recv(1)
        times.append((time.perf_counter() - start) * 1000)
    sock.close()
    return statistics.median(times)


def test_each_internet_link_delays_both_ways_and_can_change_while_the_nat_still_drops_inbound() -> None:
    with Testnet(Topology(public_hosts=1, segments=(Segment("cone"),), netem=Netem(delay_ms=20))) as net:
        net.popen("p1", [sys.executable, "-c", ECHO])
        time.sleep(0.5)
        # a1 -> p1 crosses two links (the router's and p1's), each delaying each direction 20 ms
        assert 75 <= _rtt_ms(net, "a1", "p1") <= 140, net.links.mode
        net.set_netem(Netem(delay_ms=5))
        assert 18 <= _rtt_ms(net, "a1", "p1") <= 60
        net.set_netem(None)
        assert _rtt_ms(net, "a1", "p1") < 10
        net.set_netem(Netem(delay_ms=5))
        # The emulator's rules sit in the mangle table: the router's filter still drops what
        # nobody inside asked for (a verdict there would have let it through to a1).
        net.popen("a1", [sys.executable, "-c", ECHO])
        time.sleep(0.5)
        # p1 is given a route into the LAN, as if it were the ISP: the SYN reaches the router's
        # FORWARD chain, and only its DROP rule stands between it and a1.
        assert net.run("p1", ["ip", "route", "add", "10.1.0.0/24", "via", net.hosts["ra"].wan_ip]).returncode == 0
        with pytest.raises(OSError):
            net.connect("p1", (net.ip("a1"), 5000), timeout_s=1.5)


def test_a_testnet_of_a_killed_run_is_removed_by_the_next_one_and_kept_ones_stay() -> None:
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    dead, kept = f"hynat-{pid_max + 1}-beef", "hynat-kept-beef"
    for name in (f"{dead}-x1", f"{kept}-x1"):
        subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        with Testnet(Topology(public_hosts=1, segments=())) as net:
            assert namespaces_of(dead) == [] and namespaces_of(kept) == [f"{kept}-x1"]
            assert namespaces_of(net.prefix)
        assert namespaces_of(net.prefix) == []
    finally:
        for name in (f"{dead}-x1", f"{kept}-x1"):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


def test_the_cli_brings_one_up_lists_it_and_takes_it_down() -> None:
    def cli(*args: str) -> str:
        done = subprocess.run([sys.executable, str(HARNESS), *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    before = set(namespaces_of("hynat-kept"))
    prefix = None
    try:
        out = cli("up", "--public", "1", "--segments", "cone", "--delay-ms", "5")
        prefix = out.split('"prefix": "')[1].split('"')[0]
        assert prefix.startswith("hynat-kept-") and len(namespaces_of(prefix)) == 4  # inet, p1, ra, a1
        assert f"{prefix}  creator kept  a1 inet p1 ra" in cli("list")
        cli("down", prefix)
        assert namespaces_of(prefix) == [] and prefix not in cli("list")
    finally:  # ours, even if `up` failed before it said its name
        for name in set(namespaces_of("hynat-kept")) - before:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
