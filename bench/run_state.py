"""Run state benchmark: convergence after a write (4/8/16 nodes), heal after a partition, bytes
per update, and the document size after 10k updates with and without compaction.

    python bench/run_state.py --json bench/results/run_state.json

Nodes are real hyphae Hosts on loopback, each running a RunStateNode, four per worker process
(this same file with ``--worker``), so 16 nodes use every core instead of one GIL. The
coordinator drives writes over the workers' stdin and reads, from their stdout, when each node
first saw each value (wall clock: one machine, one clock). Convergence = last node's time - the
write's time. The baseline, measured in the same run on the same hosts, is a bare pubsub message
of the same size on another topic (what the transport alone costs); the ratio is ours / bare.

A partition is made the way the integration tests make it: every node ignores the other half
(pubsub, sync, envelopes authored there); each side writes; heal = time from lifting the filter
until every node holds both sides' writes.

Targets (issue 3): 16 nodes converge within 1 s median on loopback; a healed partition within 3 s.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import platform
import random
import statistics
import subprocess
import sys
import threading
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import msgpack

from hyphae.protocol.config import HostConfig
from hyphae.protocol.host import open_host
from hyphae.protocol.identity import Identity
from hyphae.protocol.runstate import (MembershipConfig, RunState, RunStateConfig, SyncConfig, SyncRequest,
                                      default_rules, open_run_state)
from hyphae.protocol.runstate.store import encode_file

RUN = "bench-run"
PROBE_TOPIC = "/hyphae/bench-probe/1"
NODES_PER_PROC = 4
WARMUP = 3


# ---- worker: K nodes in one process, driven by JSON lines --------------------------------------


class Worker:
    def __init__(self, count: int, bootstrap: str | None, first: bool) -> None:
        self.count, self.bootstrap, self.first = count, bootstrap, first
        self.nodes: list[Any] = []
        self.hosts: list[Any] = []
        self.states: list[RunState] = []
        self.groups: dict[str, int] = {}
        self._lock = threading.Lock()

    def emit(self, **event: Any) -> None:
        with self._lock:
            sys.stdout.write(json.dumps(event) + "\n")
            sys.stdout.flush()

    def _watch(self, index: int, state: RunState) -> None:
        seen_config: dict[str, Any] = {}
        seen_marks: dict[str, Any] = {}

        def on_applied(envelopes: Any, local: bool) -> None:
            now = time.time()
            sections = {e.section for e in envelopes}
            if "config" in sections:
                for key, value in state.run_config().items():
                    if seen_config.get(key) != value:
                        seen_config[key] = value
                        self.emit(event="seen", node=index, kind="config", key=key, value=value, t=now)
            if "progress" in sections:
                for env in envelopes:
                    if env.section == "progress":
                        mark = state.value("progress", env.author).get("mark")
                        if mark is not None and seen_marks.get(env.author) != mark:
                            seen_marks[env.author] = mark
                            self.emit(event="seen", node=index, kind="mark", key=env.author, value=mark, t=now)

        state.add_listener(on_applied)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        sync = SyncConfig(anti_entropy_interval_s=1.0)
        async with AsyncExitStack() as stack:
            for i in range(self.count):
                boot = (self.bootstrap,) if self.bootstrap else ((self.hosts[0].addrs[0],) if self.hosts else ())
                ident = Identity.generate()
                host = await stack.enter_async_context(open_host(
                    ident, HostConfig(listen=("/ip4/127.0.0.1/tcp/0",), mdns=False, bootstrap=boot), agent="bench"))
                state = RunState(RUN, ident, config=RunStateConfig(membership=MembershipConfig()))
                node = await stack.enter_async_context(open_run_state(host, state, config=sync))
                state.set_member(addrs=list(host.addrs), roles=["bench"])
                self._watch(i, state)
                await host.subscribe(PROBE_TOPIC, lambda a, d, i=i: self.emit(event="probe", node=i,
                                                                               id=int(d[:8]), t=time.time()))
                self.hosts.append(host)
                self.states.append(state)
                self.nodes.append(node)
            if self.first:
                self.states[0].create_run()
            self.emit(event="ready", nodes=[{"peer_id": h.peer_id, "addr": h.addrs[0]} for h in self.hosts])
            reader = asyncio.StreamReader()
            await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
            while line := await reader.readline():
                command = json.loads(line)
                if command["cmd"] == "quit":
                    break
                self.emit(**await self.handle(command))

    async def handle(self, c: dict[str, Any]) -> dict[str, Any]:
        cmd = c["cmd"]
        if cmd == "status":
            return {"event": "status", "owner": [s.owner() for s in self.states],
                    "live": [len(s.live_members()) for s in self.states]}
        if cmd == "config":
            t = time.time()
            env = self.states[c["node"]].set_config({c["key"]: c["value"]})
            return {"event": "written", "t": t, "envelope_bytes": len(env.encode()), "update_bytes": len(env.update)}
        if cmd == "mark":
            t = time.time()
            env = self.states[c["node"]].set_progress({"mark": c["value"]})
            return {"event": "written", "t": t, "envelope_bytes": len(env.encode()), "update_bytes": len(env.update)}
        if cmd == "probe":
            t = time.time()
            await self.hosts[c["node"]].publish(PROBE_TOPIC, b"%08d" % c["id"] + b"x" * (c["size"] - 8))
            return {"event": "written", "t": t}
        if cmd == "partition":
            groups = c["groups"]
            for node in self.nodes:
                mine = groups[node.state.peer_id]
                node.link_filter = lambda peer, mine=mine: groups.get(peer, mine) == mine
            return {"event": "ok", "t": time.time()}
        if cmd == "heal":
            t = time.time()
            for node in self.nodes:
                node.link_filter = None
            return {"event": "ok", "t": t}
        if cmd == "stats":
            return {"event": "stats", "nodes": [n.stats for n in self.nodes],
                    "replica": [s.replica.stats() for s in self.states],
                    "heads_bytes": [len(msgpack.packb(SyncRequest(RUN, s.replica.heads()).to_wire(), use_bin_type=True))
                                    for s in self.states]}
        raise ValueError(f"unknown command {cmd}")


# ---- coordinator -------------------------------------------------------------------------------


class Cluster:
    """Worker processes holding ``n`` nodes; events from all of them in one queue."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.procs: list[subprocess.Popen[str]] = []
        self.nodes: list[tuple[int, int, str]] = []  # (proc, local index, peer id)
        self.events: list[dict[str, Any]] = []
        self.replies: list[list[dict[str, Any]]] = []
        self._cv = threading.Condition()

    def start(self) -> None:
        bootstrap = None
        for p in range((self.n + NODES_PER_PROC - 1) // NODES_PER_PROC):
            count = min(NODES_PER_PROC, self.n - p * NODES_PER_PROC)
            cmd = [sys.executable, __file__, "--worker", "--count", str(count)]
            if bootstrap:
                cmd += ["--bootstrap", bootstrap]
            else:
                cmd += ["--first"]
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                    text=True, bufsize=1)
            self.procs.append(proc)
            self.replies.append([])
            threading.Thread(target=self._read, args=(p, proc), daemon=True).start()
            ready = self._wait_reply(p, "ready", 60)
            for i, node in enumerate(ready["nodes"]):
                self.nodes.append((p, i, node["peer_id"]))
            bootstrap = bootstrap or ready["nodes"][0]["addr"]

    def _read(self, p: int, proc: subprocess.Popen[str]) -> None:
        for line in proc.stdout:
            event = json.loads(line)
            with self._cv:
                if event["event"] in ("seen", "probe"):
                    event["proc"] = p
                    self.events.append(event)
                else:
                    self.replies[p].append(event)
                self._cv.notify_all()

    def _wait_reply(self, p: int, kind: str, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while True:
                for i, event in enumerate(self.replies[p]):
                    if event["event"] == kind:
                        return self.replies[p].pop(i)
                if not self._cv.wait(max(0.0, deadline - time.monotonic())):
                    raise TimeoutError(f"worker {p} sent no {kind!r} within {timeout_s} s")

    def call(self, p: int, reply: str, **command: Any) -> dict[str, Any]:
        self.procs[p].stdin.write(json.dumps(command) + "\n")
        self.procs[p].stdin.flush()
        return self._wait_reply(p, reply, 30)

    def broadcast(self, reply: str, **command: Any) -> list[dict[str, Any]]:
        for proc in self.procs:
            proc.stdin.write(json.dumps(command) + "\n")
            proc.stdin.flush()
        return [self._wait_reply(p, reply, 30) for p in range(len(self.procs))]

    def wait_seen(self, match: Any, count: int, timeout_s: float, *, partial: bool = False) -> list[float]:
        """Times of the first ``match``ing event from each of ``count`` distinct nodes (with
        ``partial``, whatever arrived by the deadline instead of an error)."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while True:
                first: dict[tuple[int, int], float] = {}
                for e in self.events:
                    if match(e):
                        first.setdefault((e["proc"], e["node"]), e["t"])
                if len(first) >= count:
                    return sorted(first.values())
                if not self._cv.wait(max(0.0, deadline - time.monotonic())):
                    if partial:
                        return sorted(first.values())
                    raise TimeoutError(f"only {len(first)}/{count} nodes saw it within {timeout_s} s")

    def wait_ready(self, timeout_s: float) -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            statuses = self.broadcast("status", cmd="status")
            if all(o for s in statuses for o in s["owner"]) and all(x == self.n for s in statuses for x in s["live"]):
                return time.monotonic() - start
            time.sleep(0.5)
        raise TimeoutError(f"{self.n} nodes did not all see each other live within {timeout_s} s")

    def close(self) -> None:
        for proc in self.procs:
            try:
                proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                proc.stdin.flush()
            except (BrokenPipeError, OSError):
                pass
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def stats_ms(samples_s: list[float]) -> dict[str, Any]:
    ordered = sorted(samples_s)
    if not ordered:
        return {"n": 0}
    return {"median_ms": round(statistics.median(ordered) * 1e3, 1),
            "p95_ms": round(ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))] * 1e3, 1),
            "max_ms": round(ordered[-1] * 1e3, 1), "n": len(ordered)}


def bench_cluster(n: int, writes: int, partitions: int, settle_s: float, rng: random.Random) -> dict[str, Any]:
    cluster = Cluster(n)
    try:
        cluster.start()
        ready_s = cluster.wait_ready(90)
        owner_proc = 0
        time.sleep(settle_s)  # let discovery and the pubsub mesh settle before timing anything
        conv, probe, sizes = [], [], []
        probes_lost = deliveries_lost = 0
        for i in range(writes + WARMUP):  # interleaved with the baseline so both see the same load
            time.sleep(0.3 + 0.2 * rng.random())
            written = cluster.call(owner_proc, "written", cmd="config", node=0, key="k", value=i)
            seen = cluster.wait_seen(lambda e, i=i: e.get("kind") == "config" and e["key"] == "k" and e["value"] == i,
                                     n, 30)
            size = written["envelope_bytes"]
            time.sleep(0.3 + 0.2 * rng.random())
            probed = cluster.call(owner_proc, "written", cmd="probe", node=0, id=i, size=size)
            # Bare pubsub has no repair: a probe some node never gets is counted, not waited for.
            seen_probe = cluster.wait_seen(lambda e, i=i: e["event"] == "probe" and e["id"] == i, n - 1, 5,
                                           partial=True)
            if i >= WARMUP:
                conv.append(max(seen) - written["t"])
                sizes.append(size)
                if len(seen_probe) == n - 1:
                    probe.append(max(seen_probe) - probed["t"])
                else:
                    probes_lost += 1
                    deliveries_lost += n - 1 - len(seen_probe)
        heal = [bench_partition(cluster, n, round_) for round_ in range(partitions)]
        stats = cluster.broadcast("stats", cmd="stats")
        node_stats = [s for w in stats for s in w["nodes"]]
        heads = [h for w in stats for h in w["heads_bytes"]]
        conv_stats, probe_stats = stats_ms(conv), stats_ms(probe)
        return {
            "nodes": n,
            "processes": len(cluster.procs),
            "seconds_to_all_live": round(ready_s, 2),
            "convergence": conv_stats,
            "pubsub_baseline": probe_stats,
            "pubsub_baseline_incomplete": {"messages": probes_lost, "deliveries_missing": deliveries_lost,
                                           "note": "bare pubsub messages some node never got (run state writes "
                                                   "always reached every node)"},
            "ratio_vs_pubsub_median": (round(conv_stats["median_ms"] / max(probe_stats["median_ms"], 1e-3), 2)
                                       if probe else None),
            "heal": stats_ms(heal),
            "heal_note": "partition = every node ignores the other half (pubsub, sync, envelopes); healed = filter lifted",
            "config_envelope_bytes": statistics.median(sizes),
            "published_bytes_per_message": round(sum(s["bytes_published"] for s in node_stats)
                                                 / max(1, sum(s["published"] for s in node_stats)), 1),
            "sync_heads_bytes_median": statistics.median(heads),
            "syncs": sum(s["syncs"] for s in node_stats),
            "sync_failures": sum(s["sync_failures"] for s in node_stats),
            "republished": sum(s["republished"] for s in node_stats),
        }
    finally:
        cluster.close()


def bench_partition(cluster: Cluster, n: int, round_: int) -> float:
    """Cut the nodes in two halves, write on both sides, heal; seconds until every node has both."""
    ids = [peer for _, _, peer in cluster.nodes]
    groups = {peer: (0 if i < n // 2 else 1) for i, peer in enumerate(ids)}
    cluster.broadcast("ok", cmd="partition", groups=groups)
    time.sleep(0.5)
    a_mark, b_mark = f"a{round_}", f"b{round_}"
    p_a, i_a, _ = cluster.nodes[1]
    p_b, i_b, _ = cluster.nodes[-1]
    cluster.call(p_a, "written", cmd="mark", node=i_a, value=a_mark)
    cluster.call(p_b, "written", cmd="mark", node=i_b, value=b_mark)
    time.sleep(2.0)
    healed_at = cluster.broadcast("ok", cmd="heal")[0]["t"]
    seen_a = cluster.wait_seen(lambda e: e.get("kind") == "mark" and e["value"] == a_mark, n, 60)
    seen_b = cluster.wait_seen(lambda e: e.get("kind") == "mark" and e["value"] == b_mark, n, 60)
    return max(max(seen_a), max(seen_b)) - healed_at


# ---- sizes: bytes per update, document size after 10k updates -----------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def bench_sizes(updates: int, authors: int) -> dict[str, Any]:
    """``updates`` writes from ``authors`` members (heartbeats, progress, ZO scalars truncated
    every 100 steps) received by one replica: its file and a full sync reply, with the default
    compaction and with compaction off (the baseline)."""
    out: dict[str, Any] = {}
    for label, rules in (("compacted", default_rules()), ("no_compaction", _uncompacted_rules())):
        clock = _Clock()
        writers = [RunState(RUN, Identity.generate(), config=RunStateConfig(rules=rules), clock=clock)
                   for _ in range(authors)]
        reader = RunState(RUN, Identity.generate(), config=RunStateConfig(rules=rules), clock=clock)
        for w in writers:
            reader.receive([w.set_member(addrs=["/ip4/127.0.0.1/tcp/4101"], roles=["trainer"],
                                         hardware={"cpus": 8, "nvidia_gpus": 1})])
        done, step = 0, 0
        kinds: dict[str, list[int]] = {"heartbeat": [], "progress": [], "zo_log": []}
        while done < updates:
            step += 1
            clock.now += 0.5
            for w in writers:
                for kind, env in (("heartbeat", w.heartbeat()),
                                  ("progress", w.set_progress({"step": step, "loss": round(3 - step / 1e4, 4)})),
                                  ("zo_log", w.append_zo(step, bytes([step % 256] * 4)))):
                    if env is not None:
                        reader.receive([env])
                        kinds[kind].append(len(env.encode()))
                        done += 1
                truncated = w.truncate_zo(step - 100) if step % 100 == 0 else None
                if truncated is not None:
                    reader.receive([truncated])
                    done += 1
        file_bytes = len(encode_file(RUN, reader.envelopes()))
        full_sync = reader.answer(SyncRequest(RUN, {}), 1 << 30)
        out[label] = {"file_bytes": file_bytes, "full_sync_reply_bytes": sum(map(len, full_sync.envelopes)),
                      "state_bytes": reader.replica.stats()["state_bytes"], "envelopes": len(reader.envelopes()),
                      "updates": done}
        if label == "compacted":
            out["envelope_bytes_median"] = {k: statistics.median(v) for k, v in kinds.items() if v}
    out["file_ratio_no_compaction_over_compacted"] = round(
        out["no_compaction"]["file_bytes"] / out["compacted"]["file_bytes"], 1)
    return out


def _uncompacted_rules() -> dict[str, Any]:
    big = 1 << 30
    return {name: dataclasses.replace(rule, compact_after_deltas=big, max_state_bytes=big, max_keys=1 << 20)
            for name, rule in default_rules().items()}


def bytes_per_update() -> dict[str, Any]:
    """Sizes of single updates (a delta on an open epoch): the pycrdt update and the signed
    envelope around it."""
    clock = _Clock()
    state = RunState(RUN, Identity.generate(), clock=clock)
    state.create_run()
    state.set_member(addrs=["/ip4/127.0.0.1/tcp/4101"], roles=["trainer"], hardware={"cpus": 8})
    makers = {
        "heartbeat": lambda i: state.heartbeat(),
        "config_key": lambda i: state.set_config({"lr": i / 10}),
        "progress_step": lambda i: state.set_progress({"step": i}),
        "zo_step_4_scalars": lambda i: state.append_zo(i, bytes([i % 256] * 4)),
    }
    out = {}
    for label, make in makers.items():
        envs = []
        for i in range(1, 4):  # the first write opens the epoch (a snapshot); then deltas
            clock.now += 1
            envs.append(make(i))
        env = envs[-1]
        assert env.seq > 0
        out[label] = {"pycrdt_update_bytes": len(env.update), "envelope_bytes": len(env.encode()),
                      "overhead_ratio": round(len(env.encode()) / len(env.update), 2)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", default="4,8,16", help="comma-separated network sizes")
    parser.add_argument("--writes", type=int, default=20, help="timed config writes per size")
    parser.add_argument("--partitions", type=int, default=3, help="partition/heal rounds per size")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds between all-live and the first write")
    parser.add_argument("--updates", type=int, default=10_000, help="updates for the document-size run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "run_state.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=NODES_PER_PROC, help=argparse.SUPPRESS)
    parser.add_argument("--bootstrap", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--first", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.CRITICAL)
    if args.worker:
        asyncio.run(Worker(args.count, args.bootstrap, args.first).run())
        return
    rng = random.Random(args.seed)
    started = time.time()
    sizes = {"bytes_per_update": bytes_per_update(), "after_updates": bench_sizes(args.updates, authors=8)}
    clusters = {}
    for n in [int(x) for x in args.nodes.split(",")]:
        print(f"[{n} nodes] ...", flush=True)
        clusters[str(n)] = bench_cluster(n, args.writes, args.partitions, args.settle, rng)
        c = clusters[str(n)]
        print(f"[{n} nodes] converge {c['convergence']['median_ms']} ms median / {c['convergence']['p95_ms']} ms p95 "
              f"(bare pubsub {c['pubsub_baseline'].get('median_ms')} ms, x{c['ratio_vs_pubsub_median']}, "
              f"{c['pubsub_baseline_incomplete']['messages']} bare messages incomplete); "
              f"heal {c['heal']['median_ms']} ms median", flush=True)
    biggest = clusters[max(clusters, key=int)]
    result = {
        "bench": "run_state",
        "device": {"cpu_count": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
                   "loadavg_at_start": os.getloadavg()[0]},
        "params": {"nodes": args.nodes, "writes": args.writes, "partitions": args.partitions,
                   "updates": args.updates, "seed": args.seed, "nodes_per_process": NODES_PER_PROC,
                   "settle_s": args.settle, "warmup_writes": WARMUP},
        "clusters": clusters,
        "sizes": sizes,
        "targets": {f"{biggest['nodes']}_nodes_median_under_1s": biggest["convergence"]["median_ms"] < 1000,
                    f"{biggest['nodes']}_nodes_heal_under_3s": biggest["heal"].get("median_ms", 0) < 3000},
        "seconds": round(time.time() - started, 1),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    after = sizes["after_updates"]
    print(f"bytes per update (envelope / pycrdt delta): "
          + ", ".join(f"{k} {v['envelope_bytes']}/{v['pycrdt_update_bytes']}" for k, v in sizes["bytes_per_update"].items()))
    print(f"after {after['compacted']['updates']} updates from 8 members: file {after['compacted']['file_bytes']} B "
          f"compacted vs {after['no_compaction']['file_bytes']} B without (x{after['file_ratio_no_compaction_over_compacted']})")
    print(f"targets: {result['targets']}; wrote {args.json}")


if __name__ == "__main__":
    main()
