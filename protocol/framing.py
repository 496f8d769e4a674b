"""Length-prefixed frames, sans-I/O (PROTOCOL.md §2).

A frame is a 4-byte big-endian unsigned length ``L`` followed by ``L`` bytes of body,
``1 <= L <= max_size``. The cap is chosen by the caller per frame (``next_frame(max_size=)``)
because it changes when the handshake completes.

Theory of operation (``FrameDecoder``)::

    feed(data) ──► chunks (bytes kept by reference; small pieces coalesced into one
                   bytearray so 1-byte segments cannot cost an object each)
    next_frame_parts(max_size) ──► header parsed once (cached in _need); then either
        * the whole body sits in the first chunk  → a zero-copy memoryview slice, or
        * it spans chunks and is large            → FILL mode: the body is received into
          pieces of its own, allocated as its bytes actually arrive (never for the length
          the header announced): the first holds what is buffered plus ``_FILL_ROOM``; each
          next one is sized so that the pieces add up to ``_FILL_GROWTH`` times what was
          received (at least ``_FILL_ROOM``, at most what the body still lacks). What is
          buffered is copied in at the start, every later ``feed`` copies straight into the
          pieces, and a piece is never moved or copied to make room (no growth copies).
    next_frame(max_size) ──► the same body as one buffer: the pieces joined (one copy) if
          there are several. ``protocol.connection`` takes the pieces and decrypts them
          straight into the message's buffers (``RecordCipher.opener``).

Receiving into the decoder (``get_buffer`` / ``buffer_updated``, the shape of
``asyncio.BufferedProtocol``): while a FILL-mode body is incomplete the caller is handed the
free room of its current piece, so the socket writes the body in place and nothing is
copied; at other times a reused receive buffer of ``RECEIVE_BYTES``, whose bytes
``buffer_updated`` feeds as above.

Memory (PROTOCOL.md §7; issue 10): a peer that announces a maximal frame and stops after 5
bytes costs ``RECEIVE_BYTES + _FILL_ROOM``, not the 8 MiB it announced; an incomplete body
costs at most ``_FILL_GROWTH`` x (its received bytes + ``_FILL_ROOM``). A completed body is
handed over to the caller and the decoder keeps nothing of it, so an idle connection holds
only the receive buffer. Pieces are uninitialized (``numpy.empty``): no zero-fill, and the
allocator hands the blocks of a freed body straight back to the next one (fresh pages would
cost a page fault per 4 KiB), which is why no spare buffer is kept. ``release`` drops
everything once the connection is over.

Invariants: each received byte is copied at most once on the way in; a header announcing
more than ``max_size`` is rejected before any of its body is buffered, so the decoder never
holds more than one incomplete frame (<= 4 + max_size bytes, in pieces of at most
``_FILL_GROWTH`` times that) plus whatever the caller fed and has not yet asked for. A view
into a received chunk is never invalidated: chunks are immutable once a view into them
exists (a coalescing bytearray is frozen when viewed), and a piece is never written again
once its body was returned.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Sequence

import numpy as np

from protocol.errors import ErrorCode, LocalProtocolError, RemoteProtocolError

HEADER = struct.Struct(">I")
HEADER_BYTES = 4
#: Feeds smaller than this are coalesced into a shared bytearray.
_COALESCE_BELOW = 64 * 1024
#: A coalescing bytearray stops growing at this size.
_TAIL_MAX = 256 * 1024
#: Bodies at least this large that are not fully buffered are assembled in FILL mode.
_FILL_AT_LEAST = 64 * 1024
#: Free room of a FILL-mode body's first piece, and the least size of every later piece.
_FILL_ROOM = 64 * 1024
#: A FILL-mode body's pieces add up to at most this many times its received bytes (plus
#: ``_FILL_ROOM``): what a peer that stops mid-frame can make us hold per byte it sent.
_FILL_GROWTH = 4
#: Size of ``get_buffer``'s reused buffer (outside FILL mode): the most one read takes there.
RECEIVE_BYTES = 256 * 1024
#: Size of the throwaway buffer ``get_buffer`` lends once the decoder was released.
_RELEASED_READ_BYTES = 1024

Buffer = bytes | bytearray | memoryview


def uninitialized(n: int) -> memoryview:
    """A writable buffer of ``n`` bytes, not zero-filled (its owner writes every byte first)."""
    return memoryview(np.empty(n, np.uint8).data).cast("B")


def join_parts(parts: Sequence[Buffer]) -> Buffer:
    """The concatenation of ``parts``, as one buffer: the part itself if there is one."""
    if len(parts) == 1:
        return parts[0]
    out = uninitialized(sum(len(p) for p in parts))
    pos = 0
    for p in parts:
        out[pos : pos + len(p)] = memoryview(p).cast("B")
        pos += len(p)
    return out


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
    then ``next_frame`` (or ``next_frame_parts``) until it returns ``None`` (more bytes
    needed, or clean EOF: see ``eof``). ``release`` when the stream is no longer wanted."""

    __slots__ = ("_at", "_chunks", "_eof", "_fill", "_filled", "_lent", "_lent_fill", "_need", "_off",
                 "_pieces", "_recv", "_released", "_size", "_tail")

    def __init__(self) -> None:
        self._chunks: deque[bytes | bytearray] = deque()
        self._off = 0  # consumed bytes of _chunks[0]
        self._size = 0  # unconsumed bytes in _chunks
        self._tail: bytearray | None = None  # last chunk, still open for coalescing
        self._need = -1  # body length of the frame whose header was consumed, or -1
        # FILL mode: full pieces of the body, then the piece being written (_at bytes of it)
        self._pieces: list[memoryview] = []
        self._fill: memoryview | None = None
        self._at = 0
        self._filled = 0  # body bytes received in FILL mode, all pieces together
        self._eof = False
        self._released = False
        self._recv: memoryview | None = None  # get_buffer's buffer outside FILL mode
        self._lent: memoryview | None = None  # what get_buffer handed out last
        self._lent_fill: memoryview | None = None  # the FILL piece it was the room of, if it was

    @property
    def eof(self) -> bool:
        """The peer closed its side (``feed(b"")`` was called)."""
        return self._eof

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as frames (including a partial frame)."""
        return self._size + self._filled + (HEADER_BYTES if self._need >= 0 else 0)

    def release(self) -> None:
        """Drop every buffer and whatever was received and not yet returned (bodies already
        returned stay valid). Afterwards received bytes are ignored, ``next_frame`` returns
        ``None`` and ``get_buffer`` lends a small throwaway buffer (a read racing the close
        must have somewhere to go). Idempotent."""
        self._released = True
        self._chunks.clear()
        self._pieces = []
        self._off = self._size = self._filled = self._at = 0
        self._need = -1
        self._tail = self._fill = self._recv = self._lent = self._lent_fill = None

    def feed(self, data: Buffer) -> None:
        """Append received bytes; ``b""`` marks EOF. Bytes after EOF are ignored."""
        n = len(data)
        if self._eof or self._released:
            return
        if n == 0:
            self._eof = True
            return
        if self._fill is not None:
            take = min(n, self._need - self._filled)
            src, pos = memoryview(data).cast("B"), 0
            while pos < take:
                fill, at = self._fill, self._at
                if at == len(fill):
                    fill, at = self._new_piece(take - pos), 0
                k = min(take - pos, len(fill) - at)
                fill[at : at + k] = src[pos : pos + k]
                pos += k
                self._at = at + k
            self._filled += take
            if take == n:
                return
            data = src[take:]
            n -= take
        self._append(data, n)

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """A buffer for the next received bytes (then ``buffer_updated(nbytes)``): the free
        room of an incomplete FILL-mode body's current piece (the socket writes the body in
        place), else a reused buffer of ``RECEIVE_BYTES``."""
        fill = self._fill
        if fill is not None and self._filled < self._need:
            if self._at == len(fill):
                fill = self._new_piece(0)
            lent = fill[self._at :]
            self._lent_fill = fill
        elif self._released:
            lent, self._lent_fill = memoryview(bytearray(_RELEASED_READ_BYTES)), None
        else:
            if self._recv is None:
                self._recv = memoryview(bytearray(RECEIVE_BYTES))
            lent, self._lent_fill = self._recv, None
        self._lent = lent
        return lent

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were written at the start of the last ``get_buffer`` buffer."""
        lent, self._lent = self._lent, None
        lent_fill, self._lent_fill = self._lent_fill, None
        if lent is None or not 0 < nbytes <= len(lent) or self._eof or self._released:
            return
        if lent_fill is not None and lent_fill is self._fill:
            self._at += nbytes  # already in place
            self._filled += nbytes
            return
        self.feed(lent[:nbytes])

    def _new_piece(self, least: int) -> memoryview:
        """Start the next piece of the FILL-mode body (the current one is full): room for at
        least ``least`` bytes, large enough that the pieces add up to ``_FILL_GROWTH`` times
        what was received, never beyond the body's end. Returned and made current."""
        full = self._fill
        assert full is not None and self._at == len(full)
        self._pieces.append(full)
        have = sum(len(p) for p in self._pieces)  # every piece is full: the bytes received so far
        size = min(self._need - have, max(least, _FILL_ROOM, (_FILL_GROWTH - 1) * have))
        fill = self._fill = uninitialized(size)
        self._at = 0
        return fill

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
        """The next complete frame body as one buffer, or ``None`` if more bytes are needed.

        Raises ``RemoteProtocolError``: ``FRAME_TOO_LARGE`` if the header announces more than
        ``max_size`` bytes, ``MALFORMED_FRAME`` for a zero length or EOF inside a frame.
        A body is a view into received bytes, or a buffer of its own (FILL mode; joined from
        its pieces, which costs a copy: ``next_frame_parts`` avoids it); either way the
        decoder never writes it again, and the memory lives as long as the caller keeps it.
        """
        parts = self.next_frame_parts(max_size=max_size)
        return None if parts is None else join_parts(parts)

    def next_frame_parts(self, *, max_size: int) -> list[Buffer] | None:
        """Like ``next_frame``, but the body as the buffers it was received into, in order
        (one, unless a large body arrived in FILL-mode pieces); none of them is empty."""
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
            # every piece is full: each was sized to at most what the body still lacked
            parts: list[Buffer] = [*self._pieces, self._fill]
            self._pieces, self._fill, self._at, self._filled = [], None, 0, 0
        elif self._size >= need:
            parts = [self._take(need)]
        elif need >= _FILL_AT_LEAST:
            self._start_fill(need)
            return self._starved()
        else:
            return self._starved()
        self._need = -1
        return parts

    def _starved(self) -> list[Buffer] | None:
        """Nothing complete yet: ``None``, unless the stream ended inside a frame."""
        if self._eof and (self._size or self._need >= 0):
            raise RemoteProtocolError("connection closed in the middle of a frame", code=ErrorCode.MALFORMED_FRAME)
        return None

    def _start_fill(self, need: int) -> None:
        """FILL mode for a body of ``need`` bytes, of which all buffered bytes are the start."""
        have = self._size
        fill = self._fill = uninitialized(min(need, have + _FILL_ROOM))
        if have:
            fill[:have] = self._take(have)
        self._at = self._filled = have

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
