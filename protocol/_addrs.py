"""Addresses a node can advertise: listen addresses with wildcards replaced by real interfaces.

py-libp2p advertises ``/ip4/0.0.0.0/tcp/N`` verbatim, which no peer can dial. We expand the
wildcard into the machine's own IPv4 addresses (Linux: SIOCGIFADDR per interface), the way
go-libp2p does, and drop what is never dialable by others.
"""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct

import multiaddr

__all__ = ["interface_ipv4s", "expand_wildcards", "is_dialable"]

_SIOCGIFADDR = 0x8915


def interface_ipv4s() -> list[str]:
    """IPv4 addresses of the local interfaces that are up (loopback included)."""
    found: list[str] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue  # interface without an IPv4 address
            found.append(socket.inet_ntoa(packed[20:24]))
    return found or ["127.0.0.1"]


def expand_wildcards(addrs: list[multiaddr.Multiaddr]) -> list[multiaddr.Multiaddr]:
    out: list[multiaddr.Multiaddr] = []
    ips: list[str] | None = None
    for addr in addrs:
        text = str(addr)
        if text.startswith("/ip4/0.0.0.0/"):
            ips = ips if ips is not None else interface_ipv4s()
            rest = text[len("/ip4/0.0.0.0"):]
            out += [multiaddr.Multiaddr(f"/ip4/{ip}{rest}") for ip in ips]
        else:
            out.append(addr)
    return list(dict.fromkeys(out))


def is_dialable(addr: str) -> bool:
    """False for wildcard and multicast addresses that no peer can dial."""
    parts = addr.split("/")
    if len(parts) > 2 and parts[1] in ("ip4", "ip6"):
        try:
            ip = ipaddress.ip_address(parts[2])
        except ValueError:
            return False
        return not (ip.is_unspecified or ip.is_multicast)
    return True
