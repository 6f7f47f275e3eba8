"""NAT traversal: reachability (dial-back), UPnP, circuit relay v2, hole punching.

Import-light on purpose: :class:`NatConfig` is needed by :mod:`hyphae.protocol.config`; the
trio machinery lives in :mod:`.service` and is loaded by the host.
"""

from .config import MODES, NatConfig, RelayLimitsConfig
from .reachability import PRIVATE, PUBLIC, UNKNOWN

__all__ = ["NatConfig", "RelayLimitsConfig", "MODES", "PUBLIC", "PRIVATE", "UNKNOWN"]
