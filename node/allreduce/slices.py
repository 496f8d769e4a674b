"""What one member holds of a round: contributions per (slice, sender), one average per slice.

Incoming chunks are checked against the layout (slice exists and is non-empty, chunk index
in range, exact length) and stored once; a duplicate is ignored. A chunk holding NaN or Inf
marks its sender NON_FINITE and drops everything it sent. Memory is bounded by the round:
one buffer per (slice, sender) and one average per slice.
"""

from __future__ import annotations

import math

from node.allreduce.buffers import SliceBuffer, chunk_sq, holdings_of
from node.allreduce.events import Floats
from protocol.errors import RemoteProtocolError
from protocol.messages.tensor import DropReason, Holding


class SliceStore:
    def __init__(self, sizes: tuple[int, ...], chunk_elements: int) -> None:
        self.sizes = sizes
        self.chunk = chunk_elements
        self.contrib: dict[int, dict[int, SliceBuffer]] = {}
        """slice -> sender -> contribution."""
        self.averages: dict[int, SliceBuffer] = {}
        """slice -> the one average we hold (``epoch`` and ``owner`` say which)."""
        self.bad: dict[int, DropReason] = {}
        """Senders found sending non-finite values."""

    def _check_slice(self, s: int, what: str) -> None:
        if not (0 <= s < len(self.sizes) and self.sizes[s]):
            raise RemoteProtocolError(f"{what} for empty or unknown slice {s}")

    def put_part(self, sender: int, s: int, index: int, values: Floats) -> bool:
        """Store a contribution chunk; True if this changed what we hold (completion or NaN)."""
        self._check_slice(s, "AR_PART")
        if sender in self.bad:
            return False
        per = self.contrib.setdefault(s, {})
        buf = per.get(sender) or SliceBuffer(self.sizes[s], self.chunk, norms=True)
        if not buf.expects(index, values.size):
            raise RemoteProtocolError(f"AR_PART slice {s} chunk {index} of {values.size} elements")
        per[sender] = buf
        if buf.complete or buf.got[index]:
            return False
        sq = chunk_sq(values)
        if not math.isfinite(sq):
            self.bad[sender] = DropReason.NON_FINITE
            for p in self.contrib.values():
                p.pop(sender, None)
            return True
        return buf.put(index, values, sq=sq)

    def put_average(self, owner: int, epoch: int, s: int, index: int, values: Floats, *,
                    committed_owner: int | None) -> bool:
        """Store an average chunk; a newer epoch replaces what we hold, and at the same
        epoch only ``committed_owner`` does. True if this completed an average."""
        self._check_slice(s, "AR_AVERAGE")
        buf = self.averages.get(s)
        if buf is None or (buf.epoch, buf.owner) != (epoch, owner):
            if not (buf is None or epoch > buf.epoch or (epoch == buf.epoch and committed_owner == owner)):
                return False
            buf = SliceBuffer(self.sizes[s], self.chunk, epoch=epoch, owner=owner)
        if not buf.expects(index, values.size):
            raise RemoteProtocolError(f"AR_AVERAGE slice {s} chunk {index} of {values.size} elements")
        self.averages[s] = buf
        return buf.put(index, values)

    def put_own(self, me: int, s: int, values: Floats) -> None:
        """Register our own contribution to slice ``s`` (a view of our tensor)."""
        per = self.contrib.setdefault(s, {})
        if me in per or not self.sizes[s]:
            return
        buf = SliceBuffer.full(values, self.chunk)
        if math.isfinite(buf.sq_norm):
            per[me] = buf
        else:
            self.bad[me] = DropReason.NON_FINITE

    def complete_from(self, s: int, senders: tuple[int, ...]) -> list[SliceBuffer] | None:
        """The contributions of ``senders`` to slice ``s`` in that order, if all complete."""
        per = self.contrib.get(s, {})
        if any(j in self.bad or j not in per or not per[j].complete for j in senders):
            return None
        return [per[j] for j in senders]

    def chunk_from(self, s: int, index: int, senders: range) -> list[Floats] | None:
        """Chunk ``index`` of every sender's contribution to slice ``s``, in sender order, if
        every one of them has it (and none sent NaN/Inf)."""
        per = self.contrib.get(s, {})
        if any(j in self.bad or j not in per for j in senders):
            return None
        bufs = [per[j] for j in senders]
        if not all(b.complete or b.got[index] for b in bufs):
            return None
        return [b.chunk(index) for b in bufs]

    def start_early(self, s: int, *, owner: int) -> SliceBuffer:
        """The early (epoch 0) average of slice ``s``, filled chunk by chunk by its owner."""
        avg = self.averages[s] = SliceBuffer.blank(self.sizes[s], self.chunk, epoch=0, owner=owner)
        return avg

    def start_average(self, s: int, parts: list[SliceBuffer], *, epoch: int, owner: int) -> SliceBuffer:
        avg = SliceBuffer.mean_of(parts, self.chunk, epoch=epoch, owner=owner)
        self.averages[s] = avg
        return avg

    def holdings(self) -> tuple[Holding, ...]:
        return holdings_of(self.contrib, self.bad)

    def clear(self) -> None:
        self.contrib.clear()
        self.averages.clear()
