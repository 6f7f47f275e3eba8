"""Control-plane benchmark: dial latency, small RPC round trip vs plain asyncio TCP, DHT put/get
with 3 and 8 nodes, and join-to-visible time of a real daemon.

    python bench/control_plane.py --json bench/results/control_plane.json

Peers run as separate processes (bench/_peer.py: a hyphae Host with an echo protocol plus a
plain asyncio TCP echo server with the same framing); the measuring side is a Host in this
process, used exactly as the daemon uses it (asyncio facade over the libp2p thread). The TCP
baseline is measured in the same run against the same peer process, and the ratio reported.

Targets (issue: foundation): dial < 20 ms on loopback; RPC round trip within 6x of plain
asyncio TCP; DHT get median under 10 ms with 8 nodes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from hyphae.protocol.config import HostConfig
from hyphae.protocol.host import Host, open_host
from hyphae.protocol.identity import Identity
from hyphae.protocol.testing import wait_for
from hyphae.protocol.wire import encode_frame

PEER_SCRIPT = Path(__file__).with_name("_peer.py")
ECHO = "/hyphae/echo/1"
LOOPBACK = ("/ip4/127.0.0.1/tcp/0",)


def stats_ms(samples_s: list[float]) -> dict[str, float]:
    ordered = sorted(samples_s)
    return {
        "median_ms": round(statistics.median(ordered) * 1e3, 3),
        "p90_ms": round(ordered[int(0.9 * (len(ordered) - 1))] * 1e3, 3),
        "p99_ms": round(ordered[int(0.99 * (len(ordered) - 1))] * 1e3, 3),
        "n": len(ordered),
    }


class PeerProcs:
    """bench/_peer.py subprocesses, killed on exit."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def spawn(self, bootstrap: list[str] | None = None) -> dict[str, Any]:
        cmd = [sys.executable, str(PEER_SCRIPT)]
        for addr in bootstrap or []:
            cmd += ["--bootstrap", addr]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.procs.append(proc)
        return json.loads(proc.stdout.readline())

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()
        for proc in self.procs:
            proc.wait()


def host_config(bootstrap: tuple[str, ...] = ()) -> HostConfig:
    return HostConfig(listen=LOOPBACK, mdns=False, bootstrap=bootstrap)


async def ready_ids(host: Host) -> set[str]:
    return {p.peer_id for p in await host.peers() if p.agent}


async def bench_dial(peer: dict[str, Any], rounds: int) -> dict[str, Any]:
    """A fresh host per round dials the peer: connect() until the Noise + yamux session is up.

    (Reconnecting one host after disconnect() is not a clean measure: the work a new connection
    starts — identify, hello, ping, DHT — may redial the peer on its own.)"""
    samples = []
    for _ in range(rounds):
        async with open_host(Identity.generate(), host_config(), agent="bench") as host:
            start = time.perf_counter()
            await host.connect(peer["addr"])
            samples.append(time.perf_counter() - start)
    return stats_ms(samples)


async def bench_rpc(peer: dict[str, Any], rounds: int, warmup: int) -> dict[str, Any]:
    message = {"op": "echo", "seq": 1, "payload": b"x" * 32}
    frame = encode_frame(message)
    reader, writer = await asyncio.open_connection("127.0.0.1", peer["tcp_port"])
    tcp = []
    for i in range(warmup + rounds):
        start = time.perf_counter()
        writer.write(frame)
        await writer.drain()
        header = await reader.readexactly(4)
        await reader.readexactly(int.from_bytes(header, "big"))
        if i >= warmup:
            tcp.append(time.perf_counter() - start)
    writer.close()
    ours = []
    async with open_host(Identity.generate(), host_config(), agent="bench") as host:
        await host.connect(peer["addr"])
        for i in range(warmup + rounds):
            start = time.perf_counter()
            await host.request(peer["peer_id"], ECHO, message)
            if i >= warmup:
                ours.append(time.perf_counter() - start)
    tcp_s, ours_s = stats_ms(tcp), stats_ms(ours)
    return {"libp2p": ours_s, "asyncio_tcp": tcp_s,
            "ratio_median": round(ours_s["median_ms"] / tcp_s["median_ms"], 2),
            "ratio_p99": round(ours_s["p99_ms"] / tcp_s["p99_ms"], 2)}


async def bench_dht(procs: PeerProcs, nodes: int, keys: int) -> dict[str, Any]:
    """``nodes`` DHT nodes: one writer and one late reader in this process, the rest subprocesses.

    The reader joins after every put, so each get is a network lookup (a node that already
    holds a value answers it locally without any message)."""
    async with AsyncExitStack() as stack:
        writer = await stack.enter_async_context(open_host(Identity.generate(), host_config(), agent="bench-w"))
        others = [procs.spawn([writer.addrs[0]]) for _ in range(nodes - 2)]
        want = {o["peer_id"] for o in others}
        await wait_for(lambda: _sees(writer, want), 30, "the DHT nodes to join")
        puts = []
        for i in range(keys):
            start = time.perf_counter()
            await writer.dht_put(f"/hyphae/bench/{nodes}/{i}", os.urandom(64))
            puts.append(time.perf_counter() - start)
        reader = await stack.enter_async_context(
            open_host(Identity.generate(), host_config((others[0]["addr"],)), agent="bench-r"))
        await wait_for(lambda: _sees(reader, want | {writer.peer_id}), 30, "the reader to meet everyone")
        gets, misses = [], 0
        for i in range(keys):
            start = time.perf_counter()
            value = await reader.dht_get(f"/hyphae/bench/{nodes}/{i}")
            gets.append(time.perf_counter() - start)
            misses += value is None
        return {"nodes": nodes, "put": stats_ms(puts), "get": stats_ms(gets), "get_misses": misses}


async def _sees(host: Host, ids: set[str]) -> bool:
    return ids <= await ready_ids(host)


async def bench_join(peer: dict[str, Any], rounds: int) -> dict[str, Any]:
    """A real ``hyphae node join`` process, bootstrapped from a running host: spawn -> visible."""
    spawn_to_visible, ready_to_visible = [], []
    async with open_host(Identity.generate(), host_config(), agent="bench-observer") as observer:
        for i in range(rounds):
            with tempfile.TemporaryDirectory() as tmp:
                cmd = [sys.executable, "-m", "hyphae.cli", "node", "join", "--data-dir", tmp, "--no-train",
                       "--no-mdns", "--listen", LOOPBACK[0], "--api", "127.0.0.1:0", "--bootstrap", observer.addrs[0]]
                start = time.time()
                proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                try:
                    node_json = Path(tmp) / "node.json"
                    await wait_for(node_json.exists, 30, "node.json")
                    ready_at = node_json.stat().st_mtime
                    peer_id = json.loads(node_json.read_text())["peer_id"]
                    await wait_for(lambda: _sees(observer, {peer_id}), 10, "the joiner to be visible")
                    seen_at = time.time()
                finally:
                    proc.terminate()
                    proc.wait(10)
                spawn_to_visible.append(seen_at - start)
                ready_to_visible.append(max(seen_at - ready_at, 0.0))
    return {"spawn_to_visible": stats_ms(spawn_to_visible), "ready_to_visible": stats_ms(ready_to_visible)}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    procs = PeerProcs()
    try:
        peer = procs.spawn()
        result = {
            "bench": "control_plane",
            "device": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
            "params": vars(args),
            "dial": await bench_dial(peer, args.dials),
            "rpc": await bench_rpc(peer, args.rpc_rounds, args.warmup),
            "dht": [await bench_dht(procs, n, args.dht_keys) for n in (3, 8)],
            "join": await bench_join(peer, args.joins),
        }
    finally:
        procs.close()
    dht8 = next(d for d in result["dht"] if d["nodes"] == 8)
    result["targets"] = {
        "dial_median_under_20ms": result["dial"]["median_ms"] < 20,
        "rpc_within_6x_of_tcp": result["rpc"]["ratio_median"] <= 6,
        "dht_get_median_under_10ms_8_nodes": dht8["get"]["median_ms"] < 10,
    }
    return result


def summary(r: dict[str, Any]) -> str:
    rpc = r["rpc"]
    lines = [
        f"dial             median {r['dial']['median_ms']:.2f} ms  p90 {r['dial']['p90_ms']:.2f} ms",
        f"rpc round trip   libp2p {rpc['libp2p']['median_ms']:.3f} ms (p99 {rpc['libp2p']['p99_ms']:.3f})"
        f"  asyncio tcp {rpc['asyncio_tcp']['median_ms']:.3f} ms (p99 {rpc['asyncio_tcp']['p99_ms']:.3f})"
        f"  ratio {rpc['ratio_median']}x",
    ]
    for d in r["dht"]:
        lines.append(f"dht {d['nodes']} nodes      put median {d['put']['median_ms']:.2f} ms"
                     f"  get median {d['get']['median_ms']:.2f} ms (p90 {d['get']['p90_ms']:.2f}, misses {d['get_misses']})")
    j = r["join"]
    lines.append(f"join to visible  from spawn {j['spawn_to_visible']['median_ms']:.0f} ms,"
                 f" from ready {j['ready_to_visible']['median_ms']:.0f} ms")
    lines.append("targets          " + ", ".join(f"{k}={'PASS' if v else 'MISS'}" for k, v in r["targets"].items()))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=Path("bench/results/control_plane.json"))
    parser.add_argument("--dials", type=int, default=10)
    parser.add_argument("--rpc-rounds", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--dht-keys", type=int, default=30)
    parser.add_argument("--joins", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0, help="unused: the bench has no randomness that matters")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    for name in ("libp2p", "hyphae"):
        logging.getLogger(name).setLevel(logging.ERROR)
    result = asyncio.run(run(args))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2, default=str))
    print(summary(result))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
