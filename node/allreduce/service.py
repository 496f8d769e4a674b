"""Runs ``AllReduceRound`` cores on a node: the one asyncio adapter of the all-reduce.

Theory of operation
-------------------
``AllReduceService(ctx, settings=)`` is built by the node after its pool and membership;
its ``handlers()`` take AR_PART / AR_AVERAGE on BULK links and the control messages
(AR_BEGIN, AR_REPORT, AR_COMMIT, AR_FINISH, AR_CANCEL, AR_TAKEOVER) on CONTROL links, as
the cores' ``Send`` outputs say. The sans-I/O ``RoundTable`` (``rounds.py``) keeps which
rounds run here, the ended ones, the inbox of messages for rounds not started yet and the
default keys; one ``node.driver.Driver`` arms its inbox expiry. ``all_reduce`` flattens the
tensor (``node.arrays``), builds the core (which starts the round), feeds it what the inbox
held, and hands it to a ``_Round`` whose ``Driver`` loops *input -> core -> outputs -> one
timer*:

* Outputs. A control ``Send`` goes to the destination's control queue, a BULK one (an
  ``OutgoingChunk``) to its tensor queue; one pump task per (destination, channel), spawned
  on the node (``ctx.spawn``), writes them in order over ``ctx.link_to`` (awaiting the link's
  drain: backpressure). A chunk's encoding is submitted to the node's codec thread pool
  (``ctx.executors.codec``) when the core emits it, so encoding overlaps sending (plain
  ``none`` chunks, views of the values, are made inline: a pool hop would cost more than the
  work); an average chunk is encoded once for all its receivers. The core emits a chunk only
  while the destination's in-flight window has room, and ``on_sent`` (after the frame is
  written) opens it again: the windows bound memory and the thread pool's backlog.
* Inputs. A tensor message is decoded in the thread pool (plain ``none``: inline) by the
  link's reader task, which waits for it: a slow decoder pauses that link's reading, so the
  sender slows down via TCP. Control messages go through the ``RoundTable``: to their round,
  into the inbox (bounded; replayed when the round starts), to an ended round's
  ``Epilogue`` (a late asker gets the AR_FINISH), or dropped, counted by reason.
* Failures. A link used by a round that breaks (closes without a goodbye), a send that
  fails, or a membership DEAD / LEFT event is ``peer_failed``; a chunk that does not decode
  fails its sender as PROTOCOL_ERROR and closes the link (``RemoteCodecError``). The core's
  ``round_timeout`` is the caller's ``timeout``, so a round never hangs; a failure past that
  time is ``protocol.errors.TimeoutError``.
* End. On ``RoundFinished`` / ``RoundFailed`` the round ends in the table (its id kept, with
  its epilogue), tensor pumps stop at once, control pumps flush what is queued (the leader's
  AR_FINISH, an AR_CANCEL) and exit. A finished round's result (a copy of every average,
  100 MB for 25M elements) is assembled in the codec pool, so the leader's AR_FINISH goes
  out first and the event loop keeps serving links meanwhile; with a lossy codec it takes
  the decoded chunks this node sent (``rounds.same_as_receivers``).
* The caller's ``min_contributors`` (default 2) is checked here, not in the core: a group
  smaller than it raises ``TooFewContributors`` before the round starts; a finished round
  whose contributors are fewer is still a finished round (every survivor agreed on it, and it
  counts as ``finished``), but this call raises ``TooFewContributors`` carrying its outcome.
"""

from __future__ import annotations

import asyncio
import builtins
import collections
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from discovery.events import EventKind, MemberEvent
from node.allreduce.config import AllReduceConfig, AllReduceSettings
from node.allreduce.events import (
    AllReduceError,
    AllReduceOutcome,
    AllReduceResult,
    OutgoingChunk,
    PeerDropped,
    RoundFailed,
    RoundFinished,
    TensorKind,
    TooFewContributors,
)
from node.allreduce.layout import canonical_group, round_id
from node.allreduce.round import AllReduceRound
from node.allreduce.rounds import (
    Outcome,
    RoundTable,
    SentAverage,
    check_contributors,
    outcome_of,
    required_contributors,
    same_as_receivers,
)
from node.arrays import flatten
from node.context import Handlers, NodeContext
from node.core import Stats
from node.driver import Driver
from node.transport import Handler, Link
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
from protocol.tags import MsgType
from protocol.tensor import (
    CodecId,
    CodecSpec,
    ErrorFeedback,
    TensorChunk,
    decode_chunk,
    encode_chunk,
)

__all__ = ["AllReduceOutcome", "AllReduceService", "Observer", "TooFewContributors"]

log = logging.getLogger("starmesh.allreduce")

#: Seconds control pumps keep flushing after their round ended.
FLUSH_S = 2.0
#: A chain that encodes to a view of the values and decodes to a view of the payload: no
#: work worth a thread-pool hop (each hop wakes a thread and hands the GIL back and forth).
_PLAIN = (CodecId.NONE,)

Observer = Callable[[str, bytes, int], None]
"""``observer(what, peer, nbytes)``: ``"sent"`` after a tensor chunk was written to
``peer``, ``"received"`` after one was decoded. A trace for tests and benchmarks."""


class AllReduceService:
    """The all-reduce of one node (``node.allreduce``; see module docstring)."""

    name = "allreduce"

    def __init__(self, ctx: NodeContext, *, settings: AllReduceSettings) -> None:
        self._ctx = ctx
        self.settings = settings
        self._table: RoundTable[_Round] = RoundTable()
        self._inbox = Driver(self._table, drain=self._drain_table)
        self._watched: set[Link] = set()
        self._closed = False
        self._tensor_bytes = {"sent": 0, "received": 0}
        self._awaited: dict[bytes, asyncio.Event] = {}  # round id -> set when a member begins it
        self.observer: Observer | None = None

    # ---- the Service protocol -----------------------------------------------------------

    def handlers(self) -> Handlers:
        table: dict[tuple[Channel, MsgType], Handler] = {}
        for cls in ALLREDUCE_TENSOR_TYPES:
            table[(Channel.BULK, cls.TAG)] = self._on_tensor
        for ctl in ALLREDUCE_CONTROL_TYPES:
            table[(Channel.CONTROL, ctl.TAG)] = self._on_control
        return table

    def on_member_event(self, event: MemberEvent) -> None:
        """A member that died or left fails every round it is in."""
        if event.kind in (EventKind.DEAD, EventKind.LEFT):
            for rnd in self._table.running():
                rnd.peer_failed(event.member.node_id)

    async def start(self) -> None:
        """Nothing to start: rounds start with ``all_reduce`` calls."""

    async def close(self) -> None:
        """Node shutdown: cancel every round (callers get ``AllReduceError``)."""
        self._closed = True
        for rnd in self._table.running():
            rnd.cancel()
        self._inbox.stop()

    def stats(self) -> Stats:
        return {**self._table.stats(), "allreduce_tensor_bytes_total": dict(self._tensor_bytes)}

    # ---- queries --------------------------------------------------------------------

    @property
    def sent_bytes(self) -> int:
        """Tensor payload bytes this node has sent in all rounds so far."""
        return self._tensor_bytes["sent"]

    def has_round(self, round_id: bytes) -> bool:
        """Whether the round ``round_id`` is running on this node now."""
        return self._table.has_round(round_id)

    @property
    def pending_rounds(self) -> int:
        """Round ids with messages held for a local start that has not happened yet."""
        return self._table.pending_rounds

    # ---- the call -------------------------------------------------------------------

    async def all_reduce(
        self, tensor: Any, *, group: Sequence[bytes], codec: str | CodecSpec = "none",
        timeout: float | None = None, key: bytes | str | None = None,
        config: AllReduceConfig | None = None, weights: Mapping[bytes, float] | None = None,
        feedback: ErrorFeedback | None = None, in_place: bool = False,
        min_contributors: int | None = None, join_timeout: float | None = None,
    ) -> AllReduceOutcome:
        """Average ``tensor`` (numpy array or torch tensor) over the members ``group`` (node
        ids, this node included), compressed with ``codec``. Every member calls it with the
        same group, tensor size, codec and ``key`` (default: the n-th call on this group is
        round n). Returns the average (the caller's type; ``in_place=True`` writes into
        ``tensor``), its contributors and the dropped members with reasons. Raises
        ``AllReduceError`` when this node leaves the round without a result, ``TimeoutError``
        after ``timeout`` seconds, ``ConfigError`` on bad arguments. ``config`` defaults to
        ``settings.round_config(numel)``; ``feedback`` is the error feedback of a lossy codec.

        ``min_contributors`` (default 2): a result averaging fewer members raises
        ``TooFewContributors`` (an ``AllReduceError``; its ``outcome`` holds the result, and
        with ``in_place`` the tensor does too) instead of returning, and a group smaller than
        it raises before the round starts. So a group of one is an error unless the caller
        passes ``min_contributors=1``. The rule is local: members may ask for different ones.

        ``join_timeout`` (seconds) replaces the config's wait for the members' AR_BEGIN (and
        stretches ``round_timeout`` to cover it): for members that reach the round at very
        different times, such as DiLoCo workers after their inner steps. A member that dies
        meanwhile is still dropped at once, by the membership's DEAD."""
        if self._closed:
            raise AllReduceError("the node is shutting down")
        started = time.perf_counter()
        spec = codec if isinstance(codec, CodecSpec) else CodecSpec.parse(codec)
        members = canonical_group(group)
        flat, restore = flatten(tensor)
        if feedback is not None and feedback.numel != flat.size:
            raise ConfigError(f"feedback covers {feedback.numel} elements, tensor has {flat.size}")
        cfg = self._config(config, flat.size, spec, timeout)
        if join_timeout is not None:
            if not join_timeout > 0:
                raise ConfigError(f"join_timeout must be a positive number of seconds, got {join_timeout!r}")
            cfg = cfg.replace(join_timeout=float(join_timeout),
                              round_timeout=max(cfg.round_timeout, cfg.round_timeout + join_timeout - cfg.join_timeout))
        if self._ctx.node_id not in members:
            raise ConfigError("this node is not in the all-reduce group")
        required = required_contributors(min_contributors, group=members)
        start = self._ctx.now()
        core = AllReduceRound(node_id=self._ctx.node_id, group=members, key=self._table.key_for(members, key),
                              tensor=flat, now=start, config=cfg, weights=weights, codec_name=spec.name,
                              out=flat if in_place and flat.flags.writeable else None)
        rnd = _Round(self, core, spec, feedback, started=start, deadline=start + cfg.round_timeout)
        for src, msg in self._table.add(core.round_id, rnd):
            core.on_message(src, msg, now=self._ctx.now())
        self._inbox.step()
        rnd.step()
        try:
            result = await asyncio.shield(rnd.done)
        except asyncio.CancelledError:
            rnd.cancel()
            raise
        return check_contributors(AllReduceOutcome(
            tensor=restore(result.average, in_place=in_place), contributors=result.contributors,
            dropped=dict(result.dropped), round_id=result.round_id, epoch=result.epoch,
            contributed=result.contributed, seconds=time.perf_counter() - started), required=required)

    async def begun_elsewhere(self, *, group: Sequence[bytes], key: bytes | str, timeout: float) -> bool:
        """Wait until another member of ``group`` has begun the round ``key`` (a message of it
        arrived here) or ``timeout`` seconds passed; whether it has. For a member with nothing
        to add that must not start the round's clocks early (a training job's listener). False
        at once if the round's messages came and were dropped before it started here."""
        members = canonical_group(group)
        rid = round_id(members, self._table.key_for(members, key))
        if self._table.holds(rid) or self._table.has_round(rid):
            return True
        if self._table.missed(rid):
            return False
        event = self._awaited.setdefault(rid, asyncio.Event())
        try:
            await asyncio.wait_for(event.wait(), timeout)
            return True
        except builtins.TimeoutError:
            return False
        finally:
            self._awaited.pop(rid, None)

    def _config(self, config: AllReduceConfig | None, numel: int, spec: CodecSpec,
                timeout: float | None) -> AllReduceConfig:
        cfg = (config or self.settings.round_config(numel)).replace(chunk_elements=spec.chunk_elements)
        if timeout is not None:
            if not timeout > 0:
                raise ConfigError(f"timeout must be a positive number of seconds, got {timeout!r}")
            cfg = cfg.replace(round_timeout=float(timeout))
        return cfg

    def _ended(self, rnd: _Round, outcome: Outcome) -> None:
        core = rnd.core
        self._table.end(core.round_id, outcome=outcome, seconds=self._ctx.now() - rnd.started,
                        epilogue=core.epilogue)

    # ---- inputs ---------------------------------------------------------------------

    async def _on_control(self, link: Link, msg: Message) -> None:
        assert link.peer is not None and isinstance(msg, ALLREDUCE_CONTROL_TYPES)
        src = link.peer.node_id
        rnd = self._table.on_control(src, msg, now=self._ctx.now())
        self._inbox.step()
        awaited = self._awaited.get(msg.round_id)
        if awaited is not None:
            awaited.set()
        if rnd is not None:
            self._watch_link(link)
            rnd.on_message(src, msg)

    async def _on_tensor(self, link: Link, msg: Message) -> None:
        assert link.peer is not None and isinstance(msg, ArPart | ArAverage)
        src = link.peer.node_id
        rnd = self._table.on_tensor(msg)
        if rnd is None or not rnd.core.active:
            return
        self._watch_link(link)
        try:
            if msg.data.stages == _PLAIN:  # a view of the payload: no work to hand off
                values = decode_chunk(msg.data)
            else:
                values = await asyncio.get_running_loop().run_in_executor(
                    self._ctx.executors.codec, decode_chunk, msg.data)
        except RemoteCodecError as exc:
            rnd.peer_failed(src, DropReason.PROTOCOL_ERROR, f"undecodable chunk: {exc}")
            raise  # the link's reader closes the connection with CODEC_ERROR
        self._tensor_bytes["received"] += len(msg.data.payload)
        if self.observer is not None:
            self.observer("received", src, len(msg.data.payload))
        rnd.on_tensor(src, msg, values)

    def _drain_table(self) -> None:
        """The table's outputs: ended rounds' AR_FINISH for late askers."""
        for send in self._table.messages_to_send():
            self._ctx.spawn(self._send_late(send.dest, send.message))

    async def _send_late(self, dest: bytes, msg: Message) -> None:
        try:
            await self._ctx.send(dest, msg, channel=Channel.CONTROL)
        except (StarmeshError, builtins.TimeoutError) as exc:
            log.debug("late AR_FINISH to %s failed: %s", short_id(dest), exc)

    def _watch_link(self, link: Link) -> None:
        """Fail the peer of ``link`` in every round it is in when the link closes."""
        if link not in self._watched and link.peer is not None:
            self._watched.add(link)
            self._ctx.spawn(self._watch(link))

    def _reject(self, node: bytes, why: str) -> None:
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
        for rnd in self._table.running():
            rnd.peer_failed(link.peer.node_id)


class _Round:
    """One round in progress: feeds its core and executes what it asks (module docstring)."""

    def __init__(self, service: AllReduceService, core: AllReduceRound, codec: CodecSpec,
                 feedback: ErrorFeedback | None, *, started: float, deadline: float) -> None:
        self.service = service
        self.ctx = service._ctx
        self.core = core
        self.codec = codec
        self.feedback = feedback
        self.started = started
        self.deadline = deadline
        self.loop = asyncio.get_running_loop()
        self.driver = Driver(core, drain=self._drain, loop=self.loop)
        self.done: asyncio.Future[AllReduceResult] = self.loop.create_future()
        self._fed: set[tuple[int, int]] = set()
        self._averages: dict[tuple[int, int, int], asyncio.Future[_Encoded]] = {}
        self._control: dict[bytes, _Pump] = {}
        self._tensors: dict[bytes, _Pump] = {}
        self._over = False

    # ---- inputs (each followed by ``step``) ---------------------------------------------

    def step(self) -> None:
        self.driver.step()

    def on_message(self, src: bytes, msg: Message) -> None:
        self.core.on_message(src, msg, now=self.ctx.now())
        self.step()

    def on_tensor(self, src: bytes, msg: ArPart | ArAverage, values: Any) -> None:
        self.core.on_tensor(src, msg, values, now=self.ctx.now())
        self.step()

    def on_sent(self, dest: bytes, nbytes: int) -> None:
        self.core.on_sent(dest, nbytes, now=self.ctx.now())
        self.step()

    def peer_failed(self, node: bytes, reason: DropReason = DropReason.DIED, detail: str = "") -> None:
        if self.core.active and node in self.core.members and node != self.ctx.node_id:
            self.core.peer_failed(node, now=self.ctx.now(), reason=reason, detail=detail)
            self.step()

    def cancel(self) -> None:
        self.core.cancel(now=self.ctx.now())
        self.step()

    # ---- outputs (the driver's drain) -----------------------------------------------------

    def _drain(self) -> None:
        """Execute the core's sends, then react to its events."""
        for send in self.core.messages_to_send():
            if isinstance(send.message, OutgoingChunk):
                self._pump(self._tensors, send.dest, Channel.BULK).put(self._encode(send.message))
            else:
                self._pump(self._control, send.dest, Channel.CONTROL).put(send.message)
        while (event := self.core.next_event(assemble=False)) is not None:
            match event:
                case PeerDropped(node=node, reason=reason, detail=detail):
                    pump = self._tensors.get(node)
                    if pump is not None:  # nothing more goes to it in this round
                        pump.stop(flush=False)
                    log.info("round %s: dropped %s (%s) %s", self.core.round_id.hex()[:12],
                             short_id(node), reason.name, detail)
                    if reason is DropReason.PROTOCOL_ERROR:
                        self.service._reject(node, detail)
                case RoundFinished(result=result):
                    self._finish(result)
                case RoundFailed(error=error):
                    timed_out = self.ctx.now() >= self.deadline - 1e-3
                    self._end(outcome_of(error, timed_out=timed_out), error=self._error(error, timed_out))

    def _pump(self, table: dict[bytes, _Pump], dest: bytes, channel: Channel) -> _Pump:
        pump = table.get(dest)
        if pump is None:
            pump = table[dest] = _Pump(self, dest, channel)
            if self._over:  # a message after the end (an AR_CANCEL on close): flush it
                pump.stop(flush=True)
            self.ctx.spawn(pump.run())
        return pump

    def _encode(self, out: OutgoingChunk) -> tuple[OutgoingChunk, asyncio.Future[_Encoded]]:
        """Submit ``out``'s encoding to the codec pool. An average chunk is encoded once for
        all its receivers; a lossy codec's chunk is also decoded, for ``same_as_receivers``."""
        codec, values, offset = self.codec, out.values, out.offset
        executor = self.ctx.executors.codec
        if out.kind is TensorKind.AVERAGE:
            key = (out.epoch, out.slice, out.chunk)
            future = self._averages.get(key)
            if future is None:
                lossy = not codec.lossless

                def encode_average() -> _Encoded:
                    chunk = encode_chunk(values, codec, offset=offset)
                    return _Encoded(chunk, values, decode_chunk(chunk) if lossy else None)

                future = self._averages[key] = self.loop.run_in_executor(executor, encode_average)
            return out, future
        feedback = None
        if self.feedback is not None and (out.slice, out.chunk) not in self._fed:
            self._fed.add((out.slice, out.chunk))  # a resend must not feed back twice
            feedback = self.feedback.slice(offset, values.size)

        def encode() -> _Encoded:
            return _Encoded(encode_chunk(values, codec, feedback=feedback, offset=offset), values)

        if codec.stages == _PLAIN and feedback is None:  # a view of the values: no work to hand off
            done: asyncio.Future[_Encoded] = self.loop.create_future()
            try:
                done.set_result(encode())
            except CodecError as exc:
                done.set_exception(exc)
            return out, done
        return out, self.loop.run_in_executor(executor, encode)

    def _finish(self, result: AllReduceResult) -> None:
        """The round finished: end it now (the leader's AR_FINISH is already queued, and goes
        out while the result is assembled), assemble the result in the codec pool, then return it."""
        sent = []
        for future in self._averages.values():
            done = future.done() and not future.cancelled() and future.exception() is None
            enc = future.result() if done else None
            if enc is not None and enc.decoded is not None:
                sent.append(SentAverage(enc.chunk.offset, enc.values, enc.decoded))
        core = self.core

        def assemble() -> AllReduceResult:
            core.assemble()
            return same_as_receivers(result, sent)

        try:
            pending = self.loop.run_in_executor(self.ctx.executors.codec, assemble)
        except RuntimeError:  # the pool is shut down (node closing)
            self._end(Outcome.CANCELLED, error=AllReduceError("the node is shutting down"))
            return
        self._end(Outcome.FINISHED, pending=pending)

    def _error(self, error: AllReduceError, timed_out: bool) -> StarmeshError:
        if timed_out:
            return TimeoutError(f"all-reduce round {self.core.round_id.hex()[:12]}: {error}")
        return error

    def _end(self, outcome: Outcome, *, error: BaseException | None = None,
             pending: asyncio.Future[AllReduceResult] | None = None) -> None:
        self._over = True
        self.driver.stop()
        for pump in self._tensors.values():
            pump.stop(flush=False)
        for future in self._averages.values():
            _discard(future)
        self._averages.clear()
        for pump in self._control.values():
            pump.stop(flush=True)
        # Break the round <-> pump cycles now: the round's buffers (the core, the result)
        # must not wait for the cyclic garbage collector (hundreds of MB per round).
        self._tensors, self._control = {}, {}
        self.service._ended(self, outcome)
        if pending is not None:
            pending.add_done_callback(self._settle)
        elif not self.done.done():
            self.done.set_exception(error or AllReduceError("the round ended without a result"))

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
    """Writes one destination's messages on one channel, in order (a task of the node)."""

    def __init__(self, rnd: _Round, dest: bytes, channel: Channel) -> None:
        self.rnd = rnd
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
                # receiver's pump (``_Round._averages``): only the round's end cancels those.
                if isinstance(item, tuple) and item[0].kind is TensorKind.PART:
                    _discard(item[1])
            self.queue.clear()
        self.ready.set()

    async def run(self) -> None:
        deadline = None
        while True:
            if not self.queue:
                if self.stopped:
                    return
                self.ready.clear()
                await self.ready.wait()
                continue
            if self.stopped and deadline is None:
                deadline = self.rnd.loop.time() + FLUSH_S
            item = self.queue[0]
            try:
                async with asyncio.timeout_at(deadline):
                    await self._send(item)
            except (StarmeshError, builtins.TimeoutError) as exc:
                log.debug("round %s: send to %s failed: %s", self.rnd.core.round_id.hex()[:12],
                          short_id(self.dest), exc)
                self.queue.clear()
                self.rnd.peer_failed(self.dest)
                return
            if self.queue and self.queue[0] is item:
                self.queue.popleft()

    async def _send(self, item: Any) -> None:
        ctx, service = self.rnd.ctx, self.rnd.service
        if self.channel is Channel.CONTROL:
            link = await ctx.link_to(self.dest, channel=Channel.CONTROL)
            service._watch_link(link)
            await link.send(item)
            return
        out, future = item
        try:
            chunk = (await asyncio.shield(future)).chunk
        except asyncio.CancelledError:
            if future.cancelled() and self.stopped:
                return  # the round ended while this chunk was being encoded
            raise
        except CodecError as exc:  # our own tensor does not encode: leave the round
            log.error("round %s: cannot encode: %s", self.rnd.core.round_id.hex()[:12], exc)
            self.rnd.cancel()
            return
        if self.stopped:
            return
        link = await ctx.link_to(self.dest, channel=Channel.BULK)
        service._watch_link(link)
        await link.send(out.to_message(chunk))
        service._tensor_bytes["sent"] += len(chunk.payload)
        if service.observer is not None:
            service.observer("sent", self.dest, len(chunk.payload))
        self.rnd.on_sent(self.dest, out.nbytes)


def _discard(future: asyncio.Future[Any]) -> None:
    """Cancel a pending encode, or retrieve a finished one's error (so none is logged)."""
    if future.done():
        if not future.cancelled():
            future.exception()
    else:
        future.cancel()
