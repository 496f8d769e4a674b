"""Every wire message, bound: import this module before decoding anything.

Importing it binds every tag in ``protocol.tags.MsgType`` to its class (handshake messages
live in ``protocol.handshake``, the rest in ``protocol.messages``). Completeness of the tag
table is checked by ``check_complete()`` (run by the test suite, and by the node at start-up).
"""

from __future__ import annotations

import protocol.handshake
import protocol.messages  # binds gossip, control and any later message modules)
from protocol.schema import REGISTRY, check_registry_complete
from protocol.tags import MsgType

HANDSHAKE_TYPES = protocol.handshake.HANDSHAKE_TYPES


def check_complete() -> None:
    """Raise ``TypeError`` if some tag in ``MsgType`` has no message class."""
    check_registry_complete(MsgType, REGISTRY)
