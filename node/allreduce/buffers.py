"""Chunked slice buffers and the fixed-order reduction.

A ``SliceBuffer`` collects the chunks of one slice (a contribution or an average) in any
order; duplicates are ignored, and the buffer is complete when every chunk arrived. The
reduction sums contributions in fp64 in ascending member order and divides once, so the
result depends only on the set of contributors, never on arrival order (the same
arithmetic as ``np.stack(xs).astype(np.float64).mean(axis=0).astype(np.float32)``).

Norms: a contribution's squared L2 norm is summed per chunk as it arrives (``chunk_sq``:
fp32 products summed in fp32 within blocks of ``NORM_BLOCK`` elements, the blocks in fp64;
relative error ~1e-7, ~4x faster than an fp64 pass) and the chunks' sums are added in chunk
order at completion, so the value does not depend on arrival order. The same number says
whether the chunk is finite: the fast sum is finite for every finite chunk whose values stay
below ~1e19 in magnitude; otherwise the exact fp64 sum decides (finite fp32 squares cannot
overflow fp64), so a huge-but-finite value is never mistaken for NaN/Inf.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from node.allreduce.events import Floats
from node.allreduce.layout import chunk_count, chunk_span
from protocol.messages.tensor import DropReason, Holding


class SliceBuffer:
    """One slice's chunks. A buffer filled by ``put`` keeps each received chunk by reference
    (the decoded array, made read-only): no copy on the event loop; ``values`` joins them on
    first use and ``copy_into`` writes them straight into a result. A lazy average (``mean_of``)
    and a ``full`` buffer are one contiguous array (``values``), sliced per chunk."""

    __slots__ = ("_chunk", "_chunks", "_length", "_parts", "_sq", "_values", "epoch", "got", "owner",
                 "remaining", "sq_norm")

    def __init__(self, length: int, chunk_elements: int, *, epoch: int = 0, owner: int = -1,
                 norms: bool = False) -> None:
        self._chunk = chunk_elements
        self._length = length
        self._values: Floats | None = None
        n = chunk_count(length, chunk_elements)
        self._chunks: list[Floats | None] = [None] * n
        self.got = bytearray(n)
        self.remaining = n
        self.epoch = epoch
        self.owner = owner
        self.sq_norm = 0.0
        """The slice's squared L2 norm once complete (a contribution, ``norms=True``), else 0."""
        self._sq: list[float] | None = [0.0] * n if norms else None
        self._parts: Sequence[Floats | SliceBuffer] = ()

    @classmethod
    def mean_of(cls, parts: Sequence[Floats | SliceBuffer], chunk_elements: int, *, epoch: int,
                owner: int) -> SliceBuffer:
        """An average computed lazily, chunk by chunk (``ensure``), from equally long ``parts``
        in the given order, so reducing pipelines with sending. (With a lossy codec the
        adapter replaces it in the result with what its receivers decode:
        ``rounds.same_as_receivers``.)"""
        first = parts[0]
        length = first.size if isinstance(first, np.ndarray) else first._length
        buf = cls(length, chunk_elements, epoch=epoch, owner=owner)
        buf._values = np.empty(length, np.float32)
        buf._parts = parts
        return buf

    def ensure(self, index: int) -> None:
        """Compute chunk ``index`` of a lazy average if it is not there yet."""
        if self._parts and not self.got[index]:
            start, count = chunk_span(self._length, self._chunk, index)
            chunks = [p.chunk(index) if isinstance(p, SliceBuffer) else p[start:start + count]
                      for p in self._parts]
            self.put_mean(index, chunks)

    def put_mean(self, index: int, chunks: Sequence[Floats]) -> bool:
        """Store chunk ``index`` as the mean of ``chunks`` (``reduce_mean``); ``put``'s result."""
        return self.put(index, reduce_mean(chunks, self._chunk))

    def ensure_all(self) -> None:
        for index in range(len(self.got)):
            self.ensure(index)

    @classmethod
    def blank(cls, length: int, chunk_elements: int, *, epoch: int, owner: int) -> SliceBuffer:
        """An average filled chunk by chunk with ``put`` (one contiguous array: ``values``;
        a chunk's slice of it is meaningful once ``got``)."""
        buf = cls(length, chunk_elements, epoch=epoch, owner=owner)
        buf._values = np.empty(length, np.float32)
        return buf

    @classmethod
    def full(cls, values: Floats, chunk_elements: int, *, epoch: int = 0, owner: int = -1) -> SliceBuffer:
        """A complete buffer over ``values`` (not copied; made read-only)."""
        buf = cls(0, chunk_elements, epoch=epoch, owner=owner)
        view = values.view()
        view.flags.writeable = False
        buf._values, buf._length = view, view.size
        buf._chunks = []
        buf.sq_norm = sq_norm(view, chunk_elements)
        return buf

    @property
    def size(self) -> int:
        return self._length

    @property
    def values(self) -> Floats:
        """The whole slice as one read-only array (joined from the chunks on first use)."""
        if self._values is None:
            out: Floats = np.empty(self._length, np.float32)
            self.copy_into(out)
            out.flags.writeable = False
            self._values, self._chunks = out, []
        return self._values

    def chunk(self, index: int) -> Floats:
        """Chunk ``index`` (it must be there)."""
        if self._values is not None:
            start, count = chunk_span(self._length, self._chunk, index)
            return self._values[start:start + count]
        data = self._chunks[index]
        assert data is not None, "chunk not received"
        return data

    def copy_into(self, out: Floats) -> None:
        """Write the (complete) slice into ``out``, chunk by chunk."""
        if self._values is not None:
            out[:] = self._values
            return
        for index, data in enumerate(self._chunks):
            start, count = chunk_span(self._length, self._chunk, index)
            out[start:start + count] = data

    @property
    def complete(self) -> bool:
        return self.remaining == 0

    def expects(self, index: int, count: int) -> bool:
        """Whether chunk ``index`` exists and has ``count`` elements."""
        n = len(self.got)
        return 0 <= index < n and chunk_span(self._length, self._chunk, index)[1] == count

    def put(self, index: int, data: Floats, *, sq: float = 0.0) -> bool:
        """Store chunk ``index`` (checked with ``expects``); True if this completed the buffer.
        Outside a lazy average ``data`` is kept, not copied: the caller must not change it.
        ``sq`` is the chunk's ``chunk_sq`` (a contribution's; ignored otherwise)."""
        if self.got[index]:
            return False
        if self._sq is not None:
            self._sq[index] = sq
        if self._values is not None:
            start, count = chunk_span(self._length, self._chunk, index)
            self._values[start:start + count] = data
        else:
            view = data.view()
            view.flags.writeable = False
            self._chunks[index] = view
        self.got[index] = 1
        self.remaining -= 1
        if self.remaining:
            return False
        if self._sq is not None:
            # The same blocks, in the same order, as ``sq_norm(values, chunk)``: bit-identical.
            self.sq_norm = sum(self._sq, 0.0)
            self._sq = None
        if self._values is not None:
            self._values.flags.writeable = False
        self._parts = ()
        return True


#: Elements summed in fp32 before the partial sum joins the fp64 total (``chunk_sq``).
NORM_BLOCK = 4096


def chunk_sq(part: Floats) -> float:
    """Sum of squares of ``part``: finite iff every value is finite (module docstring).
    einsum, not BLAS: BLAS threads would fight the node's own for the cores."""
    n = part.size - part.size % NORM_BLOCK
    rows = part[:n].reshape(-1, NORM_BLOCK)
    tail = part[n:]
    fast = float(np.einsum("ij,ij->i", rows, rows).sum(dtype=np.float64)) + float(np.einsum("i,i->", tail, tail))
    if math.isfinite(fast):
        return fast
    return float(np.einsum("i,i->", part, part, dtype=np.float64))  # exact: non-finite iff a value is


def sq_norm(values: Floats, block: int) -> float:
    """Sum of squares, ``chunk_sq`` per block of ``block`` elements added in order."""
    total = 0.0
    for start in range(0, values.size, block):
        total += chunk_sq(values[start:start + block])
    return total


#: Elements reduced at a time: the fp64 accumulator (512 KiB) stays in the core's cache.
REDUCE_BLOCK = 1 << 16


def reduce_mean(parts: Sequence[Floats], block: int = REDUCE_BLOCK) -> Floats:
    """Mean of equally long fp32 arrays: fp64 sum in the given order, one division, fp32."""
    length = parts[0].size
    out: Floats = np.empty(length, np.float32)
    count = float(len(parts))
    block = min(block, REDUCE_BLOCK)
    scratch = np.empty(min(block, length), np.float64)
    for start in range(0, length, block):
        stop = min(length, start + block)
        acc = scratch[:stop - start]
        np.copyto(acc, parts[0][start:stop])
        for p in parts[1:]:
            np.add(acc, p[start:stop], out=acc)
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
