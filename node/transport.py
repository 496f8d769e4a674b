"""asyncio TCP adapters around the sans-I/O ``protocol.Connection``: links and a pool.

Theory of operation
-------------------
A ``Link`` is one TCP connection and its ``Connection`` core. Bytes flow one way::

    get_buffer/buffer_updated -> core -> core.next_event() ... -> inbox -> reader task
                                        -> core.data_to_send() -> transport.write

* Handshake. The initiator's first flight is written in ``connection_made``; the core's
  ``next_deadline()`` (handshake timeout) is armed as one ``loop.call_at`` timer, re-armed
  after every input. ``HandshakeComplete`` resolves ``link.opened`` and registers the link
  in the pool (``on_open``).
* Receive and backpressure. ``MessageReceived`` goes into a bounded inbox consumed by the
  link's reader task (owned by the node's ``TaskGroup``), which awaits the handler from the
  dispatch table of the peer's channel. When the inbox holds ``inbox_messages`` messages or
  ``inbox_bytes`` bytes of frames we stop pulling events from the core and pause reading the
  socket, so a slow handler slows the sender via TCP; below half of both bounds the reader
  pulls again and resumes reading.
* Send. ``send_nowait`` is best effort (gossip; SWIM tolerates loss): dropped when the link
  is not open or its write buffer is above ``write_buffer_bytes``. ``await send`` waits
  for the transport to drain below the high-water mark first (``pause_writing``).
* Termination. ``ConnectionTerminated`` (a peer violation, our timeout, the peer's goodbye,
  or EOF once everything before it was delivered), or a socket error closes the link once:
  pending output (an ERROR frame) is written, the transport closed, the timer cancelled,
  and ``on_close(link, error)`` called with the reason (None for a graceful goodbye; EOF
  without goodbye is a ``TransportError``). Messages already in the inbox are still
  handed to their handlers (they were valid), except after ``abort``/``force_close``.

Invariants: the core is fed only from the event loop thread; a link closes exactly once;
nothing a peer sends raises out of a callback.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from node import congestion
from node.config import LinkConfig
from node.driver import Driver
from protocol.connection import (
    NEED_DATA,
    Channel,
    Connection,
    ConnectionTerminated,
    ConnState,
    HandshakeComplete,
    HandshakeOptions,
    MessageReceived,
    PeerInfo,
    Role,
)
from protocol.crypto import short_id
from protocol.errors import (
    ErrorCode,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    StarmeshError,
    TimeoutError,
    TransportError,
)
from protocol.schema import Message
from protocol.tags import MsgType

log = logging.getLogger("starmesh.transport")

Handler = Callable[["Link", Message], Awaitable[None]]
"""A message handler: gets the link it came in on (``link.peer`` is authenticated)."""

DispatchTable = Mapping[Channel, Mapping[MsgType, Handler]]
Spawn = Callable[[Coroutine[Any, Any, None]], None]


@dataclass(slots=True)
class Traffic:
    """What one node's connections moved and refused, per channel: bytes (frames as written
    and read, encryption included), frames, best-effort messages dropped, peers rejected by
    reason. Counters only grow; a benchmark subtracts two readings."""

    sent: dict[Channel, int] = field(default_factory=lambda: dict.fromkeys(Channel, 0))
    received: dict[Channel, int] = field(default_factory=lambda: dict.fromkeys(Channel, 0))
    frames_sent: dict[Channel, int] = field(default_factory=lambda: dict.fromkeys(Channel, 0))
    frames_received: dict[Channel, int] = field(default_factory=lambda: dict.fromkeys(Channel, 0))
    dropped: dict[Channel, int] = field(default_factory=lambda: dict.fromkeys(Channel, 0))
    """Best-effort messages (gossip) not written: link not open or its write buffer full."""
    rejected: collections.Counter[str] = field(default_factory=collections.Counter)
    """Connections closed for a peer's fault, by ``ErrorCode`` name (or ``refused``)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkSettings:
    """What every link of one node shares: its keys, its advertised address, the limits
    (``LinkConfig``, where every default lives) and the traffic counters."""

    identity: Ed25519PrivateKey
    mesh_secret: bytes
    listen_address: str | None
    config: LinkConfig = field(default_factory=LinkConfig)
    traffic: Traffic = field(default_factory=Traffic)
    """Shared by every link of the node (``dataclasses.replace`` keeps the same object)."""


def describe_error(error: BaseException | None) -> str:
    """One-line reason for logs: ``AUTH_FAILED: bad mesh secret proof``."""
    if error is None:
        return "closed by peer"
    if isinstance(error, ProtocolError):
        return f"{error.code.name}: {error}"
    return f"{type(error).__name__}: {error}"


class Link(asyncio.BufferedProtocol):
    """One TCP connection driven by a ``protocol.Connection`` core (see module docstring)."""

    def __init__(
        self,
        *,
        role: Role,
        channel: Channel,
        settings: LinkSettings,
        dispatch: DispatchTable,
        spawn: Spawn,
        on_open: Callable[[Link], None],
        on_close: Callable[[Link, BaseException | None], None],
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self.role = role
        self.settings = settings
        self._initial_channel = channel
        self.core = Connection(
            role=role,
            identity=settings.identity,
            mesh_secret=settings.mesh_secret,
            options=HandshakeOptions(
                listen_address=None if channel is Channel.CLIENT else settings.listen_address,
                channel=channel,
            ),
            now=self._loop.time(),
            handshake_timeout=settings.config.handshake_timeout,
        )
        self.peer: PeerInfo | None = None
        self.remote = "?"
        self.opened: asyncio.Future[PeerInfo] = self._loop.create_future()
        self.closed = asyncio.Event()
        self.lost = asyncio.Event()
        """Set once the socket is really gone (buffered output flushed or dropped)."""
        self.close_reason: BaseException | None = None
        self._dispatch = dispatch
        self._spawn = spawn
        self._on_open = on_open
        self._on_close = on_close
        self._transport: asyncio.Transport | None = None
        self._driver = Driver(self.core, drain=self._drain, loop=self._loop)
        self._inbox: collections.deque[tuple[Message, int]] = collections.deque()
        self._inbox_bytes = 0
        self._inbox_ready = asyncio.Event()
        self._reading_paused = False
        self._writable = asyncio.Event()
        self._writable.set()
        self._done = False
        self._at_eof = False
        self.dropped = 0
        self.last_active = self._loop.time()
        """Event-loop time of the last bytes read or written (the pool's idle rule)."""

    # ---- asyncio.BufferedProtocol callbacks ----------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        peername = transport.get_extra_info("peername")
        if isinstance(peername, tuple) and len(peername) >= 2:
            host = str(peername[0])
            self.remote = f"[{host}]:{peername[1]}" if ":" in host else f"{host}:{peername[1]}"
        self._transport.set_write_buffer_limits(high=min(1 << 20, self.settings.config.write_buffer_bytes))
        self._spawn(self._reader())
        self._pump()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.core.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self.last_active = self._loop.time()
        self.settings.traffic.received[self._channel()] += nbytes
        if not self._done:
            self.core.buffer_updated(nbytes)
            self._pump()

    def eof_received(self) -> bool:
        if not self._done:
            self._at_eof = True
            self.core.receive_data(b"")
            self._pump()
        return True  # we close once the core has delivered what came before the EOF

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            reason: BaseException = TransportError(f"connection lost: {exc}")
        else:
            reason = TransportError("connection closed without goodbye")
        self._finish(reason)
        self.lost.set()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # ---- core driving ---------------------------------------------------------------

    def _pump(self) -> None:
        """After any input: drain the core (``_drain``) and re-arm its one timer."""
        self._driver.step()

    def _drain(self) -> None:
        """Drain the core's events and output.

        Stops pulling events while the inbox is full (the rest stay parsed-later in the core,
        at most one socket read) and pauses reading; the reader task resumes both."""
        while not self._done:
            if self._inbox_full():
                self._pause_reading()
                break
            event = self.core.next_event()
            if event is NEED_DATA:
                break
            if isinstance(event, MessageReceived):
                self._inbox.append((event.message, event.size))
                self._inbox_bytes += event.size
                self._inbox_ready.set()
                self.settings.traffic.frames_received[self._channel()] += 1
            elif isinstance(event, HandshakeComplete):
                self.peer = event.peer
                if event.peer.channel is Channel.BULK and self.settings.config.bulk_congestion:
                    congestion.apply_to_transport(self._transport, self.settings.config.bulk_congestion)
                if not self.opened.done():
                    self.opened.set_result(event.peer)
                self._on_open(self)
            elif isinstance(event, ConnectionTerminated):
                self._write(self.core.data_to_send())
                error: BaseException | None = event.error
                if error is None and self._at_eof:  # EOF without GOODBYE: the peer vanished
                    error = TransportError("connection closed without goodbye")
                self._finish(error)
                return
        if not self._done:
            self._write(self.core.data_to_send())

    def _pause_reading(self) -> None:
        if not self._reading_paused:
            self._reading_paused = True
            if self._transport is not None:
                self._transport.pause_reading()

    def _resume_reading(self) -> None:
        """Reader task: the inbox drained to half: pull buffered events, then read again."""
        self._reading_paused = False
        self._pump()
        if not self._reading_paused and not self._done and self._transport is not None:
            self._transport.resume_reading()

    def _write(self, data: bytes | bytearray | memoryview) -> None:
        if data and self._transport is not None and not self._transport.is_closing():
            self.settings.traffic.sent[self._channel()] += len(data)
            self.last_active = self._loop.time()
            self._transport.write(data)

    def congestion(self) -> str | None:
        """The TCP congestion control of this link's socket (None: not connected, or the
        platform does not say)."""
        sock = self._transport.get_extra_info("socket") if self._transport is not None else None
        try:
            return congestion.current(sock) if sock is not None else None
        except (OSError, AttributeError):
            return None

    def _channel(self) -> Channel:
        """The link's channel (an inbound link is CONTROL until the peer's handshake says)."""
        return self.peer.channel if self.peer is not None else self._initial_channel

    def _finish(self, error: BaseException | None) -> None:
        """Close exactly once: cancel the timer, close the socket, wake everyone, report."""
        if self._done:
            return
        self._done = True
        self.close_reason = error
        self._driver.stop()
        if self._transport is not None:
            self._transport.close()
        if not self.opened.done():
            self.opened.set_exception(error if error is not None else TransportError("closed"))
            self.opened.exception()  # retrieved: a failed dial is reported by the dialer
        self._writable.set()
        self._inbox_ready.set()
        self.closed.set()
        self._on_close(self, error)

    # ---- receive side: the reader task ----------------------------------------------

    async def _reader(self) -> None:
        """Hand inbox messages to their handlers, one at a time, until the link closes."""
        while True:
            while not self._inbox:
                if self._done:
                    return
                self._inbox_ready.clear()
                await self._inbox_ready.wait()
            message, size = self._inbox.popleft()  # delivered even after a close: it was valid
            self._inbox_bytes -= size
            if self._reading_paused and not self._done and self._inbox_half_empty():
                self._resume_reading()
            await self._handle(message)

    def _inbox_full(self) -> bool:
        s = self.settings.config
        return len(self._inbox) >= s.inbox_messages or self._inbox_bytes >= s.inbox_bytes

    def _inbox_half_empty(self) -> bool:
        s = self.settings.config
        return len(self._inbox) <= s.inbox_messages // 2 and self._inbox_bytes <= s.inbox_bytes // 2

    async def _handle(self, message: Message) -> None:
        assert self.peer is not None
        handler = self._dispatch.get(self.peer.channel, {}).get(message.TAG)
        if handler is None:
            self.abort(ErrorCode.UNEXPECTED_MESSAGE, f"{message.TAG.name} not accepted on {self.peer.channel.name}")
            return
        try:
            await handler(self, message)
        except RemoteProtocolError as exc:
            self.abort(exc.code, str(exc))
        except StarmeshError as exc:
            level = logging.DEBUG if self._done else logging.WARNING  # e.g. replying on a closed link
            log.log(level, "%s: handler for %s failed: %s", self.describe(), message.TAG.name, exc)
        except Exception:
            log.exception("%s: handler for %s crashed", self.describe(), message.TAG.name)

    # ---- public API -----------------------------------------------------------------

    @property
    def inbox_size(self) -> int:
        """Messages received and not yet handed to a handler."""
        return len(self._inbox)

    @property
    def reading_paused(self) -> bool:
        """True while the inbox is full and the socket is not read (backpressure)."""
        return self._reading_paused

    @property
    def is_open(self) -> bool:
        return not self._done and self.core.state is ConnState.OPEN

    def describe(self) -> str:
        who = short_id(self.peer.node_id) if self.peer is not None else "?"
        return f"peer {who} @ {self.remote}"

    def send_nowait(self, message: Message) -> bool:
        """Best effort: write now, or drop (returns False) if not open or the buffer is full."""
        return self.send_many_nowait((message,))

    def send_many_nowait(self, messages: Sequence[Message]) -> bool:
        """``send_nowait`` for several messages in one write (a probe and its piggybacked gossip)."""
        transport = self._transport
        if (
            not self.is_open
            or transport is None
            or transport.get_write_buffer_size() > self.settings.config.write_buffer_bytes
        ):
            self._drop(len(messages))
            return False
        try:
            data = self.core.send_many(messages)
        except LocalProtocolError as exc:  # a message over the size cap: our bug, not the peer's
            log.error("%s: cannot send: %s", self.describe(), exc)
            self._drop(len(messages))
            return False
        self.settings.traffic.frames_sent[self._channel()] += len(messages)
        self._write(data)
        return True

    async def send(self, message: Message) -> None:
        """Write ``message`` once the write buffer has drained (backpressure).

        Raises ``TransportError`` if the link is or becomes closed.
        """
        await self._writable.wait()
        if not self.is_open:
            raise TransportError(f"{self.describe()}: link closed ({describe_error(self.close_reason)})")
        try:
            data = self.core.send(message)
        except LocalProtocolError as exc:
            raise TransportError(f"{self.describe()}: cannot send: {exc}") from exc
        self.settings.traffic.frames_sent[self._channel()] += 1
        self._write(data)

    def _drop(self, n: int) -> None:
        self.dropped += n
        self.settings.traffic.dropped[self._channel()] += n

    def close(self, code: ErrorCode | None = None, reason: str = "") -> None:
        """Say goodbye (or send an error ``code``) and close the socket."""
        if self._done:
            return
        if self.core.state in (ConnState.OPEN, ConnState.HANDSHAKING):
            self._write(self.core.close(code, reason))
        self._finish(None if code is None else LocalProtocolError(reason, code=code))

    def abort(self, code: ErrorCode, reason: str) -> None:
        """Close because the peer broke the protocol: log it as a rejected peer; drop its inbox."""
        if self._done:
            return
        self._inbox.clear()
        self._inbox_bytes = 0
        log.warning("rejected %s: %s: %s", self.describe(), code.name, reason)
        self.settings.traffic.rejected[code.name] += 1
        self.close(code, reason)

    def force_close(self) -> None:
        """Drop the socket now, discarding unsent output (shutdown after the linger time)."""
        self._inbox.clear()
        self._inbox_bytes = 0
        self._finish(TransportError("aborted"))
        if self._transport is not None:
            self._transport.abort()

    def buffered_bytes(self) -> int:
        """Bytes written to the transport and not yet handed to the kernel."""
        transport = self._transport
        return 0 if transport is None or transport.is_closing() else transport.get_write_buffer_size()


def handshake_failure(link: Link) -> StarmeshError:
    """The error a dialer reports when ``link`` closed before its handshake finished."""
    error = link.close_reason
    if isinstance(error, StarmeshError):
        return error
    return TransportError(describe_error(error))


__all__ = [
    "DispatchTable",
    "Handler",
    "Link",
    "LinkSettings",
    "Spawn",
    "TimeoutError",
    "describe_error",
    "handshake_failure",
]
