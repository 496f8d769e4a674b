"""Fault-tolerant butterfly all-reduce (PROTOCOL.md §11): sans-I/O cores and one asyncio adapter.

``AllReduceRound`` (``round.py``) is one member's side of one round, ``RoundTable``
(``rounds.py``) a node's bookkeeping around its rounds; both are sans-I/O and shared with the
simulator (``testing.py``). ``service.py`` (``AllReduceService``, ``node.allreduce`` of a
running ``Node``) is the one asyncio adapter: sockets, timers, the codec thread pool. See
``round.py`` for the theory of operation.
"""

from __future__ import annotations

from node.allreduce.config import AllReduceConfig, AllReduceSettings
from node.allreduce.events import (
    AllReduceError,
    AllReduceOutcome,
    AllReduceResult,
    Event,
    OutgoingChunk,
    PeerDropped,
    RoundFailed,
    RoundFinished,
    RoundSend,
    TensorKind,
    TooFewContributors,
)
from node.allreduce.layout import round_id
from node.allreduce.round import AllReduceRound, Deadline, Epilogue, RoundState
from node.allreduce.rounds import InboxLimits, Outcome, RoundTable
from protocol.messages.tensor import DropReason

__all__ = [
    "AllReduceConfig",
    "AllReduceError",
    "AllReduceOutcome",
    "AllReduceResult",
    "AllReduceRound",
    "AllReduceSettings",
    "Deadline",
    "DropReason",
    "Epilogue",
    "Event",
    "InboxLimits",
    "Outcome",
    "OutgoingChunk",
    "PeerDropped",
    "RoundFailed",
    "RoundFinished",
    "RoundSend",
    "RoundState",
    "RoundTable",
    "TensorKind",
    "TooFewContributors",
    "round_id",
]
