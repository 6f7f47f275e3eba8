"""A bare hyphae host (plus tensor plane) inside a namespace, driven by JSON lines on stdin.

Why not always the daemon: tests and ``bench/nat.py`` need what the daemon's API does not (yet)
show — ``Host.reachability()``, the tensor plane's path and timings — and a host starts in a
fraction of a daemon's time. Run by :class:`nodes.NetnsPeer`::

    ip netns exec NS python deploy/netns/peer.py --listen /ip4/0.0.0.0/tcp/4001 [--bootstrap ADDR]

It prints one JSON line when ready (``{"peer_id": …, "addrs": […]}``), then answers one JSON line
per request line: ``{"op": "reach"}``, ``{"op": "peers"}``, ``{"op": "connect", "addr": A}``,
``{"op": "send", "peer": P, "bytes": N, "tag": T}`` (a transfer, timed), ``{"op": "recv", "peer": P,
"tag": T}``, ``{"op": "tensor"}`` (plane stats), ``{"op": "dht", "key": K}`` (providers of K),
``{"op": "quit"}``. Errors come back as
``{"error": "…"}``. stdout carries only these lines; logs go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from typing import Any

import numpy as np

from hyphae.protocol.config import HostConfig
from hyphae.protocol.host import Host, open_host
from hyphae.protocol.identity import Identity
from hyphae.protocol.tensor import TensorConfig, open_tensor_plane
from hyphae.protocol.tensor.punch import TcpPuncher
from hyphae.protocol.tensor.spec import Tensor

log = logging.getLogger("netns.peer")


async def _handle(host: Host, plane: Any, request: dict[str, Any]) -> Any:
    op = request.get("op")
    if op == "reach":
        return await host.reachability()
    if op == "peers":
        return [p.to_json() for p in await host.peers()]
    if op == "connect":
        return {"peer_id": await host.connect(request["addr"])}
    if op == "tensor":
        return plane.stats()
    if op == "dht":
        providers = await host.dht_find_providers(request["key"], 20)
        return {"providers": providers, "routing_table": host.routing_table_size()}
    if op == "send":
        payload = np.zeros(int(request["bytes"]), dtype=np.uint8)
        started = time.perf_counter()
        await plane.send(request["peer"], request.get("tag", "bulk"), [Tensor.from_numpy("x", payload)])
        seconds = time.perf_counter() - started
        stats = plane.stats()["peers"].get(request["peer"], {})
        return {"seconds": seconds, "path": stats.get("path"), "bytes": int(request["bytes"])}
    if op == "recv":
        tensors = await plane.recv(request["peer"], request.get("tag", "bulk"))
        return {"bytes": sum(t.spec.nbytes for t in tensors)}
    raise ValueError(f"unknown op {op!r}")


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", default="/ip4/0.0.0.0/tcp/4001")
    parser.add_argument("--data-listen", default="/ip4/0.0.0.0/tcp/0")
    parser.add_argument("--bootstrap", action="append", default=[])
    parser.add_argument("--network", default="nattest")
    parser.add_argument("--nat", default="{}", help="NatConfig fields as JSON")
    parser.add_argument("--no-punch", action="store_true", help="tensor plane without the TCP puncher")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    config = HostConfig(listen=(args.listen,), bootstrap=tuple(args.bootstrap), mdns=False, network=args.network,
                        nat=json.loads(args.nat))
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    async with open_host(Identity.generate(), config, agent="netns-peer/1") as host:
        puncher = None if args.no_punch else TcpPuncher(host)
        async with open_tensor_plane(host, TensorConfig(listen=(args.data_listen,)), puncher=puncher) as plane:
            print(json.dumps({"peer_id": host.peer_id, "addrs": host.addrs, "data_addrs": list(plane.data_addrs)}),
                  flush=True)
            async with asyncio.TaskGroup() as tg:
                while line := await reader.readline():
                    request = json.loads(line)
                    if request.get("op") == "quit":
                        break
                    tg.create_task(_answer(host, plane, request))


async def _answer(host: Host, plane: Any, request: dict[str, Any]) -> None:
    try:
        reply: Any = {"id": request.get("id"), "result": await _handle(host, plane, request)}
    except Exception as exc:  # noqa: BLE001 — every failure goes back to the driver as data
        reply = {"id": request.get("id"), "error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
