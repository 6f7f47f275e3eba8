"""Human-readable output of the CLI (plain aligned text; ``--json`` gives the raw data)."""

from __future__ import annotations

from typing import Any

__all__ = ["print_ready", "print_status", "print_testnet", "table"]


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)


def print_ready(info: dict[str, Any]) -> None:
    print("hyphae node ready", flush=True)
    print(f"  peer id  {info['peer_id']}")
    print(f"  api      {info['api_url']}")
    for addr in info["multiaddrs"]:
        print(f"  address  {addr}")
    print("  stop with Ctrl+C (state is saved)", flush=True)


def _short(peer_id: str) -> str:
    return peer_id if len(peer_id) <= 16 else f"{peer_id[:8]}…{peer_id[-6:]}"


def print_status(node: dict[str, Any], peers: list[dict[str, Any]]) -> None:
    print(f"peer id   {node['peer_id']}")
    print(f"version   {node['version']}   uptime {node['uptime_s']:.0f} s   network {node['network']}")
    print(f"api       {node['api_url']}")
    for addr in node["addrs"]:
        print(f"address   {addr}")
    print(f"peers     {len(peers)} connected, {node['routing_table_size']} in the DHT routing table")
    if peers:
        rows = [[_short(p["peer_id"]), p["connection"], p["direction"],
                 "-" if p["rtt_ms"] is None else f"{p['rtt_ms']:.2f}", p["agent"] or "(hello pending)",
                 ",".join(p["sources"]), f"{p['connected_s']:.0f}"] for p in peers]
        print(table(rows, ["PEER", "CONN", "DIR", "RTT ms", "AGENT", "FOUND BY", "UP s"]))


def print_testnet(rows: list[dict[str, Any]]) -> None:
    body = [[str(r["index"]), str(r["pid"]), "up" if r.get("alive") else "down",
             "-" if r.get("peers") is None else str(r["peers"]), _short(r.get("peer_id") or "?"),
             r.get("api_url") or "-"] for r in rows]
    print(table(body, ["NODE", "PID", "STATE", "PEERS", "PEER ID", "API"]))
