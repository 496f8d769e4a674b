"""One Starmesh connection, sans-I/O: bytes in, events out; messages in, bytes out (PROTOCOL.md §1-7).

Theory of operation
-------------------
States::

    HANDSHAKING ──(handshake verified)──► OPEN ──(GOODBYE either way / clean EOF)──► CLOSED
         │                                  │
         └──(violation, timeout, ERROR)─────┴──(violation, ERROR from peer)──────────► ERROR

``close()`` moves any state to CLOSED. CLOSED and ERROR are final: received bytes are
ignored, ``send`` raises, and ``next_event`` returns the one ``ConnectionTerminated`` and
then ``NEED_DATA`` forever.

Receive path: ``receive_data`` (or ``get_buffer`` / ``buffer_updated``, which let the socket
write a large body in place) only buffers; ``next_event`` parses one frame at a time
(lazily, so the frame-size cap that applies is always the one of the current state: 4 KiB
during the handshake, 8 MiB after), decrypts it with the receive ``RecordCipher`` once the
peer has switched to encryption, decodes it with ``protocol.schema.decode_body`` restricted to
the tags allowed in the current state, and feeds handshake messages to
``protocol.handshake.Handshake``. A large AES-GCM frame is opened in two steps instead: its
first bytes, where ``split_head`` looks for a tensor message's payload, then the payload
straight into a buffer of its own that the message keeps (no msgpack copy); any other large
frame is decrypted whole and decoded as usual, so the verdict is the same either way.
Send path: a tensor message is sealed from its header and its payload's own memory
(``encode_split`` + ``RecordCipher.seal_parts_into``), every other message from one pack. Any ``ProtocolError`` raised on this path is converted to
a ``RemoteProtocolError`` (h11's rule), an ERROR frame is queued for the peer, and the state
becomes ERROR.

Encryption switch points (both sides agree without extra messages): the initiator seals
everything after its FINISH and opens everything after the RESPONSE; the responder opens
everything after the FINISH and seals everything after it, even an ERROR rejecting FINISH.

Memory: the receive side holds a 256 KiB receive buffer plus, while a large frame is
incomplete, body pieces that grow with the bytes received (``protocol.framing``); a
delivered body belongs to its message. Termination (CLOSED or ERROR) drops the receive side,
the ciphers and the packer at once, keeping only the final event and the closing frame still
to be written; ``release()`` drops that too, once written. The stored error is ``detached``
(no traceback, no chain), so a terminated connection and whatever owns it are freed by
reference counting alone, never left to the cyclic GC.
"""

from __future__ import annotations

import enum
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final, Literal

import msgpack
import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import protocol.wire  # noqa: F401  (binds every message tag before anything is decoded)
from protocol.crypto import OPEN_SLACK, TAG_BYTES, FrameOpener, RecordCipher
from protocol.errors import (
    ErrorCode,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    detached,
)
from protocol.framing import HEADER, Buffer, FrameDecoder, encode_frame, join_parts
from protocol.handshake import (
    MAX_REASON_CHARS,
    Channel,
    Goodbye,
    Handshake,
    HandshakeFinish,
    HandshakeInit,
    HandshakeOptions,
    HandshakeResponse,
    PeerInfo,
    Phase,
    ProtocolErrorMsg,
    Role,
)
from protocol.limits import MAX_FRAME_BYTES, MAX_HANDSHAKE_FRAME_BYTES
from protocol.schema import (
    SPLIT_HEAD_BYTES,
    Message,
    blob_size,
    decode_body,
    encode_body,
    encode_split,
    message_from_obj,
    put_blob,
    split_head,
)
from protocol.tags import MsgType

__all__ = [
    "NEED_DATA",
    "Channel",
    "ConnState",
    "Connection",
    "ConnectionTerminated",
    "Event",
    "HandshakeComplete",
    "HandshakeOptions",
    "MessageReceived",
    "NeedData",
    "PeerInfo",
    "Role",
]

#: Largest plaintext message body that fits one encrypted frame.
MAX_MESSAGE_BYTES = MAX_FRAME_BYTES - TAG_BYTES


class ConnState(enum.Enum):
    HANDSHAKING = "handshaking"
    OPEN = "open"
    CLOSED = "closed"
    ERROR = "error"


class NeedData(enum.Enum):
    NEED_DATA = "NEED_DATA"


#: ``next_event()`` has nothing to report until more bytes arrive.
NEED_DATA: Final = NeedData.NEED_DATA


@dataclass(frozen=True, slots=True)
class HandshakeComplete:
    """The handshake verified; ``peer`` is authenticated. ``send`` may be used from now on."""

    peer: PeerInfo


@dataclass(frozen=True, slots=True)
class MessageReceived:
    message: Message
    size: int = field(default=0, compare=False)
    """Bytes of the frame it came in (what holding it costs, about): for byte-bounded inboxes."""


@dataclass(frozen=True, slots=True)
class ConnectionTerminated:
    """The connection is over. ``error`` is None for a normal close (GOODBYE, clean EOF,
    our own ``close``), else why: a ``RemoteProtocolError`` whose ``code`` says what the peer
    did wrong, or what the peer said we did wrong when it sent an ERROR frame."""

    error: ProtocolError | None


Event = HandshakeComplete | MessageReceived | ConnectionTerminated

_HANDSHAKE_TAGS = frozenset({MsgType.HANDSHAKE_INIT, MsgType.HANDSHAKE_RESPONSE, MsgType.HANDSHAKE_FINISH})
_CLOSING_TAGS = frozenset({MsgType.ERROR, MsgType.GOODBYE})
_PHASE_TAG = {
    Phase.AWAIT_INIT: MsgType.HANDSHAKE_INIT,
    Phase.AWAIT_RESPONSE: MsgType.HANDSHAKE_RESPONSE,
    Phase.AWAIT_FINISH: MsgType.HANDSHAKE_FINISH,
}


def _new_packer() -> msgpack.Packer:
    return msgpack.Packer(autoreset=False, use_bin_type=True, buf_size=4096)


#: A message whose ``BLOB`` payload is at least this large is sealed from the payload itself.
_SPLIT_AT_LEAST = 64 * 1024

#: A non-BULK connection drops its msgpack buffer after packing a message larger than this.
_SHRINK_PACKER_ABOVE = 256 * 1024


def _check_size(msg: Message, size: int) -> None:
    if size > MAX_MESSAGE_BYTES:
        raise LocalProtocolError(f"{msg.TAG.name} encodes to {size} bytes, over the "
                                 f"{MAX_MESSAGE_BYTES}-byte message cap", code=ErrorCode.FRAME_TOO_LARGE)


class Connection:
    """Feed received bytes to ``receive_data`` and then call ``next_event`` until it returns
    ``NEED_DATA``; write ``data_to_send()`` after each of those rounds and after ``handle_timer``.
    When OPEN, ``send(msg)`` returns bytes to write. Arm a timer at ``next_deadline()``.
    """

    def __init__(
        self,
        *,
        role: Role,
        identity: Ed25519PrivateKey,
        mesh_secret: bytes,
        options: HandshakeOptions,
        now: float,
        handshake_timeout: float = 5.0,
        token_bytes: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        self.role = role
        self.state = ConnState.HANDSHAKING
        self.peer: PeerInfo | None = None
        self._hs = Handshake(role=role, identity=identity, mesh_secret=mesh_secret, options=options,
                             token_bytes=token_bytes)
        self._frames = FrameDecoder()
        self._packer: msgpack.Packer | None = _new_packer()
        self._head = memoryview(bytearray(SPLIT_HEAD_BYTES + OPEN_SLACK))
        self._out: list[bytes | bytearray | memoryview] = []
        self._tx: RecordCipher | None = None
        self._rx: RecordCipher | None = None
        self._deadline = now + handshake_timeout
        self._timeout = handshake_timeout
        self._final: ConnectionTerminated | None = None
        self._final_delivered = False
        if role is Role.INITIATOR:
            self._queue_plain(self._hs.initiate())

    # ---- receiving -------------------------------------------------------------------------

    def receive_data(self, data: Buffer) -> None:
        """Buffer bytes from the peer (``b""`` = EOF). Then call ``next_event`` until NEED_DATA."""
        if self._final is None:
            self._frames.feed(data)

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Receiving the ``asyncio.BufferedProtocol`` way: a buffer for the socket to write
        into; then call ``buffer_updated(nbytes)``, which is ``receive_data`` of those bytes
        (a large frame's body is written in place: see ``protocol.framing``)."""
        return self._frames.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` bytes from the peer are at the start of the last ``get_buffer`` buffer."""
        if self._final is None:
            self._frames.buffer_updated(nbytes)

    @property
    def buffered_bytes(self) -> int:
        """Received bytes not yet turned into events (at most one partial frame after a full drain)."""
        return self._frames.buffered

    def next_event(self) -> Event | Literal[NeedData.NEED_DATA]:
        """The next event, or ``NEED_DATA``. Afterwards call ``data_to_send()`` and write it."""
        if self._final is not None:
            if self._final_delivered:
                return NEED_DATA
            self._final_delivered = True
            return self._final
        try:
            while True:
                max_size = MAX_HANDSHAKE_FRAME_BYTES if self.state is ConnState.HANDSHAKING else MAX_FRAME_BYTES
                parts = self._frames.next_frame_parts(max_size=max_size)
                if parts is None:
                    return self._on_eof() if self._frames.eof else NEED_DATA
                event = self._on_frame(parts)
                if event is not None:
                    return event
        except RemoteProtocolError as exc:
            return self._fail(exc)
        except ProtocolError as exc:  # LocalProtocolError while parsing: the peer's fault
            return self._fail(RemoteProtocolError(str(exc), code=exc.code))
        except Exception as exc:  # a bug on our side (e.g. in a message validator): never crash the node
            err = ProtocolError(f"internal error on received data: {type(exc).__name__}: {exc}"[:200],
                                code=ErrorCode.INTERNAL)
            self._queue_closing(ProtocolErrorMsg(code=int(ErrorCode.INTERNAL), reason="internal error"))
            return self._terminate(ConnState.ERROR, err)

    def _allowed(self, tag: MsgType) -> bool:
        if tag in _CLOSING_TAGS:
            return True
        if self.state is ConnState.OPEN:
            return tag not in _HANDSHAKE_TAGS
        return _PHASE_TAG.get(self._hs.phase) is tag

    def _on_frame(self, parts: list[Buffer]) -> Event | None:
        """One frame, as the buffers it arrived in (several only for a large body)."""
        size = len(parts[0]) if len(parts) == 1 else sum(len(p) for p in parts)
        if self._rx is None:
            msg = decode_body(bytes(join_parts(parts)), allowed=self._allowed)
        elif size >= _SPLIT_AT_LEAST and (opener := self._rx.opener(parts)) is not None:
            msg = self._open_split(opener)  # decrypted from the parts themselves, never joined
        else:
            with self._rx.open_view(join_parts(parts)) as plaintext:
                msg = decode_body(plaintext, allowed=self._allowed)  # type: ignore[arg-type]  # msgpack takes any buffer
        if self.state is ConnState.OPEN and msg.TAG not in _CLOSING_TAGS:
            return MessageReceived(msg, size)
        if isinstance(msg, ProtocolErrorMsg):
            code = msg.error_code()
            err = RemoteProtocolError(f"peer closed the connection: {code.name}: {msg.reason}", code=code)
            return self._terminate(ConnState.ERROR, err)
        if isinstance(msg, Goodbye):
            return self._terminate(ConnState.CLOSED, None)
        return self._on_handshake(msg)

    def _open_split(self, opener: FrameOpener) -> Message:
        """Open a large frame in two steps: its first bytes into a scratch buffer, where
        ``split_head`` looks for a tensor payload; then the rest straight into the payload's
        own buffer (the message keeps a read-only view of it: no msgpack copy, and the frame
        buffer is free again). A large frame of any other kind is decoded as usual."""
        size = opener.size
        head_len = min(size, SPLIT_HEAD_BYTES)
        head = self._head
        opener.read_into(head, head_len)
        found = split_head(head[:head_len], size)
        if found is None:
            body = memoryview(np.empty(size + OPEN_SLACK, np.uint8).data).cast("B")
            body[:head_len] = head[:head_len]
            opener.read_into(body[head_len:], size - head_len)
            opener.finish()
            return decode_body(body[:size], allowed=self._allowed)  # type: ignore[arg-type]  # msgpack takes any buffer
        raw, offset = found
        blob = memoryview(np.empty(size - offset + OPEN_SLACK, np.uint8).data).cast("B")
        have = head_len - offset  # payload bytes already in the head
        blob[:have] = head[offset:head_len]
        opener.read_into(blob[have:], size - head_len)
        opener.finish()
        put_blob(raw, blob[: size - offset].toreadonly())
        return message_from_obj(raw, allowed=self._allowed)

    def _on_handshake(self, msg: Message) -> Event | None:
        if isinstance(msg, HandshakeInit):
            self._queue_plain(self._hs.on_init(msg))
            return None
        if isinstance(msg, HandshakeResponse):
            self._queue_plain(self._hs.on_response(msg))
        elif isinstance(msg, HandshakeFinish):
            try:
                self._hs.on_finish(msg)
            finally:
                if self._hs.keys is not None:  # the initiator seals from now on, so do we
                    self._tx, self._rx = self._hs.keys.tx, self._hs.keys.rx
        else:  # pragma: no cover - _allowed() admits nothing else
            raise RemoteProtocolError(f"unexpected {msg.TAG.name}", code=ErrorCode.UNEXPECTED_MESSAGE)
        assert self._hs.keys is not None and self._hs.peer is not None
        self._tx, self._rx = self._hs.keys.tx, self._hs.keys.rx
        self._hs.wipe()  # the ciphers are ours now; the ephemeral secrets go (forward secrecy)
        self.peer = self._hs.peer
        self.state = ConnState.OPEN
        return HandshakeComplete(self.peer)

    def _on_eof(self) -> Event:
        if self.state is ConnState.HANDSHAKING:
            err = RemoteProtocolError("connection closed during the handshake", code=ErrorCode.MALFORMED_FRAME)
            return self._fail(err, reply=False)
        return self._terminate(ConnState.CLOSED, None)

    def _fail(self, exc: RemoteProtocolError, *, reply: bool = True) -> Event:
        if reply:
            self._queue_closing(ProtocolErrorMsg(code=int(exc.code), reason=str(exc)[:MAX_REASON_CHARS]))
        return self._terminate(ConnState.ERROR, exc)

    def _terminate(self, state: ConnState, error: ProtocolError | None) -> ConnectionTerminated:
        self.state = state
        self._final = ConnectionTerminated(None if error is None else detached(error))
        self._final_delivered = True
        # Nothing is received or sealed any more (the closing frame, if any, is queued):
        # drop whatever else the peer sent, every buffer and the keys.
        self._frames.release()
        self._tx = self._rx = self._packer = None
        self._hs.wipe()
        return self._final

    def release(self) -> None:
        """Drop everything this connection still holds: its buffers, keys and pending output.

        Call it once the connection is over and its last ``data_to_send()`` was written (the
        owner's "finished" step); a connection that is not over yet is ended first, as by
        ``close()`` but without anything to send. Idempotent. Afterwards ``next_event``
        delivers the ``ConnectionTerminated`` (if not yet delivered) and then ``NEED_DATA``;
        ``get_buffer`` still lends a small throwaway buffer, whose bytes are ignored."""
        if self._final is None:
            self._terminate(ConnState.CLOSED, None)
            self._final_delivered = False
        self._out.clear()

    # ---- sending ---------------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Drain pending output: handshake flights and closing frames. Write it to the peer."""
        out = b"".join(self._out)
        self._out.clear()
        return out

    def send(self, msg: Message) -> bytes | bytearray | memoryview:
        """The bytes to write for ``msg`` (one encrypted frame, preceded by any pending output
        such as the handshake's FINISH, so that writing exactly this keeps the stream in order).
        Only when OPEN; ``LocalProtocolError`` otherwise or if ``msg`` is a handshake/closing message."""
        frame = self._seal(msg)
        if self._out:
            self._out.append(frame)
            return self.data_to_send()
        return frame

    def send_many(self, msgs: Iterable[Message]) -> bytes:
        """Like ``send`` for several messages, written in one go (e.g. a Ping with piggybacked gossip)."""
        for msg in msgs:
            self._out.append(self._seal(msg))
        return self.data_to_send()

    def _seal(self, msg: Message) -> bytes | bytearray | memoryview:
        if self.state is not ConnState.OPEN or self._tx is None:
            raise LocalProtocolError(f"cannot send in state {self.state.name}", code=ErrorCode.UNEXPECTED_MESSAGE)
        if msg.TAG in _HANDSHAKE_TAGS or msg.TAG in _CLOSING_TAGS:
            raise LocalProtocolError(f"{msg.TAG.name} is sent by the connection itself (see close())",
                                     code=ErrorCode.UNEXPECTED_MESSAGE)
        if blob_size(msg) >= _SPLIT_AT_LEAST:
            split = encode_split(msg)
            if split is not None:
                return self._seal_split(msg, *split)
        # One reusable msgpack buffer per connection: a multi-MiB message costs one pack into
        # warm memory and one seal, instead of a fresh allocation per step.
        packer = self._packer
        assert packer is not None  # dropped only when terminated, and then _seal refused above
        packer.reset()
        packer.pack(msg.to_wire())
        with packer.getbuffer() as body:
            size = len(body)
            _check_size(msg, size)
            # Length prefix and sealed body in one fresh buffer (written once, never copied
            # again: the transport may hold it until the socket takes it).
            frame = bytearray(HEADER.size + size + TAG_BYTES)
            HEADER.pack_into(frame, 0, size + TAG_BYTES)
            self._tx.seal_into(body, memoryview(frame)[HEADER.size:])
        if size > _SHRINK_PACKER_ABOVE and self.peer is not None and self.peer.channel is not Channel.BULK:
            self._packer = _new_packer()  # a rare big message on a small-message channel: give the memory back
        return frame

    def _seal_split(self, msg: Message, head: bytes, blob: bytes | memoryview) -> memoryview:
        """Seal a message with a large trailing payload straight from the payload's memory
        (no msgpack copy) into an uninitialized frame buffer (no zero-fill)."""
        assert self._tx is not None
        size = len(head) + len(blob)
        _check_size(msg, size)
        frame = memoryview(np.empty(HEADER.size + size + TAG_BYTES, np.uint8).data).cast("B")
        HEADER.pack_into(frame, 0, size + TAG_BYTES)
        self._tx.seal_parts_into((head, blob), frame[HEADER.size:])
        return frame

    def close(self, code: ErrorCode | None = None, reason: str = "") -> bytes:
        """Say goodbye (``code`` None) or report an error, and move to CLOSED. Returns the bytes
        to write (with any pending output first); then close the socket. Idempotent."""
        if self._final is not None:
            return self.data_to_send()
        reason = reason[:MAX_REASON_CHARS]
        self._queue_closing(Goodbye(reason=reason) if code is None else ProtocolErrorMsg(code=int(code), reason=reason))
        self._terminate(ConnState.CLOSED, None)
        self._final_delivered = False
        return self.data_to_send()

    def _queue_plain(self, msg: Message) -> None:
        self._out.append(encode_frame(encode_body(msg), max_size=MAX_HANDSHAKE_FRAME_BYTES))

    def _queue_closing(self, msg: Message) -> None:
        if self._tx is None:
            self._queue_plain(msg)
        else:
            sealed = self._tx.seal(encode_body(msg))
            self._out.append(HEADER.pack(len(sealed)) + sealed)

    # ---- time ------------------------------------------------------------------------------

    def handle_timer(self, *, now: float) -> None:
        """Fail the handshake if its deadline passed (then write ``data_to_send()`` and close)."""
        if self.state is ConnState.HANDSHAKING and now >= self._deadline:
            err = RemoteProtocolError(f"handshake did not complete within {self._timeout:g} s",
                                      code=ErrorCode.HANDSHAKE_TIMEOUT)
            self._fail(err)
            self._final_delivered = False

    def next_deadline(self) -> float | None:
        """When ``handle_timer`` must next be called, or None."""
        return self._deadline if self.state is ConnState.HANDSHAKING else None
