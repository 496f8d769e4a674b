"""The listener, the dialer and the connection pool of one node.

Theory of operation
-------------------
The pool owns every connected ``Link`` of the node: a link enters its table in
``connection_made`` (``on_connect``), not when the protocol factory makes it, because uvloop
makes the protocol before connecting and, when the connect fails, never tells it; so a
failed dial leaves nothing behind on either loop. Outbound links are dialed on demand by
``connect(address, channel)``; concurrent callers for the same key share one dial (a
future resolved by a dial task in the node's ``TaskGroup``). A link is usable for sending
once its handshake completed; the table maps ``(address, channel)`` to the link to send on:

* outbound: under the address we dialed;
* inbound: under the listen address the peer announced in its (authenticated) handshake,
  unless a link is already stored there — so a member that dialed us is answered on its
  own connection, and we do not dial back. CLIENT links (status tools) are never stored.

Duplicate links. Two members that dial each other at the same moment get two links for one
(peer, channel), one initiated by each side. When the second one completes its handshake,
both sides pick the same *preferred* link by one rule, ``prefer``: the link initiated by
the member with the smaller node id (of two links dialed by the same side, e.g. an address
alias, the older one). Every table entry that pointed at the other link is re-pointed at the
preferred one, so from then on both sides send on one connection. The other link is
*retired*: nothing new is sent on it, and what was already written on it is still read and
delivered. A retired link closes with a goodbye once it is drained and quiet: nothing
buffered for writing, nothing unhandled in its inbox, and no byte moved either way for
``retired_quiet(idle_timeout)`` seconds (``close_retired``, run by the sweep below). Only the
side that *answered* the preferred link closes it; the other side sees the goodbye. That
side's handshake completes last (the dialer completes on the RESPONSE, before it writes the
FINISH), so by then the peer has retired the link and writes nothing more on it; the quiet
time covers what it wrote just before switching. So our goodbye does not cross a message of
the peer, and the socket we close has no unread bytes (the kernel would answer those with a
reset instead of delivering the goodbye). The goodbye is graceful on both sides: membership
ignores it, and the all-reduce does not fail the peer (``AllReduceService._watch`` ignores
links closed with a goodbye; what was sent before it is delivered). When a preferred link
closes, a still open retired link to that peer takes its place.

Idle reaping. With ``idle_timeout > 0`` one sweep task wakes every ``sweep_interval``
(``idle_timeout / 4``, clamped to [0.05, 30] s) and closes gracefully (GOODBYE) the links of
every (peer, channel) whose links all moved no byte in either direction for ``idle_timeout``
seconds, have nothing buffered for writing and nothing unhandled in their inbox. CLIENT links
are judged one by one, against ``client_idle_timeout``; while any is open the sweep also
wakes every ``sweep_interval(client_idle_timeout)``. Both sides see a goodbye, i.e.
``on_lost(link, None)``: membership treats it as a graceful close (no suspicion, no
``on_unreachable``), and the next ``connect`` dials again. An all-reduce round writes every few ms, so links in use are never idle; a
message a peer writes in the same instant as our goodbye is lost, which gossip tolerates.
While retired links wait for their quiet time, the sweep also wakes when the first of them
may close (and at once when a link is retired), so a duplicate lives about a second, not
``idle_timeout``. With ``idle_timeout == 0`` idle and retired member links stay open until
the peer or a failure closes them (and with both timeouts 0 there is no sweep).

Budgets. Every link is in exactly one of three budgets, so none can lock the others out:

* *half-open*: an inbound link before its handshake says its channel. At most
  ``max_handshaking`` in all and ``max_handshaking_per_address`` from one IP address. A new
  connection over either is not refused: half-open links over that limit are *evicted*
  (closed with ``LIMIT_EXCEEDED``), oldest first, only those whose first flight has not
  arrived and that connected ``eviction_grace`` s ago or more (``to_evict``). So idle
  strangers go first, and a peer that handshakes normally survives a flood from its own
  address: its INIT is in within a round trip, though a burst of connections accepted in one
  go is handled before any of them is read, hence the grace. Links in their grace may exceed
  ``max_handshaking`` up to ``HARD_LIMIT_FACTOR`` times; there the oldest goes at once. (A
  per-address cap below that would let a stranger with more sockets than the cap churn at it
  and push out a newcomer from its own address before the newcomer's INIT is read; the
  whole-node cap still bounds the sockets.) A peer must send its first flight within
  ``first_flight_timeout`` (``Link``), its whole handshake within ``handshake_timeout``.
* *client*: an open CLIENT link (status tools). At most ``max_client_connections``; when one
  more completes its handshake the client idle the longest is closed (goodbye) to make room,
  so a pile of idle status connections never keeps a new status request out.
* *member*: every other link (outbound links from the dial on, inbound ones once their
  handshake names a member channel). At most ``max_connections``: a dial beyond it fails at
  once, an inbound member link beyond it is closed with ``LIMIT_EXCEEDED`` when its
  handshake completes (logged as ``refused``).

When a link closes it is dropped from the table and ``on_lost(link, error)`` is called
(error None: graceful goodbye). Inbound links that the peer broke the protocol on are logged
as rejected peers with the reason (wrong mesh key, garbage, handshake timeout). Every
refusal, rejection and eviction is counted (``Traffic.rejected``, ``stats()``), but logged
at most once per reason per ``REJECT_LOG_INTERVAL_S``.
"""

from __future__ import annotations

import asyncio
import builtins
import collections
import contextlib
import logging
import socket
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

from node.config import Address, parse_address
from node.core import Stats
from node.transport import (
    DispatchTable,
    Link,
    LinkSettings,
    Spawn,
    Traffic,
    describe_error,
    handshake_failure,
    settled,
)
from protocol import crypto
from protocol.connection import Channel, Role
from protocol.errors import (
    ConfigError,
    ErrorCode,
    LocalProtocolError,
    RemoteProtocolError,
    StarmeshError,
    TimeoutError,
    TransportError,
)

log = logging.getLogger("starmesh.pool")

Key = tuple[str, Channel]
PeerKey = tuple[bytes, Channel]

#: Bounds of the idle sweep period (seconds).
SWEEP_MIN_S = 0.05
SWEEP_MAX_S = 30.0


def guess_local_ip() -> str:
    """Best guess of this host's outward-facing IP (no packet is sent); loopback if none."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))  # TEST-NET-1: routing decision only
        ip: str = probe.getsockname()[0]
    except OSError:
        ip = "127.0.0.1"
    finally:
        probe.close()
    return ip


def sweep_interval(idle_timeout: float) -> float:
    """Seconds between two idle sweeps: a quarter of ``idle_timeout``, clamped to
    [``SWEEP_MIN_S``, ``SWEEP_MAX_S``]."""
    return min(SWEEP_MAX_S, max(SWEEP_MIN_S, idle_timeout / 4))


RETIRED_QUIET_S = 1.0
"""Seconds a retired duplicate link must have moved no byte (and hold nothing unsent or
unhandled) before the pool closes it: long enough for a peer that had not yet switched to
the preferred link to finish what it was writing, short enough that duplicates do not pile up."""


def retired_quiet(idle_timeout: float) -> float:
    """The quiet time of retired links: ``RETIRED_QUIET_S``, or ``idle_timeout`` if shorter
    (a retired link never outlives an idle one); 0 when idle reaping is off."""
    return max(0.0, min(RETIRED_QUIET_S, idle_timeout))


def initiator_id(link: Link, self_id: bytes) -> bytes:
    """Node id of the member that dialed ``link`` (an open link: its peer is known)."""
    assert link.peer is not None
    return self_id if link.role is Role.INITIATOR else link.peer.node_id


def prefer(older: Link, newer: Link, self_id: bytes) -> Link:
    """Of two open links to one (peer, channel), the one both sides keep sending on: the link
    dialed by the smaller node id; of two dialed by the same side, the older one."""
    first, second = initiator_id(older, self_id), initiator_id(newer, self_id)
    return newer if second < first else older


HARD_LIMIT_FACTOR = 4
"""Connections still in their eviction grace may exceed ``max_handshaking`` up to this many
times; there a new connection evicts the oldest whatever its age. The per-address quota has
no such cap: an address exceeds it only with connections in their grace, within this one."""


class HalfOpen(Protocol):
    """What ``to_evict`` looks at in a half-open link."""

    @property
    def first_flight_in(self) -> bool: ...

    @property
    def connected_at(self) -> float: ...


H = TypeVar("H", bound=HalfOpen)


def to_evict(links: Sequence[H], *, limit: int, grace: float, now: float,
             hard_limit: int | None = None) -> list[H]:
    """The half-open ``links`` (oldest first, all under one limit) that a new connection
    evicts at ``now``: while ``limit`` or more remain, the oldest whose first flight has not
    arrived and that connected at least ``grace`` s ago (one not read yet may have its first
    flight waiting in the socket); then, if ``hard_limit`` or more still remain, one more:
    the oldest whose first flight has not arrived, whatever its age (else the oldest). Links
    whose first flight arrived are evicted only there: their handshake is bounded by
    ``handshake_timeout``."""
    out: list[H] = []
    remaining = len(links)
    for link in links:
        if remaining < limit:
            break
        if not link.first_flight_in and now - link.connected_at >= grace:
            out.append(link)
            remaining -= 1
    if hard_limit is not None and remaining >= hard_limit:
        rest = [link for link in links if link not in out]
        out.append(next((link for link in rest if not link.first_flight_in), rest[0]))
    return out


class _Refused(asyncio.Protocol):
    """Closes an inbound connection at once (the node is shutting down)."""

    def __init__(self, why: str, traffic: Traffic) -> None:
        self.why = why
        self.traffic = traffic

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.traffic.reject("refused", log, "refused connection from %s: %s",
                            transport.get_extra_info("peername"), self.why,
                            now=asyncio.get_running_loop().time())
        transport.close()


class Pool:
    """Listener + dialer + the ``(address, channel) -> Link`` table (see module docstring)."""

    def __init__(
        self,
        *,
        settings: LinkSettings,
        dispatch: DispatchTable,
        spawn: Spawn,
        on_lost: Callable[[Link, BaseException | None], None],
    ) -> None:
        self.settings = settings
        config = settings.config
        self._dispatch = dispatch
        self._spawn = spawn
        self._dial_timeout = config.dial_timeout
        self._max_connections = config.max_connections
        self._max_handshaking = config.max_handshaking
        self._max_per_address = config.max_handshaking_per_address
        self._max_clients = config.max_client_connections
        self._grace = config.eviction_grace
        self._on_lost = on_lost
        self._idle_timeout = config.idle_timeout
        self._client_idle_timeout = config.client_idle_timeout
        self._retired_quiet = retired_quiet(config.idle_timeout)
        self._self_id = crypto.node_id_of(settings.identity)
        self._links: dict[Key, Link] = {}
        self._preferred: dict[PeerKey, Link] = {}
        self._all: dict[Link, None] = {}  # connected links; insertion order = age
        self._half_open: dict[Link, None] = {}  # inbound, handshake not done; by age
        self._clients: dict[Link, None] = {}  # open CLIENT links
        self._evicted: collections.Counter[str] = collections.Counter()
        self._clients_closed: collections.Counter[str] = collections.Counter()
        self._dials: dict[Key, asyncio.Future[Link]] = {}
        self._server: asyncio.Server | None = None
        self._closing = False
        self._wake = asyncio.Event()  # the sweep: shutdown, or a link was retired
        self._sweeping = False

    # ---- listening ------------------------------------------------------------------

    async def listen(self, address: Address) -> Address:
        """Start accepting connections on ``address``; returns the address actually bound."""
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(
                self._accept, address.host, address.port, reuse_address=True, backlog=128,
                start_serving=False,
            )
        except OSError as exc:
            raise ConfigError(f"cannot listen on {address}: {exc.strerror or exc}") from None
        host, port = self._server.sockets[0].getsockname()[:2]
        return Address(address.host if address.is_unspecified else str(host), int(port))

    def set_listen_address(self, settings: LinkSettings) -> None:
        """Replace the settings once the advertised address is known (after ``listen``)."""
        self.settings = settings

    async def start_serving(self) -> None:
        """Accept connections (``listen`` binds without accepting, so settings can be fixed)."""
        if self._server is not None:
            await self._server.start_serving()
        sweeps = self._idle_timeout > 0 or self._client_idle_timeout > 0
        if sweeps and not self._sweeping and not self._closing:
            self._sweeping = True
            self._spawn(self._sweep())

    def _accept(self) -> asyncio.BaseProtocol:
        if self._closing:
            return _Refused("shutting down", self.settings.traffic)
        return self._new_link(Role.RESPONDER, Channel.CONTROL)  # budgets: see _connected

    def _new_link(self, role: Role, channel: Channel) -> Link:
        """The protocol for one connection; it enters the table once connected."""
        return Link(
            role=role,
            channel=channel,
            settings=self.settings,
            dispatch=self._dispatch,
            spawn=self._spawn,
            on_open=self._opened,
            on_close=self._closed,
            on_connect=self._connected,
        )

    # ---- budgets --------------------------------------------------------------------

    def _members(self) -> int:
        """Links in the member budget: neither half-open inbound nor CLIENT."""
        return len(self._all) - len(self._half_open) - len(self._clients)

    def _connected(self, link: Link) -> None:
        """``Link.connection_made``: enter the table; an inbound link is half-open, and makes
        room for itself under both half-open limits (module docstring, "Budgets")."""
        if self._closing:
            link.close(ErrorCode.SHUTTING_DOWN, "node shutting down")
            return
        self._all[link] = None
        if link.role is not Role.RESPONDER:
            return
        now = asyncio.get_running_loop().time()
        host = link.remote_host
        same = [other for other in self._half_open if other.remote_host == host]
        self._evict(to_evict(same, limit=self._max_per_address, grace=self._grace, now=now),
                    f"{len(same)} handshakes in progress from {host} (limit {self._max_per_address})",
                    "per_address", now=now)
        self._evict(to_evict(list(self._half_open), limit=self._max_handshaking, grace=self._grace,
                             now=now, hard_limit=HARD_LIMIT_FACTOR * self._max_handshaking),
                    f"{len(self._half_open)} handshakes in progress (limit {self._max_handshaking})",
                    "max_handshaking", now=now)
        self._half_open[link] = None

    def _evict(self, victims: list[Link], why: str, limit: str, *, now: float) -> None:
        """Close ``victims`` (``to_evict``), count them under ``limit``, log (rate-limited)."""
        for victim in victims:
            self._evicted[limit] += 1
            self.settings.traffic.warnings.log(
                log, logging.WARNING, "evicted", "evicted half-open connection %s: %s",
                victim.remote, why, now=now)
            victim.close(ErrorCode.LIMIT_EXCEEDED, "too many handshakes in progress")

    def _admit_client(self, link: Link) -> None:
        """A CLIENT link completed its handshake: make room in the client budget by closing
        the client idle the longest (module docstring, "Budgets")."""
        if len(self._clients) >= self._max_clients:
            victim = min(self._clients, key=lambda c: c.last_active)
            self._clients_closed["budget"] += 1
            log.debug("%s: closing the client idle longest (%d clients open, limit %d)",
                      victim.describe(), len(self._clients), self._max_clients)
            victim.close()
        self._clients[link] = None
        if len(self._clients) == 1:
            self._wake.set()  # the sweep now also wakes for client idle timeouts

    def _refuse_member(self, link: Link) -> bool:
        """An inbound member link over ``max_connections``: closed (True)."""
        if link.role is not Role.RESPONDER or self._members() <= self._max_connections:
            return False
        why = f"{self._members() - 1} connections open (limit {self._max_connections})"
        self.settings.traffic.reject("refused", log, "refused %s: %s", link.describe(), why,
                                     now=asyncio.get_running_loop().time())
        link.close(ErrorCode.LIMIT_EXCEEDED, why)
        return True

    def _opened(self, link: Link) -> None:
        peer = link.peer
        assert peer is not None
        log.debug("%s: handshake complete (%s, %s)", link.describe(), link.role.name, peer.channel.name)
        self._half_open.pop(link, None)
        if peer.channel is Channel.CLIENT:
            self._admit_client(link)
            return
        if self._refuse_member(link):
            return
        pkey = (peer.node_id, peer.channel)
        current = self._preferred.get(pkey)
        best = link if current is None else prefer(current, link, self._self_id)
        self._preferred[pkey] = best
        if current is not None:
            retired = link if best is current else current
            log.debug("%s: duplicate %s link; keeping the one dialed by %s, retiring %s %s",
                      link.describe(), peer.channel.name, crypto.short_id(initiator_id(best, self._self_id)),
                      retired.role.name.lower(), retired.remote)
            self._repoint(retired, best)
            self._wake.set()
        if link.role is Role.RESPONDER and peer.listen_address:
            self._links.setdefault((peer.listen_address, peer.channel), best)

    def _repoint(self, old: Link, new: Link | None) -> None:
        """Table entries that pointed at ``old`` now point at ``new`` (or are dropped)."""
        for key in [k for k, v in self._links.items() if v is old]:
            if new is None:
                del self._links[key]
            else:
                self._links[key] = new

    def _successor(self, pkey: PeerKey) -> Link | None:
        """The preferred one of the still open links to ``pkey`` (a retired one), if any."""
        best: Link | None = None
        for link in self._all:
            peer = link.peer
            if link.is_open and peer is not None and (peer.node_id, peer.channel) == pkey:
                best = link if best is None else prefer(best, link, self._self_id)
        return best

    def _closed(self, link: Link, error: BaseException | None) -> None:
        self._all.pop(link, None)
        self._half_open.pop(link, None)
        self._clients.pop(link, None)
        peer = link.peer
        successor: Link | None = None
        if peer is not None and peer.channel is not Channel.CLIENT:
            pkey = (peer.node_id, peer.channel)
            if self._preferred.get(pkey) is link:
                successor = self._successor(pkey)
                if successor is None:
                    del self._preferred[pkey]
                else:
                    self._preferred[pkey] = successor
        self._repoint(link, successor)
        # The peer's fault (bad bytes, wrong key, too slow a handshake). Our own aborts
        # (LocalProtocolError) were logged by ``Link.abort``; a member vanishing is not a rejection.
        ours = isinstance(error, LocalProtocolError)
        rejected = isinstance(error, RemoteProtocolError) or (link.peer is None and not ours)
        if link.role is Role.RESPONDER and rejected and not self._closing:
            code = error.code.name if isinstance(error, RemoteProtocolError) else "handshake_failed"
            self.settings.traffic.reject(code, log, "rejected %s: %s", link.describe(), describe_error(error),
                                         now=asyncio.get_running_loop().time())
        self._on_lost(link, error)

    # ---- dialing --------------------------------------------------------------------

    def links(self) -> list[Link]:
        """Every connected link of the pool, oldest first (handshaking and retired ones
        included; a dial still connecting is not a link yet)."""
        return list(self._all)

    def get_open(self, address: str, channel: Channel) -> Link | None:
        """The open link stored for ``(address, channel)``, if any (never dials)."""
        link = self._links.get((address, channel))
        return link if link is not None and link.is_open else None

    async def connect(self, address: str, channel: Channel) -> Link:
        """An open link to ``address`` on ``channel``, dialing if needed.

        Raises ``TransportError`` (refused, reset), ``TimeoutError`` (connect or handshake too
        slow) or ``RemoteProtocolError`` (the peer refused our handshake, e.g. wrong mesh key).
        """
        link = self.get_open(address, channel)
        if link is not None:
            return link
        if self._closing:
            raise TransportError("node is shutting down")
        key = (address, channel)
        future = self._dials.get(key)
        if future is None:
            future = self._dials[key] = asyncio.get_running_loop().create_future()
            self._spawn(self._dial(key, future))
        return await settled(future)  # a failure: a fresh copy per waiter (transport "Memory")

    async def _dial(self, key: Key, future: asyncio.Future[Link]) -> None:
        try:
            link = await self._open(*key)
        except StarmeshError as exc:
            if not future.done():
                future.set_exception(exc.with_traceback(None))  # its frames hold the link
                future.exception()  # retrieved here; every waiter still sees it
        else:
            if future.done():  # the pool closed meanwhile
                link.close()
            else:
                future.set_result(link)
        finally:
            if self._dials.get(key) is future:
                del self._dials[key]

    async def _open(self, address: str, channel: Channel) -> Link:
        if self._members() >= self._max_connections:
            raise TransportError(f"{self._members()} connections open (limit {self._max_connections})")
        try:
            target = parse_address(address, what="peer address")
        except ConfigError as exc:
            raise TransportError(str(exc)) from None
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._dial_timeout):
                _, link = await loop.create_connection(
                    lambda: self._new_link(Role.INITIATOR, channel), target.host, target.port
                )
        except builtins.TimeoutError:
            raise TimeoutError(f"dial {address}: no TCP connection in {self._dial_timeout}s") from None
        except OSError as exc:
            raise TransportError(f"dial {address}: {exc.strerror or exc}") from None
        try:
            await asyncio.wait((link.opened,))  # the core's handshake timeout bounds this
        except BaseException:  # cancelled
            link.close()
            raise
        if link.opened.cancelled() or link.opened.exception() is not None:
            link.close()
            raise handshake_failure(link) from None
        assert link.peer is not None
        best = self._preferred.get((link.peer.node_id, channel), link)  # see "Duplicate links"
        if self.get_open(address, channel) is None:
            self._links[(address, channel)] = best
        return best

    # ---- shutdown -------------------------------------------------------------------

    def close_address(self, address: str) -> None:
        """Close every link to the member stored under ``address`` (it died or left),
        retired duplicates included."""
        gone = {link.peer.node_id for (a, _), link in self._links.items() if a == address and link.peer}
        for link in list(self._all):
            peer = link.peer
            if peer is not None and peer.channel is not Channel.CLIENT and peer.node_id in gone:
                link.close()

    # ---- idle reaping ---------------------------------------------------------------

    async def _sweep(self) -> None:
        """The one periodic task that closes idle and retired links (module docstring)."""
        loop = asyncio.get_running_loop()
        while not self._closing:
            with contextlib.suppress(builtins.TimeoutError):
                async with asyncio.timeout(self._sweep_delay(now=loop.time())):
                    await self._wake.wait()
            self._wake.clear()
            if not self._closing:
                now = loop.time()
                self.close_retired(now=now)
                self.reap_idle(now=now)

    def _sweep_delay(self, *, now: float) -> float | None:
        """Seconds until the next sweep (None: only when woken): ``sweep_interval`` of
        ``idle_timeout`` and, while a CLIENT link is open, of ``client_idle_timeout``; sooner
        when a retired link we close becomes quiet (one not drained yet is looked at again a
        quiet time later)."""
        delays = []
        if self._idle_timeout > 0:
            delays.append(sweep_interval(self._idle_timeout))
        if self._client_idle_timeout > 0 and self._clients:
            delays.append(sweep_interval(self._client_idle_timeout))
        if self._retired_quiet > 0:
            for link in self._retired_to_close():
                due = link.last_active + self._retired_quiet - now
                delays.append(due if due > 0 else self._retired_quiet)
        return max(SWEEP_MIN_S, min(delays)) if delays else None

    def _retired_to_close(self) -> list[Link]:
        """Open retired links whose preferred link this side answered (module docstring)."""
        found = []
        for link in self._all:
            peer = link.peer
            if peer is None or peer.channel is Channel.CLIENT or not link.is_open:
                continue
            preferred = self._preferred.get((peer.node_id, peer.channel))
            if preferred is not None and preferred is not link and preferred.role is Role.RESPONDER:
                found.append(link)
        return found

    def close_retired(self, *, now: float) -> int:
        """Close (goodbye) every retired duplicate link this side closes that is drained and
        quiet at ``now`` (event-loop time): nothing buffered for writing, nothing unhandled in
        its inbox, no byte moved for ``retired_quiet(idle_timeout)`` s. Returns the number of
        links closed; 0 when idle reaping is off. The sweep calls this; tests call it with an
        explicit ``now``."""
        if self._retired_quiet <= 0:
            return 0
        closed = 0
        for link in self._retired_to_close():
            if self._quiet(link, now, self._retired_quiet):
                log.debug("%s: closing retired duplicate %s link (quiet for %.1fs)", link.describe(),
                          link.peer.channel.name if link.peer else "?", now - link.last_active)
                link.close()
                closed += 1
        return closed

    @staticmethod
    def _quiet(link: Link, now: float, quiet: float) -> bool:
        """No byte moved for ``quiet`` s, nothing buffered for writing, nothing unhandled."""
        return now - link.last_active >= quiet and link.buffered_bytes() == 0 and link.inbox_size == 0

    def reap_idle(self, *, now: float) -> int:
        """Close (goodbye) every link group idle at ``now`` (event-loop time): all links to one
        (peer, channel) idle for ``idle_timeout``, or one CLIENT link idle for
        ``client_idle_timeout`` (each off when 0). Returns the number of links closed. The
        sweep calls this; tests call it with an explicit ``now``."""
        closed = 0
        if self._client_idle_timeout > 0:
            for link in [c for c in self._clients if self._quiet(c, now, self._client_idle_timeout)]:
                log.debug("%s: closing idle CLIENT link (no traffic for %.1fs)", link.describe(),
                          now - link.last_active)
                self._clients_closed["idle"] += 1
                link.close()
                closed += 1
        if self._idle_timeout <= 0:
            return closed
        groups: dict[PeerKey, list[Link]] = {}
        for link in self._all:
            peer = link.peer
            # a handshake is bounded by its own timeouts; CLIENT links were judged above
            if peer is not None and peer.channel is not Channel.CLIENT:
                groups.setdefault((peer.node_id, peer.channel), []).append(link)
        for links in groups.values():
            if all(self._quiet(link, now, self._idle_timeout) for link in links):
                for link in links:
                    log.debug("%s: closing idle %s link (no traffic for %.1fs)", link.describe(),
                              link.peer.channel.name if link.peer else "?", now - link.last_active)
                    link.close()
                    closed += 1
        return closed

    def stats(self) -> Stats:
        """Connections open per channel (``handshaking`` before the peer said), the traffic
        counters of every link (``Traffic``), half-open connections evicted by the limit that
        evicted them (``max_handshaking``, ``per_address``) and CLIENT connections closed by
        why (``budget``: to make room for a new one, ``idle``: ``client_idle_timeout``)."""
        open_links = dict.fromkeys([c.name.lower() for c in Channel] + ["handshaking"], 0.0)
        for link in self._all:
            open_links[link.peer.channel.name.lower() if link.peer is not None else "handshaking"] += 1
        t = self.settings.traffic

        def per_channel(counts: dict[Channel, int]) -> dict[str, float]:
            return {c.name.lower(): float(n) for c, n in counts.items()}

        return {
            "connections": open_links,
            "sent_bytes_total": per_channel(t.sent),
            "received_bytes_total": per_channel(t.received),
            "sent_frames_total": per_channel(t.frames_sent),
            "received_frames_total": per_channel(t.frames_received),
            "dropped_messages_total": per_channel(t.dropped),
            "rejected_peers_total": {reason: float(n) for reason, n in t.rejected.items()},
            "evicted_handshakes_total": {
                limit: float(self._evicted[limit]) for limit in ("max_handshaking", "per_address")},
            "closed_client_connections_total": {
                why: float(self._clients_closed[why]) for why in ("budget", "idle")},
        }

    def write_buffers_empty(self) -> bool:
        return all(link.buffered_bytes() == 0 for link in self._all)

    async def close(self, *, linger: float = 0.3) -> None:
        """Stop accepting, say goodbye on every link and wait (``linger`` s at most) for the
        sockets to flush."""
        self._closing = True
        self._wake.set()
        if self._server is not None:
            self._server.close()
        for future in self._dials.values():
            if not future.done():
                future.set_exception(TransportError("node is shutting down"))
                future.exception()
        links = list(self._all)
        for link in links:
            link.close(ErrorCode.SHUTTING_DOWN, "node shutting down") if link.peer is None else link.close()
        with contextlib.suppress(builtins.TimeoutError):
            async with asyncio.timeout(linger):
                for link in links:
                    await link.lost.wait()
        for link in links:
            link.force_close()
