"""A CLIENT-channel link to one node that matches replies to requests by their ``req`` id.

Tools that are not members (``python -m node submit``, ``tasks``, ``submitters``) talk to a
node through one of these: ``ClientLink.connect`` dials with a throwaway identity (or the one
given) and the mesh secret; ``request(lambda req: Msg(req=req, ...))`` sends one request and
returns the reply that carries the same ``req`` (any of the ``replies`` tags), within
``timeout``. Several requests may be in flight at once (at most ``MAX_IN_FLIGHT``); a reply
nobody waits for (late, after a timeout) is dropped. When the link closes every waiter gets
the link's error.

``LinkTasks`` owns the tasks a client's links spawn (their readers and handlers); ``with_client``
is the one "dial, run a body, close, end the tasks" wrapper every one-shot client tool uses.
"""

from __future__ import annotations

import asyncio
import builtins
import itertools
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from node.config import Address, LinkConfig
from node.transport import Handler, Link, LinkSettings, Spawn, handshake_failure, settled
from protocol import crypto
from protocol.connection import Channel, Role
from protocol.errors import TimeoutError, TransportError
from protocol.schema import Message
from protocol.tags import MsgType

#: Most requests one client link has in flight.
MAX_IN_FLIGHT = 256
T = TypeVar("T")
log = logging.getLogger("starmesh.client")


class LinkTasks:
    """The tasks a client's links spawn, owned by the client: ``spawn`` (what ``ClientLink.connect``
    takes), then ``aclose()`` cancels what is left and waits for it."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("client link task failed", exc_info=task.exception())

    async def aclose(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def with_client(address: Address, *, mesh_secret: bytes, replies: Iterable[MsgType], timeout: float,
                      body: Callable[[ClientLink], Awaitable[T]], identity: Ed25519PrivateKey | None = None) -> T:
    """Dial a CLIENT link to ``address``, return ``await body(link)``, then close the link and end
    its tasks (whatever ``body`` raised, or the dial: ``TransportError``, ``TimeoutError``,
    ``RemoteProtocolError``, propagates)."""
    tasks = LinkTasks()
    try:
        link = await ClientLink.connect(address, mesh_secret=mesh_secret, spawn=tasks.spawn, replies=replies,
                                        timeout=timeout, identity=identity)
        try:
            return await body(link)
        finally:
            link.close()
    finally:
        await tasks.aclose()


class ClientLink:
    """One CLIENT link with request/reply matching (module docstring)."""

    def __init__(self, address: Address) -> None:
        self.address = address
        self.link: Link | None = None
        self._pending: dict[int, asyncio.Future[Message]] = {}
        self._reqs = itertools.count(1)

    async def _on_reply(self, link: Link, message: Message) -> None:
        waiter = self._pending.pop(getattr(message, "req", -1), None)
        if waiter is not None and not waiter.done():
            waiter.set_result(message)

    def _on_close(self, link: Link, error: BaseException | None) -> None:
        failure = handshake_failure(link)
        for waiter in self._pending.values():
            if not waiter.done():
                waiter.set_exception(failure)
                waiter.exception()  # retrieved here; request() re-raises it
        self._pending.clear()

    @classmethod
    async def connect(
        cls, address: Address, *, mesh_secret: bytes, spawn: Spawn, replies: Iterable[MsgType],
        timeout: float = 5.0, identity: Ed25519PrivateKey | None = None,
    ) -> ClientLink:
        """Dial ``address`` and finish the handshake. ``TransportError``, ``TimeoutError`` or
        ``RemoteProtocolError`` (refused, e.g. another mesh key)."""
        client = cls(address)
        client.link = await dial_client(
            address, mesh_secret=mesh_secret, spawn=spawn, identity=identity, timeout=timeout,
            dispatch={Channel.CLIENT: {tag: client._on_reply for tag in replies}}, on_close=client._on_close)
        return client

    async def request(self, make: Callable[[int], Message], *, timeout: float) -> Message:
        """Send ``make(req)`` and return the reply with that ``req``. ``TimeoutError`` (the
        link stays open: the late reply is dropped), ``TransportError`` when the link closes,
        ``TransportError`` past ``MAX_IN_FLIGHT``."""
        link = self.link
        if link is None or not link.is_open:
            raise TransportError(f"{self.address}: not connected")
        if len(self._pending) >= MAX_IN_FLIGHT:
            raise TransportError(f"{self.address}: {MAX_IN_FLIGHT} requests already in flight")
        req = next(self._reqs) & 0xFFFF_FFFF
        waiter: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._pending[req] = waiter
        try:
            async with asyncio.timeout(timeout):
                await link.send(make(req))
                return await waiter
        except builtins.TimeoutError:
            raise TimeoutError(f"{self.address}: no reply within {timeout}s") from None
        finally:
            self._pending.pop(req, None)

    @property
    def is_open(self) -> bool:
        return self.link is not None and self.link.is_open

    def close(self) -> None:
        if self.link is not None:
            self.link.close()


async def dial_client(
    address: Address, *, mesh_secret: bytes, spawn: Spawn, dispatch: Mapping[Channel, Mapping[MsgType, Handler]],
    on_close: Callable[[Link, BaseException | None], None], timeout: float,
    identity: Ed25519PrivateKey | None = None,
) -> Link:
    """Dial ``address`` as a CLIENT (a throwaway identity unless ``identity``) and finish the
    handshake: the open link. ``TransportError``, ``TimeoutError`` or ``RemoteProtocolError``
    (refused, e.g. another mesh key). Every client tool dials through here."""
    settings = LinkSettings(identity=identity or crypto.generate_identity(), mesh_secret=mesh_secret,
                            listen_address=None, config=LinkConfig(handshake_timeout=min(timeout, 600.0)))

    def make_link() -> Link:
        return Link(role=Role.INITIATOR, channel=Channel.CLIENT, settings=settings, dispatch=dispatch,
                    spawn=spawn, on_open=lambda _: None, on_close=on_close)

    link: Link | None = None
    try:
        async with asyncio.timeout(timeout):
            _, link = await asyncio.get_running_loop().create_connection(make_link, address.host, address.port)
            await settled(link.opened)
    except builtins.TimeoutError:
        if link is not None:
            link.close()
        raise TimeoutError(f"{address}: no handshake within {timeout}s") from None
    except OSError as exc:
        raise TransportError(f"{address}: {exc.strerror or exc}") from None
    except BaseException:
        if link is not None:
            link.close()
        raise
    return link
