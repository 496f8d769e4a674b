"""The listener, the dialer and the connection pool of one node.

Theory of operation
-------------------
The pool owns every ``Link`` of the node. Outbound links are dialed on demand by
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
seconds, have nothing buffered for writing and nothing unhandled in their inbox (CLIENT links
are judged one by one). Both sides see a goodbye, i.e. ``on_lost(link, None)``: membership
treats it as a graceful close (no suspicion, no ``on_unreachable``), and the next ``connect``
dials again. An all-reduce round writes every few ms, so links in use are never idle; a
message a peer writes in the same instant as our goodbye is lost, which gossip tolerates.
While retired links wait for their quiet time, the sweep also wakes when the first of them
may close (and at once when a link is retired), so a duplicate lives about a second, not
``idle_timeout``. With ``idle_timeout == 0`` there is no sweep: idle and retired links stay
open until the peer or a failure closes them.

Limits: at most ``max_connections`` links in all and ``max_handshaking`` inbound links
still in their handshake; an inbound connection beyond either is closed at once and logged.
When a link closes it is dropped from the table and ``on_lost(link, error)`` is called
(error None: graceful goodbye). Inbound links that the peer broke the protocol on are logged
as rejected peers with the reason (wrong mesh key, garbage, handshake timeout).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import socket
from collections.abc import Callable

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


class _Refused(asyncio.Protocol):
    """Closes an inbound connection at once (over a connection limit)."""

    def __init__(self, why: str, traffic: Traffic) -> None:
        self.why = why
        traffic.rejected["refused"] += 1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        log.warning("refused connection from %s: %s", transport.get_extra_info("peername"), self.why)
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
        self._on_lost = on_lost
        self._idle_timeout = config.idle_timeout
        self._retired_quiet = retired_quiet(config.idle_timeout)
        self._self_id = crypto.node_id_of(settings.identity)
        self._links: dict[Key, Link] = {}
        self._preferred: dict[PeerKey, Link] = {}
        self._all: dict[Link, None] = {}  # insertion order = age
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
        if self._idle_timeout > 0 and not self._sweeping and not self._closing:
            self._sweeping = True
            self._spawn(self._sweep())

    def _accept(self) -> asyncio.BaseProtocol:
        if self._closing:
            return _Refused("shutting down", self.settings.traffic)
        if len(self._all) >= self._max_connections:
            return _Refused(f"{len(self._all)} connections open (limit {self._max_connections})",
                            self.settings.traffic)
        handshaking = sum(1 for link in self._all if link.role is Role.RESPONDER and link.peer is None)
        if handshaking >= self._max_handshaking:
            return _Refused(f"{handshaking} handshakes in progress (limit {self._max_handshaking})",
                            self.settings.traffic)
        return self._new_link(Role.RESPONDER, Channel.CONTROL)

    def _new_link(self, role: Role, channel: Channel) -> Link:
        link = Link(
            role=role,
            channel=channel,
            settings=self.settings,
            dispatch=self._dispatch,
            spawn=self._spawn,
            on_open=self._opened,
            on_close=self._closed,
        )
        self._all[link] = None
        return link

    def _opened(self, link: Link) -> None:
        peer = link.peer
        assert peer is not None
        log.debug("%s: handshake complete (%s, %s)", link.describe(), link.role.name, peer.channel.name)
        if peer.channel is Channel.CLIENT:
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
            log.warning("rejected %s: %s", link.describe(), describe_error(error))
            code = error.code.name if isinstance(error, RemoteProtocolError) else "handshake_failed"
            self.settings.traffic.rejected[code] += 1
        self._on_lost(link, error)

    # ---- dialing --------------------------------------------------------------------

    def links(self) -> list[Link]:
        """Every link of the pool, oldest first (handshaking and retired ones included)."""
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
        return await asyncio.shield(future)

    async def _dial(self, key: Key, future: asyncio.Future[Link]) -> None:
        try:
            link = await self._open(*key)
        except StarmeshError as exc:
            if not future.done():
                future.set_exception(exc)
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
        if len(self._all) >= self._max_connections:
            raise TransportError(f"{len(self._all)} connections open (limit {self._max_connections})")
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
            await asyncio.shield(link.opened)  # the core's handshake timeout bounds this
        except BaseException:
            link.close()
            if link.close_reason is None or link.opened.cancelled():
                raise
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

    def _sweep_delay(self, *, now: float) -> float:
        """Seconds until the next sweep: ``sweep_interval``, or sooner when a retired link we
        close becomes quiet (one not drained yet is looked at again a quiet time later)."""
        delay = sweep_interval(self._idle_timeout)
        for link in self._retired_to_close():
            due = link.last_active + self._retired_quiet - now
            delay = min(delay, due if due > 0 else self._retired_quiet)
        return max(SWEEP_MIN_S, delay)

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
        (peer, channel), or one CLIENT link. Returns the number of links closed; 0 when idle
        reaping is off. The sweep calls this; tests call it with an explicit ``now``."""
        if self._idle_timeout <= 0:
            return 0
        groups: dict[object, list[Link]] = {}
        for link in self._all:
            peer = link.peer
            if peer is not None:  # a handshake is bounded by its own timeout
                key: object = link if peer.channel is Channel.CLIENT else (peer.node_id, peer.channel)
                groups.setdefault(key, []).append(link)
        closed = 0
        for links in groups.values():
            if all(self._quiet(link, now, self._idle_timeout) for link in links):
                for link in links:
                    log.debug("%s: closing idle %s link (no traffic for %.1fs)", link.describe(),
                              link.peer.channel.name if link.peer else "?", now - link.last_active)
                    link.close()
                    closed += 1
        return closed

    def stats(self) -> Stats:
        """Connections open per channel (``handshaking`` before the peer said), and the
        traffic counters of every link (``Traffic``)."""
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
