"""Human-readable output of the CLI (rich tables; ``--json`` gives the raw data)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress_bar import ProgressBar
from rich.table import Table

__all__ = ["print_ready", "print_status", "print_testnet", "print_downloads"]

console = Console(highlight=False)


def print_ready(info: dict[str, Any]) -> None:
    print("hyphae node ready", flush=True)
    print(f"  peer id  {info['peer_id']}")
    print(f"  api      {info['api_url']}  (dashboard: open it in a browser)")
    for addr in info["multiaddrs"]:
        print(f"  address  {addr}")
    print("  stop with Ctrl+C (state is saved)", flush=True)


def _short(peer_id: str) -> str:
    return peer_id if len(peer_id) <= 16 else f"{peer_id[:8]}…{peer_id[-6:]}"


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def print_downloads(downloads: list[dict[str, Any]]) -> None:
    """Long transfers in progress (checkpoint weights, experts, snapshots) as progress bars."""
    if not downloads:
        return
    table = Table(title="downloads", title_justify="left", show_edge=False)
    for col in ("what", "progress", "chunks", "from"):
        table.add_column(col)
    for d in downloads:
        total = d.get("total") or 1
        table.add_row(d["what"], ProgressBar(total=total, completed=d["done"], width=30),
                      f"{d['done']}/{d.get('total') or '?'}", f"{d['providers']} peer(s)")
    console.print(table)


def print_status(node: dict[str, Any], peers: list[dict[str, Any]], training: dict[str, Any] | None = None) -> None:
    facts = Table.grid(padding=(0, 2))
    facts.add_row("peer id", node["peer_id"])
    facts.add_row("version", f"{node['version']}   uptime {node['uptime_s']:.0f} s   network {node['network']}")
    facts.add_row("api", node["api_url"])
    for addr in node["addrs"]:
        facts.add_row("address", addr)
    facts.add_row("peers", f"{len(peers)} connected, {node['routing_table_size']} in the DHT routing table")
    reach = node.get("reachability", "unknown")
    relayed = node.get("relay_addrs") or []
    facts.add_row("reachability", reach + (f"   reachable through {len(relayed)} relay address(es)" if relayed else ""))
    admission = node.get("run_admission") or {}
    if admission.get("closed"):
        how = [w for w, on in (("secret", admission.get("secret")), ("allowlist", admission.get("allowlist"))) if on]
        facts.add_row("run", f"closed ({' + '.join(how)})")
    console.print(facts)
    if training:
        t = Table(title="training", title_justify="left", show_edge=False)
        for col in ("state", "algorithm", "step", "loss", "val loss", "tokens/s", "restarts"):
            t.add_column(col)
        t.add_row(training["state"], f"{training['algorithm']} · {training['preset']}", str(training["step"]),
                  _fmt(training["loss"]), _fmt(training["val_loss"]), _fmt(training["tokens_per_s"], 0),
                  str(training["worker_restarts"]))
        console.print(t)
    if peers:
        table = Table(title="peers", title_justify="left", show_edge=False)
        for col in ("peer", "conn", "dir", "RTT ms", "agent", "found by", "up s"):
            table.add_column(col, justify="right" if col in ("RTT ms", "up s") else "left")
        for p in peers:
            table.add_row(_short(p["peer_id"]), p["connection"], p["direction"], _fmt(p["rtt_ms"], 2),
                          p["agent"] or "(hello pending)", ",".join(p["sources"]), f"{p['connected_s']:.0f}")
        console.print(table)


def print_testnet(rows: list[dict[str, Any]]) -> None:
    table = Table(show_edge=False)
    for col in ("node", "pid", "state", "peers", "peer id", "api"):
        table.add_column(col)
    for r in rows:
        table.add_row(str(r["index"]), str(r["pid"]), "up" if r.get("alive") else "down",
                      "-" if r.get("peers") is None else str(r["peers"]), _short(r.get("peer_id") or "?"),
                      r.get("api_url") or "-")
    console.print(table)
