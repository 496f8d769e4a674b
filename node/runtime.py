"""The ``Node``: the composition root of one mesh member.

Theory of operation
-------------------
``async with Node(config) as node`` builds the node in one order and tears it down in the
reverse one:

1. the data-dir lock, the identity and mesh secret, the node's ``asyncio.TaskGroup`` (every
   task the node runs is its child) and its thread pools (``Executors``);
2. the ``Pool`` (listener, dialer, every ``Link``) bound to ``--listen``; ``Swim`` with the
   advertised address, driven by ``Membership``;
3. a ``NodeContext`` and the services, each given its dependencies explicitly: ``status``,
   ``allreduce`` (``node.allreduce``), and what later issues add. Their ``handlers()`` fill
   the ``{Channel: {MsgType: handler}}`` dispatch table, they hear every membership event,
   and are ``start()``-ed in order;
4. then the pool accepts connections, membership joins the seeds, the optional metrics
   endpoint (``--metrics-listen``) serves ``stats()``, and GPUs are detected in the background.

It answers status requests well under a second after start (torch is never imported).
Shutdown (``request_stop``; SIGINT/SIGTERM under ``node.serve.run_node``): services close in reverse,
membership announces the leave and keeps gossiping until it is flushed (at most
``leave_timeout``), every link says goodbye, the executors stop, the tasks are cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from discovery.config import PRESETS as SWIM_PRESETS
from discovery.members import MemberView
from discovery.swim import Swim
from node import congestion
from node.allreduce import AllReduceOutcome
from node.allreduce.service import AllReduceService
from node.blobs.service import BlobService
from node.blobs.store import BlobStore
from node.config import NodeConfig
from node.context import Executors, NodeContext, Service
from node.core import Stats
from node.datadir import DataDir
from node.looplag import LoopLagMonitor, guard_torch_import
from node.membership import EventListener, JoinState, Membership, start_incarnation
from node.metrics import MetricsServer
from node.pool import Pool, guess_local_ip
from node.resources import basic_meta, detect_gpus_async, torch_versions
from node.status_service import StatusService
from node.submitters.service import SubmitterService
from node.supervisor import Supervisor
from node.tasks.service import TASK_SLOTS_TAG, TaskService
from node.training.service import TrainingService
from node.transport import Handler, Link, LinkSettings, Traffic
from protocol import crypto
from protocol.connection import Channel
from protocol.errors import TransportError
from protocol.messages.gossip import NodeMeta
from protocol.schema import Message
from protocol.tags import MsgType

log = logging.getLogger("starmesh.node")


class Node:
    """A running mesh member. Use as ``async with Node(config) as node: ...``.

    Inside the block: ``node_id`` (our Ed25519 public key), ``address`` (advertised
    ``host:port``), ``members()``, the services as attributes (``node.allreduce``),
    ``await node.all_reduce(tensor, group=[ids], codec=..., timeout=..., key=...)``,
    ``on_message(tag, handler, channel=)`` for extra handlers, ``on_member_event(listener)``,
    ``await send(node_id, message)`` / ``await link_to(node_id)``, ``spawn(coro)``,
    ``stats()`` (what ``/metrics`` serves), ``traffic``, ``links()``, ``update_meta(meta)``,
    ``request_stop()`` and ``await run_until_stopped()``.
    """

    allreduce: AllReduceService
    submitters: SubmitterService
    tasks: TaskService
    blobs: BlobService
    training: TrainingService

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.node_id = b""
        self.address = ""
        self.metrics_address: str | None = None
        """``host:port`` serving ``/metrics`` (``--metrics-listen``), None when off."""
        self.services: list[Service] = []
        self._files = DataDir(config)
        self._stack = contextlib.AsyncExitStack()
        self._supervisor = Supervisor()
        self.spawn = self._supervisor.spawn
        """Run a coroutine as a child of the node's TaskGroup (``Supervisor.spawn``)."""
        self._dispatch: dict[Channel, dict[MsgType, Handler]] = {c: {} for c in Channel}
        self._stop = asyncio.Event()
        self._pool: Pool | None = None
        self._membership: Membership | None = None
        self._ctx: NodeContext | None = None
        self._metrics: MetricsServer | None = None
        self._executors: Executors | None = None
        self.loop_lag = LoopLagMonitor()
        """How late this node's event loop runs (``loop_lag_*`` metrics; ``node.looplag``)."""
        torch_version, cuda_version = torch_versions()  # package metadata: torch not imported
        tags = config.tags + ((f"{TASK_SLOTS_TAG}={config.tasks.slots:g}",) if config.tasks.slots else ())
        self._meta = dataclasses.replace(basic_meta(tags=tags), torch_version=torch_version, cuda_version=cuda_version)
        self._started = 0.0
        self._stopping = False

    async def __aenter__(self) -> Node:
        try:
            await self._start()
        except BaseException:
            self._stopping = True
            await self._close_parts(linger=0.0)
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        try:
            await self._shutdown()
        finally:  # the TaskGroup exits clean: every task was cancelled
            await self._stack.aclose()

    # ---- composition ----------------------------------------------------------------

    async def _start(self) -> None:
        config, loop = self.config, asyncio.get_running_loop()
        self._started = loop.time()
        self.loop_lag.start()
        if config.links.bulk_congestion is not None:
            congestion.check(config.links.bulk_congestion)
        key, secret = self._files.open()
        self._stack.callback(self._files.close)
        self.node_id = crypto.node_id_of(key)
        self._supervisor.attach(await self._stack.enter_async_context(asyncio.TaskGroup()))
        self._executors = Executors(config.executors)
        guard_torch_import(self._executors.codec)  # torch is never imported on the loop thread
        settings = LinkSettings(identity=key, mesh_secret=secret, listen_address=None, config=config.links)
        pool = self._pool = Pool(settings=settings, dispatch=self._dispatch, spawn=self.spawn,
                                 on_lost=self._link_lost)
        bound = await pool.listen(config.listen)
        self.address = str(config.advertise_for(bound, local_ip=guess_local_ip))
        pool.set_listen_address(dataclasses.replace(settings, listen_address=self.address))
        swim = Swim(node_id=self.node_id, address=self.address, meta=self._meta,
                    config=SWIM_PRESETS[config.preset](), rng=random.Random(config.seed), now=loop.time(),
                    incarnation=start_incarnation(self._files.last_incarnation()))
        membership = self._membership = Membership(
            swim=swim, node_id=self.node_id, pool=pool, spawn=self.spawn,
            on_incarnation=self._files.store_incarnation, on_peers=self._files.store_peers)
        self._dispatch[Channel.CONTROL].update(membership.handlers())
        ctx = self._ctx = NodeContext(node_id=self.node_id, config=config, pool=pool, membership=membership,
                          spawn=self.spawn, executors=self._executors)
        self.status = StatusService(ctx, metrics=self.stats, started=self._started)
        self.allreduce = AllReduceService(ctx, settings=config.allreduce)
        self.submitters = SubmitterService(ctx, owner=self._files.mesh_owner)
        self.tasks = TaskService(ctx, config=config.tasks, authority=self.submitters)
        self.blobs = BlobService(ctx, store=BlobStore(config.data_dir / "blobs", max_bytes=config.blobs.cache_bytes),
                                 config=config.blobs)
        self.training = TrainingService(ctx, tasks=self.tasks, allreduce=self.allreduce, blobs=self.blobs,
                                        slots=self.tasks.slots)
        self.tasks.runners["train"] = self.training
        for service in (self.status, self.allreduce, self.submitters, self.tasks, self.blobs, self.training):
            await self._add_service(service)
        await pool.start_serving()
        membership.join(self._files.seeds(own_address=self.address))
        if config.metrics_listen is not None:
            self._metrics = MetricsServer(self.stats)
            self.metrics_address = str(await self._metrics.listen(config.metrics_listen))
            log.info("metrics at http://%s/metrics", self.metrics_address)
        self._files.announce(node_id=self.node_id, address=self.address, bound=str(bound),
                             metrics=self.metrics_address)
        self.spawn(self._detect_resources())

    async def _add_service(self, service: Service) -> None:
        for (channel, tag), handler in service.handlers().items():
            self.on_message(tag, handler, channel=channel)
        self.on_member_event(service.on_member_event)
        self.services.append(service)
        await service.start()

    # ---- shutdown -------------------------------------------------------------------

    async def run_until_stopped(self) -> None:
        """Serve until ``request_stop()`` (or a signal, under ``node.serve.run_node``)."""
        await self._stop.wait()

    def request_stop(self) -> None:
        self._stop.set()

    async def _shutdown(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        self._stop.set()
        for service in reversed(self.services):
            try:
                await service.close()
            except Exception:
                log.exception("closing the %s service failed", service.name)
        membership = self._membership
        if membership is not None:
            membership.leave()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.config.leave_timeout
            await asyncio.sleep(0)
            while membership.busy() and loop.time() < deadline:  # flush the leave announcement
                await asyncio.sleep(0.01)
            membership.stop()
        await self._close_parts(linger=0.3)

    async def _close_parts(self, *, linger: float) -> None:
        if self._metrics is not None:
            self._metrics.close()
        if self._pool is not None:
            await self._pool.close(linger=linger)
        if self._executors is not None:
            self._executors.shutdown()
        self._supervisor.close()  # refuse new tasks, cancel the rest: the TaskGroup exits at once
        self.loop_lag.stop()

    # ---- tasks and callbacks --------------------------------------------------------

    async def _detect_resources(self) -> None:
        """GPUs via ``nvidia-smi`` (slow, only where present) after we are up; gossiped as an update."""
        gpus = await detect_gpus_async(timeout=2.0)
        if gpus and gpus != self._meta.gpus:
            self.update_meta(dataclasses.replace(self._meta, gpus=gpus))

    def _link_lost(self, link: Link, error: BaseException | None) -> None:
        if self._membership is not None and not self._stopping:
            self._membership.link_lost(link, error)

    # ---- public API -----------------------------------------------------------------

    def members(self) -> list[MemberView]:
        """Every member this node knows (ourselves included), sorted by node id."""
        return [] if self._membership is None else self._membership.members()

    def stats(self) -> Stats:
        """Every metric of the node now: membership, connections and each service's."""
        merged: dict[str, Any] = {"uptime_seconds": asyncio.get_running_loop().time() - self._started}
        for part in (self.loop_lag, self._membership, self._pool, *self.services):
            if part is not None:
                merged.update(part.stats())
        return merged

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
        """An open link to the live member ``node_id`` (``NodeContext.link_to``)."""
        if self._ctx is None:
            raise TransportError("the node is not running")
        return await self._ctx.link_to(node_id, channel=channel)

    async def send(self, node_id: bytes, message: Message, *, channel: Channel = Channel.BULK) -> None:
        """Send ``message`` to member ``node_id``; waits while its connection is backed up."""
        if self._ctx is None:
            raise TransportError("the node is not running")
        await self._ctx.send(node_id, message, channel=channel)

    def links(self) -> list[Link]:
        """Every connection of this node, oldest first, handshaking ones included."""
        return self._pool.links() if self._pool is not None else []

    def join_state(self) -> JoinState:
        """Where joining the seeds stands (``Membership.join_state``): in yet, and per seed
        why not (refused our mesh key, unreachable)."""
        if self._membership is None:
            raise RuntimeError("the node is not running")
        return self._membership.join_state()

    @property
    def mesh_key_created(self) -> bool:
        """Whether this run created the mesh secret (a new mesh)."""
        return self._files.mesh_key_created

    @property
    def traffic(self) -> Traffic:
        """Bytes and frames this node moved on its connections, per channel (only grows)."""
        return self._pool.settings.traffic if self._pool is not None else Traffic()

    async def all_reduce(self, tensor: Any, *, group: Sequence[bytes], codec: str = "none",
                         timeout: float | None = None, key: bytes | str | None = None,
                         **options: Any) -> AllReduceOutcome:
        """Average ``tensor`` over the members ``group`` (``AllReduceService.all_reduce``); fewer
        than ``min_contributors`` (default 2) in the result raises ``TooFewContributors``."""
        return await self.allreduce.all_reduce(tensor, group=group, codec=codec, timeout=timeout,
                                               key=key, **options)
