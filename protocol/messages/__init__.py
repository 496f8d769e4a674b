"""All wire messages, by layer. Importing this package binds every tag in ``MsgType``.

Handshake messages live in ``protocol.handshake`` (they are tied to its state machine);
everything after the handshake lives in the modules below.
"""

from __future__ import annotations

from protocol.messages.control import MemberReport, StatusReply, StatusRequest
from protocol.messages.gossip import (
    GOSSIP_TYPES,
    Ack,
    Alive,
    Dead,
    GpuInfo,
    MemberState,
    MemberStatus,
    Nack,
    NodeMeta,
    Ping,
    PingReq,
    PushPull,
    Suspect,
)

__all__ = [
    "GOSSIP_TYPES",
    "Ack",
    "Alive",
    "Dead",
    "GpuInfo",
    "MemberReport",
    "MemberState",
    "MemberStatus",
    "Nack",
    "NodeMeta",
    "Ping",
    "PingReq",
    "PushPull",
    "StatusReply",
    "StatusRequest",
    "Suspect",
]
