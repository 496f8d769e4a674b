"""Runs ``AllReduceRound`` cores inside a ``Node``: the asyncio side of the all-reduce.

Theory of operation
-------------------
``AllReduceService`` is created with the node and registers the all-reduce tags before the
node accepts connections: AR_PART / AR_AVERAGE on BULK links, the control messages
(AR_BEGIN, AR_REPORT, AR_COMMIT, AR_FINISH, AR_CANCEL, AR_TAKEOVER) on CONTROL links, as
``SendMessage`` / ``SendTensor`` say. ``all_reduce`` flattens the tensor (``node.arrays``),
builds the core (which starts the round), and hands it to a ``_Driver`` that loops
*input -> core -> outputs -> one timer*:

* Outputs. ``SendMessage`` goes to the destination's control queue, ``SendTensor`` to its
  tensor queue; one pump task per (destination, channel), a child of the node's TaskGroup,
  writes them in order with ``node.send`` (which awaits the link's drain: backpressure).
  A tensor's encoding is submitted to the node's codec thread pool when the core emits it,
  so encoding overlaps sending (plain ``none`` chunks, views of the values, are made
  inline: a pool hop would cost more than the work); the core emits a chunk only while the destination's
  in-flight window has room, and ``on_sent`` (after the frame is written) opens it again.
  Nothing else is queued: the windows bound memory and the thread pool's backlog.
* Inputs. A tensor message is decoded in the thread pool (plain ``none``: inline, a view
  of the payload) by the link's reader task, which waits for it: a slow decoder pauses that link's reading (the transport's bounded inbox),
  so the sender slows down via TCP. Control messages go to the core directly. Messages
  for a round this node has not started yet are held in a bounded pending inbox (at most
  ``MAX_PENDING_ROUNDS`` round ids, ``MAX_PENDING_PER_ROUND`` messages each, for
  ``PENDING_TTL_S``) and replayed when the round starts; beyond that the oldest round's
  messages, or the newest message, are dropped (the core's deadlines cope with a loss).
  Tensor messages for an unknown round are dropped: a member streams data only after the
  owner's AR_BEGIN.
* Failures. A link used by a round that breaks (closes without a goodbye), a send that
  fails, or a membership DEAD / LEFT event is ``peer_failed``; a chunk that does not decode
  fails its sender as PROTOCOL_ERROR and closes the link (``RemoteCodecError``). One ``loop.call_at(core.next_deadline())`` timer per
  round drives every deadline; the core's ``round_timeout`` is the caller's ``timeout``, so
  a round never hangs; a failure past that time is ``protocol.errors.TimeoutError``.
* End. On ``RoundFinished`` / ``RoundFailed`` the round is forgotten (its id kept a while,
  so late messages are dropped, not held), tensor pumps stop at once, control pumps flush
  what is queued (the leader's AR_FINISH, an AR_CANCEL) and exit. A finished round's result
  (a copy of every average, 100 MB for 25M elements) is assembled in the codec pool, so the
  leader's AR_FINISH goes out first and the event loop keeps serving links meanwhile.
"""

from __future__ import annotations

import asyncio
import builtins
import collections
import concurrent.futures
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from discovery.events import EventKind, MemberEvent
from node.allreduce.config import AllReduceConfig
from node.allreduce.events import (
    AllReduceError,
    AllReduceResult,
    PeerDropped,
    RoundFailed,
    RoundFinished,
    SendMessage,
    SendTensor,
    TensorKind,
)
from node.allreduce.layout import canonical_group
from node.allreduce.round import AllReduceRound
from node.arrays import flatten
from node.transport import Link
from protocol.connection import Channel
from protocol.crypto import short_id
from protocol.errors import (
    CodecError,
    ConfigError,
    ErrorCode,
    RemoteCodecError,
    StarmeshError,
    TimeoutError,
)
from protocol.messages.tensor import (
    ALLREDUCE_CONTROL_TYPES,
    ALLREDUCE_TENSOR_TYPES,
    ArAverage,
    ArPart,
    DropReason,
)
from protocol.schema import Message
from protocol.tensor import (
    CodecId,
    CodecSpec,
    ErrorFeedback,
    TensorChunk,
    decode_chunk,
    encode_chunk,
)

if TYPE_CHECKING:
    from node.runtime import Node

log = logging.getLogger("starmesh.allreduce")

#: Round ids with messages waiting for the local start, and messages held per round id.
MAX_PENDING_ROUNDS = 64
MAX_PENDING_PER_ROUND = 1024
#: Seconds a pending message waits for its round to start before it is dropped.
PENDING_TTL_S = 60.0
#: Round ids remembered after they end (their late messages are dropped, not held).
RECENT_ROUNDS = 1024
#: Seconds control pumps keep flushing after their round ended.
FLUSH_S = 2.0
#: A chain that encodes to a view of the values and decodes to a view of the payload: no
#: work worth a thread-pool hop (each hop wakes a thread and hands the GIL back and forth).
_PLAIN = (CodecId.NONE,)
#: Assumed link speed for default deadlines when the caller gives no config (100 Mbit/s).
DEFAULT_LINK_BYTES_PER_S = 12.5e6

Observer = Callable[[str, bytes, int], None]
"""``observer(what, peer, nbytes)``: ``"sent"`` after a tensor chunk was written to
``peer``, ``"received"`` after one was decoded. A trace for tests and benchmarks."""


@dataclass(frozen=True, slots=True, eq=False)
class AllReduceOutcome:
    """What ``Node.all_reduce`` returns: the average and the report of who contributed."""

    tensor: Any
    """The average as the caller's kind of tensor (numpy / torch, shape, dtype, device); the
    input object itself when ``in_place``."""
    contributors: tuple[bytes, ...]
    """Node ids whose tensors are in the average, ascending."""
    dropped: Mapping[bytes, DropReason]
    """Every other member of the group, with the reason it is not in the average."""
    round_id: bytes
    epoch: int
    contributed: bool
    """Whether this node's own tensor is in the average."""
    seconds: float
    """Wall time of the call."""


class AllReduceService:
    """The all-reduce side of one ``Node`` (see module docstring); ``node.allreduce``."""

    def __init__(self, node: Node, *, codec_threads: int | None = None) -> None:
        self._node = node
        self._threads = codec_threads or min(4, os.cpu_count() or 1)
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._rounds: dict[bytes, _Driver] = {}
        self._pending: dict[bytes, tuple[float, collections.deque[tuple[bytes, Message]]]] = {}
        self._recent: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._sequence: dict[tuple[bytes, ...], int] = {}
        self._watched: set[Link] = set()
        self._closed = False
        self.observer: Observer | None = None
        for cls in ALLREDUCE_TENSOR_TYPES:
            node.on_message(cls.TAG, self._on_tensor, channel=Channel.BULK)
        for ctl in ALLREDUCE_CONTROL_TYPES:
            node.on_message(ctl.TAG, self._on_control, channel=Channel.CONTROL)

    # ---- lifecycle ------------------------------------------------------------------

    @property
    def executor(self) -> concurrent.futures.ThreadPoolExecutor:
        """The node's codec thread pool (threads start on first use)."""
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                self._threads, thread_name_prefix="starmesh-codec")
        return self._executor

    def member_event(self, event: MemberEvent) -> None:
        """Membership listener: a member that died or left fails every round it is in."""
        if event.kind in (EventKind.DEAD, EventKind.LEFT):
            for driver in list(self._rounds.values()):
                driver.peer_failed(event.member.node_id)

    def close(self) -> None:
        """Node shutdown: cancel every round (callers get ``AllReduceError``), stop the pool."""
        self._closed = True
        for driver in list(self._rounds.values()):
            driver.cancel()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def has_round(self, round_id: bytes) -> bool:
        """Whether the round ``round_id`` is running on this node now."""
        return round_id in self._rounds

    @property
    def pending_rounds(self) -> int:
        """Round ids with messages held for a local start that has not happened yet."""
        return len(self._pending)

    # ---- the call -------------------------------------------------------------------

    async def all_reduce(
        self, tensor: Any, *, group: Sequence[bytes], codec: str | CodecSpec = "none",
        timeout: float | None = None, key: bytes | str | None = None,
        config: AllReduceConfig | None = None, weights: Mapping[bytes, float] | None = None,
        feedback: ErrorFeedback | None = None, in_place: bool = False,
    ) -> AllReduceOutcome:
        """Average ``tensor`` over ``group`` (see ``Node.all_reduce``)."""
        if self._closed:
            raise AllReduceError("the node is shutting down")
        started = time.perf_counter()
        spec = codec if isinstance(codec, CodecSpec) else CodecSpec.parse(codec)
        members = canonical_group(group)
        flat, restore = flatten(tensor)
        if feedback is not None and feedback.numel != flat.size:
            raise ConfigError(f"feedback covers {feedback.numel} elements, tensor has {flat.size}")
        cfg = self._config(config, flat.size, spec, timeout)
        loop = asyncio.get_running_loop()
        start = loop.time()
        core = AllReduceRound(node_id=self._node.node_id, group=members, key=self._key(members, key),
                              tensor=flat, now=start, config=cfg, weights=weights,
                              codec_name=spec.name, out=flat if in_place and flat.flags.writeable else None)
        if core.round_id in self._rounds or core.round_id in self._recent:
            raise ConfigError(f"round {core.round_id.hex()[:12]} already ran or is running here: "
                              "every round of a group needs its own key")
        driver = _Driver(self, core, spec, feedback, deadline=start + cfg.round_timeout)
        self._rounds[core.round_id] = driver
        for src, msg in self._take_pending(core.round_id):
            core.on_message(src, msg, now=loop.time())
        driver.step()
        try:
            result = await asyncio.shield(driver.done)
        except asyncio.CancelledError:
            driver.cancel()
            raise
        return AllReduceOutcome(
            tensor=restore(result.average, in_place=in_place), contributors=result.contributors,
            dropped=dict(result.dropped), round_id=result.round_id, epoch=result.epoch,
            contributed=result.contributed, seconds=time.perf_counter() - started)

    def _config(self, config: AllReduceConfig | None, numel: int, spec: CodecSpec,
                timeout: float | None) -> AllReduceConfig:
        cfg = config or AllReduceConfig.for_transfer(numel=numel, bytes_per_s=DEFAULT_LINK_BYTES_PER_S)
        cfg = cfg.replace(chunk_elements=spec.chunk_elements)
        if timeout is not None:
            if not timeout > 0:
                raise ConfigError(f"timeout must be a positive number of seconds, got {timeout!r}")
            cfg = cfg.replace(round_timeout=float(timeout))
        return cfg

    def _key(self, members: tuple[bytes, ...], key: bytes | str | None) -> bytes:
        """The caller's key, or the group's call counter: the n-th call on a group is round n."""
        if isinstance(key, str):
            return key.encode()
        if key is not None:
            return key
        n = self._sequence.get(members, 0) + 1
        self._sequence[members] = n
        return b"seq:%d" % n

    def _ended(self, driver: _Driver) -> None:
        rid = driver.core.round_id
        if self._rounds.get(rid) is driver:
            del self._rounds[rid]
        self._recent[rid] = None
        while len(self._recent) > RECENT_ROUNDS:
            self._recent.popitem(last=False)

    # ---- inputs ---------------------------------------------------------------------

    async def _on_control(self, link: Link, msg: Message) -> None:
        assert link.peer is not None
        rid: bytes = getattr(msg, "round_id", b"")
        driver = self._rounds.get(rid)
        if driver is None:
            self._hold(rid, link.peer.node_id, msg)
            return
        self.watch(link)
        driver.on_message(link.peer.node_id, msg)

    async def _on_tensor(self, link: Link, msg: Message) -> None:
        assert link.peer is not None and isinstance(msg, ArPart | ArAverage)
        src = link.peer.node_id
        driver = self._rounds.get(msg.round_id)
        if driver is None or not driver.core.active:
            return
        self.watch(link)
        try:
            if msg.data.stages == _PLAIN:  # a view of the payload: no work to hand off
                values = decode_chunk(msg.data)
            else:
                values = await asyncio.get_running_loop().run_in_executor(self.executor, decode_chunk, msg.data)
        except RemoteCodecError as exc:
            driver.peer_failed(src, DropReason.PROTOCOL_ERROR, f"undecodable chunk: {exc}")
            raise  # the link's reader closes the connection with CODEC_ERROR
        if self.observer is not None:
            self.observer("received", src, len(msg.data.payload))
        driver.on_tensor(src, msg, values)

    def _hold(self, rid: bytes, src: bytes, msg: Message) -> None:
        if rid in self._recent:
            return
        now = asyncio.get_running_loop().time()
        for old in [r for r, (t, _) in self._pending.items() if now - t > PENDING_TTL_S]:
            del self._pending[old]
        entry = self._pending.get(rid)
        if entry is None:
            if len(self._pending) >= MAX_PENDING_ROUNDS:  # the oldest is the likeliest stale
                oldest = min(self._pending, key=lambda r: self._pending[r][0])
                log.warning("forgot %d message(s) of round %s that never started here: "
                            "%d rounds pending", len(self._pending[oldest][1]), oldest.hex()[:12],
                            MAX_PENDING_ROUNDS)
                del self._pending[oldest]
            entry = self._pending[rid] = (now, collections.deque())
        if len(entry[1]) >= MAX_PENDING_PER_ROUND:
            log.warning("dropped %s for pending round %s: inbox full", msg.TAG.name, rid.hex()[:12])
            return
        entry[1].append((src, msg))

    def _take_pending(self, rid: bytes) -> list[tuple[bytes, Message]]:
        entry = self._pending.pop(rid, None)
        return [] if entry is None else list(entry[1])

    def watch(self, link: Link) -> None:
        """Fail the peer of ``link`` in every round it is in when the link closes."""
        if link not in self._watched and link.peer is not None:
            self._watched.add(link)
            self._node.spawn(self._watch(link))

    def reject(self, node: bytes, why: str) -> None:
        """``node`` broke the all-reduce protocol: close its connections (typed error)."""
        for link in list(self._watched):
            if link.peer is not None and link.peer.node_id == node:
                link.abort(ErrorCode.SCHEMA_VIOLATION, f"all-reduce: {why}"[:200])

    async def _watch(self, link: Link) -> None:
        try:
            await link.closed.wait()
        finally:
            self._watched.discard(link)
        assert link.peer is not None
        if link.close_reason is None:
            # A goodbye is no failure: a member leaving says AR_CANCEL (and membership LEFT)
            # first, and the pool retires idle or duplicate links this way; the next send
            # dials again. What was sent before the goodbye was delivered.
            return
        for driver in list(self._rounds.values()):
            driver.peer_failed(link.peer.node_id)


class _Driver:
    """One round in progress: feeds its core and executes what it asks (module docstring)."""

    def __init__(self, service: AllReduceService, core: AllReduceRound, codec: CodecSpec,
                 feedback: ErrorFeedback | None, *, deadline: float) -> None:
        self.service = service
        self.core = core
        self.codec = codec
        self.feedback = feedback
        self._fed: set[tuple[int, int]] = set()
        self._averages: dict[tuple[int, int, int], asyncio.Future[_Encoded]] = {}
        self.deadline = deadline
        self.loop = asyncio.get_running_loop()
        self.done: asyncio.Future[Any] = self.loop.create_future()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._control: dict[bytes, _Pump] = {}
        self._tensors: dict[bytes, _Pump] = {}
        self._over = False

    # ---- inputs (each followed by ``step``) ---------------------------------------------

    def on_message(self, src: bytes, msg: Message) -> None:
        self.core.on_message(src, msg, now=self.loop.time())
        self.step()

    def on_tensor(self, src: bytes, msg: ArPart | ArAverage, values: Any) -> None:
        self.core.on_tensor(src, msg, values, now=self.loop.time())
        self.step()

    def on_sent(self, dest: bytes, nbytes: int) -> None:
        self.core.on_sent(dest, nbytes, now=self.loop.time())
        self.step()

    def peer_failed(self, node: bytes, reason: DropReason = DropReason.DIED, detail: str = "") -> None:
        if self.core.active and node in self.core.members and node != self.service._node.node_id:
            self.core.peer_failed(node, now=self.loop.time(), reason=reason, detail=detail)
            self.step()

    def _drop_tensors(self, node: bytes) -> None:
        """Nothing more goes to ``node`` in this round (the core dropped it)."""
        pump = self._tensors.get(node)
        if pump is not None:
            pump.stop(flush=False)

    def cancel(self) -> None:
        self.core.cancel(now=self.loop.time())
        self.step()

    def _on_timer(self) -> None:
        self._timer = self._timer_at = None
        self.core.handle_timer(now=self.loop.time())
        self.step()

    # ---- outputs --------------------------------------------------------------------

    def step(self) -> None:
        """Execute the core's sends, react to its events, re-arm the timer."""
        for send in self.core.messages_to_send():
            if isinstance(send, SendMessage):
                self._pump(self._control, send.dest, Channel.CONTROL).put(send.message)
            else:
                self._pump(self._tensors, send.dest, Channel.BULK).put(self._encode(send))
        while (event := self.core.next_event(assemble=False)) is not None:
            if isinstance(event, PeerDropped):
                self._drop_tensors(event.node)
                log.info("round %s: dropped %s (%s) %s", self.core.round_id.hex()[:12],
                         short_id(event.node), event.reason.name, event.detail)
                if event.reason is DropReason.PROTOCOL_ERROR:
                    self.service.reject(event.node, event.detail)
            elif isinstance(event, RoundFinished):
                self._finish(event.result)
            elif isinstance(event, RoundFailed):
                self._end(None, self._error(event.error))
        self._arm()

    def _pump(self, table: dict[bytes, _Pump], dest: bytes, channel: Channel) -> _Pump:
        pump = table.get(dest)
        if pump is None:
            pump = table[dest] = _Pump(self, dest, channel)
            if self._over:  # a message after the end (a late AR_FINISH echo): flush it
                pump.stop(flush=True)
            self.service._node.spawn(pump.run())
        return pump

    def _encode(self, send: SendTensor) -> tuple[SendTensor, asyncio.Future[_Encoded]]:
        """Submit ``send``'s encoding to the codec pool. An average chunk is encoded once for
        all its receivers; a lossy codec's chunk is also decoded, for ``_same_as_receivers``."""
        codec, values, offset = self.codec, send.values, send.offset
        if send.kind is TensorKind.AVERAGE:
            key = (send.epoch, send.slice, send.chunk)
            future = self._averages.get(key)
            if future is None:
                lossy = not codec.lossless

                def encode_average() -> _Encoded:
                    chunk = encode_chunk(values, codec, offset=offset)
                    return _Encoded(chunk, values, decode_chunk(chunk) if lossy else None)

                future = self._averages[key] = self.loop.run_in_executor(self.service.executor,
                                                                         encode_average)
            return send, future
        feedback = None
        if self.feedback is not None and (send.slice, send.chunk) not in self._fed:
            self._fed.add((send.slice, send.chunk))  # a resend must not feed back twice
            feedback = self.feedback.slice(offset, values.size)

        def encode() -> _Encoded:
            return _Encoded(encode_chunk(values, codec, feedback=feedback, offset=offset), values)

        if codec.stages == _PLAIN and feedback is None:  # a view of the values: no work to hand off
            done: asyncio.Future[_Encoded] = self.loop.create_future()
            try:
                done.set_result(encode())
            except CodecError as exc:
                done.set_exception(exc)
            return send, done
        return send, self.loop.run_in_executor(self.service.executor, encode)

    def _finish(self, result: AllReduceResult) -> None:
        """The round finished: end it now (the leader's AR_FINISH is already queued, and goes
        out while the result is assembled), assemble the result in the codec pool, then return it."""
        lossy = []
        for future in self._averages.values():
            done = future.done() and not future.cancelled() and future.exception() is None
            enc = future.result() if done else None
            if enc is not None and enc.decoded is not None:
                lossy.append(enc)
        core = self.core

        def assemble() -> AllReduceResult:
            core.assemble()
            return _same_as_receivers(result, lossy)

        try:
            pending = self.loop.run_in_executor(self.service.executor, assemble)
        except RuntimeError:  # the pool is shut down (node closing)
            self._end(None, AllReduceError("the node is shutting down"))
            return
        self._end(None, None, pending=pending)

    def _arm(self) -> None:
        at = self.core.next_deadline() if self.core.active else None
        if self._timer is not None and at != self._timer_at:
            self._timer.cancel()
            self._timer = self._timer_at = None
        if at is not None and self._timer is None:
            self._timer = self.loop.call_at(at, self._on_timer)
            self._timer_at = at

    def _error(self, error: AllReduceError) -> StarmeshError:
        if self.loop.time() >= self.deadline - 1e-3:
            return TimeoutError(f"all-reduce round {self.core.round_id.hex()[:12]}: {error}")
        return error

    def _end(self, result: Any, error: BaseException | None, *,
             pending: asyncio.Future[AllReduceResult] | None = None) -> None:
        self._over = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = self._timer_at = None
        for pump in self._tensors.values():
            pump.stop(flush=False)
        for future in self._averages.values():
            _discard(future)
        self._averages.clear()
        for pump in self._control.values():
            pump.stop(flush=True)
        # Break the driver <-> pump cycles now: the round's buffers (the core, the result)
        # must not wait for the cyclic garbage collector (hundreds of MB per round).
        self._tensors, self._control = {}, {}
        self.service._ended(self)
        if pending is not None:
            pending.add_done_callback(self._settle)
        elif not self.done.done():
            if error is not None:
                self.done.set_exception(error)
            else:
                self.done.set_result(result)

    def _settle(self, pending: asyncio.Future[AllReduceResult]) -> None:
        if self.done.done():
            _discard(pending)
        elif pending.cancelled():
            self.done.set_exception(AllReduceError("the node is shutting down"))
        elif (exc := pending.exception()) is not None:
            self.done.set_exception(exc)
        else:
            self.done.set_result(pending.result())


@dataclass(frozen=True, slots=True)
class _Encoded:
    """An encoded chunk, the values it encodes, and (lossy averages) what receivers decode."""

    chunk: TensorChunk
    values: Any
    decoded: Any = None


class _Pump:
    """Writes one destination's messages on one channel, in order (a TaskGroup child)."""

    def __init__(self, driver: _Driver, dest: bytes, channel: Channel) -> None:
        self.driver = driver
        self.dest = dest
        self.channel = channel
        self.queue: collections.deque[Any] = collections.deque()
        self.ready = asyncio.Event()
        self.stopped = False
        self.flush = False

    def put(self, item: Any) -> None:
        self.queue.append(item)
        self.ready.set()

    def stop(self, *, flush: bool) -> None:
        self.stopped, self.flush = True, flush
        if not flush:
            for item in self.queue:
                # A part's encoding is this pump's alone; an average's is shared by every
                # receiver's pump (``_Driver._averages``): only the round's end cancels those.
                if isinstance(item, tuple) and item[0].kind is TensorKind.PART:
                    _discard(item[1])
            self.queue.clear()
        self.ready.set()

    async def run(self) -> None:
        node = self.driver.service._node
        deadline = None
        while True:
            if not self.queue:
                if self.stopped:
                    return
                self.ready.clear()
                await self.ready.wait()
                continue
            if self.stopped and deadline is None:
                deadline = self.driver.loop.time() + FLUSH_S
            item = self.queue[0]
            try:
                async with asyncio.timeout_at(deadline):
                    await self._send(node, item)
            except (StarmeshError, builtins.TimeoutError) as exc:
                log.debug("round %s: send to %s failed: %s", self.driver.core.round_id.hex()[:12],
                          short_id(self.dest), exc)
                self.queue.clear()
                self.driver.peer_failed(self.dest)
                return
            if self.queue and self.queue[0] is item:
                self.queue.popleft()

    async def _send(self, node: Node, item: Any) -> None:
        if self.channel is Channel.CONTROL:
            link = await node.link_to(self.dest, channel=Channel.CONTROL)
            self.driver.service.watch(link)
            await link.send(item)
            return
        send, future = item
        try:
            chunk = (await asyncio.shield(future)).chunk
        except asyncio.CancelledError:
            if future.cancelled() and self.stopped:
                return  # the round ended while this chunk was being encoded
            raise
        except CodecError as exc:  # our own tensor does not encode: leave the round
            log.error("round %s: cannot encode: %s", self.driver.core.round_id.hex()[:12], exc)
            self.driver.cancel()
            return
        if self.stopped:
            return
        link = await node.link_to(self.dest, channel=Channel.BULK)
        self.driver.service.watch(link)
        await link.send(send.to_message(chunk))
        if self.driver.service.observer is not None:
            self.driver.service.observer("sent", self.dest, len(chunk.payload))
        self.driver.on_sent(self.dest, send.nbytes)




def _same_as_receivers(result: AllReduceResult, lossy: Sequence[_Encoded]) -> AllReduceResult:
    """With a lossy codec the receivers of a slice this node averaged get the decoded chunks,
    not the exact average: use those too, so every survivor returns the same."""
    patches = []
    for enc in lossy:
        lo, n = enc.chunk.offset, enc.values.size
        if np.array_equal(result.average[lo:lo + n], enc.values):  # still this average
            patches.append((lo, enc.decoded))
    if not patches:
        return result
    average = result.average if result.average.flags.writeable else result.average.copy()
    for lo, decoded in patches:
        average[lo:lo + decoded.size] = decoded
    return dataclasses.replace(result, average=average)


def _discard(future: asyncio.Future[Any]) -> None:
    """Cancel a pending encode, or retrieve a finished one's error (so none is logged)."""
    if future.done():
        if not future.cancelled():
            future.exception()
    else:
        future.cancel()
