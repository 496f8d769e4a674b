"""asyncio adapter around ``discovery.Swim``: messages in, messages out, one timer.

Theory of operation
-------------------
``Swim`` is a sans-I/O state machine. This adapter is its only driver:

* input: gossip messages arriving on CONTROL links (``handle``), the timer, dial
  failures and lost connections (``Swim.on_unreachable``), ``join``/``leave``/``update_meta``;
* after *every* input, ``step()`` drains ``messages_to_send()`` into the pool, drains and logs
  ``next_event()`` (one line per membership event) and re-arms the single
  ``loop.call_at(swim.next_deadline())`` timer;
* sending is best effort, like SWIM's UDP: over an open link at once; otherwise the
  messages wait in a small per-address queue while one dial task (in the node's
  ``TaskGroup``) connects. If the dial fails the queue is dropped and Swim is told the
  address is unreachable — the probe it was carrying then fails the SWIM way.

Our own incarnation is persisted (``on_incarnation``) whenever it changed after an input, and
a restarted node starts one above the persisted value (``Swim(incarnation=...)``), so its Alive beats
every claim the others still hold about its previous run.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Sequence

from discovery.events import EventKind, MemberEvent
from discovery.members import MemberView
from discovery.swim import Swim
from node.core import Stats
from node.driver import Driver
from node.pool import Pool
from node.transport import Handler, Link, Spawn, describe_error
from protocol.connection import Channel
from protocol.crypto import short_id
from protocol.errors import ConfigError, RemoteProtocolError, StarmeshError
from protocol.messages.gossip import MemberStatus, NodeMeta
from protocol.schema import Message
from protocol.tags import MsgType

log = logging.getLogger("starmesh.members")

#: Gossip messages accepted on CONTROL links and handed to Swim.
GOSSIP_TAGS = (
    MsgType.PING,
    MsgType.PING_REQ,
    MsgType.ACK,
    MsgType.NACK,
    MsgType.ALIVE,
    MsgType.SUSPECT,
    MsgType.DEAD,
    MsgType.PUSH_PULL,
)

#: Messages queued per address while it is being dialed; older ones are dropped first.
PENDING_PER_ADDRESS = 64
#: Addresses with a dial in progress at once; messages to further ones are dropped.
MAX_PENDING_ADDRESSES = 256
#: Highest persisted incarnation a node restarts above (anything larger is a corrupt file).
MAX_START_INCARNATION = 1 << 62
#: Seconds between two warnings about the same unreachable address.
WARN_EVERY_S = 30.0

_EVENT_LOG: dict[EventKind, tuple[int, str]] = {
    EventKind.JOINED: (logging.INFO, "joined"),
    EventKind.UPDATED: (logging.DEBUG, "updated"),
    EventKind.SUSPECTED: (logging.WARNING, "suspect"),
    EventKind.REFUTED: (logging.INFO, "refuted suspicion"),
    EventKind.DEAD: (logging.WARNING, "dead"),
    EventKind.LEFT: (logging.INFO, "left"),
    EventKind.REAPED: (logging.DEBUG, "reaped"),
    EventKind.SEED_UNREACHABLE: (logging.WARNING, "seed unreachable"),
}

EventListener = Callable[[MemberEvent], None]


def format_event(event: MemberEvent, self_id: bytes | None = None) -> tuple[int, str]:
    """(log level, one line) for a membership event."""
    level, what = _EVENT_LOG.get(event.kind, (logging.INFO, event.kind.name.lower()))
    m = event.member
    if event.kind is EventKind.SEED_UNREACHABLE:
        return level, f"join: no answer from seeds {', '.join(event.seeds) or '-'}; retrying"
    if self_id is not None and m.node_id == self_id:
        return level, f"this node {what}: {short_id(m.node_id)} (incarnation {m.incarnation})"
    return level, f"member {what}: {short_id(m.node_id)} at {m.address} (incarnation {m.incarnation})"


def start_incarnation(last_incarnation: int) -> int:
    """The incarnation a (re)started node begins at: one above the last one it persisted."""
    if not 0 <= last_incarnation <= MAX_START_INCARNATION:
        raise ConfigError(f"persisted incarnation {last_incarnation} is implausible; delete the incarnation file")
    return last_incarnation + 1


class Membership:
    """Drives one ``Swim`` from the event loop (see module docstring)."""

    def __init__(
        self,
        *,
        swim: Swim,
        node_id: bytes,
        pool: Pool,
        spawn: Spawn,
        on_incarnation: Callable[[int], None],
        on_peers: Callable[[list[str]], None] | None = None,
    ) -> None:
        self.swim = swim
        self.node_id = node_id
        self._pool = pool
        self._spawn = spawn
        self._on_incarnation = on_incarnation
        self._on_peers = on_peers
        self._peers: list[str] = []
        self._driver = Driver(swim, drain=self._drain)
        self._pending: dict[str, collections.deque[Message]] = {}
        self._warned: dict[str, float] = {}
        self._listeners: list[EventListener] = []
        self._incarnation = -1
        self._stopped = False

    # ---- inputs ---------------------------------------------------------------------

    def handlers(self) -> dict[MsgType, Handler]:
        """The CONTROL-channel dispatch entries this adapter serves."""
        return dict.fromkeys(GOSSIP_TAGS, self._handle)

    async def _handle(self, link: Link, message: Message) -> None:
        peer = link.peer
        assert peer is not None
        if self._stopped:
            return
        self.swim.on_message(peer.listen_address or link.remote, peer.node_id, message, now=self._driver.now())
        self.step()

    def join(self, seeds: Sequence[str]) -> None:
        self.swim.join(list(seeds), now=self._driver.now())
        self.step()

    def update_meta(self, meta: NodeMeta) -> None:
        self.swim.update_meta(meta, now=self._driver.now())
        self.step()

    def link_lost(self, link: Link, error: BaseException | None) -> None:
        """Pool callback: a member's CONTROL connection broke (not a goodbye) -> hint Swim."""
        peer = link.peer
        if self._stopped or error is None or peer is None or peer.channel is not Channel.CONTROL:
            return
        if peer.listen_address:
            self.swim.on_unreachable(peer.listen_address, now=self._driver.now())
            self.step()

    # ---- outputs --------------------------------------------------------------------

    def step(self) -> None:
        """After every input: send, report events, re-arm the one timer."""
        self._driver.step()

    def _drain(self) -> None:
        """Write ``messages_to_send()``, report ``next_event()``, persist the incarnation."""
        batch: list[Message] = []
        batch_to = ""
        for address, message in self.swim.messages_to_send():
            if address != batch_to and batch:
                self._send(batch_to, batch)
                batch = []
            batch_to = address
            batch.append(message)
        if batch:
            self._send(batch_to, batch)
        changed = False
        while (event := self.swim.next_event()) is not None:
            self._report(event)
            changed = True
        if changed and self._on_peers is not None and not self._stopped:
            self._remember_peers()
        if self.swim.incarnation != self._incarnation:
            self._incarnation = self.swim.incarnation
            self._on_incarnation(self._incarnation)

    def _report(self, event: MemberEvent) -> None:
        member = event.member
        if member.node_id == self.node_id and event.kind is EventKind.UPDATED:
            return
        level, line = format_event(event, self.node_id)
        if event.kind is EventKind.SEED_UNREACHABLE and not self._should_warn("<seeds>"):
            level = logging.DEBUG
        log.log(level, "%s", line)
        if event.kind in (EventKind.DEAD, EventKind.LEFT) and member.node_id != self.node_id:
            self._pool.close_address(member.address)
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                log.exception("member event listener failed")

    def _remember_peers(self) -> None:
        assert self._on_peers is not None
        live = (MemberStatus.ALIVE, MemberStatus.SUSPECT)
        peers = sorted(m.address for m in self.swim.members() if m.status in live and m.node_id != self.node_id)
        if peers and peers != self._peers:
            self._peers = peers
            self._on_peers(peers)

    def _send(self, address: str, messages: list[Message]) -> None:
        """Write ``messages`` (consecutive ones to one address: a probe and its piggyback)."""
        link = self._pool.get_open(address, Channel.CONTROL)
        if link is not None:
            link.send_many_nowait(messages)
            return
        queue = self._pending.get(address)
        if queue is None:
            if len(self._pending) >= MAX_PENDING_ADDRESSES:
                return
            queue = self._pending[address] = collections.deque(maxlen=PENDING_PER_ADDRESS)
            self._spawn(self._dial_and_flush(address))
        queue.extend(messages)

    async def _dial_and_flush(self, address: str) -> None:
        try:
            link = await self._pool.connect(address, Channel.CONTROL)
        except StarmeshError as exc:
            self._pending.pop(address, None)
            self._unreachable(address, exc)
            return
        link.send_many_nowait(list(self._pending.pop(address, ())))

    def _should_warn(self, key: str) -> bool:
        """At most one warning per ``key`` every ``WARN_EVERY_S`` seconds."""
        now = self._driver.now()
        if now - self._warned.get(key, -WARN_EVERY_S) < WARN_EVERY_S:
            return False
        if len(self._warned) > MAX_PENDING_ADDRESSES:
            self._warned.clear()
        self._warned[key] = now
        return True

    def _unreachable(self, address: str, error: StarmeshError) -> None:
        now = self._driver.now()
        if isinstance(error, RemoteProtocolError) and self._should_warn(address):
            log.warning("%s refused our handshake: %s", address, describe_error(error))
        else:
            log.debug("%s unreachable: %s", address, describe_error(error))
        if not self._stopped:
            self.swim.on_unreachable(address, now=now)
            self.step()

    # ---- views and leaving ----------------------------------------------------------

    def members(self) -> list[MemberView]:
        return self.swim.members()

    def stats(self) -> Stats:
        """``Swim.stats()`` and the gossip waiting for a dial."""
        return {**self.swim.stats(), "gossip_pending_dials": float(len(self._pending))}

    def add_listener(self, listener: EventListener) -> None:
        self._listeners.append(listener)

    def busy(self) -> bool:
        """True while gossip is queued (for someone live to hear), being dialed, or still in a
        write buffer. After ``leave()``: the announcement is not out yet."""
        live = (MemberStatus.ALIVE, MemberStatus.SUSPECT)
        if not any(m.status in live for m in self.swim.members() if m.node_id != self.node_id):
            return False  # nobody left to tell
        pending = bool(self._pending) or self.swim.pending_broadcasts > 0
        return pending or not self._pool.write_buffers_empty()

    def leave(self) -> None:
        """Announce a graceful leave (``Dead`` about ourselves); gossip keeps running."""
        self.swim.leave(now=self._driver.now())
        self.step()

    def stop(self) -> None:
        """Stop driving Swim: no timer, no more input."""
        self._stopped = True
        self._driver.stop()
