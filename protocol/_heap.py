"""Hand memory that buffers freed back to the operating system (glibc's ``malloc_trim``).

glibc keeps freed memory in its arenas for reuse: after a peer that had parked 16 MiB in our
stream buffers went, 12 MiB of a host's RSS stayed (measured; ``malloc_trim(0)`` brought it
back to within 4 MiB of where it started). So the host trims once such a peer is gone, not
after every small connection (a trim walks the whole heap). Elsewhere than glibc: a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from collections.abc import Callable

__all__ = ["trim"]

log = logging.getLogger(__name__)

_trim: Callable[[int], int] | None = None
_looked_up = False


def trim() -> bool:
    """Return freed heap memory to the OS; False where there is no ``malloc_trim``. Blocking
    (milliseconds on a large heap; ctypes releases the GIL): call it from a worker thread."""
    global _trim, _looked_up
    if not _looked_up:
        _looked_up = True
        try:
            _trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            log.debug("no malloc_trim here (not glibc); freed memory stays with the allocator")
    if _trim is None:
        return False
    _trim(0)
    return True
