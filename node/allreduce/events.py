"""What an all-reduce round asks of its adapter (sends) and tells it (events, the result)."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from node.core import Send
from protocol.errors import StarmeshError
from protocol.messages.tensor import ArAverage, ArPart, DropReason
from protocol.schema import Message
from protocol.tensor.chunk import TensorChunk

Floats = NDArray[np.float32]


class TensorKind(enum.Enum):
    PART = "part"
    """A contribution chunk, sender -> slice owner (reduce-scatter)."""
    AVERAGE = "average"
    """An average chunk, slice owner -> receiver (all-gather)."""


@dataclass(frozen=True, slots=True, eq=False)
class OutgoingChunk:
    """A tensor chunk a round asks its adapter to send (the ``message`` of a BULK ``Send``):
    encode ``values`` with the round's codec, wrap it with ``to_message``, write it to the
    ``Send``'s ``dest``, then call ``on_sent(dest, nbytes)`` once it is written.

    ``values`` is a read-only view into the round's buffers; it stays valid and unchanged
    until the round ends (encode it in an executor without copying).
    """

    kind: TensorKind
    round_id: bytes
    epoch: int
    slice: int
    chunk: int
    offset: int
    """Index of ``values[0]`` in the flattened tensor (pass to ``encode_chunk(offset=)``)."""
    values: Floats

    @property
    def nbytes(self) -> int:
        """What this send charges to the destination's window: raw fp32 bytes."""
        return int(self.values.nbytes)

    def to_message(self, data: TensorChunk) -> ArPart | ArAverage:
        if self.kind is TensorKind.PART:
            return ArPart(round_id=self.round_id, slice=self.slice, chunk=self.chunk, data=data)
        return ArAverage(round_id=self.round_id, epoch=self.epoch, slice=self.slice,
                         chunk=self.chunk, data=data)


RoundSend = Send[Message | OutgoingChunk]
"""One output of a round (``node.core.Send``): a control ``Message`` on CONTROL, or an
``OutgoingChunk`` to encode and send on BULK."""


@dataclass(frozen=True, slots=True, eq=False)
class AllReduceResult:
    """The outcome every surviving member of a round agrees on."""

    round_id: bytes
    average: Floats
    """Mean over ``contributors`` (fp64 sum in member order, divided, cast to fp32); a new array."""
    contributors: tuple[bytes, ...]
    """Node ids whose contribution is in ``average``, ascending."""
    dropped: Mapping[bytes, DropReason]
    """Every other member of the group, with the reason its contribution is not in ``average``."""
    epoch: int
    """The commit epoch the result belongs to (1 when nothing failed after the first commit)."""
    contributed: bool
    """Whether this member's own contribution is in ``average``."""


class AllReduceError(StarmeshError):
    """This member leaves the round without a result (dropped, cancelled, aborted, timed out)."""

    def __init__(self, msg: str, *, reason: DropReason | None = None) -> None:
        super().__init__(msg)
        self.reason = reason


#: Contributors a result needs unless the caller passes ``min_contributors``: an "average"
#: of this node's tensor alone is no average, so a group of one never succeeds by default.
DEFAULT_MIN_CONTRIBUTORS = 2


class TooFewContributors(AllReduceError):
    """The average would cover fewer members than the caller's ``min_contributors`` (default
    ``DEFAULT_MIN_CONTRIBUTORS``): the group is smaller than that (raised before any round
    starts; ``outcome`` is None), or members dropped out of the round (``outcome``: the
    result the round did agree on, e.g. this node's own tensor when every peer failed)."""

    def __init__(self, msg: str, *, required: int, contributors: tuple[bytes, ...],
                 outcome: AllReduceOutcome | None = None) -> None:
        super().__init__(msg)
        self.required = required
        """The ``min_contributors`` in force."""
        self.contributors = contributors
        """Who is in the average (the round ran) or in the group (it did not), ascending."""
        self.outcome = outcome


@dataclass(frozen=True, slots=True)
class RoundFinished:
    result: AllReduceResult


@dataclass(frozen=True, slots=True)
class RoundFailed:
    error: AllReduceError


@dataclass(frozen=True, slots=True)
class PeerDropped:
    """This member stopped waiting for ``node`` (a log line; PROTOCOL_ERROR: close its connection)."""

    node: bytes
    reason: DropReason
    detail: str = ""


Event = RoundFinished | RoundFailed | PeerDropped


@dataclass(frozen=True, slots=True, eq=False)
class AllReduceOutcome:
    """What ``AllReduceService.all_reduce`` (``Node.all_reduce``) returns: the average and
    the report of who contributed."""

    tensor: Any
    """The average as the caller's kind of tensor (numpy / torch, shape, dtype, device); the
    input object itself when ``in_place``."""
    contributors: tuple[bytes, ...]
    """Node ids whose tensors are in the average, ascending."""
    dropped: Mapping[bytes, DropReason]
    """Every other member of the group, with the reason it is not in the average."""
    round_id: bytes
    epoch: int
    contributed: bool
    """Whether this node's own tensor is in the average."""
    seconds: float
    """Wall time of the call."""
