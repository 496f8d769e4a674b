"""Fault-tolerant butterfly all-reduce, sans-I/O (PROTOCOL.md §11).

``AllReduceRound`` is one member's side of one round; ``node/`` drives it with sockets,
timers and an executor for the codecs. See ``round.py`` for the theory of operation.
"""

from __future__ import annotations

from node.allreduce.config import AllReduceConfig
from node.allreduce.events import (
    AllReduceError,
    AllReduceResult,
    Event,
    PeerDropped,
    RoundFailed,
    RoundFinished,
    Send,
    SendMessage,
    SendTensor,
    TensorKind,
)
from node.allreduce.layout import round_id
from node.allreduce.round import AllReduceRound, RoundState
from protocol.messages.tensor import DropReason

__all__ = [
    "AllReduceConfig",
    "AllReduceError",
    "AllReduceResult",
    "AllReduceRound",
    "DropReason",
    "Event",
    "PeerDropped",
    "RoundFailed",
    "RoundFinished",
    "RoundState",
    "Send",
    "SendMessage",
    "SendTensor",
    "TensorKind",
    "round_id",
]
