"""All-reduce messages (PROTOCOL.md §11): the wire shape of one butterfly all-reduce round.

Semantics live in ``node/allreduce/`` (the sans-I/O round state machine); this module only
fixes shapes and bounds. Every message carries the 16-byte ``round_id`` that all members
derive from (group, key) without talking (``node.allreduce.layout.round_id``). Members are
named by their *index* in the group (node ids sorted ascending), never by node id, so a
round of at most ``MAX_GROUP`` members keeps control messages small.

=============  ===========================================================================
AR_BEGIN       "I am in this round with this layout": gates the data a sender streams
AR_PART        one chunk of the sender's contribution to one slice (reduce-scatter)
AR_AVERAGE     one chunk of a slice's average, computed by the slice's owner (all-gather)
AR_REPORT      a member's state, to the round leader: contributions and averages held
AR_COMMIT      the leader's decision for an epoch: contributors, receivers, slice owners
AR_FINISH      the leader's end of the round: return epoch ``epoch``'s result (or abort)
AR_CANCEL      the sender cancelled its all-reduce: drop it now, do not wait for a deadline
AR_TAKEOVER    the sender succeeds a failed leader: send your reports to it from now on
=============  ===========================================================================
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import ClassVar

from protocol.schema import (
    Bool,
    Bytes,
    EnumOf,
    Float,
    IntRange,
    ListOf,
    Message,
    Struct,
    StructOf,
    UInt,
    register,
    spec,
)
from protocol.tags import MsgType
from protocol.tensor.chunk import TensorChunk

#: Most members in one all-reduce group (member indices fit one byte).
MAX_GROUP = 256

#: Most epochs (leader commits) in one round; a round needing more fails.
MAX_EPOCHS = 64

#: Largest flattened tensor one round averages (elements).
MAX_NUMEL = 1 << 40

#: Length of a round id and of a layout digest.
ROUND_ID_BYTES = 16
LAYOUT_BYTES = 16

ROUND_ID = Bytes(ROUND_ID_BYTES, min_len=ROUND_ID_BYTES)
MEMBER = IntRange(0, MAX_GROUP - 1)
EPOCH = IntRange(0, MAX_EPOCHS)
MEMBERS = ListOf(MEMBER, max_len=MAX_GROUP)
CHUNK_INDEX = UInt(32)


class DropReason(enum.IntEnum):
    """Why a member's contribution is not in a round's average. APPEND ONLY."""

    DIED = 0
    """Its connection failed or membership declared it dead."""
    STALLED = 1
    """It missed a deadline: no Begin, no complete contribution, no report, no average."""
    CANCELLED = 2
    """It cancelled its all-reduce (AR_CANCEL)."""
    NON_FINITE = 3
    """Its contribution holds NaN or Inf."""
    NORM_OUTLIER = 4
    """Its contribution's L2 norm exceeds ``outlier_factor`` x the median norm."""
    MISMATCH = 5
    """Its AR_BEGIN announced a different tensor size or layout."""
    PROTOCOL_ERROR = 6
    """It sent an all-reduce message that cannot be valid (index out of range, wrong size)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Exclusion(Struct):
    """A member left out of the contributors, and why."""

    member: int = spec(MEMBER)
    reason: DropReason = spec(EnumOf(DropReason))


@dataclass(frozen=True, slots=True, kw_only=True)
class Holding(Struct):
    """The complete, finite contributions to one slice that a member holds."""

    slice: int = spec(MEMBER)
    senders: tuple[int, ...] = spec(MEMBERS)
    """Member indices, ascending."""
    sq_norms: tuple[float, ...] = spec(ListOf(Float(0.0), max_len=MAX_GROUP))
    """Sum of squares of each sender's contribution to this slice (same order as ``senders``)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Resend(Struct):
    """Members that must (re)send their contribution to ``slice`` to its owner."""

    slice: int = spec(MEMBER)
    senders: tuple[int, ...] = spec(MEMBERS)


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class ArBegin(Message):
    """Sent once to every other member when a member starts the round."""

    TAG: ClassVar[MsgType] = MsgType.AR_BEGIN
    round_id: bytes = spec(ROUND_ID)
    numel: int = spec(IntRange(1, MAX_NUMEL))
    layout: bytes = spec(Bytes(LAYOUT_BYTES, min_len=LAYOUT_BYTES))
    """Digest of (numel, slice weights, chunk_elements, codec name): equal or MISMATCH."""


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class ArPart(Message):
    """Chunk ``chunk`` of the sender's contribution to slice ``slice``, to the slice's owner."""

    TAG: ClassVar[MsgType] = MsgType.AR_PART
    BLOB: ClassVar[tuple[str, ...]] = ("data", "payload")
    round_id: bytes = spec(ROUND_ID)
    slice: int = spec(MEMBER)
    chunk: int = spec(CHUNK_INDEX)
    data: TensorChunk = spec(StructOf(TensorChunk))


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class ArAverage(Message):
    """Chunk ``chunk`` of slice ``slice``'s average over the contributors of epoch ``epoch``."""

    TAG: ClassVar[MsgType] = MsgType.AR_AVERAGE
    BLOB: ClassVar[tuple[str, ...]] = ("data", "payload")
    round_id: bytes = spec(ROUND_ID)
    epoch: int = spec(IntRange(0, MAX_EPOCHS))
    """The commit this average is for; 0: an *early* average (§11.3), sent by the slice's
    initial owner before any commit, over every member of the group."""
    slice: int = spec(MEMBER)
    chunk: int = spec(CHUNK_INDEX)
    data: TensorChunk = spec(StructOf(TensorChunk))


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class ArReport(Message):
    """A member's state, sent to the leader it follows (PROTOCOL.md §11.5)."""

    TAG: ClassVar[MsgType] = MsgType.AR_REPORT
    round_id: bytes = spec(ROUND_ID)
    epoch: int = spec(EPOCH)
    """Epoch of the latest commit the sender accepted (0: none yet)."""
    leader: int = spec(MEMBER)
    holdings: tuple[Holding, ...] = spec(ListOf(StructOf(Holding), max_len=MAX_GROUP))
    averages: tuple[int, ...] = spec(MEMBERS)
    """Slices whose average, valid under commit ``epoch``, the sender holds completely."""
    exclusions: tuple[Exclusion, ...] = spec(ListOf(StructOf(Exclusion), max_len=MAX_GROUP))
    """Members the sender saw fail or send non-finite values."""
    timed_out: bool = spec(Bool(), default=False)
    """The sender's own deadline for this phase has passed: what it lacks now is late."""


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class ArCommit(Message):
    """The leader's decision for epoch ``epoch`` (PROTOCOL.md §11.6)."""

    TAG: ClassVar[MsgType] = MsgType.AR_COMMIT
    round_id: bytes = spec(ROUND_ID)
    epoch: int = spec(IntRange(1, MAX_EPOCHS))
    leader: int = spec(MEMBER)
    """Who leads this epoch: the first member of ``receivers``."""
    contributors: tuple[int, ...] = spec(MEMBERS)
    """S: every average of this epoch is the mean over exactly these members, ascending."""
    contributors_since: int = spec(IntRange(0, MAX_EPOCHS))
    """First epoch with this same S: averages computed since then by the same owner stay valid
    (0: S is the whole group, so the initial owners' early averages are valid too)."""
    receivers: tuple[int, ...] = spec(MEMBERS)
    """R: members still in the round (they get the averages); S is a subset."""
    owners: tuple[int, ...] = spec(MEMBERS)
    """Owner of each slice, indexed by slice (one slice per member of the group)."""
    resend: tuple[Resend, ...] = spec(ListOf(StructOf(Resend), max_len=MAX_GROUP))
    dropped: tuple[Exclusion, ...] = spec(ListOf(StructOf(Exclusion), max_len=MAX_GROUP))
    """Every member not in S, with the reason."""


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class ArFinish(Message):
    """End of the round at ballot (epoch, leader): return that epoch's averages, or fail."""

    TAG: ClassVar[MsgType] = MsgType.AR_FINISH
    round_id: bytes = spec(ROUND_ID)
    epoch: int = spec(EPOCH)
    leader: int = spec(MEMBER)
    aborted: bool = spec(Bool(), default=False)
    """The round failed (no contributor left, or too many epochs): every member fails."""


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class ArCancel(Message):
    TAG: ClassVar[MsgType] = MsgType.AR_CANCEL
    round_id: bytes = spec(ROUND_ID)


@register
@dataclass(frozen=True, slots=True, kw_only=True)
class ArTakeover(Message):
    """The sender leads from now on: every member ranked before it in R is failed (stalled)."""

    TAG: ClassVar[MsgType] = MsgType.AR_TAKEOVER
    round_id: bytes = spec(ROUND_ID)
    epoch: int = spec(EPOCH)
    """The latest commit epoch the new leader knows."""
    leader: int = spec(MEMBER)


ALLREDUCE_CONTROL_TYPES = (ArBegin, ArReport, ArCommit, ArFinish, ArCancel, ArTakeover)
ALLREDUCE_TENSOR_TYPES = (ArPart, ArAverage)
