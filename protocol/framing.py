"""Length-prefixed frames, sans-I/O (PROTOCOL.md §2).

A frame is a 4-byte big-endian unsigned length ``L`` followed by ``L`` bytes of body,
``1 <= L <= max_size``. The cap is chosen by the caller per frame (``next_frame(max_size=)``)
because it changes when the handshake completes.

Theory of operation (``FrameDecoder``)::

    feed(data) ──► chunks (bytes kept by reference; small pieces coalesced into one
                   bytearray so 1-byte segments cannot cost an object each)
    next_frame(max_size) ──► header parsed once (cached in _need); then either
        * the whole body sits in the first chunk  → a zero-copy memoryview slice, or
        * it spans chunks and is large            → FILL mode: one preallocated buffer of
          L bytes (reused across large frames); what is buffered is copied in now and every
          later ``feed`` copies straight into it (each body byte copied once, while cache-hot).

Receiving into the decoder (``get_buffer`` / ``buffer_updated``, the shape of
``asyncio.BufferedProtocol``): while a FILL-mode body is incomplete the caller is handed the
rest of its buffer, so the socket writes the body in place and nothing is copied at all; at
other times a reused receive buffer, whose bytes ``buffer_updated`` feeds as above.

Invariants: each received byte is copied at most once; a header announcing more than
``max_size`` is rejected before any of its body is buffered, so the decoder never holds more
than one incomplete frame (<= 4 + max_size bytes) plus whatever the caller fed and has not yet
asked for. A view into a received chunk is never invalidated: chunks are immutable once a view
into them exists (a coalescing bytearray is frozen when viewed). A FILL-mode body is only valid
until the next ``next_frame`` call, because its buffer is reused (fresh multi-MiB allocations
cost page faults that dwarf the memcpy).
"""

from __future__ import annotations

import struct
from collections import deque

from protocol.errors import ErrorCode, LocalProtocolError, RemoteProtocolError

HEADER = struct.Struct(">I")
HEADER_BYTES = 4
#: Feeds smaller than this are coalesced into a shared bytearray.
_COALESCE_BELOW = 64 * 1024
#: A coalescing bytearray stops growing at this size.
_TAIL_MAX = 256 * 1024
#: Bodies at least this large that are not fully buffered are assembled in FILL mode.
_FILL_AT_LEAST = 64 * 1024
#: Size of ``get_buffer``'s reused buffer (outside FILL mode).
RECEIVE_BYTES = 256 * 1024

Buffer = bytes | bytearray | memoryview


def frame_header(length: int) -> bytes:
    """The 4-byte prefix of a body of ``length`` bytes."""
    if not 0 < length <= 0xFFFFFFFF:
        raise LocalProtocolError(f"frame body of {length} bytes cannot be framed", code=ErrorCode.FRAME_TOO_LARGE)
    return HEADER.pack(length)


def encode_frame(body: Buffer, *, max_size: int) -> bytes:
    """Prefix ``body`` with its length; ``LocalProtocolError`` if it exceeds ``max_size``."""
    if len(body) > max_size:
        raise LocalProtocolError(
            f"frame body of {len(body)} bytes exceeds the {max_size}-byte cap", code=ErrorCode.FRAME_TOO_LARGE
        )
    return frame_header(len(body)) + body


class FrameDecoder:
    """Splits a byte stream into frame bodies. Call ``feed`` with received bytes (``b""`` = EOF),
    then ``next_frame`` until it returns ``None`` (more bytes needed, or clean EOF: see ``eof``)."""

    __slots__ = ("_chunks", "_eof", "_fill", "_filled", "_lent", "_need", "_off", "_recv", "_size",
                 "_spare", "_tail")

    def __init__(self) -> None:
        self._chunks: deque[bytes | bytearray] = deque()
        self._off = 0  # consumed bytes of _chunks[0]
        self._size = 0  # unconsumed bytes in _chunks
        self._tail: bytearray | None = None  # last chunk, still open for coalescing
        self._need = -1  # body length of the frame whose header was consumed, or -1
        self._fill: memoryview | None = None  # FILL mode target (len == _need), a view of _spare
        self._spare: bytearray | None = None  # reused by the next large frame
        self._filled = 0
        self._eof = False
        self._recv: memoryview | None = None  # get_buffer's buffer outside FILL mode
        self._lent: memoryview | None = None  # what get_buffer handed out last

    @property
    def eof(self) -> bool:
        """The peer closed its side (``feed(b"")`` was called)."""
        return self._eof

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as frames (including a partial frame)."""
        return self._size + self._filled + (HEADER_BYTES if self._need >= 0 else 0)

    def feed(self, data: Buffer) -> None:
        """Append received bytes; ``b""`` marks EOF. Bytes after EOF are ignored."""
        n = len(data)
        if self._eof:
            return
        if n == 0:
            self._eof = True
            return
        if self._fill is not None:
            take = min(n, self._need - self._filled)
            self._fill[self._filled : self._filled + take] = memoryview(data)[:take]
            self._filled += take
            if take == n:
                return
            data = memoryview(data)[take:]
            n -= take
        self._append(data, n)

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """A buffer for the next received bytes (then ``buffer_updated(nbytes)``): the rest of
        an incomplete FILL-mode body (the socket writes it in place), else a reused buffer of
        ``RECEIVE_BYTES``."""
        if self._fill is not None and self._filled < self._need:
            lent = self._fill[self._filled:]
        else:
            if self._recv is None:
                self._recv = memoryview(bytearray(RECEIVE_BYTES))
            lent = self._recv
        self._lent = lent
        return lent

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were written at the start of the last ``get_buffer`` buffer."""
        lent, self._lent = self._lent, None
        if lent is None or not 0 < nbytes <= len(lent) or self._eof:
            return
        if self._fill is not None and lent.obj is self._fill.obj and self._filled < self._need:
            self._filled += nbytes  # already in place
            return
        self.feed(lent[:nbytes])

    def _append(self, data: Buffer, n: int) -> None:
        if n >= _COALESCE_BELOW:
            self._chunks.append(data if type(data) is bytes else bytes(data))
            self._tail = None
        elif self._tail is not None and len(self._tail) < _TAIL_MAX:
            self._tail += data
        else:
            self._tail = bytearray(data)
            self._chunks.append(self._tail)
        self._size += n

    def next_frame(self, *, max_size: int) -> Buffer | None:
        """The next complete frame body, or ``None`` if more bytes are needed.

        Raises ``RemoteProtocolError``: ``FRAME_TOO_LARGE`` if the header announces more than
        ``max_size`` bytes, ``MALFORMED_FRAME`` for a zero length or EOF inside a frame.
        A body assembled in FILL mode lives in a buffer reused for the next large frame: it
        is valid until the next ``next_frame`` call (decode or copy it before asking again).
        """
        if self._need < 0:
            if self._size < HEADER_BYTES:
                return self._starved()
            need = self._take_header()
            if need > max_size:
                raise RemoteProtocolError(
                    f"frame of {need} bytes exceeds the {max_size}-byte cap", code=ErrorCode.FRAME_TOO_LARGE
                )
            if need == 0:
                raise RemoteProtocolError("zero-length frame", code=ErrorCode.MALFORMED_FRAME)
            self._need = need
        need = self._need
        if self._fill is not None:
            if self._filled < need:
                return self._starved()
            body: Buffer = self._fill
            self._fill, self._filled = None, 0
        elif self._size >= need:
            body = self._take(need)
        elif need >= _FILL_AT_LEAST:
            self._start_fill(need)
            return self._starved()
        else:
            return self._starved()
        self._need = -1
        return body

    def _starved(self) -> Buffer | None:
        """Nothing complete yet: ``None``, unless the stream ended inside a frame."""
        if self._eof and (self._size or self._need >= 0):
            raise RemoteProtocolError("connection closed in the middle of a frame", code=ErrorCode.MALFORMED_FRAME)
        return None

    def _start_fill(self, need: int) -> None:
        spare = self._spare
        if spare is None or len(spare) < need:
            spare = self._spare = bytearray(need)  # replaced, never resized: old views stay intact
        fill = memoryview(spare)[:need]
        have = self._size
        if have:
            fill[:have] = self._take(have)
        self._fill, self._filled = fill, have

    def _take_header(self) -> int:
        first = self._chunks[0]
        if len(first) - self._off >= HEADER_BYTES:
            need: int = HEADER.unpack_from(first, self._off)[0]
            self._advance(HEADER_BYTES)
            return need
        return int(HEADER.unpack(self._take(HEADER_BYTES))[0])

    def _take(self, n: int) -> Buffer:
        """Consume ``n <= self._size`` bytes: a view into the first chunk if it holds them all."""
        first = self._chunks[0]
        off = self._off
        if len(first) - off >= n:
            if first is self._tail:
                self._tail = None  # a view will exist: freeze it
            out: Buffer = memoryview(first)[off : off + n]
            self._advance(n)
            return out
        joined = bytearray(n)
        pos = 0
        while pos < n:
            first = self._chunks[0]
            take = min(n - pos, len(first) - self._off)
            joined[pos : pos + take] = memoryview(first)[self._off : self._off + take]
            pos += take
            self._advance(take)
        return joined

    def _advance(self, n: int) -> None:
        self._size -= n
        self._off += n
        if self._off == len(self._chunks[0]):
            if self._chunks.popleft() is self._tail:
                self._tail = None
            self._off = 0
