"""Structured, quiet-by-default logging for the daemon.

One line per event, ``key=value`` for people or one JSON object per line (``--log-json``) for
collectors. py-libp2p logs loudly at WARNING about routine stream resets; its loggers are held at
ERROR unless the level is debug.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

__all__ = ["setup_logging"]

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        extra = " ".join(f"{k}={v}" for k, v in vars(record).items() if k not in _STANDARD)
        line = f"{stamp} {record.levelname.lower():<7} {record.name.removeprefix('hyphae.')}: {record.getMessage()}"
        if extra:
            line += f"  {extra}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


_ROUTINE_LIBP2P = ("Failed to open stream", "Failed to open TCP stream", "MultiselectClient handshake",
                   "[ADDCONN_FAIL]", "Error sending ADD_PROVIDER", "Error getting providers",
                   "Failed to read DHT message")
"""py-libp2p logs these at ERROR, yet in a peer-to-peer network they are routine (a dial to an
address that no longer answers, a peer that hung up mid-handshake); hyphae logs what they mean
for the node itself."""


def _drop_routine_libp2p_errors(record: logging.LogRecord) -> bool:
    if not record.name.startswith("libp2p"):
        return True
    return not str(record.msg).startswith(_ROUTINE_LIBP2P)


def setup_logging(level: str = "info", *, json_lines: bool = False) -> None:
    """Configure the root logger once for the process (idempotent)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if json_lines else _TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    noisy_level = logging.DEBUG if level == "debug" else logging.ERROR
    for name in list(logging.root.manager.loggerDict):
        if name.split(".")[0] in ("libp2p", "multiaddr", "zeroconf", "aiohttp", "asyncio"):
            lib = logging.getLogger(name)
            lib.setLevel(logging.NOTSET)
            lib.handlers.clear()
            lib.propagate = True
    for name in ("libp2p", "multiaddr", "zeroconf"):
        logging.getLogger(name).setLevel(noisy_level)
    if level != "debug":
        handler.addFilter(_drop_routine_libp2p_errors)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
