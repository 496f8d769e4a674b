"""The ``Node``: one mesh member's listener, pool, membership and status, in one TaskGroup.

Theory of operation
-------------------
``async with Node(config) as node`` takes the data-dir lock, loads (or creates) the identity
and mesh secret, listens, builds ``Swim`` with the advertised address, starts serving and
joins the seeds. It is answering status requests at that point (well under a second:
torch is never imported; its version comes from package metadata, and GPUs are detected
with ``nvidia-smi`` in the background and gossiped as a metadata update). Every task the node runs (one reader per
link, dials, resource detection, and whatever other parts start with ``node.spawn``) is a
child of the node's ``asyncio.TaskGroup``; leaving the ``async with`` block stops them all.

Shutdown (``request_stop``, SIGINT/SIGTERM in ``run_node``): announce the leave (``Swim.leave``
gossips our own ``Dead``, which others record as *left*), keep gossiping until it is flushed
or ``leave_timeout`` passes, say goodbye on every link, cancel what is left. The process
exits 0 in well under 2 s.

Dispatch is an explicit ``{Channel: {MsgType: handler}}`` table: CONTROL carries gossip to
``Membership``, CLIENT carries ``StatusRequest``; other parts register theirs (BULK tensor
messages) with ``on_message``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import random
import signal
import sys
import time
from collections.abc import Coroutine, Sequence
from types import TracebackType
from typing import Any

from discovery.config import SwimConfig
from discovery.members import MemberView
from discovery.swim import Swim
from node import congestion
from node import identity as files
from node.allreduce.adapter import AllReduceOutcome, AllReduceService
from node.config import Address, NodeConfig, parse_address
from node.membership import EventListener, Membership, start_incarnation
from node.pool import Pool
from node.resources import basic_meta, detect_gpus_async, torch_versions
from node.status import build_status_reply
from node.transport import Handler, Link, LinkSettings, Traffic
from protocol import crypto
from protocol.connection import Channel
from protocol.errors import ConfigError, ErrorCode, TransportError
from protocol.messages.gossip import NodeMeta
from protocol.schema import Message
from protocol.tags import MsgType

log = logging.getLogger("starmesh.node")

PRESETS = {
    "lan": SwimConfig.lan,
    "wan": SwimConfig.wan,
    "local": SwimConfig.local,
    "test": SwimConfig.test,
}


class Node:
    """A running mesh member. Use as ``async with Node(config) as node: ...``.

    Public API (valid inside the ``async with`` block):

    * ``node_id: bytes`` (our Ed25519 public key), ``address: str`` (advertised ``host:port``)
    * ``members() -> list[MemberView]`` — everyone we know, ourselves included
    * ``on_message(tag, handler, *, channel=Channel.BULK)`` — route a message type to
      ``async handler(link, message)``; ``link.peer.node_id`` is the authenticated sender
      and ``await link.send(reply)`` answers on the same connection
    * ``on_member_event(listener)`` — ``listener(MemberEvent)`` for every membership change
    * ``await send(node_id, message, *, channel=Channel.BULK)`` / ``await link_to(node_id)``
    * ``spawn(coro)`` — run a coroutine as a task of the node's TaskGroup
    * ``await all_reduce(tensor, group=[ids], codec="none", timeout=None, key=None)`` —
      average a numpy array / torch tensor over a group of members (``node.allreduce``)
    * ``traffic`` — bytes sent and received per channel (``node.transport.Traffic``)
    * ``update_meta(meta)``, ``request_stop()``, ``await run_until_stopped()``
    """

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.node_id = b""
        self.address = ""
        self.mesh_key_created = False
        self._stack = contextlib.AsyncExitStack()
        self._group: asyncio.TaskGroup | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._dispatch: dict[Channel, dict[MsgType, Handler]] = {c: {} for c in Channel}
        self._stop = asyncio.Event()
        self._pool: Pool | None = None
        self._membership: Membership | None = None
        torch_version, cuda_version = torch_versions()  # package metadata: ms, torch not imported
        self._meta = dataclasses.replace(basic_meta(), torch_version=torch_version, cuda_version=cuda_version)
        self._started = 0.0
        self._stopping = False
        self._tasks_closed = False
        self.allreduce = AllReduceService(self)
        """Registers the all-reduce message handlers now, before any connection exists."""

    # ---- lifecycle ------------------------------------------------------------------

    async def __aenter__(self) -> Node:
        try:
            await self._start()
        except BaseException:
            self._stopping = True
            if self._pool is not None:
                await self._pool.close(linger=0.0)
            self._cancel_tasks()
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        try:
            await self._shutdown()
        finally:
            # The TaskGroup exits clean: every task was cancelled above. An exception from
            # the ``async with`` body propagates as itself (3.11 would wrap it in a group).
            await self._stack.aclose()
        return None

    async def _start(self) -> None:
        config = self.config
        loop = asyncio.get_running_loop()
        self._started = loop.time()
        if config.bulk_congestion is not None:
            congestion.check(config.bulk_congestion)
        lock = files.DataDirLock(config.data_dir)
        lock.acquire()
        self._stack.callback(lock.release)
        key, created_identity = files.load_or_create_identity(config.identity_path)
        secret, self.mesh_key_created = files.load_or_create_mesh_key(config.mesh_key_path)
        self.node_id = crypto.node_id_of(key)
        if created_identity:
            log.info("created a new node identity in %s", config.identity_path)
        if self.mesh_key_created:
            log.info("created a new mesh secret in %s (mode 0600)", config.mesh_key_path)
            if config.seeds:
                log.warning("this node has a NEW mesh secret: seeds with another secret will refuse it")
        last_incarnation = files.load_incarnation(config.incarnation_path)
        self._group = await self._stack.enter_async_context(asyncio.TaskGroup())
        settings = LinkSettings(identity=key, mesh_secret=secret, listen_address=None,
                                handshake_timeout=config.handshake_timeout,
                                inbox_messages=config.inbox_messages,
                                write_buffer_bytes=config.write_buffer_bytes,
                                bulk_congestion=config.bulk_congestion)
        pool = self._pool = Pool(
            settings=settings, dispatch=self._dispatch, spawn=self.spawn,
            dial_timeout=config.dial_timeout, max_connections=config.max_connections,
            max_handshaking=config.max_handshaking, on_lost=self._link_lost,
            idle_timeout=config.idle_timeout,
        )
        bound = await pool.listen(config.listen)
        advertise = config.advertise_for(bound)
        self.address = str(advertise)
        pool.set_listen_address(dataclasses.replace(settings, listen_address=self.address))
        swim = Swim(
            node_id=self.node_id, address=self.address, meta=self._meta,
            config=PRESETS[config.preset](), rng=random.Random(config.seed), now=loop.time(),
            incarnation=start_incarnation(last_incarnation),
        )
        self._membership = Membership(
            swim=swim, node_id=self.node_id, pool=pool, spawn=self.spawn,
            on_incarnation=self._store_incarnation, on_peers=self._store_peers,
        )
        self._dispatch[Channel.CONTROL].update(self._membership.handlers())
        self._dispatch[Channel.CLIENT][MsgType.STATUS_REQUEST] = self._serve_status
        self._membership.add_listener(self.allreduce.member_event)
        await pool.start_serving()
        self._membership.join(self._seeds())
        self._announce(bound)
        self.spawn(self._detect_resources())

    def _announce(self, bound: Address) -> None:
        key_path = self.config.mesh_key_path.resolve()
        log.info("node %s listening on %s, advertising %s", crypto.short_id(self.node_id), bound, self.address)
        print(
            f"starmesh node {crypto.short_id(self.node_id)} is up at {self.address}. "
            f"To join this mesh, copy {key_path} to the other machine and run:\n"
            f"  python -m node --join {self.address} --mesh-key-file {key_path}",
            flush=True,
        )
        if self.config.ready_file is not None:
            _write_json(self.config.ready_file, {
                "address": self.address, "listen": str(bound), "node_id": self.node_id.hex(),
                "pid": os.getpid(), "ready_at": time.time(),
            })

    async def run_until_stopped(self) -> None:
        """Serve until ``request_stop()`` (or a signal, under ``run_node``)."""
        await self._stop.wait()

    def request_stop(self) -> None:
        self._stop.set()

    async def _shutdown(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        self._stop.set()
        self.allreduce.close()
        membership, pool = self._membership, self._pool
        if membership is not None:
            membership.leave()
            await self._flush_leave(membership)
            membership.stop()
        if pool is not None:
            await pool.close(linger=0.3)
        self._cancel_tasks()

    async def _flush_leave(self, membership: Membership) -> None:
        """Keep gossiping until the leave announcement is written out, at most leave_timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.leave_timeout
        await asyncio.sleep(0)
        while membership.busy() and loop.time() < deadline:
            await asyncio.sleep(0.01)

    # ---- tasks ----------------------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` as a child of the node's TaskGroup. Its exceptions are logged, so one
        connection's failure never stops the node; it is cancelled when the node stops."""
        if self._group is None or self._tasks_closed:
            coro.close()
            return
        task = self._group.create_task(_logged(coro))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda _: coro.close())  # a task cancelled before it ran

    def _cancel_tasks(self) -> None:
        """Cancel every task and refuse new ones (the TaskGroup then exits at once)."""
        self._tasks_closed = True
        for task in list(self._tasks):
            task.cancel()

    async def _detect_resources(self) -> None:
        """GPUs via ``nvidia-smi`` (slow, only where present) after we are up; gossiped as an update."""
        gpus = await detect_gpus_async(timeout=2.0)
        if gpus and gpus != self._meta.gpus:
            self.update_meta(dataclasses.replace(self._meta, gpus=gpus))

    # ---- callbacks ------------------------------------------------------------------

    def _link_lost(self, link: Link, error: BaseException | None) -> None:
        if self._membership is not None and not self._stopping:
            self._membership.link_lost(link, error)

    def _seeds(self) -> list[str]:
        """``--join`` seeds, else the live members remembered from the last run (rejoin)."""
        seeds = [str(s) for s in self.config.seeds]
        if not seeds:
            seeds = [p for p in files.load_peers(self.config.peers_path) if _is_address(p)]
            if seeds:
                log.info("rejoining through %d peers remembered in %s", len(seeds), self.config.peers_path)
        return [s for s in seeds if s != self.address]

    def _store_peers(self, addresses: list[str]) -> None:
        try:
            files.store_peers(self.config.peers_path, addresses)
        except ConfigError as exc:
            log.error("%s", exc)

    def _store_incarnation(self, incarnation: int) -> None:
        try:
            files.store_incarnation(self.config.incarnation_path, incarnation)
        except ConfigError as exc:
            log.error("%s", exc)

    async def _serve_status(self, link: Link, message: Message) -> None:
        now = asyncio.get_running_loop().time()
        reply = build_status_reply(self.members(), self_id=self.node_id, now=now, uptime_s=now - self._started)
        if not link.send_nowait(reply):  # never wait on a client that does not read its replies
            link.abort(ErrorCode.LIMIT_EXCEEDED, "status client is not reading its replies")

    # ---- public API -----------------------------------------------------------------

    def members(self) -> list[MemberView]:
        """Every member this node knows (ourselves included), sorted by node id."""
        return [] if self._membership is None else self._membership.members()

    def on_message(self, tag: MsgType, handler: Handler, *, channel: Channel = Channel.BULK) -> None:
        """Route messages of type ``tag`` arriving on ``channel`` links to ``handler``."""
        table = self._dispatch[channel]
        if tag in table:
            raise ValueError(f"{tag.name} on {channel.name} already has a handler")
        table[tag] = handler

    def on_member_event(self, listener: EventListener) -> None:
        """Call ``listener(event)`` for every membership event (joined, suspected, dead...)."""
        if self._membership is None:
            raise RuntimeError("the node is not running")
        self._membership.add_listener(listener)

    def update_meta(self, meta: NodeMeta) -> None:
        """Advertise new metadata (bumps our incarnation, gossiped to everyone)."""
        self._meta = meta
        if self._membership is not None:
            self._membership.update_meta(meta)

    async def link_to(self, node_id: bytes, *, channel: Channel = Channel.BULK) -> Link:
        """An open link to the live member ``node_id`` on ``channel`` (dialed if needed).

        Raises ``TransportError`` if it is not a live member, cannot be reached, or its
        address now answers with another identity; ``TimeoutError``; ``RemoteProtocolError``.
        """
        if self._membership is None or self._pool is None:
            raise TransportError("the node is not running")
        address = self._membership.alive_address(node_id)
        if address is None:
            raise TransportError(f"{crypto.short_id(node_id)} is not a live member")
        link = await self._pool.connect(address, channel)
        assert link.peer is not None
        if link.peer.node_id != node_id:
            raise TransportError(
                f"{address} is now {crypto.short_id(link.peer.node_id)}, not {crypto.short_id(node_id)}"
            )
        return link

    async def send(self, node_id: bytes, message: Message, *, channel: Channel = Channel.BULK) -> None:
        """Send ``message`` to member ``node_id``; waits while its connection is backed up."""
        link = await self.link_to(node_id, channel=channel)
        await link.send(message)

    def links(self) -> list[Link]:
        """Every connection of this node, oldest first, handshaking ones included (diagnostics:
        ``link.peer``, ``link.congestion()``, ...)."""
        return self._pool.links() if self._pool is not None else []

    @property
    def traffic(self) -> Traffic:
        """Bytes this node wrote and read on its connections, per channel (only grows)."""
        return self._pool.settings.traffic if self._pool is not None else Traffic()

    async def all_reduce(self, tensor: Any, *, group: Sequence[bytes], codec: str = "none",
                         timeout: float | None = None, key: bytes | str | None = None,
                         **options: Any) -> AllReduceOutcome:
        """Average ``tensor`` (numpy array or torch tensor) over the members ``group`` (node ids,
        this node included), compressed with ``codec``. Every member calls it with the same
        group, the same tensor size and codec, and the same ``key`` (default: the n-th call on
        this group is round n). Returns the average (the caller's type; ``in_place=True``
        writes into ``tensor``), its contributors and the dropped members with reasons.
        Raises ``AllReduceError`` when this node leaves the round without a result,
        ``TimeoutError`` after ``timeout`` seconds, ``ConfigError`` on bad arguments.
        More options: ``config`` (``AllReduceConfig``), ``weights``, ``feedback``, ``in_place``.
        """
        return await self.allreduce.all_reduce(tensor, group=group, codec=codec, timeout=timeout,
                                               key=key, **options)


def _is_address(text: str) -> bool:
    try:
        parse_address(text)
    except ConfigError:
        return False
    return True


async def _logged(coro: Coroutine[Any, Any, None]) -> None:
    try:
        await coro
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("task failed")


def _write_json(path: os.PathLike[str], data: dict[str, Any]) -> None:
    tmp = f"{os.fspath(path)}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write ready file: {exc.strerror or exc}") from None


async def _serve(config: NodeConfig) -> int:
    loop = asyncio.get_running_loop()
    async with Node(config) as node:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, node.request_stop)
        await node.run_until_stopped()
        log.info("leaving the mesh")
    return 0


def run_node(config: NodeConfig) -> int:
    """Run a node until SIGINT/SIGTERM; returns the process exit code (0 after a clean leave)."""
    factory = None
    if config.use_uvloop:
        with contextlib.suppress(ImportError):
            import uvloop

            factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        code = runner.run(_serve(config))
    sys.stdout.flush()
    return code
