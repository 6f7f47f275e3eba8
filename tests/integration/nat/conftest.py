"""Fixtures for NAT tests in network namespaces (root): the harness lives in deploy/netns/.

``deploy/netns`` is not a package (it is deployment tooling, run as scripts too), so it is put on
``sys.path`` here and its modules are imported by name: ``harness`` (topologies, cleanup) and
``nodes`` (daemons and bare hosts inside namespaces).
"""

from __future__ import annotations

import sys
from pathlib import Path

NETNS = Path(__file__).resolve().parents[3] / "deploy" / "netns"
if str(NETNS) not in sys.path:
    sys.path.insert(0, str(NETNS))
