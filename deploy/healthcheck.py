#!/opt/hyphae/bin/python
"""Container healthcheck: the daemon's HTTP API answers ``/api/v1/node`` (with its token).

Healthy = the API answers within 2 s with this node's peer id and, if
``HYPHAE_HEALTH_MIN_PEERS`` is set, at least that many connections. The API binds beyond
loopback in a container, so every request needs ``DATA_DIR/api.token``. Exit 0 healthy, 1 not.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.request
from pathlib import Path


def main() -> int:
    data_dir = Path(os.environ.get("HYPHAE_DATA_DIR", "/data"))
    port = os.environ.get("HYPHAE_API", "0.0.0.0:7700").rpartition(":")[2]
    min_peers = int(os.environ.get("HYPHAE_HEALTH_MIN_PEERS", "0"))
    try:
        token = (data_dir / "api.token").read_text().strip()
    except OSError:
        print(f"no {data_dir / 'api.token'} yet (daemon starting)", file=sys.stderr)
        return 1
    req = urllib.request.Request(f"http://127.0.0.1:{port}/api/v1/node",
                                 headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=2) as resp:
            node = json.loads(resp.read())
    except (OSError, ValueError) as exc:
        print(f"API on port {port} does not answer: {exc}", file=sys.stderr)
        return 1
    if not node.get("peer_id"):
        print("API answered without a peer id", file=sys.stderr)
        return 1
    if node.get("connections", 0) < min_peers:
        print(f"{node.get('connections')} connections, want >= {min_peers} (HYPHAE_HEALTH_MIN_PEERS)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
