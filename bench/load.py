"""Load: N daemons, each flooded at its per-peer limits; honest traffic still gets through, no
node falls over, memory stays bounded.

    python bench/load.py --json bench/results/load.json            # 8 nodes, 60 s of flood
    python bench/load.py --nodes 8 --duration-s 15 --json /tmp/load.json   # the test's cut

Every node is a real daemon (``hyphae node join --no-train``) in its own process, all meshed on
loopback. Each has a flooder: a separate process with its own libp2p Host (``open_host``), its
own run-state replica and tensor plane, connected to that node, which uses the node's real
protocols at the limits the node grants one peer:

* pubsub: signed run-state writes on ``/hyphae/run/<run>/1`` at ``ENVELOPE_RATE`` (50/s, after a
  200 burst) — gossip carries them to every node, so each node sees all N flooders';
* ``/hyphae/runsync/1``: ``SYNC_RATE`` requests (10/s) with empty heads, so each reply is the
  node's whole run state (the most expensive honest-looking request);
* ``/hyphae/hello/1``: ``HELLO_RATE`` hellos (1/s after a burst of 10), two at once;
* tensor plane: blob ``have``/``get`` requests for unknown blobs (``--blob-requests-per-s``) and
  unsolicited 1 MiB transfers nobody claims (``--push-mib-per-s``), which the node must hold
  until they expire (``mailbox_ttl_s``) or refuse past ``max_unclaimed_bytes``.

Meanwhile the run owner's API writes a config key every ``--probe-every-s``; the time until
every other node's API shows it is the honest-traffic latency. Every API call is timed. RSS
(VmRSS) of every daemon is sampled each second; peak RSS is VmHWM at the end. "Bounded" compares
RSS at the end with RSS after the warm-up (the first quarter of the flood), less what the node
holds for peers on purpose (unclaimed transfers and its receive-buffer pool, from
``/api/v1/tensor``; both capped by the tensor plane's config, 2 GiB and 512 MiB, and unclaimed
transfers expire after 300 s — so at 4 MiB/s per flooder they grow all minute, by design).

An honest peer outside the gossip also sends one runsync request a second to each node (its own
host idle, so its latency is the node's). The baseline is the same honest probes with no flood,
measured first in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from hyphae.node.testing import DaemonProcess, process_cpu_s, process_memory_kib, sync_wait

ROOT = Path(__file__).resolve().parents[1]
RUN = "default"


# ---- the flooder (a process per node) ------------------------------------------------------


async def _paced(rate_per_s: float, burst: int, deadline: float, action: Any, counts: dict[str, int],
                 name: str) -> None:
    """Call ``action`` ``burst`` times at once, then ``rate_per_s`` times a second until
    ``deadline``; count successes and failures (a refusal is an expected answer)."""
    async def once() -> None:
        try:
            await asyncio.wait_for(action(), 10)
            counts[f"{name}_ok"] = counts.get(f"{name}_ok", 0) + 1
        except Exception as exc:  # noqa: BLE001 — refused, reset, timed out, banned: counted by kind
            key = f"{name}_failed_{type(exc).__name__}"
            counts[key] = counts.get(key, 0) + 1

    pending: set[asyncio.Task[None]] = {asyncio.create_task(once()) for _ in range(burst)}
    interval = 1.0 / rate_per_s
    next_at = time.monotonic()
    while time.monotonic() < deadline:
        next_at += interval
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        pending = {t for t in pending if not t.done()}
        if len(pending) < 64:  # never more than 64 in flight: we flood the node, not our own memory
            pending.add(asyncio.create_task(once()))
    await asyncio.gather(*pending, return_exceptions=True)


async def flood(target: str, duration_s: float, seed: int, push_mib_per_s: float,
                blob_requests_per_s: float, started: Path) -> dict[str, int]:
    """Flood the node at ``target`` (a /p2p/ multiaddr) for ``duration_s``; return counts.
    ``started`` is created when the flood begins (after imports, connect and setup)."""
    import numpy as np

    from hyphae.protocol.config import HostConfig
    from hyphae.protocol.hello.service import HELLO_RATE
    from hyphae.protocol.hello.wire import MAX_FRAME_BYTES as HELLO_FRAME, PROTOCOL_ID as HELLO, Hello
    from hyphae.protocol.host import open_host
    from hyphae.protocol.identity import Identity
    from hyphae.protocol.runstate import SYNC_PROTOCOL, RunState, open_run_state
    from hyphae.protocol.runstate.service import ENVELOPE_RATE, SYNC_RATE
    from hyphae.protocol.runstate.wire import MAX_SYNC_FRAME_BYTES
    from hyphae.protocol.tensor import TensorConfig, open_tensor_plane
    from hyphae.protocol.tensor.blobs import ROUTE_GET, ROUTE_HAVE
    from hyphae.protocol.tensor.spec import Tensor

    rng = random.Random(seed)
    identity = Identity.generate()
    counts: dict[str, int] = {}
    config = HostConfig(listen=("/ip4/127.0.0.1/tcp/0",), mdns=False, bootstrap=(target,))
    async with open_host(identity, config, agent="hyphae-load-flooder/1") as host:
        node = await host.connect(target)
        empty_heads = RunState(RUN, Identity.generate()).sync_request().to_wire()  # "send me everything"
        state = RunState(RUN, identity)
        async with open_run_state(host, state) as _replica, \
                open_tensor_plane(host, TensorConfig(listen=("/ip4/127.0.0.1/tcp/0",))) as plane:
            payload = np.frombuffer(rng.randbytes(1 << 20), dtype=np.uint8)
            written = 0

            async def write() -> None:
                nonlocal written
                written += 1
                state.set_progress({f"k{written % 64}": "x" * 200})  # published by the replica

            async def sync() -> None:
                await host.request(node, SYNC_PROTOCOL, empty_heads, max_frame_bytes=MAX_SYNC_FRAME_BYTES)

            async def hello() -> None:
                stream = await host.open_stream(node, HELLO, max_frame_bytes=HELLO_FRAME)
                try:
                    await stream.send(Hello(agent="flooder", network="hyphae").to_wire())
                    await stream.recv()
                finally:
                    await stream.aclose()

            async def blob_request() -> None:
                blob = rng.randbytes(32).hex()
                if rng.random() < 0.5:
                    await plane.request(node, ROUTE_HAVE, {"id": blob})
                else:
                    await plane.request(node, ROUTE_GET, {"id": blob, "index": 0})

            async def push() -> None:
                await plane.send(node, f"flood/{rng.randrange(1 << 30)}", [Tensor.from_numpy("junk", payload)])

            # Open the tensor-plane session first, with time to spare: a dial cancelled by the
            # 10 s per-request timeout below starts over, and under this load may never finish.
            setup = time.monotonic()
            try:
                await asyncio.wait_for(plane.request(node, ROUTE_HAVE, {"id": "00" * 32}), 60)
                counts["tensor_setup_ms"] = int((time.monotonic() - setup) * 1000)
            except Exception as exc:  # noqa: BLE001 — recorded; the flood goes on without it
                counts[f"tensor_setup_failed_{type(exc).__name__}"] = 1
            started.touch()
            deadline = time.monotonic() + duration_s
            jobs = [
                _paced(ENVELOPE_RATE.rate_per_s, int(ENVELOPE_RATE.burst), deadline, write, counts, "envelope"),
                _paced(SYNC_RATE.rate_per_s, int(SYNC_RATE.burst), deadline, sync, counts, "runsync"),
                _paced(HELLO_RATE.rate_per_s, 2, deadline, hello, counts, "hello"),
                _paced(blob_requests_per_s, 16, deadline, blob_request, counts, "blob_request"),
            ]
            if push_mib_per_s > 0:
                jobs.append(_paced(push_mib_per_s, 1, deadline, push, counts, "push_mib"))
            await asyncio.gather(*jobs)
        counts["still_connected"] = int(node in {p.peer_id for p in await host.peers()})
    return counts


async def honest_rpc(targets: list[str], duration_s: float) -> dict[str, Any]:
    """An honest peer that is not in the gossip (so its own host is idle): a runsync request to
    each node in turn, one a second; returns the latencies and the failures."""
    from hyphae.protocol.config import HostConfig
    from hyphae.protocol.host import open_host
    from hyphae.protocol.identity import Identity
    from hyphae.protocol.runstate import SYNC_PROTOCOL, RunState
    from hyphae.protocol.runstate.wire import MAX_SYNC_FRAME_BYTES

    latencies: list[float] = []
    failures: dict[str, int] = {}
    config = HostConfig(listen=("/ip4/127.0.0.1/tcp/0",), mdns=False)
    async with open_host(Identity.generate(), config, agent="hyphae-load-honest/1") as host:
        peers = [await host.connect(t) for t in targets]
        request = RunState(RUN, Identity.generate()).sync_request().to_wire()
        deadline = time.monotonic() + duration_s
        while time.monotonic() < deadline:
            for peer in peers:
                start = time.perf_counter()
                try:
                    await asyncio.wait_for(host.request(peer, SYNC_PROTOCOL, request,
                                                        max_frame_bytes=MAX_SYNC_FRAME_BYTES), 30)
                    latencies.append(time.perf_counter() - start)
                except Exception as exc:  # noqa: BLE001 — counted by kind
                    failures[type(exc).__name__] = failures.get(type(exc).__name__, 0) + 1
            await asyncio.sleep(1.0)
    return {"latencies_s": latencies, "failures": failures}


def _honest_stats(result: dict[str, Any]) -> dict[str, Any]:
    lat = result.get("latencies_s", [])
    return {"median": statistics.median(lat) if lat else None, "p90": _pct(lat, 0.9),
            "max": max(lat, default=None), "ok": len(lat), "failed": result.get("failures", {"crashed": 1})}


# ---- the orchestrator ----------------------------------------------------------------------


def _api(d: DaemonProcess, path: str, body: dict[str, Any] | None = None) -> tuple[Any, float]:
    """One API call; returns (decoded reply, seconds it took)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(d.info["api_url"] + path, data=data, method="GET" if body is None else "POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {d.token}"})
    start = time.perf_counter()
    with urllib.request.urlopen(req, timeout=10) as resp:
        reply = json.loads(resp.read())
    return reply, time.perf_counter() - start


def start_nodes(root: Path, n: int) -> list[DaemonProcess]:
    nodes = [DaemonProcess(root / "n0", []).start()]
    for i in range(1, n):
        nodes.append(DaemonProcess(root / f"n{i}", ["--bootstrap", nodes[0].multiaddr]).start())
    everyone = {d.peer_id for d in nodes}
    def settled() -> bool:
        views = [_api(d, "/api/v1/run")[0] for d in nodes]
        return all(everyone <= set(v["live_members"]) and v["owner"] in everyone for v in views)

    sync_wait(settled, 120, "every node to see every other as a live member, and the owner", interval_s=0.5)
    return nodes


class Probe:
    """Honest traffic: the owner writes a config key; time until every node's API shows it."""

    def __init__(self, nodes: list[DaemonProcess]) -> None:
        owner = _api(nodes[0], "/api/v1/run")[0]["owner"]
        self.owner = next(d for d in nodes if d.peer_id == owner)
        self.others = [d for d in nodes if d is not self.owner]
        self.api_s: list[float] = []
        self.n = 0

    def once(self, timeout_s: float) -> float | None:
        """Write, then poll every other node; seconds until all have it (None: not within timeout)."""
        self.n += 1
        value = f"probe-{self.n}-{time.time()}"
        start = time.perf_counter()
        self.call(self.owner, "/api/v1/run/config", {"set": {"load_probe": value}})
        waiting = set(range(len(self.others)))
        while waiting and time.perf_counter() - start < timeout_s:
            for i in list(waiting):
                config = self.call(self.others[i], "/api/v1/run")["config"]
                if config.get("load_probe") == value:
                    waiting.discard(i)
            time.sleep(0.05)
        return None if waiting else time.perf_counter() - start

    def call(self, d: DaemonProcess, path: str, body: dict[str, Any] | None = None) -> Any:
        """One timed API call (every call the bench makes under flood counts for responsiveness)."""
        reply, took = _api(d, path, body)
        self.api_s.append(took)
        return reply


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def start_honest(root: Path, nodes: list[DaemonProcess], duration_s: float, name: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--honest", *[d.multiaddr for d in nodes],
           "--duration-s", str(duration_s), "--json", str(root / f"{name}.json")]
    with open(root / f"{name}.log", "wb") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)


def _honest_result(root: Path, name: str) -> dict[str, Any]:
    try:
        return _honest_stats(json.loads((root / f"{name}.json").read_text()))
    except (FileNotFoundError, json.JSONDecodeError):
        return _honest_stats({})


def start_flooders(root: Path, nodes: list[DaemonProcess], args: argparse.Namespace) -> list[subprocess.Popen[bytes]]:
    flooders = []
    for i, d in enumerate(nodes):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--flooder", d.multiaddr, "--duration-s",
               str(args.duration_s), "--seed", str(args.seed + i), "--push-mib-per-s", str(args.push_mib_per_s),
               "--blob-requests-per-s", str(args.blob_requests_per_s), "--json", str(root / f"flooder{i}.json")]
        with open(root / f"flooder{i}.log", "wb") as log:
            flooders.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT))
    return flooders


def _cpu_s(procs: list[subprocess.Popen[bytes]]) -> list[float]:
    """CPU seconds each live process has used so far (0 once it has exited)."""
    out = []
    for proc in procs:
        try:
            out.append(process_cpu_s(proc.pid) if proc.poll() is None else 0.0)
        except OSError:
            out.append(0.0)
    return out


def sample(nodes: list[DaemonProcess], probe: Probe) -> dict[str, Any]:
    """RSS of every daemon, and what its tensor plane holds for others (unclaimed transfers and
    its receive-buffer pool), in MiB."""
    rss, held = [], []
    for d in nodes:
        if d.proc.poll() is not None:
            rss.append(None)
            held.append(None)
            continue
        rss.append(process_memory_kib(d.proc.pid)["VmRSS"] / 1024)
        tensor = probe.call(d, "/api/v1/tensor")
        held.append((tensor["unclaimed_bytes"] + tensor["recv_pool_bytes"]) / (1 << 20))
    return {"t": time.monotonic(), "rss": rss, "held": held}


class Sampler(threading.Thread):
    """Samples memory every second (and CPU) while the main thread probes honest traffic, so a
    slow probe never leaves a gap in the memory record."""

    def __init__(self, nodes: list[DaemonProcess], flooders: list[subprocess.Popen[bytes]], probe: Probe,
                 until: float) -> None:
        super().__init__(daemon=True)
        self.nodes, self.flooders, self.probe, self.until = nodes, flooders, probe, until
        self.samples: list[dict[str, Any]] = []
        self.cpu_first = self.cpu_last = (_cpu_s([d.proc for d in nodes]), _cpu_s(flooders))

    def run(self) -> None:
        while time.monotonic() < self.until:
            self.samples.append(sample(self.nodes, self.probe))
            self.cpu_last = (_cpu_s([d.proc for d in self.nodes]), _cpu_s(self.flooders))
            time.sleep(max(0.0, min(1.0, self.until - time.monotonic())))

    def cores_used(self, seconds: float) -> dict[str, float]:
        return {who: round(sum(b - a for a, b in zip(self.cpu_first[i], self.cpu_last[i])) / seconds, 2)
                for i, who in enumerate(("nodes", "flooders"))}


def flood_and_watch(root: Path, nodes: list[DaemonProcess], probe: Probe,
                    args: argparse.Namespace) -> dict[str, Any]:
    """Run the flooders; probe honest traffic and sample memory until they are done."""
    flooders = start_flooders(root, nodes, args)
    honest = start_honest(root, nodes, args.duration_s, "honest-flood")
    try:
        sync_wait(lambda: all((root / f"flooder{i}.started").exists() or f.poll() is not None
                              for i, f in enumerate(flooders)), 180, "every flooder to start", interval_s=0.2)
        began = time.monotonic()
        sampler = Sampler(nodes, flooders, probe, began + args.duration_s)
        sampler.start()
        latencies = []
        while time.monotonic() - began < args.duration_s:
            latencies.append(probe.once(args.probe_timeout_s))
            time.sleep(max(0.0, args.probe_every_s - (time.monotonic() - began) % args.probe_every_s))
        sampler.join()
        for f in [*flooders, honest]:
            f.wait(90)  # in-flight requests time out after 10 s, then the flooder reports
        flood_s = time.monotonic() - began
    finally:
        for f in [*flooders, honest]:
            if f.poll() is None:
                f.kill()
            f.wait(10)
    samples = sampler.samples
    warm = next((x for x in samples if x["t"] - began >= args.duration_s / 4), samples[-1])
    return {"flood_s": flood_s, "began": began, "cpu_cores_used": sampler.cores_used(samples[-1]["t"] - began),
            "latencies": latencies, "warm": warm, "end": samples[-1],
            "counts": [_flooder_result(root / f"flooder{i}.json") for i in range(len(flooders))],
            "honest_rpc": _honest_result(root, "honest-flood")}


def run(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="hyphae-load-"))
    nodes: list[DaemonProcess] = []
    try:
        nodes = start_nodes(root, args.nodes)
        probe = Probe(nodes)
        baseline = [probe.once(args.probe_timeout_s) for _ in range(5)]
        quiet = start_honest(root, nodes, 6.0, "honest-baseline")
        quiet.wait(120)
        baseline_rpc = _honest_result(root, "honest-baseline")
        baseline_api = list(probe.api_s)
        probe.api_s.clear()
        watched = flood_and_watch(root, nodes, probe, args)
        alive = [d.proc.poll() is None for d in nodes]
        peaks = [process_memory_kib(d.proc.pid)["VmHWM"] / 1024 if ok else None for d, ok in zip(nodes, alive)]
        after_probe = probe.once(args.probe_timeout_s)
        scores = [probe.call(d, "/api/v1/peers/scores") for d, ok in zip(nodes, alive) if ok]
    finally:
        for d in nodes:
            d.kill_family()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    honest = {d.peer_id for d in nodes}
    result = report(args, root, watched, alive, peaks, baseline, baseline_api, probe, after_probe, scores, honest)
    result["honest_runsync_s"] = {"baseline": baseline_rpc, "under_flood": watched["honest_rpc"]}
    return result


def report(args: argparse.Namespace, root: Path, watched: dict[str, Any], alive: list[bool],
           peaks: list[float | None], baseline: list[float | None], baseline_api: list[float], probe: Probe,
           after_probe: float | None, scores: list[dict[str, Any]], honest: set[str]) -> dict[str, Any]:
    latencies = watched["latencies"]
    delivered = [x for x in latencies if x is not None]
    warm, end = watched["warm"], watched["end"]
    # Growth not explained by what the node holds on purpose (unclaimed transfers, buffer pool):
    # if memory is bounded this stays near zero however long the flood runs.
    residual = [None if None in (e, w, he, hw) else e - w - (he - hw)
                for e, w, he, hw in zip(end["rss"], warm["rss"], end["held"], warm["held"])]
    r1 = lambda xs: [None if x is None else round(x, 1) for x in xs]  # noqa: E731
    return {
        "bench": "load",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "params": {"nodes": args.nodes, "duration_s": args.duration_s, "seed": args.seed,
                   "push_mib_per_s": args.push_mib_per_s, "blob_requests_per_s": args.blob_requests_per_s,
                   "probe_every_s": args.probe_every_s, "probe_timeout_s": args.probe_timeout_s},
        "flood_s": round(watched["flood_s"], 1),
        "nodes_alive_at_end": sum(alive),
        "cpu_cores_used": watched["cpu_cores_used"],
        "honest_write_to_all_s": {
            "baseline_median": statistics.median([b for b in baseline if b is not None] or [float("nan")]),
            "under_flood_median": statistics.median(delivered) if delivered else None,
            "under_flood_p90": _pct(delivered, 0.9),
            "under_flood_max": max(delivered) if delivered else None,
            "probes": len(latencies), "probes_not_delivered": latencies.count(None),
            "after_flood": after_probe,
        },
        "api_call_s": {"baseline_p90": _pct(baseline_api, 0.9), "under_flood_median": _pct(probe.api_s, 0.5),
                       "under_flood_p90": _pct(probe.api_s, 0.9), "under_flood_max": max(probe.api_s, default=None),
                       "calls": len(probe.api_s)},
        "memory_mib": {
            "peak_rss_per_node": r1(peaks),
            "rss_after_warmup_per_node": r1(warm["rss"]), "rss_end_per_node": r1(end["rss"]),
            "held_after_warmup_per_node": r1(warm["held"]), "held_end_per_node": r1(end["held"]),
            "unexplained_growth_per_node": r1(residual),
            "warmup_s": round(warm["t"] - watched["began"], 1), "end_s": round(end["t"] - watched["began"], 1),
        },
        "flooders": watched["counts"],
        "scores": _score_summary(scores, honest),
        "data_dir": str(root) if args.keep else None,
    }


def _score_summary(views: list[dict[str, Any]], honest: set[str]) -> dict[str, Any]:
    """What the nodes' score tables say, split by who was scored: the flooders, or honest nodes
    (which a flood must not get penalised or disconnected)."""
    out: dict[str, Any] = {"disconnected_for_score": sum(v["disconnected"] for v in views)}
    for who, mine in (("flooders", lambda p: p not in honest), ("honest_nodes", lambda p: p in honest)):
        rows = [row for view in views for peer, row in view["peers"].items() if mine(peer)]
        kinds: dict[str, int] = {}
        for row in rows:
            for kind, n in row["violations"].items():
                kinds[kind] = kinds.get(kind, 0) + n
        out[who] = {"violations": kinds, "lowest": min((r["score"] for r in rows), default=None)}
    return out


def _flooder_result(path: Path) -> dict[str, int]:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {"crashed": 1}


def _fmt_rpc(stats: dict[str, Any]) -> str:
    if stats["median"] is None:
        return f"none answered ({stats['failed']})"
    return (f"median {stats['median']:.3f} s, p90 {stats['p90']:.3f}, max {stats['max']:.3f} "
            f"({stats['ok']} ok, failed {stats['failed']})")


def summary(result: dict[str, Any]) -> str:
    h, m, a = result["honest_write_to_all_s"], result["memory_mib"], result["api_call_s"]
    totals: dict[str, int] = {}
    for c in result["flooders"]:
        for k, v in c.items():
            if k != "tensor_setup_ms":
                totals[k] = totals.get(k, 0) + v
    setup_ms = [c.get("tensor_setup_ms") for c in result["flooders"]]
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    return "\n".join([
        f"load: {result['params']['nodes']} nodes flooded for {result['flood_s']} s; "
        f"{result['nodes_alive_at_end']} alive at the end; CPU cores used: {result['cpu_cores_used']} "
        f"of {result['machine']['cpus']}",
        f"  honest write reaches all: baseline {fmt(h['baseline_median'])} s; under flood median "
        f"{fmt(h['under_flood_median'])} s, p90 {fmt(h['under_flood_p90'])}, max {fmt(h['under_flood_max'])} "
        f"({h['probes']} probes, {h['probes_not_delivered']} not delivered); after {fmt(h['after_flood'])} s",
        f"  honest runsync (a peer outside the gossip, 1/s to each node): baseline "
        f"{_fmt_rpc(result['honest_runsync_s']['baseline'])}; under flood {_fmt_rpc(result['honest_runsync_s']['under_flood'])}",
        f"  API call: baseline p90 {fmt(a['baseline_p90'])} s; under flood median {fmt(a['under_flood_median'])}, "
        f"p90 {fmt(a['under_flood_p90'])}, max {fmt(a['under_flood_max'])} s ({a['calls']} calls)",
        f"  peak RSS per node (MiB): {m['peak_rss_per_node']}",
        f"  RSS after {m['warmup_s']} s of flood {m['rss_after_warmup_per_node']} -> after {m['end_s']} s "
        f"{m['rss_end_per_node']}",
        f"  held for peers (unclaimed transfers + buffer pool) {m['held_after_warmup_per_node']} -> "
        f"{m['held_end_per_node']}; growth beyond that {m['unexplained_growth_per_node']}",
        f"  flooder totals: {dict(sorted(totals.items()))}",
        f"  tensor-plane session setup per flooder (ms, before its flood): {setup_ms}",
        f"  scores: {result['scores']}",
    ])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--duration-s", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--push-mib-per-s", type=float, default=4.0,
                        help="unsolicited tensor-plane MiB per second per flooder (0: none)")
    parser.add_argument("--blob-requests-per-s", type=float, default=50.0)
    parser.add_argument("--probe-every-s", type=float, default=3.0)
    parser.add_argument("--probe-timeout-s", type=float, default=20.0)
    parser.add_argument("--json", type=Path, default=None, help="where to write the result")
    parser.add_argument("--keep", action="store_true", help="keep the nodes' data dirs and logs")
    parser.add_argument("--flooder", metavar="MULTIADDR", help=argparse.SUPPRESS)
    parser.add_argument("--honest", metavar="MULTIADDR", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.honest:
        args.json.write_text(json.dumps(asyncio.run(honest_rpc(args.honest, args.duration_s))))
        return 0
    if args.flooder:
        counts = asyncio.run(flood(args.flooder, args.duration_s, args.seed, args.push_mib_per_s,
                                   args.blob_requests_per_s, args.json.with_suffix(".started")))
        args.json.write_text(json.dumps(counts))
        return 0
    result = run(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
