"""Muxer benchmark: small-RPC round trip and bulk throughput over libp2p (Noise + yamux) streams,
py-libp2p's Yamux vs hyphae's LeanYamux, against plain asyncio TCP with the same framing.

    python bench/muxer.py --json bench/results/muxer.json      # ~45 s on 2 busy cores

Each variant is a pair of processes on loopback (a server and a client, both sides using the same
muxer; this process only orchestrates), started once and kept for the whole run:

* ``stock``: py-libp2p 0.8.1's ``Yamux`` (with ``PY_YAMUX_RELEASE_ON_READ=0``, as the project runs it);
* ``lean``: ``hyphae.protocol._yamux.LeanYamux`` with its direct Noise I/O;
* ``lean-session-io``: LeanYamux reading and writing through py-libp2p's Noise session instead
  (what the direct Noise I/O buys);
* ``tcp``: plain asyncio TCP, 4-byte length + msgpack, the baseline, always measured in the same run.

A round is, per variant in turn: ``--warmup`` untimed round trips, then ``--messages`` timed ones
(one small msgpack message echoed back; ``TrioFramedStream.request`` on the libp2p side), then
``--bulk-mib`` MiB written one way on a fresh stream in 1 MiB writes and FIN, timed until the
server's byte count comes back. CPU per message is ``time.process_time()`` over the timed run
divided by the message count, in each process (the server reports its own). ``--rounds`` rounds
interleave the variants so they share the machine's (noisy, shared) load; every number reported
is the median over rounds, and the ratios to TCP are taken round by round before the median.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from collections.abc import Awaitable, Callable
from typing import Any

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import IHost, INetStream
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux

from hyphae.protocol import _yamux
from hyphae.protocol.stream import TrioFramedStream
from hyphae.protocol.wire import HEADER_BYTES, decode_body, encode_frame, parse_header

ECHO = TProtocol("/hyphae/bench/echo/1")
SINK = TProtocol("/hyphae/bench/sink/1")
VARIANTS = ("stock", "lean", "lean-session-io", "tcp")
MIB = 1 << 20


# ---- the two processes -------------------------------------------------------------------------


def build_host(variant: str) -> IHost:
    """A host as the project builds it (Noise only, one connection per peer) with the variant's muxer."""
    if variant == "lean-session-io":
        _yamux.open_chunk_io = functools.partial(_yamux.open_chunk_io, direct=False)  # type: ignore[assignment]
    muxer = Yamux if variant == "stock" else _yamux.LeanYamux
    keypair = create_new_key_pair()
    noise = NoiseTransport(keypair, noise_privkey=create_x25519_key_pair().private_key)
    host = new_host(key_pair=keypair, sec_opt={TProtocol(NOISE_PROTOCOL_ID): noise},
                    muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): muxer},
                    listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")],
                    connection_config=ConnectionConfig(max_connections_per_peer=1))
    if muxer is not Yamux:
        _yamux.honor_muxer_opt(host)
    return host


def reply_to(message: Any) -> Any:
    """The echo, except ``{"op": "cpu"}``, answered with this process's CPU seconds."""
    if isinstance(message, dict) and message.get("op") == "cpu":
        return {"cpu_s": time.process_time()}
    return message


async def serve_libp2p(variant: str) -> None:
    host = build_host(variant)

    async def echo(stream: INetStream) -> None:
        framed = TrioFramedStream(stream)
        try:
            while True:
                await framed.send(reply_to(await framed.recv()))
        except Exception:  # noqa: BLE001 -- the client hung up; the bench goes on
            pass
        await framed.close()

    async def sink(stream: INetStream) -> None:
        total = 0
        try:
            while True:
                total += len(await stream.read(MIB))
        except Exception:  # noqa: BLE001 -- EOF ends the transfer
            pass
        await stream.write(total.to_bytes(8, "big"))
        await stream.close()

    async with host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        host.set_stream_handler(ECHO, echo)
        host.set_stream_handler(SINK, sink)
        addr = str(host.get_addrs()[0])
        print(json.dumps({"addr": addr, "peer_id": str(host.get_id())}), flush=True)
        await trio.sleep_forever()


async def serve_tcp() -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                length = parse_header(await reader.readexactly(HEADER_BYTES), 1 << 20)
                writer.write(encode_frame(reply_to(decode_body(await reader.readexactly(length)))))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    print(json.dumps({"port": server.sockets[0].getsockname()[1]}), flush=True)
    await asyncio.Event().wait()


def summarize(rtts_s: list[float], client_cpu_s: float, server_cpu_s: float) -> dict[str, float]:
    ordered, n = sorted(rtts_s), len(rtts_s)
    return {
        "rtt_median_us": statistics.median(ordered) * 1e6,
        "rtt_p90_us": ordered[int(0.90 * (n - 1))] * 1e6,
        "rtt_p99_us": ordered[int(0.99 * (n - 1))] * 1e6,
        "cpu_client_us_per_msg": client_cpu_s / n * 1e6,
        "cpu_server_us_per_msg": server_cpu_s / n * 1e6,
    }


async def echo_round(request: Callable[[Any], Awaitable[Any]], args: argparse.Namespace) -> dict[str, float]:
    """Warm up, then time ``args.messages`` round trips; CPU from both processes."""
    message = {"op": "echo", "data": b"x" * args.message_bytes}
    for _ in range(args.warmup):
        await request(message)
    server_cpu0 = (await request({"op": "cpu"}))["cpu_s"]
    rtts, cpu0 = [], time.process_time()
    for _ in range(args.messages):
        start = time.perf_counter()
        await request(message)
        rtts.append(time.perf_counter() - start)
    client_cpu = time.process_time() - cpu0
    server_cpu = (await request({"op": "cpu"}))["cpu_s"] - server_cpu0
    return summarize(rtts, client_cpu, server_cpu)


async def client_libp2p(variant: str, server: dict[str, Any], args: argparse.Namespace) -> None:
    """Connect once, then run one echo (and bulk) round per "go" line on stdin."""
    host = build_host(variant)
    peer = ID.from_base58(server["peer_id"])
    stdin = trio.wrap_file(sys.stdin)
    async with host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        await host.connect(PeerInfo(peer, [multiaddr.Multiaddr(server["addr"])]))
        framed = TrioFramedStream(await host.new_stream(peer, [ECHO]))
        print(json.dumps({"ready": True}), flush=True)
        while (await stdin.readline()).strip() == "go":
            result = await echo_round(framed.request, args)
            if args.bulk_mib:
                result.update(await bulk_libp2p(host, peer, args.bulk_mib))
            print(json.dumps(result), flush=True)
        await framed.close()


async def bulk_libp2p(host: IHost, peer: ID, mib: int) -> dict[str, float]:
    """``mib`` MiB one way on a fresh stream, timed until the server's byte count is back."""
    chunk = bytes(MIB)
    stream = await host.new_stream(peer, [SINK])
    await stream.write(chunk[:1024])  # the stream is open and negotiated before timing
    start, cpu0 = time.perf_counter(), time.process_time()
    for _ in range(mib):
        await stream.write(chunk)
    await stream.close()
    received = b""
    while len(received) < 8:
        received += await stream.read(8 - len(received))
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu0
    total = int.from_bytes(received, "big")
    if total != mib * MIB + 1024:
        raise RuntimeError(f"bulk transfer: server counted {total} bytes, sent {mib * MIB + 1024}")
    return {"bulk_mb_per_s": mib * MIB / elapsed / 1e6, "bulk_cpu_client_s_per_gb": cpu / (mib * MIB / 1e9)}


async def client_tcp(server: dict[str, Any], args: argparse.Namespace) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server["port"])

    async def request(msg: Any) -> Any:
        writer.write(encode_frame(msg))
        await writer.drain()
        length = parse_header(await reader.readexactly(HEADER_BYTES), 1 << 20)
        return decode_body(await reader.readexactly(length))

    loop = asyncio.get_running_loop()
    print(json.dumps({"ready": True}), flush=True)
    while (await loop.run_in_executor(None, sys.stdin.readline)).strip() == "go":
        print(json.dumps(await echo_round(request, args)), flush=True)
    writer.close()


# ---- orchestration ---------------------------------------------------------------------------------


class Pair:
    """A server and a client process of one variant, alive for the whole run."""

    def __init__(self, variant: str, args: argparse.Namespace) -> None:
        env = dict(os.environ, PY_YAMUX_RELEASE_ON_READ="0")
        base = [sys.executable, __file__, "--variant", variant, "--messages", str(args.messages),
                "--warmup", str(args.warmup), "--message-bytes", str(args.message_bytes),
                "--bulk-mib", str(args.bulk_mib)]
        self.variant = variant
        self.server = subprocess.Popen(base + ["--role", "server"], stdout=subprocess.PIPE, text=True, env=env)
        info = self.server.stdout.readline()  # type: ignore[union-attr]
        if not info:
            raise RuntimeError(f"{variant} server exited before listening")
        self.client = subprocess.Popen(base + ["--role", "client", "--server", info.strip()], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True, env=env)
        self._line()

    def _line(self) -> dict[str, Any]:
        line = self.client.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise RuntimeError(f"{self.variant} client exited (see its stderr above)")
        return json.loads(line)

    def round(self) -> dict[str, Any]:
        self.client.stdin.write("go\n")  # type: ignore[union-attr]
        self.client.stdin.flush()  # type: ignore[union-attr]
        return self._line()

    def close(self) -> None:
        for proc in (self.client, self.server):
            proc.kill()
            proc.wait()


def aggregate(rounds: list[dict[str, float]]) -> dict[str, float]:
    """Median over rounds of every metric."""
    return {key: round(statistics.median(r[key] for r in rounds), 2) for key in rounds[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=Path("bench/results/muxer.json"))
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds over the variants")
    parser.add_argument("--messages", type=int, default=2000, help="timed round trips per round")
    parser.add_argument("--warmup", type=int, default=200, help="untimed round trips before each round")
    parser.add_argument("--message-bytes", type=int, default=64)
    parser.add_argument("--bulk-mib", type=int, default=64, help="one-way bulk transfer per round (0: none)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--role", choices=("server", "client"), help=argparse.SUPPRESS)
    parser.add_argument("--server", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.role == "server":
        asyncio.run(serve_tcp()) if args.variant == "tcp" else trio.run(serve_libp2p, args.variant)
        return
    if args.role == "client":
        server = json.loads(args.server)
        if args.variant == "tcp":
            asyncio.run(client_tcp(server, args))
        else:
            trio.run(client_libp2p, args.variant, server, args)
        return

    variants = [v for v in args.variants.split(",") if v and v != "tcp"] + ["tcp"]  # baseline always
    loadavg = os.getloadavg()
    pairs = [Pair(v, args) for v in variants]
    per_round: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    try:
        for _ in range(args.rounds):
            for pair in pairs:
                per_round[pair.variant].append(pair.round())
    finally:
        for pair in pairs:
            pair.close()

    results: dict[str, dict[str, float]] = {}
    for variant in variants:
        result = aggregate(per_round[variant])
        if variant != "tcp":  # ratios taken round by round (same load), then the median
            pairs_ = list(zip(per_round[variant], per_round["tcp"]))
            result["rtt_median_vs_tcp"] = round(statistics.median(
                a["rtt_median_us"] / b["rtt_median_us"] for a, b in pairs_), 2)
            result["cpu_vs_tcp"] = round(statistics.median(
                (a["cpu_client_us_per_msg"] + a["cpu_server_us_per_msg"])
                / (b["cpu_client_us_per_msg"] + b["cpu_server_us_per_msg"]) for a, b in pairs_), 2)
        results[variant] = result

    report = {
        "bench": "muxer",
        "device": {"platform": platform.platform(), "python": platform.python_version(),
                   "cpus": os.cpu_count(), "loadavg_at_start": loadavg},
        "params": {"rounds": args.rounds, "messages_per_round": args.messages, "warmup": args.warmup,
                   "message_bytes": args.message_bytes, "bulk_mib": args.bulk_mib,
                   "transport": "loopback TCP; libp2p variants add Noise + yamux"},
        "results": results,
        "rounds": per_round,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"medians over {args.rounds} interleaved rounds of {args.messages} round trips "
          f"({args.message_bytes} B messages); load average at start {loadavg[0]:.2f}")
    print(f"{'variant':<16}{'median us':>10}{'p99 us':>9}{'cpu us/msg cli+srv':>20}{'x tcp':>7}"
          f"{'x tcp cpu':>10}{'bulk MB/s':>10}{'bulk cpu s/GB':>14}")
    for variant, r in results.items():
        cpu = f"{r['cpu_client_us_per_msg']:.0f}+{r['cpu_server_us_per_msg']:.0f}"
        print(f"{variant:<16}{r['rtt_median_us']:>10.0f}{r['rtt_p99_us']:>9.0f}{cpu:>20}"
              f"{r.get('rtt_median_vs_tcp', 1.0):>7.2f}{r.get('cpu_vs_tcp', 1.0):>10.2f}"
              f"{r.get('bulk_mb_per_s', float('nan')):>10.1f}{r.get('bulk_cpu_client_s_per_gb', float('nan')):>14.2f}")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
