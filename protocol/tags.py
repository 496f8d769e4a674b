"""The message type table. APPEND ONLY: a tag, once shipped, keeps its number and meaning.

Numbers are grouped in ranges so that layers can grow independently:

====== ===========================================================
0-15   handshake and connection control (protocol/handshake.py)
16-31  membership gossip, SWIM (protocol/messages/gossip.py)
32-47  node control: status queries (protocol/messages/control.py)
48-79  tensors and all-reduce (protocol/messages/tensor.py)
====== ===========================================================
"""

from __future__ import annotations

import enum


class MsgType(enum.IntEnum):
    # 0-15: handshake and connection control
    HANDSHAKE_INIT = 1
    HANDSHAKE_RESPONSE = 2
    HANDSHAKE_FINISH = 3
    ERROR = 4
    GOODBYE = 5

    # 16-31: SWIM membership gossip
    PING = 16
    PING_REQ = 17
    ACK = 18
    NACK = 19
    ALIVE = 20
    SUSPECT = 21
    DEAD = 22
    PUSH_PULL = 23

    # 32-47: node control
    STATUS_REQUEST = 32
    STATUS_REPLY = 33

    # 48-79: tensors and all-reduce (see protocol/messages/tensor.py)
    AR_BEGIN = 48
    AR_PART = 49
    AR_AVERAGE = 50
    AR_REPORT = 51
    AR_COMMIT = 52
    AR_FINISH = 53
    AR_CANCEL = 54
    AR_TAKEOVER = 55
