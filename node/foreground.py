"""Run the daemon in the foreground of a terminal: signals, a shutdown watchdog, exit codes.

Ctrl+C or SIGTERM asks the daemon to stop cleanly (state saved); a second Ctrl+C, or a clean
stop that takes longer than :data:`HARD_STOP_S`, ends the process at once. Ctrl+C always stops.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

from hyphae.protocol.errors import HyphaeError

from .config import NodeConfig
from .daemon import Daemon, Service
from .logs import setup_logging

__all__ = ["run_foreground", "HARD_STOP_S"]

log = logging.getLogger(__name__)

HARD_STOP_S = 8.0


def run_foreground(config: NodeConfig, *, on_ready: Callable[[dict[str, Any]], None] | None = None,
                   services: list[Callable[[Daemon], Service]] | None = None) -> int:
    """Run until stopped; return the process exit code (0 clean, 1 failed to start or crashed)."""
    setup_logging(config.log_level, json_lines=config.log_json)
    try:
        return asyncio.run(_main(config, on_ready, services))
    except HyphaeError as exc:
        log.error("%s", exc)
        return 1
    except OSError as exc:
        log.error("%s", exc)
        return 1


async def _main(config: NodeConfig, on_ready: Callable[[dict[str, Any]], None] | None,
                services: list[Callable[[Daemon], Service]] | None) -> int:
    daemon = Daemon(config, services=services or _default_services(config))
    loop = asyncio.get_running_loop()
    interrupts = 0

    def on_signal(signum: int) -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts > 1 and signum == signal.SIGINT:
            sys.stderr.write("second Ctrl+C: exiting now without saving\n")
            os._exit(130)
        daemon.request_stop(f"{signal.Signals(signum).name} received")
        _arm_watchdog()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    await daemon.run(on_ready=on_ready)
    log.info("stopped cleanly")
    return daemon.exit_code


def _arm_watchdog() -> None:
    def expire() -> None:
        sys.stderr.write(f"clean stop took longer than {HARD_STOP_S:.0f} s; exiting now\n")
        os._exit(1)

    timer = threading.Timer(HARD_STOP_S, expire)
    timer.daemon = True
    timer.start()


def _default_services(config: NodeConfig) -> list[Callable[[Daemon], Service]]:
    from .peer_scores import peer_score_service
    from .runstate_service import runstate_service

    from .tensor_service import TensorService

    if not config.train:
        return [runstate_service, TensorService, peer_score_service]
    from .training_service import TrainingService  # only training daemons pay for it

    return [runstate_service, TensorService, TrainingService, peer_score_service]
