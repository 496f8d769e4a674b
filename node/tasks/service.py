"""The node's task service: the asyncio adapter of ``node.tasks.engine.TaskEngine``.

It feeds the engine what the node hears (member events, task messages on CONTROL links),
writes what the engine sends (one ordered outbound queue per member, bounded), runs the
attempts it is given in the node's worker processes (``node.process_pool``) after fetching
their bundle once per digest (``BundleGet`` to the coordinator, kept in ``node.bundles``),
and serves clients on CLIENT links:

* ``TaskSubmit``: the *entry* checks (decodes the ``Submission``, its Ed25519 signature, that
  the submitter is authorized, the digests, that the function's module is in the bundle or
  allowed) and hands the task to the first member of its rendezvous chain (relaying the same
  ``TaskSubmit`` on CONTROL, where the coordinator checks it all again: a relay cannot alter
  what was signed), answering ``TaskAccepted`` or a typed ``TaskError``.
* ``TaskQuery`` (list, status, wait, results) and ``TaskCancel``: answered here when this node
  holds the task (coordinator or replica), else relayed (``relayed=True``) to the members
  that may hold it: the coordinator the directory names, then the task's chain.

Nothing here decides anything about a task: that is the engine's. Every queue is bounded:
outbound messages per member, waiters, relays in flight, fetches.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import dataclasses
import itertools
import logging
import os
import random
import time
from collections import deque
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from discovery.events import MemberEvent
from node.bundles.manifest import BundleError, content_id, unpack_files
from node.bundles.store import BundleCache
from node.context import Handlers, NodeContext
from node.core import Stats
from node.driver import Driver
from node.membership import LIVE
from node.process_pool import ProcessPool
from node.tasks.config import KIND_MODULES, TaskConfig
from node.tasks.coordinator import Worker
from node.tasks.engine import AbortAttempts, RunAttempt, TaskChanged, TaskEngine, outcome_size
from node.tasks.kinds import KINDS
from node.tasks.worker_frames import module_allowed
from node.transport import Handler, Link
from protocol.connection import Channel
from protocol.crypto import short_id
from protocol.errors import (
    ErrorCode,
    RemoteProtocolError,
    StarmeshError,
    TimeoutError,
    TransportError,
)
from protocol.messages.gossip import NodeMeta
from protocol.messages.tasks import (
    BUNDLE_CHUNK_BYTES,
    MAX_BATCH,
    MAX_INPUTS_BYTES,
    TERMINAL_STATES,
    BundleChunk,
    BundleGet,
    Failure,
    Outcome,
    QueryOp,
    Submission,
    SubtaskReport,
    TaskAccepted,
    TaskAssign,
    TaskCancel,
    TaskCancelled,
    TaskError,
    TaskErrorCode,
    TaskQuery,
    TaskQueryReply,
    TaskSeed,
    TaskSubmit,
    TaskSummary,
    cancel_body,
    decode_struct,
    inputs_digest,
    signed_submission,
    task_id_of,
)
from protocol.schema import Message
from protocol.tags import MsgType

log = logging.getLogger("starmesh.tasks")

#: Messages queued for one member before new ones are dropped (the engine re-sends what matters).
MAX_OUTBOUND = 8192
#: Clients' WAIT queries parked at once; relays to other members in flight at once.
MAX_WAITERS = 4096
MAX_RELAYS = 1024
#: How long a relayed request may take, beyond a WAIT's own wait.
RELAY_TIMEOUT_S = 10.0
#: Members a query or submission is tried on before giving up.
MAX_CANDIDATES = 6
#: Bytes of outcomes in one results page.
MAX_PAGE_BYTES = 4 * 1024 * 1024
#: How far a cancel's signing time may be from ours.
CANCEL_SKEW_S = 600.0


#: The member tag a node with ``--task-slots`` advertises, so coordinators size it right.
TASK_SLOTS_TAG = "starmesh.task-slots"


def advertised_slots(meta: NodeMeta) -> float:
    """The CPUs a member offers to subtasks: its ``TASK_SLOTS_TAG``, else its CPU count."""
    for tag in meta.tags:
        key, _, value = tag.partition("=")
        if key == TASK_SLOTS_TAG:
            try:
                slots = float(value)
            except ValueError:
                break
            if 0 < slots <= 4096:
                return slots
            break
    return float(meta.cpus or 1)


class Authority(Protocol):
    """Who may submit (``node.submitters.service.SubmitterService``)."""

    @property
    def owner(self) -> bytes | None: ...

    def authorized(self, key: bytes) -> bool: ...

    def describe(self, key: bytes) -> str: ...


class _Refused(Exception):
    def __init__(self, code: TaskErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Outbound:
    """One FIFO queue and at most one sending task per member; a member that cannot be
    reached loses what was queued for it (the engine's timers re-send what matters)."""

    def __init__(self, ctx: NodeContext) -> None:
        self._ctx = ctx
        self._queues: dict[bytes, deque[Message]] = {}
        self.dropped = 0
        self.failed = 0

    def put(self, dest: bytes, message: Message) -> None:
        queue = self._queues.get(dest)
        if queue is None:
            queue = self._queues[dest] = deque()
            self._ctx.spawn(self._pump(dest, queue))
        if len(queue) >= MAX_OUTBOUND:
            self.dropped += 1
            return
        queue.append(message)

    async def _pump(self, dest: bytes, queue: deque[Message]) -> None:
        try:
            while queue:
                message = queue[0]
                try:
                    await self._ctx.send(dest, message, channel=Channel.CONTROL)
                except (TransportError, TimeoutError, RemoteProtocolError) as exc:
                    self.failed += len(queue)
                    log.debug("tasks: %s unreachable (%s): %d messages dropped", short_id(dest), exc, len(queue))
                    queue.clear()
                    break
                queue.popleft()
        finally:
            if self._queues.get(dest) is queue:
                del self._queues[dest]

    @property
    def queued(self) -> int:
        return sum(map(len, self._queues.values()))


class KindRunner(Protocol):
    """Runs the attempts of one kind of task on this node (not in the map process pool)."""

    async def run(self, task_id: bytes, assign: TaskAssign, *, bundle_path: Path | None,
                  attempt_id: int) -> list[Outcome]: ...

    def cancel(self, attempt_id: int) -> None: ...


class TaskService:
    """Serves tasks (module docstring)."""

    name = "tasks"

    def __init__(self, ctx: NodeContext, *, config: TaskConfig, authority: Authority,
                 rng: random.Random | None = None) -> None:
        self._ctx = ctx
        self.config = config
        self._authority = authority
        self._slots = config.slots or float(os.cpu_count() or 1)
        self.engine = TaskEngine(self_id=ctx.node_id, rng=rng or random.Random(),
                                 settings=config.engine_settings(), wall_offset=time.time() - ctx.now())
        self._driver = Driver(self.engine, drain=self._drain)
        self.pool = ProcessPool(slots=self._slots, allow_modules=config.allowed)
        self.bundles = BundleCache((ctx.data_dir / "bundles").resolve())  # workers run elsewhere
        self._out = _Outbound(ctx)
        self._pool_ids = itertools.count(1)
        self._attempt_ids: dict[tuple[bytes, int], int] = {}
        self._changed: dict[bytes, asyncio.Event] = {}
        self._waiters = 0
        self._relays: dict[int, asyncio.Future[Message]] = {}
        self._relay_reqs = itertools.count(1)
        self._fetches: dict[bytes, asyncio.Future[bytes]] = {}
        self._bundle_dirs: dict[bytes, Path] = {}  # unpacked bundles already looked up
        self._chunks: dict[tuple[bytes, int], asyncio.Future[BundleChunk]] = {}
        self._refused_keys: set[bytes] = set()
        self.runners: dict[str, KindRunner] = {}
        """Who runs the attempts of kinds other than "map" (the node wires ``"train"``)."""
        self.counters = {"submissions": 0, "refused": 0, "queries": 0, "relayed": 0, "bundle_fetches": 0}

    @property
    def slots(self) -> float:
        """CPUs this node offers to work."""
        return self._slots

    # ---- Service --------------------------------------------------------------------

    def handlers(self) -> Handlers:
        engine_tags = (MsgType.TASK_REPLICATE, MsgType.TASK_REPLICATE_ACK, MsgType.TASK_ASSIGN,
                       MsgType.TASK_HEARTBEAT, MsgType.TASK_RESULT, MsgType.TASK_REJECT,
                       MsgType.TASK_ABORT, MsgType.TASK_ANNOUNCE)
        handlers: dict[tuple[Channel, MsgType], Handler] = {(Channel.CONTROL, t): self._on_engine_message
                                                            for t in engine_tags}
        handlers.update({
            (Channel.CLIENT, MsgType.TASK_SUBMIT): self._on_submit,
            (Channel.CONTROL, MsgType.TASK_SUBMIT): self._on_submit,
            (Channel.CLIENT, MsgType.TASK_QUERY): self._on_query,
            (Channel.CONTROL, MsgType.TASK_QUERY): self._on_query,
            (Channel.CLIENT, MsgType.TASK_CANCEL): self._on_cancel,
            (Channel.CONTROL, MsgType.TASK_CANCEL): self._on_cancel,
            (Channel.CONTROL, MsgType.BUNDLE_GET): self._on_bundle_get,
            (Channel.CONTROL, MsgType.BUNDLE_CHUNK): self._on_bundle_chunk,
        })
        for tag in (MsgType.TASK_ACCEPTED, MsgType.TASK_ERROR, MsgType.TASK_QUERY_REPLY, MsgType.TASK_CANCELLED):
            handlers[(Channel.CONTROL, tag)] = self._on_relay_reply
        return handlers

    def on_member_event(self, event: MemberEvent) -> None:
        self.engine.set_members(self._workers(), now=self._ctx.now())
        self._driver.step()

    async def start(self) -> None:
        self.engine.set_members(self._workers(), now=self._ctx.now())
        self._driver.step()

    async def close(self) -> None:
        self._driver.stop()
        futures: list[asyncio.Future[Message] | asyncio.Future[bytes] | asyncio.Future[BundleChunk]] = [
            *self._relays.values(), *self._fetches.values(), *self._chunks.values()]
        for fut in futures:
            if not fut.done():
                fut.cancel()
        for event in self._changed.values():
            event.set()
        await self.pool.close()

    def stats(self) -> Stats:
        return {
            **self.engine.stats(),
            **{f"task_{k}": v for k, v in self.pool.stats().items()},
            "task_submissions_total": float(self.counters["submissions"]),
            "task_submissions_refused_total": float(self.counters["refused"]),
            "task_queries_total": float(self.counters["queries"]),
            "task_relayed_total": float(self.counters["relayed"]),
            "task_bundle_fetches_total": float(self.counters["bundle_fetches"]),
            "task_outbound_queued": float(self._out.queued),
            "task_outbound_dropped_total": float(self._out.dropped + self._out.failed),
        }

    # ---- engine plumbing ------------------------------------------------------------

    def _workers(self) -> Iterator[Worker]:
        for m in self._ctx.members():
            if m.status in LIVE:
                cpus = self._slots if m.node_id == self._ctx.node_id else advertised_slots(m.meta)
                yield Worker(node_id=m.node_id, cpus=cpus, gpus=len(m.meta.gpus),
                             memory_mb=m.meta.memory_bytes >> 20)

    def _drain(self) -> None:
        for send in self.engine.messages_to_send():
            self._out.put(send.dest, send.message)
        while (event := self.engine.next_event()) is not None:
            if isinstance(event, RunAttempt):
                pool_id = next(self._pool_ids)
                self._attempt_ids[(event.task_id, event.assign.attempt)] = pool_id
                self._ctx.spawn(self._run_attempt(event, pool_id))
            elif isinstance(event, AbortAttempts):
                for attempt in event.attempts:
                    running = self._attempt_ids.get((event.task_id, attempt))
                    if running is not None:
                        self.pool.cancel(running)
                        for runner in self.runners.values():
                            runner.cancel(running)
            elif isinstance(event, TaskChanged):
                changed = self._changed.pop(event.task_id, None)
                if changed is not None:
                    changed.set()

    async def _on_engine_message(self, link: Link, message: Message) -> None:
        assert link.peer is not None
        self.engine.on_message(link.peer.node_id, message, now=self._ctx.now())
        self._driver.step()

    def set_progress(self, task_id: bytes, data: bytes) -> None:
        """A kind runner's live figures for its running attempt of ``task_id`` (heartbeats)."""
        self.engine.set_progress(task_id, data, now=self._ctx.now())
        self._driver.step()

    async def _run_attempt(self, event: RunAttempt, pool_id: int) -> None:
        assign = event.assign
        try:
            path = None if assign.bundle is None else await self._bundle_path(assign.bundle, event.coordinator)
            runner = self.runners.get(assign.kind)
            if assign.kind != "map" and runner is None:
                failure = Failure(type="KindUnavailable", message=f"this node runs no {assign.kind!r} tasks")
                outcomes = [Outcome(index=i.index, ok=False, failure=failure) for i in assign.items]
            elif runner is not None:
                outcomes = await runner.run(event.task_id, assign, bundle_path=path, attempt_id=pool_id)
            else:
                outcomes = await self.pool.run(attempt=pool_id, function=assign.function, bundle_path=path,
                                               items=[(i.index, i.input) for i in assign.items],
                                               timeout_s=assign.timeout_s, resources=assign.resources)
        except (StarmeshError, OSError) as exc:
            failure = Failure(type="BundleUnavailable", message=f"cannot get the task's bundle: {exc}"[:4096])
            outcomes = [Outcome(index=i.index, ok=False, failure=failure) for i in assign.items]
        finally:
            self._attempt_ids.pop((event.task_id, assign.attempt), None)
        self.engine.attempt_done(event.task_id, assign.attempt, outcomes, now=self._ctx.now())
        self._driver.step()

    # ---- bundles --------------------------------------------------------------------

    def _held_bundle(self, digest: bytes) -> bytes | None:
        for rec in self.engine.records.values():
            if rec.submission.bundle == digest and rec.seed.bundle:
                return rec.seed.bundle
        return None

    async def _bundle_path(self, digest: bytes, holder: bytes) -> Path:
        known = self._bundle_dirs.get(digest)
        if known is not None:
            return known
        loop = asyncio.get_running_loop()
        io = self._ctx.executors.io
        path = await loop.run_in_executor(io, self.bundles.path, digest)
        if path is not None:
            return self._remember_bundle(digest, path)
        data = self._held_bundle(digest)
        if data is None:
            fetch = self._fetches.get(digest)
            if fetch is None:
                fetch = self._fetches[digest] = loop.create_future()
                self._ctx.spawn(self._fetch(digest, holder, fetch))
            data = await asyncio.shield(fetch)
        return self._remember_bundle(digest, await loop.run_in_executor(io, self.bundles.put, digest, data))

    def _remember_bundle(self, digest: bytes, path: Path) -> Path:
        if len(self._bundle_dirs) >= 1024:
            self._bundle_dirs.clear()
        self._bundle_dirs[digest] = path
        return path

    async def _fetch(self, digest: bytes, holder: bytes, result: asyncio.Future[bytes]) -> None:
        self.counters["bundle_fetches"] += 1
        parts: list[bytes] = []
        offset = 0
        try:
            while True:
                waiter: asyncio.Future[BundleChunk] = asyncio.get_running_loop().create_future()
                self._chunks[(digest, offset)] = waiter
                try:
                    await self._ctx.send(holder, BundleGet(digest=digest, offset=offset), channel=Channel.CONTROL)
                    async with asyncio.timeout(30.0):
                        chunk = await waiter
                finally:
                    self._chunks.pop((digest, offset), None)
                if chunk.total == 0:
                    raise BundleError(f"{short_id(holder)} does not have bundle {digest.hex()[:16]}")
                parts.append(bytes(chunk.data))
                offset += len(chunk.data)
                if offset >= chunk.total or not chunk.data:
                    break
            data = b"".join(parts)
            content = content_id(data)
            if content != digest:
                raise BundleError(f"bundle from {short_id(holder)} does not match its digest")
            result.set_result(data)
        except builtins.TimeoutError:
            result.set_exception(TimeoutError(f"no bundle chunk from {short_id(holder)} within 30s"))
        except (StarmeshError, OSError) as exc:
            result.set_exception(exc if isinstance(exc, StarmeshError) else TransportError(str(exc)))
        finally:
            self._fetches.pop(digest, None)
            if result.done() and not result.cancelled():
                result.exception()  # retrieved: the waiters re-raise it

    async def _on_bundle_get(self, link: Link, message: Message) -> None:
        assert isinstance(message, BundleGet)
        data = self._held_bundle(message.digest)
        if data is None:
            data = await asyncio.get_running_loop().run_in_executor(
                self._ctx.executors.io, self.bundles.packed, message.digest)
        if data is None or message.offset > len(data):
            await link.send(BundleChunk(digest=message.digest, offset=message.offset, total=0, data=b""))
            return
        piece = memoryview(data)[message.offset: message.offset + BUNDLE_CHUNK_BYTES].toreadonly()
        await link.send(BundleChunk(digest=message.digest, offset=message.offset, total=len(data), data=piece))

    async def _on_bundle_chunk(self, link: Link, message: Message) -> None:
        assert isinstance(message, BundleChunk)
        waiter = self._chunks.get((message.digest, message.offset))
        if waiter is not None and not waiter.done():
            waiter.set_result(message)

    # ---- submissions ----------------------------------------------------------------

    async def _on_submit(self, link: Link, message: Message) -> None:
        assert isinstance(message, TaskSubmit) and link.peer is not None
        entry = link.peer.channel is Channel.CLIENT
        if entry:
            self._ctx.spawn(self._answer_later(link, message.req, self._submit(message.seed, entry=True)))
        else:
            await self._reply(link, message.req, await self._submit(message.seed, entry=False))

    async def _submit(self, seed: TaskSeed, *, entry: bool) -> Message:
        """Check a submission; create the task here or hand it to its coordinator."""
        try:
            submission, task_id = self._check(seed)
        except _Refused as exc:
            self.counters["refused"] += 1
            return TaskError(req=0, code=exc.code, message=str(exc)[:1000])
        self.counters["submissions"] += 1
        held = self.engine.records.get(task_id)
        if held is not None:
            return TaskAccepted(req=0, task_id=task_id, coordinator=held.coordinator)
        chain = self.engine.chain(task_id)
        if entry:  # hand it to the first live member of its chain that takes it
            me = self._ctx.node_id
            above = chain[: chain.index(me)] if me in chain else chain
            for candidate in above[:MAX_CANDIDATES]:
                try:
                    reply = await self._relay(candidate, TaskSubmit(req=0, seed=seed), timeout=RELAY_TIMEOUT_S)
                except (StarmeshError, builtins.TimeoutError) as exc:
                    log.info("tasks: cannot hand task %s to %s (%s): trying the next member",
                             task_id.hex()[:12], short_id(candidate), exc)
                    continue
                if isinstance(reply, TaskError) and reply.code is TaskErrorCode.UNAVAILABLE:
                    continue
                return reply
        if self.engine.full():
            return TaskError(req=0, code=TaskErrorCode.UNAVAILABLE,
                             message=f"this node already holds {self.config.max_tasks} running tasks")
        self.engine.create(seed, submission, task_id, now=self._ctx.now())
        self._driver.step()
        log.info("tasks: task %s (%s, %d subtasks) from %s: coordinating", task_id.hex()[:12],
                 submission.function, submission.count, self._authority.describe(submission.submitter))
        return TaskAccepted(req=0, task_id=task_id, coordinator=self._ctx.node_id)

    def _check(self, seed: TaskSeed) -> tuple[Submission, bytes]:
        """The submission and its task id, or ``_Refused`` saying what is wrong."""
        try:
            submission = decode_struct(Submission, seed.body, what="submission")
        except RemoteProtocolError as exc:
            raise _Refused(TaskErrorCode.BAD_SUBMISSION, f"malformed submission: {exc}") from None
        key = submission.submitter
        try:
            Ed25519PublicKey.from_public_bytes(key).verify(seed.signature, signed_submission(seed.body))
        except (InvalidSignature, ValueError):
            raise _Refused(TaskErrorCode.UNAUTHORIZED,
                           f"UNAUTHORIZED: the signature does not match submitter key "
                           f"{self._authority.describe(key)}") from None
        if not self._authority.authorized(key):
            if key not in self._refused_keys and len(self._refused_keys) < 1024:
                self._refused_keys.add(key)
                log.warning("tasks: refused a submission from unauthorized key %s", self._authority.describe(key))
            hint = ("this mesh's key file names no owner: python -m node mesh-key set-owner"
                    if self._authority.owner is None else
                    f"the mesh owner can grant it: python -m node submitters add {self._authority.describe(key)}")
            raise _Refused(TaskErrorCode.UNAUTHORIZED,
                           f"UNAUTHORIZED: submitter key {self._authority.describe(key)} may not run work "
                           f"on this mesh ({hint})")
        if submission.kind not in KINDS:
            raise _Refused(TaskErrorCode.BAD_SUBMISSION, f"unknown task kind {submission.kind!r}")
        if sum(map(len, seed.inputs)) > MAX_INPUTS_BYTES:
            raise _Refused(TaskErrorCode.TOO_LARGE, f"the inputs take {sum(map(len, seed.inputs))} bytes: at most "
                           f"{MAX_INPUTS_BYTES} per task")
        if submission.count != len(seed.inputs) or inputs_digest(seed.inputs) != submission.inputs_digest:
            raise _Refused(TaskErrorCode.BAD_SUBMISSION, "the inputs do not match the signed inputs digest")
        if submission.kind != "map":  # a map task's inputs are opaque; others' are the kind's
            try:
                KINDS[submission.kind](submission, seed.inputs)
            except RemoteProtocolError as exc:
                raise _Refused(TaskErrorCode.BAD_SUBMISSION, f"bad {submission.kind} task: {exc}") from None
        allowed = self.config.allowed + KIND_MODULES.get(submission.kind, ())
        module = submission.function.split(":", 1)[0]
        if submission.bundle is not None:
            if not seed.bundle or content_id(seed.bundle) != submission.bundle:
                raise _Refused(TaskErrorCode.BAD_SUBMISSION, "the bundle does not match the signed bundle digest")
            try:
                paths = [p for p, _, _ in unpack_files(seed.bundle)]
            except BundleError as exc:
                raise _Refused(TaskErrorCode.BAD_SUBMISSION, f"bad bundle: {exc}") from None
            top = module.split(".")[0]
            if not any(p in (f"{top}.py", f"{top}/__init__.py") for p in paths) and \
                    not module_allowed(module, allowed):
                raise _Refused(TaskErrorCode.NOT_ALLOWED,
                               f"module {module} is not in the bundle (it has {', '.join(paths[:8])}) "
                               "and not allowed on this node (--allow-module)")
        elif seed.bundle:
            raise _Refused(TaskErrorCode.BAD_SUBMISSION, "a bundle was sent but the submission names none")
        elif not module_allowed(module, allowed):
            raise _Refused(TaskErrorCode.NOT_ALLOWED,
                           f"module {module} is not allowed without a bundle on this node "
                           f"(allowed: {', '.join(allowed)}; an operator adds more with "
                           "--allow-module PATTERN)")
        return submission, task_id_of(seed.body)

    # ---- queries --------------------------------------------------------------------

    async def _on_query(self, link: Link, message: Message) -> None:
        assert isinstance(message, TaskQuery) and link.peer is not None
        self.counters["queries"] += 1
        if link.peer.channel is Channel.CONTROL and not message.relayed:
            message = dataclasses.replace(message, relayed=True)  # a member asks: never relay again
        if message.op is QueryOp.LIST:
            await self._reply(link, message.req, self._list(message))
            return
        local = message.task_id in self.engine.records or message.relayed or link.peer.channel is Channel.CONTROL
        if message.op is QueryOp.WAIT or not local:
            self._ctx.spawn(self._answer_later(link, message.req, self._query(message)))
        else:
            await self._reply(link, message.req, self._answer(message))

    async def _query(self, message: TaskQuery) -> Message:
        if message.task_id in self.engine.records or message.relayed:
            if message.op is QueryOp.WAIT:
                return await self._wait(message)
            return self._answer(message)
        relayed = dataclasses.replace(message, req=0, relayed=True)
        last: Message = TaskError(req=0, code=TaskErrorCode.UNKNOWN_TASK,
                                  message=f"no live member knows task {_hex(message.task_id)}")
        for candidate in self._candidates(message.task_id):
            try:
                reply = await self._relay(candidate, relayed, timeout=message.wait_s + RELAY_TIMEOUT_S)
            except (StarmeshError, builtins.TimeoutError):
                last = TaskError(req=0, code=TaskErrorCode.UNAVAILABLE,
                                 message=f"the members that hold task {_hex(message.task_id)} cannot be reached")
                continue
            if isinstance(reply, TaskError) and reply.code is TaskErrorCode.UNKNOWN_TASK:
                continue
            return reply
        return last

    def _candidates(self, task_id: bytes | None) -> list[bytes]:
        """Members that may hold ``task_id``, most likely first (never ourselves)."""
        if task_id is None:
            return []
        out: list[bytes] = []
        known = self.engine.directory.get(task_id)
        if known is not None:
            out.append(known.coordinator)
        out.extend(self.engine.chain(task_id))
        unique = [n for n in dict.fromkeys(out) if n != self._ctx.node_id and self._ctx.is_live(n)]
        return unique[:MAX_CANDIDATES]

    def _list(self, message: TaskQuery) -> TaskQueryReply:
        summaries = [s for s in self.engine.summaries() if message.after is None or s.task_id > message.after]
        page = summaries[: max(1, min(message.limit, 1024))]
        more = len(summaries) > len(page)
        return TaskQueryReply(req=0, tasks=tuple(page), next_after=page[-1].task_id if more and page else None)

    def _answer(self, message: TaskQuery) -> Message:
        """STATUS or RESULTS of a task we hold (UNKNOWN_TASK otherwise)."""
        rec = self.engine.records.get(message.task_id) if message.task_id is not None else None
        if rec is None:
            return TaskError(req=0, code=TaskErrorCode.UNKNOWN_TASK,
                             message=f"this node does not hold task {_hex(message.task_id)}")
        summary = rec.summary(wall_offset=self.engine.wall_offset)
        limit = max(1, min(message.limit, MAX_BATCH))
        kind = rec.kind
        if message.op is QueryOp.STATUS or message.op is QueryOp.WAIT:
            reports: list[SubtaskReport] = []
            end, size = message.after_index, 0
            while message.op is QueryOp.STATUS and end < kind.total and len(reports) < limit:
                report = kind.report(end)
                weight = 128 if report.failure is None else outcome_size(Outcome(index=0, ok=False,
                                                                                 failure=report.failure))
                if reports and size + weight > MAX_PAGE_BYTES:
                    break
                reports.append(report)
                size += weight
                end += 1
            more = message.op is QueryOp.STATUS and end < kind.total
            return TaskQueryReply(req=0, tasks=(summary,), subtasks=tuple(reports),
                                  next_index=end if more else None)
        outcomes: list[Outcome] = []
        size = 0
        index = message.after_index
        while index < kind.total and len(outcomes) < limit:
            outcome = kind.outcomes.get(index)
            index += 1
            if outcome is None:
                continue
            weight = outcome_size(outcome)
            if outcomes and size + weight > MAX_PAGE_BYTES:
                index -= 1
                break
            outcomes.append(outcome)
            size += weight
        return TaskQueryReply(req=0, tasks=(summary,), outcomes=tuple(outcomes),
                              next_index=index if index < kind.total else None)

    async def _wait(self, message: TaskQuery) -> Message:
        task_id = message.task_id
        if task_id is None:
            return TaskError(req=0, code=TaskErrorCode.BAD_SUBMISSION, message="WAIT needs a task id")
        summary = self.engine.summary(task_id)
        if summary is None and task_id not in self.engine.records:
            return self._answer(message)
        if (summary is not None and (summary.version > message.version or summary.state in TERMINAL_STATES)) \
                or self._waiters >= MAX_WAITERS or message.wait_s <= 0:
            return self._answer(message)
        self._waiters += 1
        deadline = self._ctx.now() + message.wait_s
        try:
            while (left := deadline - self._ctx.now()) > 0:
                event = self._changed.setdefault(task_id, asyncio.Event())
                try:
                    async with asyncio.timeout(left):
                        await event.wait()
                except builtins.TimeoutError:
                    break
                summary = self.engine.summary(task_id)
                if summary is None or summary.version > message.version or summary.state in TERMINAL_STATES:
                    break
        finally:
            self._waiters -= 1
        return self._answer(message)

    # ---- cancel ---------------------------------------------------------------------

    async def _on_cancel(self, link: Link, message: Message) -> None:
        assert isinstance(message, TaskCancel) and link.peer is not None
        if link.peer.channel is Channel.CONTROL and not message.relayed:
            message = dataclasses.replace(message, relayed=True)
        self._ctx.spawn(self._answer_later(link, message.req, self._cancel(message)))

    async def _cancel(self, message: TaskCancel) -> Message:
        rec = self.engine.records.get(message.task_id)
        known: TaskSummary | None = self.engine.summary(message.task_id)
        submitter = rec.submission.submitter if rec is not None else (known.submitter if known else None)
        try:
            Ed25519PublicKey.from_public_bytes(message.key).verify(
                message.signature, cancel_body(message.task_id, message.signed_at))
        except (InvalidSignature, ValueError):
            return TaskError(req=0, code=TaskErrorCode.UNAUTHORIZED, message="UNAUTHORIZED: bad cancel signature")
        if abs(time.time() - message.signed_at) > CANCEL_SKEW_S:
            return TaskError(req=0, code=TaskErrorCode.UNAUTHORIZED,
                             message="UNAUTHORIZED: the cancel was signed too long ago (check the clock)")
        if submitter is not None and message.key not in (submitter, self._authority.owner):
            return TaskError(req=0, code=TaskErrorCode.UNAUTHORIZED,
                             message=f"UNAUTHORIZED: only the task's submitter or the mesh owner may cancel it, "
                                     f"not {self._authority.describe(message.key)}")
        if rec is not None and rec.is_coordinator:
            self.engine.cancel(message.task_id, now=self._ctx.now())
            self._driver.step()
            log.info("tasks: task %s cancelled by %s", message.task_id.hex()[:12],
                     self._authority.describe(message.key))
            deadline = self._ctx.now() + RELAY_TIMEOUT_S / 2
            while not rec.cancelled and rec.state not in TERMINAL_STATES and self._ctx.now() < deadline:
                event = self._changed.setdefault(message.task_id, asyncio.Event())
                with contextlib.suppress(builtins.TimeoutError):
                    async with asyncio.timeout(deadline - self._ctx.now()):
                        await event.wait()  # until the cancel is on every replica
            return TaskCancelled(req=0, summary=rec.summary(wall_offset=self.engine.wall_offset))
        if message.relayed:
            return TaskError(req=0, code=TaskErrorCode.UNKNOWN_TASK, message="not the task's coordinator here")
        targets = ([rec.coordinator] if rec is not None else []) + self._candidates(message.task_id)
        relayed = dataclasses.replace(message, req=0, relayed=True)
        for target in dict.fromkeys(t for t in targets if t != self._ctx.node_id):
            try:
                reply = await self._relay(target, relayed, timeout=RELAY_TIMEOUT_S)
            except (StarmeshError, builtins.TimeoutError):
                continue
            if isinstance(reply, TaskError) and reply.code is TaskErrorCode.UNKNOWN_TASK:
                continue
            return reply
        return TaskError(req=0, code=TaskErrorCode.UNKNOWN_TASK,
                         message=f"no live member coordinates task {_hex(message.task_id)}")

    # ---- replies and relays ---------------------------------------------------------

    async def _answer_later(self, link: Link, req: int, answer: Coroutine[Any, Any, Message]) -> None:
        """Reply to ``req`` on ``link`` with what ``answer`` comes to (spawned: the link's
        next request is read meanwhile)."""
        await self._reply(link, req, await answer)

    async def _reply(self, link: Link, req: int, message: Message) -> None:
        reply = dataclasses.replace(message, req=req)  # type: ignore[type-var]
        if link.peer is not None and link.peer.channel is Channel.CLIENT:
            if not link.send_nowait(reply):  # never wait on a client that does not read
                link.abort(ErrorCode.LIMIT_EXCEEDED, "task client is not reading its replies")
        else:
            await link.send(reply)

    async def _relay(self, node: bytes, message: Message, *, timeout: float) -> Message:
        """Send ``message`` (with a fresh ``req``) to member ``node``; its reply."""
        if len(self._relays) >= MAX_RELAYS:
            raise TransportError(f"{MAX_RELAYS} relayed requests already in flight")
        req = next(self._relay_reqs) & 0xFFFF_FFFF
        waiter: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._relays[req] = waiter
        self.counters["relayed"] += 1
        try:
            async with asyncio.timeout(timeout):
                await self._ctx.send(node, dataclasses.replace(message, req=req),  # type: ignore[type-var]
                                     channel=Channel.CONTROL)
                return await waiter
        finally:
            self._relays.pop(req, None)

    async def _on_relay_reply(self, link: Link, message: Message) -> None:
        waiter = self._relays.pop(getattr(message, "req", -1), None)
        if waiter is not None and not waiter.done():
            waiter.set_result(message)


def _hex(task_id: bytes | None) -> str:
    return "?" if task_id is None else task_id.hex()

