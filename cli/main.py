"""The ``hyphae`` command. It only parses arguments, calls :mod:`hyphae.node`, and prints.

    hyphae node join [--bootstrap ADDR]... [--config FILE] [--data-dir DIR] ...
    hyphae node status [--json]         hyphae node leave
    hyphae keygen [--force]
    hyphae testnet up --nodes N --dir DIR | status --dir DIR | down --dir DIR
    hyphae testnet scenario NAME [--dir DIR] [--nodes N] [--json PATH]
    hyphae export --hf OUT [--data-dir DIR | --checkpoint DIR] [--tokenizer FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from hyphae.node.client import ApiClient
from hyphae.node.config import ConfigError, HyphaeError, NodeConfig, default_data_dir, load_config
from hyphae.node.foreground import run_foreground
from hyphae.node.keys import keygen
from hyphae.node.testnet import testnet_down, testnet_status, testnet_up
from hyphae.node.version import __version__

from .export_cmd import add_export_parser, export_command
from .render import print_downloads, print_ready, print_status, print_testnet
from .run_cmd import add_run_parser, run_command

__all__ = ["main", "build_parser"]


def _add_data_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", type=Path, default=None,
                   help=f"node data directory (default: $HYPHAE_DATA_DIR or {default_data_dir()})")


def _join_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("join", help="start the daemon in the foreground and join the network",
                       description="Start the daemon. With no arguments it trains the tiny model on the "
                                   "built-in corpus on this machine; Ctrl+C stops it cleanly.")
    p.add_argument("--config", type=Path, help="TOML config file (flags and env override it)")
    _add_data_dir(p)
    p.add_argument("--listen", action="append", metavar="MULTIADDR",
                   help="libp2p listen address, repeatable (default /ip4/0.0.0.0/tcp/4101)")
    p.add_argument("--bootstrap", action="append", metavar="MULTIADDR",
                   help="peer to join through, ending in /p2p/<peer id>; repeatable")
    p.add_argument("--network", metavar="NAME", help="network name (default hyphae)")
    p.add_argument("--api", metavar="HOST:PORT", help="local HTTP API (default 127.0.0.1:7700; port 0 picks one)")
    p.add_argument("--run", metavar="NAME", help="join (or create) this run (default: default)")
    p.add_argument("--run-owner", metavar="PEER_ID", help="pin the run owner (only it may change the run config)")
    p.add_argument("--run-secret-file", type=Path, metavar="FILE",
                   help="close the run: only peers that prove they know this secret are talked to "
                        "(or set HYPHAE_RUN_SECRET)")
    p.add_argument("--run-allowlist", type=Path, metavar="FILE",
                   help="close the run to the peers in this signed list (make it with `hyphae run allowlist`)")
    p.add_argument("--no-mdns", action="store_true", help="do not look for peers on the LAN by mDNS")
    p.add_argument("--no-train", action="store_true",
                   help="network-only member (bootstrap, relay, DHT) for machines that should not train")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-json", action="store_true", help="structured JSON log lines")
    t = p.add_argument_group("training")
    t.add_argument("--preset", help="model preset (default tiny)")
    t.add_argument("--algorithm", help="ddp | diloco | … (default diloco)")
    t.add_argument("--max-steps", type=int, help="stop cleanly after N local steps")
    t.add_argument("--data", type=Path, help="text file/dir or .bin shards (default: Python stdlib sources)")
    t.add_argument("--seed", type=int, help="base seed")
    t.add_argument("--threads", type=int, help="torch CPU threads (0 = one per core; 1 for testnets)")
    t.add_argument("--workers", type=int, metavar="N",
                   help="N training workers on this node, one member of the run (CPU workers without --gpus)")
    t.add_argument("--gpus", metavar="LIST", help="train on these GPUs, one worker each: all or e.g. 0,1")
    t.add_argument("--model", type=Path, metavar="DIR",
                   help="local Hugging Face model dir (config.json + *.safetensors); replaces --preset")
    t.add_argument("--tokenizer", type=Path, metavar="PATH", help="tokenizer.json (default: the model's, else bytes)")
    t.add_argument("--text-field", metavar="NAME", help="text field of .jsonl/.parquet records (default text)")
    t.add_argument("--batch-size", type=int, help="sequences per micro-batch (default 8)")
    t.add_argument("--seq-len", type=int, help="tokens per sequence (default 128)")
    t.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    t.add_argument("--precision", choices=["auto", "fp32", "bf16"], help="compute precision (default auto)")
    t.add_argument("--activation-checkpointing", action="store_true", default=None,
                   help="recompute activations in backward (less memory)")
    t.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hyphae", description="Train one neural network together, peer to peer.")
    parser.add_argument("--version", action="version", version=f"hyphae {__version__}")
    top = parser.add_subparsers(dest="command", required=True)

    node = top.add_parser("node", help="run and inspect this machine's daemon").add_subparsers(dest="action", required=True)
    _join_parser(node)
    status = node.add_parser("status", help="what the running daemon is doing")
    _add_data_dir(status)
    status.add_argument("--api", metavar="URL", help="talk to this API URL instead of the data dir's daemon")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    leave = node.add_parser("leave", help="stop the running daemon cleanly")
    _add_data_dir(leave)
    leave.add_argument("--api", metavar="URL")

    kg = top.add_parser("keygen", help="create this node's identity key")
    _add_data_dir(kg)
    kg.add_argument("--force", action="store_true", help="replace an existing key (changes the peer id)")

    tn = top.add_parser("testnet", help="local testnets of N daemons on loopback").add_subparsers(dest="action", required=True)
    up = tn.add_parser("up", help="start N daemons; return when all see each other")
    up.add_argument("--nodes", type=int, required=True)
    up.add_argument("--dir", type=Path, required=True)
    up.add_argument("--train", action="store_true", help="let the nodes train (default: network only)")
    up.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the mesh")
    up.add_argument("--json", action="store_true")
    sc = tn.add_parser("scenario", help="run a scripted scenario (churn, partition, wan, nat, scale) and check invariants")
    sc.add_argument("name", metavar="NAME", help="churn, partition, wan, nat or scale (deploy/README.md)")
    sc.add_argument("--dir", type=Path, help="where the nodes' data dirs and logs go (default: a new temp dir)")
    sc.add_argument("--nodes", type=int, default=4, help="training nodes, besides the bootstrap (default 4)")
    sc.add_argument("--no-train", action="store_true", help="network-only nodes (for scale)")
    sc.add_argument("--json", type=Path, metavar="PATH", help="also write the report here")
    for name in ("status", "down"):
        sp = tn.add_parser(name, help=f"{name} the testnet in DIR")
        sp.add_argument("--dir", type=Path, required=True)
        if name == "status":
            sp.add_argument("--json", action="store_true")
    add_run_parser(top)
    add_export_parser(top)
    return parser


def _join_flags(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "data_dir": args.data_dir,
        "api": args.api,
        "log_level": args.log_level,
        "log_json": True if args.log_json else None,
        "train": False if args.no_train else None,
        "net.listen": args.listen,
        "net.bootstrap": args.bootstrap,
        "net.mdns": False if args.no_mdns else None,
        "net.name": args.network,
        "run": args.run,
        "run_owner": args.run_owner,
        "run_secret_file": args.run_secret_file,
        "run_allowlist": args.run_allowlist,
        "training.preset": args.preset,
        "training.algorithm": args.algorithm,
        "training.max_steps": args.max_steps,
        "training.data": args.data,
        "training.seed": args.seed,
        "training.threads": args.threads,
        "training.workers": args.workers,
        "training.gpus": args.gpus,
        "training.model": args.model,
        "training.tokenizer": args.tokenizer,
        "training.text_field": args.text_field,
        "training.batch_size": args.batch_size,
        "training.seq_len": args.seq_len,
        "training.grad_accum": args.grad_accum,
        "training.precision": args.precision,
        "training.activation_checkpointing": args.activation_checkpointing,
        "training.compile": args.compile,
    }


def _client(args: argparse.Namespace) -> ApiClient:
    data_dir = args.data_dir or load_config(flags={}).data_dir
    if args.api:
        return ApiClient.for_url(args.api, data_dir)
    return ApiClient.for_data_dir(data_dir)


def _run(args: argparse.Namespace) -> int:
    if args.command == "node" and args.action == "join":
        config: NodeConfig = load_config(file=args.config, flags=_join_flags(args))
        return run_foreground(config, on_ready=print_ready)
    if args.command == "node" and args.action == "status":
        client = _client(args)
        node, peers, training = client.node(), client.peers(), client.training()
        downloads = client.get("/api/v1/dashboard").get("downloads", [])
        if args.json:
            print(json.dumps({"node": node, "peers": peers, "training": training, "downloads": downloads}, indent=2))
        else:
            print_status(node, peers, training)
            print_downloads(downloads)
        return 0
    if args.command == "node" and args.action == "leave":
        stopped = _client(args).leave()
        print("stopped" if stopped else "asked to stop; still shutting down")
        return 0 if stopped else 1
    if args.command == "keygen":
        data_dir = args.data_dir or load_config(flags={}).data_dir
        peer_id, path = keygen(data_dir, force=args.force)
        print(f"peer id {peer_id}\nkey     {path}")
        return 0
    if args.command == "testnet":
        return _testnet(args)
    if args.command == "run":
        return run_command(args)
    if args.command == "export":
        return export_command(args)
    raise AssertionError(f"unhandled command {args.command}")  # argparse guarantees a command


def _testnet(args: argparse.Namespace) -> int:
    if args.action == "scenario":
        from hyphae.node.scenarios import ScenarioOptions, run_scenario  # not loaded for every command

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
        options = ScenarioOptions(nodes=args.nodes, train=not args.no_train)
        report = run_scenario(args.name, root=args.dir, options=options, json_path=args.json).to_json()
        for check in report["checks"]:
            print(f"{'PASS' if check['passed'] else 'FAIL'}  {check['name']:<45} {check['waited_s']:7.1f} s")
        verdict = "passed" if report["passed"] else "FAILED"
        print(f"scenario {args.name} {verdict} in {report['duration_s']:.0f} s; report: {report['settings']['dir']}/report.json")
        if report["error"]:
            print(f"error: {report['error']}")
        return 0 if report["passed"] else 1
    if args.action == "up":
        result = testnet_up(args.dir, args.nodes, train=args.train, timeout_s=args.timeout)
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print(f"{args.nodes} nodes up in {result['dir']}; all see each other after {result['seconds_to_mesh']} s")
            print_testnet([{**n, "alive": True, "peers": args.nodes - 1} for n in result["nodes"]])
        return 0
    if args.action == "status":
        rows = testnet_status(args.dir)
        print(json.dumps(rows, indent=2) if args.json else "", end="" if not args.json else "\n")
        if not args.json:
            print_testnet(rows)
        return 0
    stopped = testnet_down(args.dir)
    print(f"stopped {len(stopped)} node(s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(signal, "SIGPIPE") and (args.command, getattr(args, "action", "")) != ("node", "join"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `hyphae node status | head` ends quietly
    try:
        return _run(args)
    except HyphaeError as exc:
        print(f"hyphae: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
