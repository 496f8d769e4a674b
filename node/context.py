"""What a service may use of its node (``NodeContext``) and what a service is (``Service``).

``node.runtime.Node`` is the composition root: it takes the data-dir lock, loads the
identity, opens the pool, starts membership, then builds each service with a
``NodeContext`` and whatever other services it depends on (passed to its constructor),
registers the service's ``handlers()``, subscribes ``on_member_event`` and ``start()``s them
in order; on shutdown it ``close()``s them in reverse. A service never sees the ``Node``.

A service is the one asyncio adapter (``node/<domain>/service.py``) of a sans-I/O domain
core. It reports a pure ``stats()`` that ``node.metrics`` turns into Prometheus samples.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from discovery.events import MemberEvent
from discovery.members import MemberView
from node.membership import LIVE
from protocol.connection import Channel
from protocol.crypto import short_id
from protocol.errors import TransportError
from protocol.schema import Message
from protocol.tags import MsgType

if TYPE_CHECKING:
    from node.config import ExecutorConfig, NodeConfig
    from node.core import Stats
    from node.membership import Membership
    from node.pool import Pool
    from node.transport import Handler, Link

Spawn = Callable[[Coroutine[Any, Any, None]], None]



class Executors:
    """The node's thread pools, one per kind of work, so services never starve each other:
    ``codec`` (tensor encode/decode, zstd: short CPU bursts that release the GIL), ``compute``
    (longer CPU work: hashing, assembling results), ``io`` (blocking disk reads and writes).
    Sized by ``ExecutorConfig``; threads start on first use."""

    def __init__(self, config: ExecutorConfig) -> None:
        pool = concurrent.futures.ThreadPoolExecutor
        self.codec = pool(config.codec_threads, thread_name_prefix="starmesh-codec")
        self.compute = pool(config.compute_threads, thread_name_prefix="starmesh-compute")
        self.io = pool(config.io_threads, thread_name_prefix="starmesh-io")

    def shutdown(self) -> None:
        for executor in (self.codec, self.compute, self.io):
            executor.shutdown(wait=False, cancel_futures=True)


class NodeContext:
    """The parts of a running node a service may use; built once by ``Node`` when it starts."""

    def __init__(self, *, node_id: bytes, config: NodeConfig, pool: Pool, membership: Membership,
                 spawn: Spawn, executors: Executors) -> None:
        self.node_id = node_id
        self.config = config
        self.data_dir: Path = config.data_dir
        self.spawn = spawn
        """Run a coroutine as a child of the node's TaskGroup (errors logged, cancelled on stop)."""
        self.executors = executors
        self._pool = pool
        self._membership = membership
        self._loop = asyncio.get_running_loop()

    def now(self) -> float:
        """The event loop's clock, what services pass to their cores as ``now=``."""
        return self._loop.time()

    def member(self, node_id: bytes) -> MemberView | None:
        """One member's view (O(1)); None if unknown."""
        return self._membership.swim.member(node_id)

    def members(self) -> list[MemberView]:
        """Every member this node knows, ourselves included, sorted by node id."""
        return self._membership.members()

    def is_live(self, node_id: bytes) -> bool:
        m = self.member(node_id)
        return m is not None and m.status in LIVE

    async def link_to(self, node_id: bytes, *, channel: Channel = Channel.BULK) -> Link:
        """An open link to the live member ``node_id`` on ``channel`` (dialed if needed).

        Raises ``TransportError`` if it is not a live member, cannot be reached, or its
        address now answers with another identity; ``TimeoutError``; ``RemoteProtocolError``.
        """
        m = self.member(node_id)
        if m is None or m.status not in LIVE:
            raise TransportError(f"{short_id(node_id)} is not a live member")
        link = await self._pool.connect(m.address, channel)
        assert link.peer is not None
        if link.peer.node_id != node_id:
            raise TransportError(
                f"{m.address} is now {short_id(link.peer.node_id)}, not {short_id(node_id)}")
        return link

    async def send(self, node_id: bytes, message: Message, *, channel: Channel = Channel.BULK) -> None:
        """Send ``message`` to member ``node_id``; waits while its connection is backed up."""
        link = await self.link_to(node_id, channel=channel)
        await link.send(message)


Handlers = Mapping[tuple[Channel, MsgType], "Handler"]


class Service(Protocol):
    """One domain's asyncio adapter, as the composition root sees it."""

    name: str
    """Short name: the ``service`` label of its metrics, ``status --json`` key."""

    def handlers(self) -> Handlers:
        """The messages it serves: ``{(channel, tag): handler}``, registered before start."""
        ...

    def on_member_event(self, event: MemberEvent) -> None:
        """Every membership change (joined, suspected, dead, left...)."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None:
        """Node shutdown: end what runs (callers get a typed error), free what it holds."""
        ...

    def stats(self) -> Stats:
        """Pure counters and gauges (``node.core.Stats``)."""
        ...
