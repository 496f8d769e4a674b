"""Chunked slice buffers and the fixed-order reduction.

A ``SliceBuffer`` collects the chunks of one slice (a contribution or an average) in any
order; duplicates are ignored, and the buffer is complete when every chunk arrived. The
reduction sums contributions in fp64 in ascending member order and divides once, so the
result depends only on the set of contributors, never on arrival order (the same
arithmetic as ``np.stack(xs).astype(np.float64).mean(axis=0).astype(np.float32)``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from node.allreduce.events import Floats
from node.allreduce.layout import chunk_count, chunk_span
from protocol.messages.tensor import DropReason, Holding

Roundtrip = Callable[[Floats], Floats]


class SliceBuffer:
    __slots__ = ("_chunk", "_parts", "_roundtrip", "epoch", "got", "owner", "remaining", "sq_norm",
                 "values")

    def __init__(self, length: int, chunk_elements: int, *, epoch: int = 0, owner: int = -1) -> None:
        self._chunk = chunk_elements
        self.values: Floats = np.empty(length, np.float32)
        n = chunk_count(length, chunk_elements)
        self.got = bytearray(n)
        self.remaining = n
        self.epoch = epoch
        self.owner = owner
        self.sq_norm = 0.0
        self._parts: Sequence[Floats] = ()
        self._roundtrip: Roundtrip | None = None

    @classmethod
    def mean_of(cls, parts: Sequence[Floats], chunk_elements: int, *, epoch: int, owner: int,
                roundtrip: Roundtrip | None = None) -> SliceBuffer:
        """An average computed lazily, chunk by chunk (``ensure``), from equally long ``parts``
        in the given order, so reducing pipelines with sending. ``roundtrip`` (a lossy
        codec's decode(encode(x))) is applied to each chunk, so this member keeps exactly
        what its receivers will decode."""
        buf = cls(parts[0].size, chunk_elements, epoch=epoch, owner=owner)
        buf._parts, buf._roundtrip = parts, roundtrip
        return buf

    def ensure(self, index: int) -> None:
        """Compute chunk ``index`` of a lazy average if it is not there yet."""
        if self._parts and not self.got[index]:
            start, count = chunk_span(self.values.size, self._chunk, index)
            mean = reduce_mean([p[start:start + count] for p in self._parts], self._chunk)
            if self._roundtrip is not None:
                mean = self._roundtrip(mean)
                if mean.dtype != np.float32 or mean.shape != (count,):
                    raise ValueError("average roundtrip must return float32 of the same length")
            self.put(index, mean)

    def ensure_all(self) -> None:
        for index in range(len(self.got)):
            self.ensure(index)

    @classmethod
    def full(cls, values: Floats, chunk_elements: int, *, epoch: int = 0, owner: int = -1) -> SliceBuffer:
        """A complete buffer over ``values`` (not copied; made read-only)."""
        buf = cls(0, chunk_elements, epoch=epoch, owner=owner)
        view = values.view()
        view.flags.writeable = False
        buf.values = view
        buf.sq_norm = sq_norm(view, chunk_elements)
        return buf

    @property
    def complete(self) -> bool:
        return self.remaining == 0

    def expects(self, index: int, count: int) -> bool:
        """Whether chunk ``index`` exists and has ``count`` elements."""
        n = len(self.got)
        return 0 <= index < n and chunk_span(self.values.size, self._chunk, index)[1] == count

    def put(self, index: int, data: Floats) -> bool:
        """Store chunk ``index`` (checked with ``expects``); True if this completed the buffer."""
        if self.got[index]:
            return False
        start, count = chunk_span(self.values.size, self._chunk, index)
        self.values[start:start + count] = data
        self.got[index] = 1
        self.remaining -= 1
        if self.remaining:
            return False
        self.sq_norm = sq_norm(self.values, self._chunk) if not self._parts else 0.0
        self.values.flags.writeable = False
        self._parts = ()
        return True


def sq_norm(values: Floats, block: int) -> float:
    """Sum of squares in fp64, block by block (bounded temporary memory)."""
    total = 0.0
    for start in range(0, values.size, block):
        part = values[start:start + block].astype(np.float64)
        total += float(np.dot(part, part))
    return total


def all_finite(values: Floats) -> bool:
    # The sum is non-finite iff some element is (finite float32 sums cannot overflow fp64).
    return bool(np.isfinite(np.sum(values, dtype=np.float64)))


def reduce_mean(parts: Sequence[Floats], block: int) -> Floats:
    """Mean of equally long fp32 arrays: fp64 sum in the given order, one division, fp32."""
    length = parts[0].size
    out: Floats = np.empty(length, np.float32)
    count = float(len(parts))
    for start in range(0, length, block):
        stop = min(length, start + block)
        acc = parts[0][start:stop].astype(np.float64)
        for p in parts[1:]:
            acc += p[start:stop]
        acc /= count
        out[start:stop] = acc
    out.flags.writeable = False
    return out


def holdings_of(contrib: Mapping[int, Mapping[int, SliceBuffer]],
                bad: Mapping[int, DropReason]) -> tuple[Holding, ...]:
    """What a report says we hold: per slice, the complete contributions of good senders."""
    out = []
    for s in sorted(contrib):
        senders = sorted(j for j, b in contrib[s].items() if b.complete and j not in bad)
        if senders:
            norms = tuple(contrib[s][j].sq_norm for j in senders)
            out.append(Holding(slice=s, senders=tuple(senders), sq_norms=norms))
    return tuple(out)
