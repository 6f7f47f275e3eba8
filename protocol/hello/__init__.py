"""``/hyphae/hello/1``: two hyphae nodes introduce themselves after connecting.

The dialer sends its :class:`~.wire.Hello`, the listener answers with its own. A peer of another
network, or one that sends anything malformed, is disconnected with a logged reason; a peer that
passes is remembered in the peer book. Wire format in :mod:`.wire`, behaviour in :mod:`.service`.
"""

from .service import HelloService
from .wire import PROTOCOL_ID, Hello

__all__ = ["Hello", "HelloService", "PROTOCOL_ID"]
