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
from protocol.messages.tensor import (
    ALLREDUCE_CONTROL_TYPES,
    ALLREDUCE_TENSOR_TYPES,
    ArAverage,
    ArBegin,
    ArCancel,
    ArCommit,
    ArFinish,
    ArPart,
    ArReport,
    ArTakeover,
    DropReason,
    Exclusion,
    Holding,
    Resend,
)

__all__ = [
    "ALLREDUCE_CONTROL_TYPES",
    "ALLREDUCE_TENSOR_TYPES",
    "GOSSIP_TYPES",
    "Ack",
    "Alive",
    "ArAverage",
    "ArBegin",
    "ArCancel",
    "ArCommit",
    "ArFinish",
    "ArPart",
    "ArReport",
    "ArTakeover",
    "Dead",
    "DropReason",
    "Exclusion",
    "GpuInfo",
    "Holding",
    "MemberReport",
    "MemberState",
    "MemberStatus",
    "Nack",
    "NodeMeta",
    "Ping",
    "PingReq",
    "PushPull",
    "Resend",
    "StatusReply",
    "StatusRequest",
    "Suspect",
]
