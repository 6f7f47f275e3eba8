#!/opt/hyphae/bin/python
"""Container entrypoint: optional network setup as root, then ``hyphae node join`` as a user.

The image runs as the unprivileged user ``hyphae``; then this script only finds the bootstrap
and execs the daemon. Compose files that need the network shaped (a node behind a NAT router, a
WAN link with netem, the router itself) start the container as root with ``NET_ADMIN``; the
script does that setup and then drops to ``HYPHAE_RUN_AS`` before the daemon starts, so the
daemon never runs as root.

Environment (all optional):

    HYPHAE_PUBLISH_PEER_ID=FILE    write this node's peer id to FILE (the bootstrap does this, so
                                   others can build its /p2p/ address without a fixed key)
    HYPHAE_BOOTSTRAP_PEER_FILE=F   wait for F (up to 120 s), then bootstrap from
    HYPHAE_BOOTSTRAP_HOST=NAME       /ip4/<NAME resolved>/tcp/<PORT>/p2p/<peer id in F>
    HYPHAE_BOOTSTRAP_PORT=4101
    HYPHAE_GATEWAY=IP              replace the default route (a node behind a NAT router)
    HYPHAE_NETEM="delay 80ms ..."  ``tc qdisc replace dev IFACE root netem ...`` on every
                                   interface but lo (a WAN link); HYPHAE_NETEM_DEV picks one
    HYPHAE_ROUTER_MASQUERADE=CIDR  router mode: forward, MASQUERADE CIDR out of every other
                                   interface, then sleep until stopped (no daemon)
    HYPHAE_ROUTER_RANDOM=1         ... with --random-fully (a symmetric-like NAT)
    HYPHAE_RUN_AS=hyphae           the user the daemon runs as when started as root

Arguments are passed to ``hyphae node join``.
"""

from __future__ import annotations

import ipaddress
import os
import pwd
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

WAIT_BOOTSTRAP_S = 120.0


def log(message: str) -> None:
    print(f"hyphae-entrypoint: {message}", file=sys.stderr, flush=True)


def sh(*cmd: str) -> None:
    log("+ " + " ".join(cmd))
    subprocess.run(cmd, check=True)


def interfaces() -> list[str]:
    """Network interfaces other than loopback, in a stable order."""
    return sorted(name for name in os.listdir("/sys/class/net") if name != "lo")


def interface_of(address: str) -> str:
    """The interface whose subnet holds ``address`` (``ip -o -4 addr`` lists CIDRs)."""
    out = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, check=True).stdout
    target = ipaddress.ip_address(address)
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[2] == "inet" and target in ipaddress.ip_interface(fields[3]).network:
            return fields[1]
    raise SystemExit(f"hyphae-entrypoint: no interface is on the subnet of {address}; check the compose networks")


def netem_commands(spec: str, devices: list[str]) -> list[list[str]]:
    """``tc`` commands that put ``netem SPEC`` on each device (replace: idempotent on restart)."""
    words = spec.split()
    if not words:
        return []
    return [["tc", "qdisc", "replace", "dev", dev, "root", "netem", *words] for dev in devices]


def masquerade_commands(cidr: str, devices: list[str], *, random_ports: bool = False) -> list[list[str]]:
    """iptables commands that NAT ``cidr`` out of each of ``devices`` (a home router).

    ``random_ports`` adds ``--random-fully``: every new mapping gets a random source port, so
    the public port a peer sees differs per destination, as behind a symmetric NAT.
    """
    ipaddress.ip_network(cidr)  # a typo fails here, with the value in the message
    extra = ["--random-fully"] if random_ports else []
    return [["iptables", "-t", "nat", "-A", "POSTROUTING", "-s", cidr, "-o", dev, "-j", "MASQUERADE", *extra]
            for dev in devices]


def bootstrap_addr(peer_file: Path, host: str, port: int, wait_s: float = WAIT_BOOTSTRAP_S) -> str:
    """Wait for the bootstrap's published peer id and resolve its host: its full multiaddr."""
    deadline = time.monotonic() + wait_s
    while True:
        peer_id = peer_file.read_text().strip() if peer_file.exists() else ""
        if peer_id:
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"hyphae-entrypoint: {peer_file} did not appear within {wait_s:.0f} s; "
                             "is the bootstrap service up and sharing the volume?")
        time.sleep(0.5)
    ip = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    return f"/ip4/{ip}/tcp/{port}/p2p/{peer_id}"


def publish_peer_id(target: Path) -> None:
    """Write this node's peer id (creating the identity key now if needed) to ``target``."""
    from hyphae.protocol.identity import load_or_create_identity

    data_dir = Path(os.environ.get("HYPHAE_DATA_DIR", "/data"))
    data_dir.mkdir(parents=True, exist_ok=True)
    peer_id = load_or_create_identity(data_dir / "identity.key").peer_id
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    tmp.write_text(peer_id + "\n")
    tmp.replace(target)
    log(f"published peer id {peer_id} to {target}")


def router(cidr: str, random_ports: bool) -> None:
    """Forward and MASQUERADE ``cidr``; then idle until SIGTERM (compose stop)."""
    try:
        Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
    except OSError:  # read-only /proc/sys: compose sets it with `sysctls:` instead
        pass
    inside = interface_of(str(ipaddress.ip_network(cidr).network_address + 1))
    for cmd in masquerade_commands(cidr, [d for d in interfaces() if d != inside], random_ports=random_ports):
        sh(*cmd)
    log(f"routing {cidr} (inside {inside}) with MASQUERADE")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        signal.pause()


def drop_privileges(user: str) -> None:
    entry = pwd.getpwnam(user)
    os.setgroups([])
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    os.environ["HOME"] = entry.pw_dir


def main(argv: list[str]) -> None:
    env = os.environ
    if env.get("HYPHAE_ROUTER_MASQUERADE"):
        router(env["HYPHAE_ROUTER_MASQUERADE"], env.get("HYPHAE_ROUTER_RANDOM", "") == "1")
    is_root = os.geteuid() == 0
    if env.get("HYPHAE_GATEWAY") or env.get("HYPHAE_NETEM"):
        if not is_root:
            raise SystemExit("hyphae-entrypoint: HYPHAE_GATEWAY/HYPHAE_NETEM need the container started as "
                             "root with cap_add NET_ADMIN (compose: user: root); the daemon still drops to "
                             "HYPHAE_RUN_AS")
        if env.get("HYPHAE_GATEWAY"):
            sh("ip", "route", "replace", "default", "via", env["HYPHAE_GATEWAY"])
        devices = [env["HYPHAE_NETEM_DEV"]] if env.get("HYPHAE_NETEM_DEV") else interfaces()
        for cmd in netem_commands(env.get("HYPHAE_NETEM", ""), devices):
            sh(*cmd)
    if is_root and env.get("HYPHAE_RUN_AS"):
        data_dir = Path(env.get("HYPHAE_DATA_DIR", "/data"))
        entry = pwd.getpwnam(env["HYPHAE_RUN_AS"])
        for path in (data_dir, Path("/shared")):
            if path.exists():
                os.chown(path, entry.pw_uid, entry.pw_gid)
        drop_privileges(env["HYPHAE_RUN_AS"])
    if env.get("HYPHAE_PUBLISH_PEER_ID"):
        publish_peer_id(Path(env["HYPHAE_PUBLISH_PEER_ID"]))
    if env.get("HYPHAE_BOOTSTRAP_PEER_FILE") and not env.get("HYPHAE_BOOTSTRAP"):
        env["HYPHAE_BOOTSTRAP"] = bootstrap_addr(Path(env["HYPHAE_BOOTSTRAP_PEER_FILE"]),
                                                 env.get("HYPHAE_BOOTSTRAP_HOST", "bootstrap"),
                                                 int(env.get("HYPHAE_BOOTSTRAP_PORT", "4101")))
        log(f"bootstrap {env['HYPHAE_BOOTSTRAP']}")
    os.execvp("hyphae", ["hyphae", "node", "join", *argv])


if __name__ == "__main__":
    main(sys.argv[1:])
