"""Test helpers for anything built on ``node.pool`` (like ``protocol.testing`` one layer down).

``loopback_pools(n)`` starts ``n`` real ``Pool``s listening on 127.0.0.1 in one process,
each with its own identity, an empty dispatch table to fill and a record of the links it
lost; leaving the ``async with`` closes them all.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

from node.config import Address, LinkConfig
from node.pool import Pool
from node.transport import Handler, Link, LinkSettings
from protocol import crypto
from protocol.connection import Channel
from protocol.tags import MsgType


@dataclasses.dataclass
class LoopbackPeer:
    pool: Pool
    address: str
    node_id: bytes
    dispatch: dict[Channel, dict[MsgType, Handler]]
    """Handlers by channel and tag: what the test registers is what the pool dispatches to."""
    lost: list[tuple[Link, BaseException | None]]
    """``on_lost`` calls, in order: (link, error), error None for a goodbye."""


@asynccontextmanager
async def loopback_pools(n: int, *, secrets: list[bytes] | None = None, idle_timeout: float = 0.0,
                         **settings: Any) -> AsyncIterator[list[LoopbackPeer]]:
    """``n`` pools on loopback sharing one mesh secret (or ``secrets[i]`` each); ``settings``
    go to every pool's ``LinkConfig`` (besides 64 connections, 8 handshaking, ``idle_timeout``)."""
    secret = crypto.new_mesh_secret()
    async with asyncio.TaskGroup() as group:

        def spawn(coro: Coroutine[Any, Any, None]) -> None:
            group.create_task(coro)

        peers = []
        for i in range(n):
            key = crypto.generate_identity()
            config = LinkConfig(**{"max_connections": 64, "max_handshaking": 8,
                                   "idle_timeout": idle_timeout, **settings})
            base = LinkSettings(identity=key, mesh_secret=secrets[i] if secrets else secret,
                                listen_address=None, config=config)
            dispatch: dict[Channel, dict[MsgType, Handler]] = {c: {} for c in Channel}
            lost: list[tuple[Link, BaseException | None]] = []

            def on_lost(link: Link, error: BaseException | None, lost: list[Any] = lost) -> None:
                lost.append((link, error))

            pool = Pool(settings=base, dispatch=dispatch, spawn=spawn, on_lost=on_lost)
            bound = await pool.listen(Address("127.0.0.1", 0))
            pool.set_listen_address(dataclasses.replace(base, listen_address=str(bound)))
            await pool.start_serving()
            peers.append(LoopbackPeer(pool, str(bound), crypto.node_id_of(key), dispatch, lost))
        try:
            yield peers
        finally:
            for peer in peers:
                await peer.pool.close(linger=0.2)


async def until(predicate: Callable[[], bool], timeout: float = 10.0, *, poll: float = 0.005) -> None:
    """Wait until ``predicate()`` holds (integration tests over real sockets); ``TimeoutError``
    after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(poll)
