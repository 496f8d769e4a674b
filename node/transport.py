"""asyncio TCP adapters around the sans-I/O ``protocol.Connection``: links and a pool.

Theory of operation
-------------------
A ``Link`` is one TCP connection and its ``Connection`` core. Bytes flow one way::

    get_buffer/buffer_updated -> core -> core.next_event() ... -> inbox -> reader task
                                        -> core.data_to_send() -> transport.write

* Connect. ``connection_made`` first tells the owner (``on_connect``: the pool enters the
  link in its table only now, so a dial that never connects leaves nothing behind; uvloop
  calls the protocol factory before connecting), then starts the reader task and the core.
* Handshake. The initiator's first flight is written in ``connection_made``. The link is the
  ``Driver``'s core: its ``next_deadline()`` is the core's (handshake timeout) and, for an
  inbound link until the peer's first flight (INIT) is in, ``first_flight_timeout`` after
  the connect; armed as one ``loop.call_at`` timer, re-armed after every input. The first
  flight is in when the core answers it (the responder's RESPONSE is the first thing it
  writes; anything else the peer sends ends the connection). ``HandshakeComplete`` resolves
  ``link.opened`` and registers the link in the pool (``on_open``).
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
  or EOF once everything before it was delivered), a socket error, or a write the transport
  refuses (uvloop raises ``RuntimeError`` on a closed handle) closes the link once: pending
  output (an ERROR frame) is written if the transport still takes it, the transport closed,
  the timer cancelled, the core closed (it drops its receive buffers), and ``on_close(link,
  error)`` called with the reason (None for a graceful goodbye; EOF without goodbye is a
  ``TransportError``). Messages already in the inbox are still handed to their handlers
  (they were valid), except after ``abort``/``force_close``.
* Memory. A finished link is freed by reference counting, never left to the cyclic GC: it
  drops its ``Driver`` (the one cycle it has while open) and its transport, and keeps no
  traceback (``close_reason`` and the exception of ``opened`` have none, and whoever waits
  for a failure gets a fresh copy: ``settled`` / ``fresh_error``; a raised exception's
  traceback holds the frames that raised it, and those frames hold the link).
* Logs. Refused and rejected connections are counted one by one in ``Traffic.rejected`` but
  logged at most once per reason per ``REJECT_LOG_INTERVAL_S`` (``LogLimiter``): a connect
  storm costs a few lines, each saying how many like it were not logged.

Invariants: the core is fed only from the event loop thread; a link closes exactly once;
nothing a peer sends raises out of a callback.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import logging
import math
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

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
    detached,
)
from protocol.schema import Message
from protocol.tags import MsgType

log = logging.getLogger("starmesh.transport")

Handler = Callable[["Link", Message], Awaitable[None]]
"""A message handler: gets the link it came in on (``link.peer`` is authenticated)."""

DispatchTable = Mapping[Channel, Mapping[MsgType, Handler]]
Spawn = Callable[[Coroutine[Any, Any, None]], None]

T = TypeVar("T")
E = TypeVar("E", bound=BaseException)

REJECT_LOG_INTERVAL_S = 10.0
"""Seconds between two log lines about refused or rejected connections of one reason."""


class LogLimiter:
    """At most one log line per ``key`` per ``interval`` seconds (``now``: event-loop time);
    the first line after suppressed ones says how many were not logged. Keys are a few fixed
    reasons (``ErrorCode`` names, ``refused``, ``evicted``), so the table stays small."""

    __slots__ = ("_last", "_suppressed", "interval")

    def __init__(self, *, interval: float = REJECT_LOG_INTERVAL_S) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: collections.Counter[str] = collections.Counter()

    def log(self, logger: logging.Logger, level: int, key: str, msg: str, *args: object,
            now: float) -> bool:
        """Log ``msg % args`` unless a line of ``key`` was logged less than ``interval`` s
        before ``now`` (then count it as suppressed). Returns whether it was logged."""
        last = self._last.get(key, -math.inf)
        if now - last < self.interval:
            self._suppressed[key] += 1
            return False
        self._last[key] = now
        suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            msg += " (%d more like this in the last %.0f s not logged)"
            args = (*args, suppressed, now - last)
        logger.log(level, msg, *args)
        return True


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
    warnings: LogLimiter = field(default_factory=LogLimiter)
    """Rate limit of the node's per-connection WARNING lines (refused, rejected, evicted)."""

    def reject(self, reason: str, logger: logging.Logger, msg: str, *args: object, now: float) -> None:
        """Count a refused or rejected connection under ``reason`` and log ``msg % args`` as
        a WARNING, rate-limited per reason (``warnings``)."""
        self.rejected[reason] += 1
        self.warnings.log(logger, logging.WARNING, reason, msg, *args, now=now)


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


def fresh_error(error: BaseException) -> BaseException:
    """A copy of ``error`` (same type, message and code) with no traceback and no chain: what
    to raise for a failure that is also stored somewhere (raising the stored object would
    grow its traceback with the raising frames)."""
    try:
        copied = copy.copy(error)
    except Exception:  # an exception type that cannot be rebuilt from its args
        return TransportError(describe_error(error))
    copied.__cause__ = copied.__context__ = None
    return copied.with_traceback(None)


async def settled(future: asyncio.Future[T]) -> T:
    """``await future`` without cancelling it if the caller is cancelled (like ``shield``), and
    raising a ``fresh_error`` copy of its exception instead of the stored object."""
    if not future.done():
        await asyncio.wait((future,))
    if not future.cancelled():
        error = future.exception()
        if error is not None:
            raise fresh_error(error) from None
    return future.result()


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
        on_connect: Callable[[Link], None] | None = None,
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
        self.remote_host = "?"
        """The peer's IP address (the pool's per-address quota of handshakes)."""
        self.opened: asyncio.Future[PeerInfo] = self._loop.create_future()
        self.closed = asyncio.Event()
        self.lost = asyncio.Event()
        """Set once the socket is really gone (buffered output flushed or dropped)."""
        self.close_reason: BaseException | None = None
        """Why the link closed (None: goodbye), without traceback (see "Memory")."""
        self._dispatch = dispatch
        self._spawn = spawn
        self._on_open = on_open
        self._on_close = on_close
        self._on_connect = on_connect
        self._transport: asyncio.Transport | None = None
        self._driver: Driver | None = None  # from connection_made until the link finishes
        self._first_flight_due: float | None = None
        self._first_flight_in = role is Role.INITIATOR
        self._inbox: collections.deque[tuple[Message, int]] = collections.deque()
        self._inbox_bytes = 0
        self._inbox_ready = asyncio.Event()
        self._reading_paused = False
        self._writable = asyncio.Event()
        self._writable.set()
        self._done = False
        self._at_eof = False
        self.last_active = self._loop.time()
        """Event-loop time of the last bytes read or written (the pool's idle rule)."""
        self.connected_at = self.last_active
        """Event-loop time of ``connection_made`` (the pool's eviction grace)."""

    # ---- asyncio.BufferedProtocol callbacks ----------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        peername = transport.get_extra_info("peername")
        if isinstance(peername, tuple) and len(peername) >= 2:
            host = self.remote_host = str(peername[0])
            self.remote = f"[{host}]:{peername[1]}" if ":" in host else f"{host}:{peername[1]}"
        self.last_active = self.connected_at = self._loop.time()
        if self.role is Role.RESPONDER:
            self._first_flight_due = self.connected_at + self.settings.config.first_flight_timeout
        if self._on_connect is not None:
            self._on_connect(self)
        if self._done:  # the owner closed it at once (shutting down)
            return
        self._transport.set_write_buffer_limits(high=min(1 << 20, self.settings.config.write_buffer_bytes))
        reader = self._reader()
        try:
            self._spawn(reader)
        except RuntimeError as exc:  # the task group is shutting down
            reader.close()
            self._finish(TransportError(f"cannot serve the connection: {exc}"))
            return
        self._driver = Driver(self, drain=self._drain, loop=self._loop)
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
        self._transport = None  # the transport holds us until now: no cycle left
        self.lost.set()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # ---- core driving ---------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """The ``Driver``'s view: the core's deadline, or the first-flight one if sooner."""
        core, first = self.core.next_deadline(), self._first_flight_due
        if first is None:
            return core
        return first if core is None else min(core, first)

    def handle_timer(self, *, now: float) -> None:
        """The ``Driver``'s view: an inbound peer that sent no valid first flight within
        ``first_flight_timeout`` is rejected (``HANDSHAKE_TIMEOUT``); then the core's timer."""
        due = self._first_flight_due
        if due is not None and now >= due:
            self._first_flight_due = None
            timeout = self.settings.config.first_flight_timeout
            self.abort(ErrorCode.HANDSHAKE_TIMEOUT, f"no handshake from the peer within {timeout:g} s")
            return
        self.core.handle_timer(now=now)

    @property
    def first_flight_in(self) -> bool:
        """True once the peer's first handshake flight arrived and was valid (always for a
        link we dialed): the pool evicts half-open links without it first."""
        return self._first_flight_in

    def _pump(self) -> None:
        """After any input: drain the core (``_drain``) and re-arm its one timer."""
        driver = self._driver
        if driver is not None:
            driver.step()

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
                self._put(self.core.data_to_send())  # a failure here changes no verdict
                error: BaseException | None = event.error
                if error is None and self._at_eof:  # EOF without GOODBYE: the peer vanished
                    error = TransportError("connection closed without goodbye")
                self._finish(error)
                return
        if not self._done:
            data = self.core.data_to_send()
            if data and not self._first_flight_in:  # the core answered the peer's INIT
                self._first_flight_in = True
                self._first_flight_due = None
            self._write(data)

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

    def _write(self, data: bytes | bytearray | memoryview) -> bool:
        """Write ``data``; a transport that refuses it finishes the link (``TransportError``).
        Returns False if the link is finished (now or before)."""
        error = self._put(data)
        if error is not None:
            self._finish(error)
        return not self._done

    def _put(self, data: bytes | bytearray | memoryview) -> TransportError | None:
        """Hand ``data`` to the transport; the error if it refused (uvloop raises
        ``RuntimeError`` once its handle is closed, even under ``is_closing() == False``)."""
        transport = self._transport
        if not data or transport is None or transport.is_closing():
            return None
        try:
            transport.write(data)
        except (RuntimeError, OSError) as exc:
            return TransportError(f"write failed: {type(exc).__name__}: {exc}")
        self.settings.traffic.sent[self._channel()] += len(data)
        self.last_active = self._loop.time()
        return None

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
        """Close exactly once: cancel the timer, close the socket and the core, wake
        everyone, report (see "Memory" for what is dropped and why)."""
        if self._done:
            return
        self._done = True
        self.close_reason = error = None if error is None else detached(error)
        self._first_flight_due = None
        if self._driver is not None:
            self._driver.stop()
            self._driver = None
        if self._transport is not None:
            self._transport.close()
        self.core.release()  # its receive buffers go (a live core ends, nothing more is sent)
        if not self.opened.done():
            self.opened.set_exception(fresh_error(error) if error is not None else TransportError("closed"))
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
        return self._write(data)

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
        if not self._write(data):
            raise TransportError(f"{self.describe()}: link closed ({describe_error(self.close_reason)})")

    def _drop(self, n: int) -> None:
        self.settings.traffic.dropped[self._channel()] += n

    def close(self, code: ErrorCode | None = None, reason: str = "") -> None:
        """Say goodbye (or send an error ``code``) and close the socket."""
        if self._done:
            return
        if self.core.state in (ConnState.OPEN, ConnState.HANDSHAKING):
            self._put(self.core.close(code, reason))  # best effort: we close either way
        self._finish(None if code is None else LocalProtocolError(reason, code=code))

    def abort(self, code: ErrorCode, reason: str) -> None:
        """Close because the peer broke the protocol: log it as a rejected peer; drop its inbox."""
        if self._done:
            return
        self._inbox.clear()
        self._inbox_bytes = 0
        self.settings.traffic.reject(code.name, log, "rejected %s: %s: %s", self.describe(), code.name,
                                     reason, now=self._loop.time())
        self.close(code, reason)

    def force_close(self) -> None:
        """Drop the socket now, discarding unsent output (shutdown after the linger time)."""
        self._inbox.clear()
        self._inbox_bytes = 0
        transport = self._transport
        self._finish(TransportError("aborted"))
        if transport is not None:
            transport.abort()

    def buffered_bytes(self) -> int:
        """Bytes written to the transport and not yet handed to the kernel."""
        transport = self._transport
        return 0 if transport is None or transport.is_closing() else transport.get_write_buffer_size()


def handshake_failure(link: Link) -> StarmeshError:
    """The error a dialer raises when ``link`` closed before its handshake finished: a fresh
    copy of ``close_reason`` (never the stored object: see "Memory")."""
    error = link.close_reason
    if error is None:
        return TransportError("closed before the handshake completed")
    if isinstance(error, StarmeshError):
        copied = fresh_error(error)
        if isinstance(copied, StarmeshError):
            return copied
    return TransportError(describe_error(error))


__all__ = [
    "REJECT_LOG_INTERVAL_S",
    "DispatchTable",
    "Handler",
    "Link",
    "LinkSettings",
    "LogLimiter",
    "Spawn",
    "TimeoutError",
    "describe_error",
    "fresh_error",
    "handshake_failure",
    "settled",
]
