"""The listener, the dialer and the connection pool of one node.

Theory of operation
-------------------
The pool owns every ``Link`` of the node. Outbound links are dialed on demand by
``connect(address, channel)``; concurrent callers for the same key share one dial (a
future resolved by a dial task in the node's ``TaskGroup``). A link is usable for sending
once its handshake completed; it is then stored under ``(address, channel)``:

* outbound: under the address we dialed;
* inbound: under the listen address the peer announced in its (authenticated) handshake,
  unless a link is already stored there — so a member that dialed us is answered on its
  own connection, and we do not dial back. CLIENT links (status tools) are never stored.

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
from collections.abc import Callable

from node.config import Address, parse_address
from node.transport import (
    DispatchTable,
    Link,
    LinkSettings,
    Spawn,
    describe_error,
    handshake_failure,
)
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


class _Refused(asyncio.Protocol):
    """Closes an inbound connection at once (over a connection limit)."""

    def __init__(self, why: str) -> None:
        self.why = why

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
        dial_timeout: float,
        max_connections: int,
        max_handshaking: int,
        on_lost: Callable[[Link, BaseException | None], None],
    ) -> None:
        self.settings = settings
        self._dispatch = dispatch
        self._spawn = spawn
        self._dial_timeout = dial_timeout
        self._max_connections = max_connections
        self._max_handshaking = max_handshaking
        self._on_lost = on_lost
        self._links: dict[Key, Link] = {}
        self._all: set[Link] = set()
        self._dials: dict[Key, asyncio.Future[Link]] = {}
        self._server: asyncio.Server | None = None
        self._closing = False

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

    def _accept(self) -> asyncio.Protocol:
        if self._closing:
            return _Refused("shutting down")
        if len(self._all) >= self._max_connections:
            return _Refused(f"{len(self._all)} connections open (limit {self._max_connections})")
        handshaking = sum(1 for link in self._all if link.role is Role.RESPONDER and link.peer is None)
        if handshaking >= self._max_handshaking:
            return _Refused(f"{handshaking} handshakes in progress (limit {self._max_handshaking})")
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
        self._all.add(link)
        return link

    def _opened(self, link: Link) -> None:
        peer = link.peer
        assert peer is not None
        log.debug("%s: handshake complete (%s, %s)", link.describe(), link.role.name, peer.channel.name)
        if link.role is Role.RESPONDER and peer.channel is not Channel.CLIENT and peer.listen_address:
            self._links.setdefault((peer.listen_address, peer.channel), link)

    def _closed(self, link: Link, error: BaseException | None) -> None:
        self._all.discard(link)
        for key in [k for k, v in self._links.items() if v is link]:
            del self._links[key]
        # The peer's fault (bad bytes, wrong key, too slow a handshake). Our own aborts
        # (LocalProtocolError) were logged by ``Link.abort``; a member vanishing is not a rejection.
        ours = isinstance(error, LocalProtocolError)
        rejected = isinstance(error, RemoteProtocolError) or (link.peer is None and not ours)
        if link.role is Role.RESPONDER and rejected and not self._closing:
            log.warning("rejected %s: %s", link.describe(), describe_error(error))
        self._on_lost(link, error)

    # ---- dialing --------------------------------------------------------------------

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
        if self.get_open(address, channel) is None:
            self._links[(address, channel)] = link
        return link

    # ---- shutdown -------------------------------------------------------------------

    def close_address(self, address: str) -> None:
        """Close every link stored under ``address`` (its member died or left)."""
        for key in [k for k in self._links if k[0] == address]:
            self._links[key].close()

    def write_buffers_empty(self) -> bool:
        return all(link.buffered_bytes() == 0 for link in self._all)

    async def close(self, *, linger: float = 0.3) -> None:
        """Stop accepting, say goodbye on every link and wait (``linger`` s at most) for the
        sockets to flush."""
        self._closing = True
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
