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
every claim the others still hold about its previous run. Swim never raises it above
``MAX_INCARNATION``, the bound ``start_incarnation`` accepts, so what is persisted always starts.

The live peers (alive and suspect members but us) are kept incrementally from the events, one
dict update each, and written (``on_peers``, sorted) by a ``WriteBehind`` timer: at once after
a quiet period, then at most once per ``PEERS_WRITE_INTERVAL_S``, and once more at ``stop()``.
A flood of membership events therefore costs O(1) each, never a sort of the whole table
(only if Swim dropped events, over ``max_events`` in one input, is the set rebuilt from it).

Joining (``join_state()``, ``wait_joined()``): a dial to a seed that fails is remembered with
its error until a dial to it succeeds, so a caller can tell "every seed refused our mesh key"
(``AUTH_FAILED``) from "no seed answers" and give up after its own timeout.

Leaving never raises and never waits forever: ``leave()`` logs a failure and ``busy()`` is then
False, so a shutdown always ends within the runtime's ``leave_timeout``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from discovery import incarnation
from discovery.events import EventKind, MemberEvent
from discovery.members import MemberView
from discovery.swim import Swim
from node.core import Stats
from node.driver import Driver
from node.pool import Pool
from node.transport import Handler, Link, Spawn, describe_error
from protocol.connection import Channel
from protocol.crypto import short_id
from protocol.errors import ErrorCode, RemoteProtocolError, StarmeshError
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

#: Messages queued per address while it is being dialed; older ones are dropped first. A full
#: member table (65 536 entries of maximal metadata) is under 300 push/pull parts.
PENDING_PER_ADDRESS = 512
#: Addresses with a dial in progress at once; messages to further ones are dropped.
MAX_PENDING_ADDRESSES = 256
#: Highest persisted incarnation a node restarts at (anything larger is a corrupt file); also
#: the highest Swim ever gives itself, so what is persisted always starts again.
MAX_START_INCARNATION = incarnation.MAX_INCARNATION
#: Seconds between two writes of the live peers (``on_peers``).
PEERS_WRITE_INTERVAL_S = 1.0
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

LIVE = (MemberStatus.ALIVE, MemberStatus.SUSPECT)


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
    """The incarnation a (re)started node begins at: one above the last one it persisted,
    saturated at ``MAX_START_INCARNATION`` (``discovery.incarnation.start_incarnation``).
    ``ConfigError`` for a value no node writes (a corrupt file)."""
    return incarnation.start_incarnation(last_incarnation)


class WriteBehind:
    """Sans-I/O: coalesce changes into at most one write every ``interval`` seconds.

    Call ``changed(now=)`` after each change: the write is due at once when the last one is at
    least ``interval`` old, else ``interval`` after it. ``handle_timer(now=)`` writes when due
    (``next_deadline()`` says when); ``flush(now=)`` writes now if a change is pending.
    """

    __slots__ = ("_due", "_last", "_write", "interval")

    def __init__(self, *, interval: float, write: Callable[[], None]) -> None:
        self.interval = interval
        self._write = write
        self._due: float | None = None
        self._last = -math.inf

    @property
    def pending(self) -> bool:
        return self._due is not None

    def changed(self, *, now: float) -> None:
        if self._due is None:
            self._due = max(now, self._last + self.interval)

    def next_deadline(self) -> float | None:
        return self._due

    def handle_timer(self, *, now: float) -> None:
        if self._due is not None and now >= self._due:
            self.flush(now=now)

    def flush(self, *, now: float) -> None:
        if self._due is not None:
            self._due, self._last = None, now
            self._write()


@dataclass(frozen=True, slots=True)
class JoinState:
    """Where a join stands (``Membership.join_state()``)."""

    joined: bool
    """A seed answered our join, or there were no seeds (we started a new mesh)."""
    seeds: tuple[str, ...]
    """The seeds joined through (deduplicated, our own address left out)."""
    refused_auth: frozenset[str]
    """Seeds whose latest dial failed with ``AUTH_FAILED``: they hold another mesh key."""
    unreachable: frozenset[str]
    """Seeds whose latest dial failed otherwise (refused, reset, timed out, unresolvable, another
    handshake error)."""
    errors: dict[str, str] = field(default_factory=dict)
    """The latest dial error of each seed in ``refused_auth`` or ``unreachable``, one line."""
    since: float = 0.0
    """Event-loop time of the ``join()`` call."""

    @property
    def all_refused_auth(self) -> bool:
        """Every seed refused our mesh key (and we are not in)."""
        return not self.joined and bool(self.seeds) and self.refused_auth.issuperset(self.seeds)

    @property
    def all_failing(self) -> bool:
        """The latest dial to every seed failed, for whatever reason (and we are not in)."""
        failing = self.refused_auth | self.unreachable
        return not self.joined and bool(self.seeds) and failing.issuperset(self.seeds)


def is_auth_failure(error: BaseException) -> bool:
    """The peer refused our handshake because we do not hold its mesh key."""
    return isinstance(error, RemoteProtocolError) and error.code is ErrorCode.AUTH_FAILED


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
        peers_interval: float = PEERS_WRITE_INTERVAL_S,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        """``on_peers``: called with the sorted live peer addresses (never an empty list, never
        the same list twice), at most once per ``peers_interval`` seconds and at ``stop()``.
        ``loop``: the event loop (default: the running one)."""
        self.swim = swim
        self.node_id = node_id
        self._pool = pool
        self._spawn = spawn
        self._on_incarnation = on_incarnation
        self._on_peers = on_peers
        self._peers: list[str] = []
        self._live: dict[bytes, str] = {}
        """Address of every live member but us, from the events (what ``on_peers`` writes)."""
        self._events_dropped = swim.events_dropped
        self._driver = Driver(swim, drain=self._drain, loop=loop)
        self._peers_writer = WriteBehind(interval=peers_interval, write=self._write_peers)
        self._peers_driver = Driver(self._peers_writer, drain=lambda: None, loop=loop)
        self._pending: dict[str, collections.deque[Message]] = {}
        self._warned: dict[str, float] = {}
        self._listeners: list[EventListener] = []
        self._incarnation = -1
        self._stopped = False
        self._leave_failed = False
        self._join_since: float | None = None
        self._seed_errors: dict[str, StarmeshError] = {}
        self._joined = asyncio.Event()

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
        """Join the mesh through ``seeds`` (none: start a new mesh); see ``join_state()``."""
        self._join_since = self._driver.now()
        self._seed_errors.clear()
        self.swim.join(list(seeds), now=self._join_since)
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
        peers_changed = False
        while (event := self.swim.next_event()) is not None:
            peers_changed |= self._track_peer(event)
            self._report(event)
        if self.swim.events_dropped != self._events_dropped:  # events were lost: rebuild
            self._events_dropped = self.swim.events_dropped  # (over max_events in one input)
            self._live = {m.node_id: m.address for m in self.swim.members()
                          if m.status in LIVE and m.node_id != self.node_id}
            peers_changed = True
        if peers_changed and self._on_peers is not None and not self._stopped:
            self._peers_writer.changed(now=self._driver.now())
            self._peers_driver.step()
        if self.swim.incarnation != self._incarnation:
            self._incarnation = self.swim.incarnation
            self._on_incarnation(self._incarnation)
        if self._join_since is not None and not self.swim.joining and not self._joined.is_set():
            self._joined.set()
            self._seed_errors.clear()

    def _track_peer(self, event: MemberEvent) -> bool:
        """Apply one event to the live peer set (O(1)); True if the set changed."""
        m = event.member
        if m.node_id == self.node_id or event.kind is EventKind.SEED_UNREACHABLE:
            return False
        if m.status in LIVE:
            if self._live.get(m.node_id) == m.address:
                return False
            self._live[m.node_id] = m.address
            return True
        return self._live.pop(m.node_id, None) is not None

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

    def _write_peers(self) -> None:
        """``WriteBehind`` callback: hand the live peers to ``on_peers`` if they changed."""
        if self._on_peers is None:
            return
        peers = sorted(set(self._live.values()))
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
        self._seed_errors.pop(address, None)
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
        if self.swim.joining and address in self.swim.join_seeds:
            self._seed_errors[address] = error.with_traceback(None)
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

    def join_state(self) -> JoinState:
        """Where the join stands: joined yet, and which seeds' latest dial failed, how.

        A ``--join-timeout`` check: ``st = join_state()``; ``st.all_refused_auth`` means
        every seed holds another mesh key (give up at once, or after the timeout);
        ``not st.joined and now - st.since > timeout`` means no seed let us in in time
        (``st.errors`` says why, per seed). Before ``join()``: not joined, no seeds."""
        seeds = self.swim.join_seeds
        joined = self._join_since is not None and not self.swim.joining
        errors = {} if joined else {a: e for a, e in self._seed_errors.items() if a in seeds}
        auth = frozenset(a for a, e in errors.items() if is_auth_failure(e))
        return JoinState(
            joined=joined, seeds=seeds, refused_auth=auth,
            unreachable=frozenset(errors) - auth,
            errors={a: describe_error(e) for a, e in errors.items()},
            since=self._driver.now() if self._join_since is None else self._join_since,
        )

    async def wait_joined(self) -> None:
        """Return once a seed answered our join (at once without seeds); wrap it in
        ``asyncio.timeout`` and read ``join_state()`` to report why not."""
        await self._joined.wait()

    def busy(self) -> bool:
        """True while gossip is queued (for someone live to hear), being dialed, or still in a
        write buffer. After ``leave()``: the announcement is not out yet. Never raises; False
        once leaving failed or after ``stop()``."""
        if self._leave_failed or self._stopped or not self._live:
            return False  # nothing to wait for, or nobody left to tell
        try:
            pending = bool(self._pending) or self.swim.pending_broadcasts > 0
            return pending or not self._pool.write_buffers_empty()
        except Exception:
            log.exception("cannot tell whether the leave announcement is out; not waiting")
            return False

    def leave(self) -> None:
        """Announce a graceful leave (``Dead`` about ourselves); gossip keeps running.
        Never raises: a failure is logged and the node closes without the announcement."""
        if self._stopped or self._leave_failed:
            return
        try:
            self.swim.leave(now=self._driver.now())
            self.step()
        except Exception:
            self._leave_failed = True
            log.exception("announcing the leave failed; closing without it")

    def stop(self) -> None:
        """Stop driving Swim: no timer, no more input; write the live peers a last time if
        they changed since the last write. Never raises."""
        if self._stopped:
            return
        self._stopped = True
        self._driver.stop()
        self._peers_driver.stop()
        try:
            self._peers_writer.flush(now=self._driver.now())
        except Exception:
            log.exception("writing the live peers at stop failed")
