"""``hyphae run ...``: look at and change the replicated run state through the local daemon.

    hyphae run show [--json] [--data-dir DIR | --api URL]
    hyphae run config set KEY=VALUE [KEY=VALUE ...] [--data-dir DIR | --api URL]

VALUEs that parse as JSON are JSON (``lr=3e-4``, ``warmup=true``, ``layers=[1,2]``); anything
else is a string (``algorithm=diloco``). Only the daemon that owns the run may set config.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from hyphae.node.client import ApiClient
from hyphae.node.config import default_data_dir, load_config
from hyphae.node.run_admission import write_allowlist
from hyphae.node.runstate_service import parse_config_pairs, run_config_set, run_show

__all__ = ["add_run_parser", "run_command"]


def _add_target(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", type=Path, default=None,
                   help=f"node data directory (default: $HYPHAE_DATA_DIR or {default_data_dir()})")
    p.add_argument("--api", metavar="URL", help="talk to this API URL instead of the data dir's daemon")


def add_run_parser(top: argparse._SubParsersAction) -> None:
    """Add ``run show`` and ``run config set`` to the top-level subparsers."""
    run = top.add_parser("run", help="the replicated run state (members, config, progress)")
    actions = run.add_subparsers(dest="action", required=True)
    show = actions.add_parser("show", help="what the run looks like from this node")
    _add_target(show)
    show.add_argument("--json", action="store_true", help="machine-readable output")
    config = actions.add_parser("config", help="the run config").add_subparsers(dest="config_action", required=True)
    set_ = config.add_parser("set", help="set config keys (run owner only)")
    set_.add_argument("pairs", nargs="+", metavar="KEY=VALUE")
    _add_target(set_)
    allow = actions.add_parser("allowlist", help="sign a list of the peers admitted to a closed run "
                                                 "(this node becomes the run's creator and owner)")
    allow.add_argument("peers", nargs="*", metavar="PEER_ID", help="admitted peer ids (this node is always in)")
    allow.add_argument("--run", required=True, metavar="NAME", help="the run the list is for")
    allow.add_argument("--out", required=True, type=Path, metavar="FILE", help="where to write the list")
    allow.add_argument("--data-dir", type=Path, default=None, help="whose key signs (default: this node's)")


def _client(args: argparse.Namespace) -> ApiClient:
    data_dir = args.data_dir or load_config(flags={}).data_dir
    if args.api:
        return ApiClient.for_url(args.api, data_dir)
    return ApiClient.for_data_dir(data_dir)


def run_command(args: argparse.Namespace) -> int:
    """Run ``hyphae run ...``; HyphaeErrors propagate to ``main`` (it prints them)."""
    if args.action == "allowlist":
        creator = write_allowlist(args.data_dir or load_config(flags={}).data_dir, args.run, args.peers, args.out)
        print(f"wrote {args.out}: {len(set(args.peers) | {creator})} peer(s) admitted to run {args.run!r}, "
              f"signed by {creator}; give it to every member (--run-allowlist {args.out})")
        return 0
    client = _client(args)
    if args.action == "show":
        view = run_show(client)
        if args.json:
            print(json.dumps(view, indent=2, sort_keys=True))
        else:
            print_run(view)
        return 0
    values = parse_config_pairs(args.pairs)
    result = run_config_set(client, values)
    for key in sorted(values):
        print(f"{key} = {json.dumps(result['config'].get(key))}")
    return 0


def table(rows: list[list[str]], header: list[str]) -> str:
    """Plain aligned columns."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip() for r in [header, *rows])


def _short(peer_id: str | None) -> str:
    if not peer_id:
        return "-"
    return peer_id if len(peer_id) <= 16 else f"{peer_id[:8]}…{peer_id[-6:]}"


def print_run(view: dict[str, Any]) -> None:
    counts = view["counts"]
    owner = view["owner"]
    mark = " (this node)" if view.get("is_owner") else ""
    pinned = ", pinned" if view.get("owner_pinned") else ""
    print(f"run       {view['run']}")
    print(f"owner     {owner or 'not known yet'}{mark}{pinned}")
    print(f"members   {counts['live']} live, {counts['suspect']} suspect, {counts['gone']} gone")
    print(f"state     {counts['streams']} streams, {counts['envelopes']} envelopes, "
          f"{counts['log_bytes']} bytes; {counts['rejected']} rejected writes")
    if view["config"]:
        print("\nconfig")
        print(table([[k, json.dumps(v)] for k, v in view["config"].items()], ["KEY", "VALUE"]))
    if view["members"]:
        print("\nmembers")
        rows = []
        for m in view["members"]:
            progress = view["progress"].get(m["peer_id"], {})
            step = progress.get("step", "-")
            age = "-" if m.get("age_s") is None else f"{m['age_s']:.0f}"
            me = "*" if m["peer_id"] == view["self"] else ""
            rows.append([_short(m["peer_id"]) + me, m["status"], age, ",".join(m.get("roles", [])),
                         str(step), m.get("version", "-")])
        print(table(rows, ["PEER", "STATUS", "AGE s", "ROLES", "STEP", "VERSION"]))
    if view["experts"]:
        owners: dict[str, int] = {}
        for peer in view["experts"].values():
            owners[peer] = owners.get(peer, 0) + 1
        print("\nexperts   " + ", ".join(f"{_short(p)}: {n}" for p, n in sorted(owners.items())))
    if view["checkpoints"]:
        print("\ncheckpoints")
        print(table([[c["id"], str(c["step"]), c["hash"][:16], str(len(c["providers"]))]
                     for c in view["checkpoints"][:10]], ["ID", "STEP", "HASH", "PROVIDERS"]))
