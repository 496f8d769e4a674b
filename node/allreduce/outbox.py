"""Per-destination queues of tensor chunks with a bounded in-flight window (backpressure).

A *job* is "send slice ``s`` of this array to ``dest``, chunk by chunk". Jobs are lazy: a
chunk becomes a ``Send`` (BULK, an ``OutgoingChunk``) only when the destination's window has room, so nothing is
buffered but the arrays the round holds anyway. The adapter calls ``on_sent(dest, nbytes)``
when a chunk's frame is written; until then its raw bytes count against the window. At
least one chunk may always be in flight, so a window smaller than a chunk still progresses.
Drain order is round-robin over destinations in ring order, one chunk per destination per
pass, so every link gets work before any link gets a second chunk; within a destination,
round-robin over its jobs whose next chunk is ready (an early average's chunk is ready once
computed), so a part and an average bound for the same member share its link.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from node.allreduce.events import Floats, OutgoingChunk, RoundSend, TensorKind
from node.allreduce.layout import chunk_count, chunk_span
from node.core import Send
from protocol.connection import Channel


@dataclass(slots=True)
class Job:
    kind: TensorKind
    epoch: int
    slice: int
    offset: int
    """Start of the slice in the flattened tensor."""
    values: Floats
    """The whole slice (a view)."""
    prepare: Callable[[int], None] | None = None
    """Called with a chunk index before that chunk is emitted (a lazy average computes it)."""
    ready: Callable[[int], bool] | None = None
    """Whether a chunk index may be emitted now (None: always); chunks go out in order."""
    next_chunk: int = 0


class Outbox:
    def __init__(self, *, round_id: bytes, order: tuple[bytes, ...], window_bytes: int,
                 chunk_elements: int) -> None:
        self._round_id = round_id
        self._order = order
        self._window = window_bytes
        self._chunk = chunk_elements
        self._jobs: dict[bytes, deque[Job]] = {d: deque() for d in order}
        self._in_flight: dict[bytes, int] = dict.fromkeys(order, 0)

    def add(self, dest: bytes, job: Job) -> None:
        if chunk_count(job.values.size, self._chunk):
            self._jobs[dest].append(job)

    def cancel(self, keep: Callable[[bytes, Job], bool]) -> None:
        """Drop every queued job for which ``keep(dest, job)`` is false."""
        for dest, jobs in self._jobs.items():
            if any(not keep(dest, j) for j in jobs):
                self._jobs[dest] = deque(j for j in jobs if keep(dest, j))

    def clear(self) -> None:
        for jobs in self._jobs.values():
            jobs.clear()

    def has(self, dest: bytes, kind: TensorKind, slice_: int) -> bool:
        return any(j.kind is kind and j.slice == slice_ for j in self._jobs[dest])

    def on_sent(self, dest: bytes, nbytes: int) -> None:
        if dest in self._in_flight:
            self._in_flight[dest] = max(0, self._in_flight[dest] - nbytes)

    def in_flight(self, dest: bytes) -> int:
        return self._in_flight[dest]

    def pending(self) -> int:
        """Jobs queued over all destinations."""
        return sum(len(j) for j in self._jobs.values())

    def drain(self) -> list[RoundSend]:
        out: list[RoundSend] = []
        progress = True
        while progress:
            progress = False
            for dest in self._order:
                send = self._next(dest)
                if send is not None:
                    out.append(send)
                    progress = True
        return out

    def _next(self, dest: bytes) -> RoundSend | None:
        jobs = self._jobs[dest]
        for _ in range(len(jobs)):
            if jobs[0].ready is None or jobs[0].ready(jobs[0].next_chunk):
                break
            jobs.rotate(-1)
        else:
            return None
        job = jobs[0]
        start, count = chunk_span(job.values.size, self._chunk, job.next_chunk)
        nbytes = 4 * count
        flying = self._in_flight[dest]
        if flying and flying + nbytes > self._window:
            return None
        if job.prepare is not None:
            job.prepare(job.next_chunk)
        chunk = OutgoingChunk(kind=job.kind, round_id=self._round_id, epoch=job.epoch, slice=job.slice,
                              chunk=job.next_chunk, offset=job.offset + start,
                              values=job.values[start:start + count])
        self._in_flight[dest] = flying + nbytes
        job.next_chunk += 1
        jobs.popleft()
        if job.next_chunk < chunk_count(job.values.size, self._chunk):
            jobs.append(job)  # its next chunk waits for the other jobs' next ones
        return Send(dest=dest, channel=Channel.BULK, message=chunk)
