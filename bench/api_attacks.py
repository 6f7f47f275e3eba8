"""API attacks: what a web page (CSRF, DNS rebinding) or a local script can do to a node's API.

    python bench/api_attacks.py --json bench/results/api_attacks.json
    python bench/api_attacks.py --clients 200 --json /tmp/api_attacks.json   # a quicker flood

One real daemon (``hyphae node join --no-train``, API on 127.0.0.1) takes each attack with
exactly the headers a browser or a script would send: cross-origin POSTs (Origin, Referer,
``Origin: null``, a ``text/plain`` form), a rebinding ``Host`` on every route, missing and wrong
API/CSRF tokens, wrong content types, bodies over 1 MiB (announced and chunked), seeded random
Host names, and ``--clients`` event-stream clients at once. After each attack the daemon must
still run and answer. The table prints attack -> statuses seen -> refused? -> daemon alive.

Baseline: the median latency of an honest ``GET /api/v1/node``, measured before the attacks;
the same probe is repeated while the event-stream clients are connected, and the ratio says how
much the flood slowed honest use. RSS (VmRSS) before and during the flood and peak (VmHWM) show
the memory the flood cost. The run ends with ``hyphae node leave``, which must still stop it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import statistics
import string
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hyphae.node.dashboard import MAX_EVENT_CLIENTS
from hyphae.node.testing import DaemonProcess, process_memory_kib, raw_request

EVIL = "http://evil.example"
CONFIG_BODY = json.dumps({"set": {"evil": 1}}).encode()


def _alive(d: DaemonProcess) -> bool:
    if d.proc.poll() is not None:
        return False
    try:
        return raw_request(d.info["api_url"], "GET", "/api/v1/node", timeout_s=10).status == 200
    except OSError:
        return False


def _probe_ms(d: DaemonProcess, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        assert raw_request(d.info["api_url"], "GET", "/api/v1/node").status == 200
        out.append((time.perf_counter() - start) * 1000)
    return out


def _stats(ms: list[float]) -> dict[str, float]:
    ordered = sorted(ms)
    return {"median_ms": round(statistics.median(ordered), 3), "p90_ms": round(ordered[int(0.9 * (len(ordered) - 1))], 3)}


def attacks(d: DaemonProcess, rng: random.Random, port: int) -> dict[str, tuple[Callable[[], list[int]], set[int]]]:
    """name -> (send it, returning every status; the statuses that count as refused)."""
    url, token = d.info["api_url"], d.token
    bearer = {"Authorization": f"Bearer {token}"}
    send = lambda method, path, **kw: raw_request(url, method, path, **kw).status  # noqa: E731
    routes = ["/", "/static/app.js", "/api/v1/csrf", "/api/v1/run", "/api/v1/peers/scores", "/no/such/route",
              *[p for p, ops in json.loads(raw_request(url, "GET", "/api/v1/openapi.json").body)["paths"].items()
                if "get" in ops]]
    rebinding = ["evil.example", f"evil.example:{port}", f"127.0.0.1.nip.io:{port}", f"localhost.evil.example:{port}"]
    posts = [("/api/v1/node/leave", None), ("/api/v1/run/config", CONFIG_BODY)]

    def each_post(headers: dict[str, str], ctype: str | None = "application/json") -> list[int]:
        return [send("POST", path, body=body, headers={**headers, **({"Content-Type": ctype} if body and ctype else {})})
                for path, body in posts]

    def random_hosts() -> list[int]:
        letters = string.ascii_lowercase + string.digits + "-"
        names = ["".join(rng.choice(letters) for _ in range(rng.randint(1, 20))).strip("-") + rng.choice(
            [".example", ".com", ".127.0.0.1.nip.io", ".localhost.example", ""]) for _ in range(200)]
        return [send("GET", rng.choice(routes), headers={"Host": f"{n}:{port}"}) for n in names if n not in ("localhost",)]

    def chunked_huge() -> list[int]:
        def body() -> Any:
            yield b'{"set": {"k": "'
            for _ in range(33):
                yield b"x" * 65536
            yield b'"}}'

        req = urllib.request.Request(url + "/api/v1/run/config", data=body(), method="POST",
                                     headers={**bearer, "Content-Type": "application/json",
                                              "Transfer-Encoding": "chunked"})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return [resp.status]
        except urllib.error.HTTPError as exc:
            return [exc.code]

    huge = b'{"set": {"k": "' + b"x" * (1 << 20) + b'"}}'
    return {
        "cross-origin POST leave/config (Origin)": (lambda: each_post({"Origin": EVIL}), {403}),
        "cross-origin POST, text/plain form (no preflight)": (lambda: each_post({"Origin": EVIL}, "text/plain"), {403}),
        "cross-origin POST with the real token": (lambda: each_post({"Origin": EVIL, **bearer}), {403}),
        "cross-site Referer, no Origin": (lambda: each_post({"Referer": f"{EVIL}/x.html", **bearer}), {403}),
        "Origin: null (sandboxed frame, file://)": (lambda: each_post({"Origin": "null", **bearer}), {403}),
        "rebinding Host GET, every route": (
            lambda: [send("GET", r, headers={"Host": h}) for h in rebinding for r in routes], {403}),
        "rebinding Host POST with the token": (
            lambda: [s for h in rebinding for s in each_post({"Host": h, **bearer})], {403}),
        "random Host names (seeded, 200)": (random_hosts, {403}),
        "missing token": (lambda: each_post({}), {403}),
        "wrong bearer token": (lambda: each_post({"Authorization": "Bearer " + "A" * len(token)}), {403}),
        "wrong CSRF token, same origin": (
            lambda: each_post({"Origin": f"http://127.0.0.1:{port}", "X-Hyphae-CSRF": "guess"}), {403}),
        "token in the query of a POST": (
            lambda: [send("POST", f"/api/v1/node/leave?token={token}")], {403}),
        "wrong content type, with the token": (
            lambda: [send("POST", path, body=CONFIG_BODY, headers={**bearer, "Content-Type": ct}) for path, _ in posts
                     for ct in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x")],
            {415}),
        "body > 1 MiB (announced), with the token": (
            lambda: [send("POST", p, body=huge, headers={**bearer, "Content-Type": "application/json"})
                     for p, _ in posts], {413}),
        "body > 1 MiB (chunked), with the token": (chunked_huge, {413}),
        "CORS preflight from a foreign origin": (
            lambda: [send("OPTIONS", "/api/v1/node/leave",
                          headers={"Origin": EVIL, "Access-Control-Request-Method": "POST"})], {403}),
    }


async def _sse_client(port: int, hold: asyncio.Event) -> int:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 60)
    except (OSError, TimeoutError):
        return -1
    try:
        writer.write(f"GET /api/v1/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        line = await asyncio.wait_for(reader.readline(), 60)
        status = int(line.split()[1]) if line else -1
        await hold.wait()
        return status
    except (OSError, TimeoutError, ValueError, IndexError):
        return -1
    finally:
        writer.close()


async def sse_flood(d: DaemonProcess, port: int, clients: int, repeats: int) -> dict[str, Any]:
    """``clients`` event streams at once; the honest probe and RSS while they are all connected."""
    hold = asyncio.Event()
    tasks = [asyncio.create_task(_sse_client(port, hold)) for _ in range(clients)]
    await asyncio.sleep(0)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and sum(t.done() for t in tasks) < clients - MAX_EVENT_CLIENTS:
        await asyncio.sleep(0.1)  # the refused ones finish; the served ones wait on `hold`
    await asyncio.sleep(1.0)
    during = await asyncio.to_thread(_probe_ms, d, repeats)
    memory = process_memory_kib(d.proc.pid)
    alive = await asyncio.to_thread(_alive, d)
    hold.set()
    statuses = await asyncio.gather(*tasks)
    return {"statuses": statuses, "during_ms": during, "memory_kib": memory, "alive": alive}


def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="hyphae-api-attacks-"))
    d = DaemonProcess(root / "node", []).start()
    try:
        port = urllib.parse.urlsplit(d.info["api_url"]).port
        _probe_ms(d, 10)  # warm-up
        baseline = _probe_ms(d, args.repeats)
        rss_before = process_memory_kib(d.proc.pid)
        rows = []
        for name, (attack, refused) in attacks(d, rng, port).items():
            statuses = attack()
            rows.append({"attack": name, "requests": len(statuses), "statuses": dict(Counter(statuses)),
                         "refused": bool(statuses) and set(statuses) <= refused, "alive": _alive(d)})
        flood = asyncio.run(sse_flood(d, port, args.clients, args.repeats))
        counts = Counter(flood["statuses"])
        served = counts.get(200, 0)
        rows.append({"attack": f"{args.clients} event-stream clients at once", "requests": args.clients,
                     "statuses": dict(counts), "alive": flood["alive"] and _alive(d),
                     "refused": served <= MAX_EVENT_CLIENTS and counts.get(503, 0) == args.clients - served})
        config_untouched = "evil" not in json.loads(raw_request(d.info["api_url"], "GET", "/api/v1/run").body)["config"]
        leave = subprocess.run([sys.executable, "-m", "hyphae.cli", "node", "leave", "--data-dir", str(d.data_dir)],
                               capture_output=True, text=True, timeout=60)
        stopped = leave.returncode == 0 and d.wait(15) == 0
        base, during = _stats(baseline), _stats(flood["during_ms"])
        return {
            "bench": "api_attacks", "device": platform.processor() or platform.machine(), "seed": args.seed,
            "params": {"clients": args.clients, "repeats": args.repeats, "max_event_clients": MAX_EVENT_CLIENTS},
            "rows": rows, "all_refused": all(r["refused"] for r in rows), "crashes": sum(not r["alive"] for r in rows),
            "run_config_untouched": config_untouched, "honest_leave_stopped_it": stopped,
            "baseline_probe": base, "probe_during_flood": during,
            "probe_slowdown_ratio": round(during["median_ms"] / base["median_ms"], 2),
            "rss_kib": {"before": rss_before["VmRSS"], "during_flood": flood["memory_kib"]["VmRSS"],
                        "peak": flood["memory_kib"]["VmHWM"]},
        }
    finally:
        d.kill()


def print_summary(result: dict[str, Any]) -> None:
    width = max(len(r["attack"]) for r in result["rows"])
    print(f"{'attack':<{width}}  {'requests':>8}  {'statuses':<24}  refused  daemon alive")
    for r in result["rows"]:
        statuses = ", ".join(f"{n}x{s}" for s, n in sorted(r["statuses"].items()))
        print(f"{r['attack']:<{width}}  {r['requests']:>8}  {statuses:<24}  {'yes' if r['refused'] else 'NO':<7}  "
              f"{'yes' if r['alive'] else 'NO'}")
    rss = result["rss_kib"]
    print(f"\nall refused: {result['all_refused']}; crashes: {result['crashes']}; run config untouched: "
          f"{result['run_config_untouched']}; `hyphae node leave` stopped it: {result['honest_leave_stopped_it']}")
    print(f"honest GET /api/v1/node: {result['baseline_probe']['median_ms']:.2f} ms median before, "
          f"{result['probe_during_flood']['median_ms']:.2f} ms during the stream flood "
          f"(x{result['probe_slowdown_ratio']}); RSS {rss['before'] // 1024} MiB before, "
          f"{rss['during_flood'] // 1024} MiB during, peak {rss['peak'] // 1024} MiB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=1000, help="event-stream clients at once (default 1000)")
    parser.add_argument("--repeats", type=int, default=50, help="honest probes per latency measurement")
    parser.add_argument("--seed", type=int, default=0, help="seeds the random Host names")
    parser.add_argument("--json", type=Path, default=None, help="where to write the result")
    args = parser.parse_args()
    result = run(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print_summary(result)
    ok = result["all_refused"] and not result["crashes"] and result["honest_leave_stopped_it"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
