"""How large a testnet this machine sustains: the ``scale`` scenario at growing sizes.

    python bench/scale.py                            # training on: 2, 4, 6, ... nodes
    python bench/scale.py --no-train --sizes 8,16,32,48,64
    python bench/scale.py --sizes 4,8 --json bench/results/scale.json
    python bench/scale.py --no-train --dht-mode server   # no DHT mode switch on reachability changes

"Sustains" (checked by ``hyphae testnet scenario scale`` at each size, node 0 being a
network-only bootstrap on top of the N nodes):

* every node is connected to min(N, 8) others within 60 s of the last node being up
  (``target_peers`` is 16, so a large testnet is not a full mesh);
* every node's ``/api/v1/run`` agrees on run, owner and config and lists every node live
  (within 90 s);
* with training on, every trainer starts and then takes H = 4 more steps (one DiLoCo outer
  all-reduce) within 150 s;
* every ``/api/v1/node``, ``/peers`` and ``/run`` answers within 1 s, one call at a time.

The largest size where all hold is the result. Memory (RSS and PSS, daemon and worker) and CPU
(over a 10 s window once training runs, or once the network is idle) are recorded per node at
each size. Sizes stop growing at the first failure (``--keep-going`` tries the rest). The
machine is shared: the load average at each size is recorded next to the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from hyphae.node.scenarios import ScenarioOptions, run_scenario


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="", help="comma-separated node counts (default: 2,4,6,... or 8,16,32,...)")
    parser.add_argument("--no-train", action="store_true", help="network-only nodes")
    parser.add_argument("--dht-mode", default="auto", choices=["auto", "server", "client"],
                        help="[network] dht_mode of every node (server: no switch when reachability changes)")
    parser.add_argument("--keep-going", action="store_true", help="try every size even after one fails")
    parser.add_argument("--dir", type=Path, default=None, help="scratch dir (default: a temp dir, removed)")
    parser.add_argument("--json", type=Path, default=None, help="result file (default bench/results/scale-*.json)")
    args = parser.parse_args(argv)
    default = "8,16,24,32,48,64" if args.no_train else "2,4,6,8,10,12"
    sizes = [int(s) for s in (args.sizes or default).split(",") if s]
    scratch = args.dir or Path(tempfile.mkdtemp(prefix="hyphae-scale-"))
    mode = "network-only" if args.no_train else "training"
    out = args.json or Path(__file__).parent / "results" / f"scale-{'net' if args.no_train else 'train'}.json"
    results = []
    largest = 0
    for size in sizes:
        load_before = os.getloadavg()[0]
        started = time.monotonic()
        options = ScenarioOptions(nodes=size, train=not args.no_train, dht_mode=args.dht_mode)
        report = run_scenario("scale", root=scratch / f"n{size}", options=options)
        data = report.to_json()
        summary = data["measurements"].get("resources", {}).get("summary", {})
        row = {"nodes": size, "sustained": report.passed, "seconds": round(time.monotonic() - started, 1),
               "load_avg_1min_before": round(load_before, 2),
               "seconds_to_mesh": data["measurements"].get("seconds_to_mesh"),
               "checks": {c["name"]: {"passed": c["passed"], "waited_s": c["waited_s"], "measured": c["measured"]}
                          for c in data["checks"]},
               "resources": summary, "error": data["error"]}
        results.append(row)
        print(f"{mode} {size:3d} nodes: {'sustained' if report.passed else 'NOT sustained'} "
              f"(mesh {row['seconds_to_mesh']} s, daemon RSS median {summary.get('daemon_rss_mib_median')} MiB, "
              f"worker RSS median {summary.get('worker_rss_mib_median')} MiB, "
              f"CPU total {round(summary.get('daemon_cpu_cores_total', 0) + summary.get('worker_cpu_cores_total', 0), 2)}"
              f" cores, load {load_before:.1f})", flush=True)
        if report.passed:
            largest = max(largest, size)
        elif not args.keep_going:
            break
    result = {"bench": "scale", "mode": mode, "dht_mode": args.dht_mode, "cpus": os.cpu_count(), "largest_sustained": largest,
              "sizes": results, "python": sys.version.split()[0]}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"largest sustained {mode} testnet: {largest} nodes (+ bootstrap); result in {out}")
    if args.dir is None:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
