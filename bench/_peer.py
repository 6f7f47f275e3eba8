"""A benchmark peer: a hyphae Host serving an echo protocol plus a plain asyncio TCP echo server.

Run by bench/control_plane.py as a subprocess; prints one JSON line with its addresses, then
serves until killed. Both servers use the same framing (4-byte length + msgpack body), so the
TCP echo is a fair baseline for the libp2p round trip.
"""

import argparse
import asyncio
import json
import logging

from hyphae.protocol.config import HostConfig
from hyphae.protocol.host import open_host
from hyphae.protocol.identity import Identity

ECHO = "/hyphae/echo/1"


async def tcp_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            header = await reader.readexactly(4)
            body = await reader.readexactly(int.from_bytes(header, "big"))
            writer.write(header + body)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bootstrap", action="append", default=[])
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    tcp = await asyncio.start_server(tcp_echo, "127.0.0.1", 0)
    config = HostConfig(listen=("/ip4/127.0.0.1/tcp/0",), mdns=False, bootstrap=tuple(args.bootstrap))
    async with open_host(Identity.generate(), config, agent="bench-peer") as host:

        async def echo(peer_id: str, request: object) -> object:
            return request

        host.serve(ECHO, echo)
        print(json.dumps({"addr": host.addrs[0], "peer_id": host.peer_id,
                          "tcp_port": tcp.sockets[0].getsockname()[1]}), flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
