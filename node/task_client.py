"""Run work on a mesh from a script: the Python API behind ``python -m node submit``.

::

    from node.task_client import MeshClient

    with MeshClient.connect("127.0.0.1:7400") as client:      # mesh key: ./data/mesh.key
        task = client.map("mymod:work", range(100), bundle="./myjob", retries=3, timeout=60,
                          resources={"cpus": 1})
        for result in task.as_completed():                       # as each subtask finishes
            print(result.index, result.value)
        values = [r.value for r in task.results()]               # all of them, in input order
        task.status(); task.cancel()
        again = client.task(task.id)                             # re-attach later, from any node
        with client.blobs() as blobs:                            # node.blob_client: move bytes
            blob_id = blobs.put("weights.bin"); blobs.replicate(blob_id, copies=2)

``AsyncMeshClient`` / ``AsyncTask`` are the same on asyncio; ``MeshClient`` runs one on a
thread of its own. A submission is signed with the person's submitter key
(``node.submitters.store.default_key_path()``, made on first use; ``key=`` another). The
client is a client of the mesh, not of one node: it learns the members' addresses when it
connects, and when its node stops answering it reconnects through another and carries on
(every request is idempotent: a task's id is the hash of what was signed).

Inputs and results are JSON-like values carried as msgpack (no pickle). A ``Result`` is ok
with a ``value`` or failed with an ``error`` (``type``, ``message``, ``traceback``,
``stdout``, ``stderr``). Execution is at-least-once (a subtask whose worker died runs again),
results exactly-once (each subtask's first recorded outcome is its result).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from node.bundles.store import pack_dir
from node.client_link import ClientLink, LinkTasks
from node.config import DEFAULT_PORT, Address, parse_address
from node.status import fetch_status
from node.submitters.keys import public_key_of
from protocol.errors import StarmeshError, TimeoutError, TransportError
from protocol.messages.tasks import (
    MAX_INPUTS_BYTES,
    TERMINAL_STATES,
    Failure,
    Outcome,
    QueryOp,
    Resources,
    Submission,
    SubtaskReport,
    TaskAccepted,
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
    encode_struct,
    inputs_digest,
    pack_value,
    signed_submission,
    unpack_value,
)
from protocol.messages.training import JobSpec
from protocol.schema import Message
from protocol.tags import MsgType

if TYPE_CHECKING:
    from node.blob_client import AsyncBlobClient, BlobClient

T = TypeVar("T")

_REPLIES = (MsgType.TASK_ACCEPTED, MsgType.TASK_ERROR, MsgType.TASK_QUERY_REPLY, MsgType.TASK_CANCELLED)
#: How long one WAIT may park at the node.
WAIT_S = 2.0


class TaskRefused(StarmeshError):
    """The mesh refused a request: ``code`` (``TaskErrorCode``) says why (``UNAUTHORIZED``,
    ``NOT_ALLOWED``, ``UNKNOWN_TASK``...)."""

    def __init__(self, code: TaskErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class Result:
    """One subtask's outcome."""

    index: int
    ok: bool
    value: Any = None
    error: dict[str, str] | None = None
    attempts: int = 1
    worker: str | None = None

    @classmethod
    def of(cls, outcome: Outcome) -> Result:
        error = None if outcome.failure is None else failure_to_json(outcome.failure)
        return cls(index=outcome.index, ok=outcome.ok, value=unpack_value(outcome.value) if outcome.ok else None,
                   error=error, attempts=outcome.attempts,
                   worker=outcome.worker.hex() if outcome.worker else None)

    def to_json(self) -> dict[str, Any]:
        """The line ``submit`` writes: ``{"index", "ok": true, "value"}`` or ``{"index",
        "ok": false, "error": {...}, "attempts"}``."""
        if self.ok:
            return {"index": self.index, "ok": True, "value": self.value}
        return {"index": self.index, "ok": False, "error": self.error, "attempts": self.attempts}


def failure_to_json(failure: Failure) -> dict[str, str]:
    out = {"type": failure.type, "message": failure.message}
    for name in ("traceback", "stdout", "stderr"):
        if getattr(failure, name):
            out[name] = getattr(failure, name)
    return out


def summary_to_json(s: TaskSummary) -> dict[str, Any]:
    return {
        "id": s.task_id.hex(), "function": s.function, "coordinator": s.coordinator.hex(),
        "state": s.state.name.lower(), "done": s.done, "total": s.total, "failed": s.failed,
        "running": s.running, "retried": s.retried, "epoch": s.epoch, "submitter": s.submitter.hex(),
        "created": s.created, "updated": s.updated, "waiting_reason": s.waiting_reason,
    }


def _task_id(value: str | bytes) -> bytes:
    if isinstance(value, bytes):
        return value
    try:
        raw = bytes.fromhex(value.strip())
    except ValueError:
        raw = b""
    if len(raw) != 16:
        raise ValueError(f"{value!r} is not a task id (32 hex digits)")
    return raw


def _resources(value: Resources | dict[str, Any] | None) -> Resources:
    if value is None or isinstance(value, Resources):
        return value or Resources()
    unknown = set(value) - {"cpus", "gpus", "memory_mb"}
    if unknown:
        raise ValueError(f"unknown resources {sorted(unknown)}: expected cpus, gpus, memory_mb")
    return Resources(cpus=float(value.get("cpus", 1.0)), gpus=int(value.get("gpus", 0)),
                     memory_mb=int(value.get("memory_mb", 0)))


def _list_query(after: bytes | None, req: int) -> TaskQuery:
    return TaskQuery(req=req, op=QueryOp.LIST, after=after)


class AsyncMeshClient:
    """A client of the mesh (module docstring). Build it with ``await AsyncMeshClient.connect``."""

    def __init__(self, addresses: list[Address], *, mesh_secret: bytes, key: Ed25519PrivateKey | None,
                 timeout: float) -> None:
        self.addresses = addresses
        self._secret = mesh_secret
        self.key = key
        self.timeout = timeout
        self._link: ClientLink | None = None
        self._link_tasks = LinkTasks()
        self._lock = asyncio.Lock()

    @classmethod
    async def connect(cls, address: Address | str, *, mesh_secret: bytes, key: Ed25519PrivateKey | None = None,
                      timeout: float = 10.0) -> AsyncMeshClient:
        """Connect to the node at ``address`` and learn the other members' addresses.
        ``TransportError`` / ``TimeoutError`` / ``RemoteProtocolError`` (refused)."""
        first = parse_address(address, what="address", default_port=DEFAULT_PORT) \
            if isinstance(address, str) else address
        client = cls([first], mesh_secret=mesh_secret, key=key, timeout=timeout)
        await client._dial(first)
        await client.learn_members()
        return client

    async def learn_members(self) -> None:
        """Refresh the addresses to fall back on from the node we talk to."""
        try:
            status = await fetch_status(self.addresses[0], mesh_secret=self._secret, timeout=self.timeout)
        except StarmeshError:
            return
        known = {str(a) for a in self.addresses}
        for m in status.members:
            if m.status.name in ("ALIVE", "SUSPECT") and m.address not in known:
                try:
                    self.addresses.append(parse_address(m.address, what="member", default_port=DEFAULT_PORT))
                except StarmeshError:
                    continue
                known.add(m.address)
        del self.addresses[64:]

    async def _dial(self, address: Address) -> ClientLink:
        link = await ClientLink.connect(address, mesh_secret=self._secret, spawn=self._link_tasks.spawn, replies=_REPLIES,
                                        timeout=self.timeout)
        if self._link is not None:
            self._link.close()
        self._link = link
        if address in self.addresses:  # talk to it first from now on
            self.addresses.remove(address)
        self.addresses.insert(0, address)
        return link

    async def request(self, make: Callable[[int], Message], *, timeout: float | None = None) -> Message:
        """One request and its reply, through the first member that answers. A ``TaskError``
        reply raises ``TaskRefused`` (``UNAVAILABLE`` ones are retried on another member)."""
        errors: list[str] = []
        for attempt, address in enumerate(list(self.addresses)[:8]):
            try:
                async with self._lock:
                    link = self._link
                    if link is None or not link.is_open or attempt > 0:
                        link = await self._dial(address)
                reply = await link.request(make, timeout=timeout or self.timeout)
            except (TransportError, TimeoutError) as exc:
                errors.append(f"{address}: {exc}")
                continue
            if isinstance(reply, TaskError):
                if reply.code is TaskErrorCode.UNAVAILABLE and attempt + 1 < len(self.addresses):
                    errors.append(f"{address}: {reply.message}")
                    continue
                raise TaskRefused(reply.code, reply.message)
            return reply
        raise TransportError("no member answered: " + "; ".join(errors[-3:]))

    async def map(self, function: str, inputs: Iterable[Any], *, bundle: str | Path | None = None,
                  retries: int = 3, timeout: float = 600.0, resources: Resources | dict[str, Any] | None = None,
                  batch: int = 0) -> AsyncTask:
        """Run ``function`` (``module:name``) once per input; the task, running."""
        if self.key is None:
            raise TaskRefused(TaskErrorCode.UNAUTHORIZED, "no submitter key: pass key=")
        return await self.submit("map", function, tuple(pack_value(x) for x in inputs), bundle=bundle,
                                 retries=retries, timeout=timeout, resources=resources, batch=batch)

    async def train(self, spec: JobSpec, *, function: str = "node.training.runner.charlm:make_job",
                    bundle: str | Path | None = None, retries: int = 3, timeout: float = 3600.0,
                    resources: Resources | dict[str, Any] | None = None) -> AsyncTask:
        """Submit a training job (``protocol.messages.training.JobSpec``; ``function`` builds
        the ``node.training.runner.job.Job`` on every worker); the task, running. ``timeout``:
        seconds one segment may take; ``retries``: failed segments in a row before it fails."""
        return await self.submit("train", function, (encode_struct(spec),), bundle=bundle, retries=retries,
                                 timeout=timeout, resources=resources)

    async def submit(self, kind: str, function: str, packed: tuple[bytes, ...], *,
                     bundle: str | Path | None = None, retries: int = 3, timeout: float = 600.0,
                     resources: Resources | dict[str, Any] | None = None, batch: int = 0) -> AsyncTask:
        """Sign and submit a task of ``kind`` with these encoded inputs; the task, running."""
        if self.key is None:
            raise TaskRefused(TaskErrorCode.UNAUTHORIZED, "no submitter key: pass key=")
        if sum(map(len, packed)) > MAX_INPUTS_BYTES:
            raise TaskRefused(TaskErrorCode.TOO_LARGE, f"inputs take {sum(map(len, packed))} bytes encoded: "
                              f"at most {MAX_INPUTS_BYTES} per task (split the work into several tasks)")
        data, digest = (b"", None) if bundle is None else pack_dir(Path(bundle).expanduser())
        submission = Submission(kind=kind, function=function, bundle=digest, inputs_digest=inputs_digest(packed),
                                count=len(packed), retries=retries, timeout_s=float(timeout),
                                resources=_resources(resources), batch=batch,
                                submitter=public_key_of(self.key), created=time.time(), nonce=os.urandom(16))
        body = encode_struct(submission)
        seed = TaskSeed(body=body, signature=self.key.sign(signed_submission(body)), inputs=packed, bundle=data)
        reply = await self.request(lambda req: TaskSubmit(req=req, seed=seed), timeout=max(self.timeout, 30.0))
        if not isinstance(reply, TaskAccepted):
            raise TransportError(f"unexpected reply {type(reply).__name__} to a submission")
        return AsyncTask(self, reply.task_id, coordinator=reply.coordinator)

    def task(self, task_id: str | bytes) -> AsyncTask:
        """Re-attach to a task by id."""
        return AsyncTask(self, _task_id(task_id))

    async def tasks(self) -> list[TaskSummary]:
        """Every task the node we talk to knows (its own, those it replicates, those announced)."""
        out: list[TaskSummary] = []
        after: bytes | None = None
        while True:
            reply = await self.request(functools.partial(_list_query, after))
            assert isinstance(reply, TaskQueryReply)
            out.extend(reply.tasks)
            if reply.next_after is None or len(out) > 100_000:
                return out
            after = reply.next_after

    async def blobs(self) -> AsyncBlobClient:
        """A blob client (``node.blob_client``) of the node this client talks to; close it when done."""
        from node.blob_client import AsyncBlobClient

        return await AsyncBlobClient.connect(self.addresses[0], mesh_secret=self._secret,
                                             timeout=max(self.timeout, 30.0))

    async def close(self) -> None:
        if self._link is not None:
            self._link.close()
        await self._link_tasks.aclose()

    async def __aenter__(self) -> AsyncMeshClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncTask:
    """A task on the mesh, by id (``AsyncMeshClient.map`` / ``.task``)."""

    def __init__(self, client: AsyncMeshClient, task_id: bytes, *, coordinator: bytes | None = None) -> None:
        self.client = client
        self.task_id = task_id
        self.coordinator = coordinator

    @property
    def id(self) -> str:
        return self.task_id.hex()

    async def _query(self, op: QueryOp, **fields: Any) -> TaskQueryReply:
        reply = await self.client.request(lambda req: TaskQuery(req=req, op=op, task_id=self.task_id, **fields),
                                          timeout=fields.get("wait_s", 0.0) + self.client.timeout)
        assert isinstance(reply, TaskQueryReply)
        return reply

    async def status(self) -> TaskSummary:
        reply = await self._query(QueryOp.STATUS, limit=1)
        return reply.tasks[0]

    async def subtasks(self) -> list[SubtaskReport]:
        """Every subtask's state, attempts, worker and last failure."""
        out: list[SubtaskReport] = []
        index = 0
        while True:
            reply = await self._query(QueryOp.STATUS, after_index=index, limit=4096)
            out.extend(reply.subtasks)
            if reply.next_index is None:
                return out
            index = reply.next_index

    async def wait(self, *, on_progress: Callable[[TaskSummary], None] | None = None,
                   timeout: float | None = None) -> TaskSummary:
        """Until the task ends (``TimeoutError`` after ``timeout``); ``on_progress`` sees each change."""
        deadline = None if timeout is None else time.monotonic() + timeout
        version = 0
        while True:
            wait_s = WAIT_S if deadline is None else max(0.0, min(WAIT_S, deadline - time.monotonic()))
            reply = await self._query(QueryOp.WAIT, version=version, wait_s=wait_s, limit=1)
            summary = reply.tasks[0]
            self.coordinator = summary.coordinator
            if summary.version != version and on_progress is not None:
                on_progress(summary)
            version = summary.version
            if summary.state in TERMINAL_STATES:
                return summary
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"task {self.id} still {summary.state.name.lower()} after {timeout}s")

    async def outcomes(self, start: int = 0) -> tuple[list[Outcome], TaskSummary]:
        """The outcomes recorded so far from index ``start`` on (raw), and the summary."""
        return await self._outcomes(start)

    async def _outcomes(self, start: int = 0) -> tuple[list[Outcome], TaskSummary]:
        out: list[Outcome] = []
        index = start
        while True:
            reply = await self._query(QueryOp.RESULTS, after_index=index, limit=4096)
            out.extend(reply.outcomes)
            if reply.next_index is None or not reply.outcomes:
                return out, reply.tasks[0]
            index = reply.next_index

    async def results(self, *, on_progress: Callable[[TaskSummary], None] | None = None,
                      timeout: float | None = None) -> list[Result]:
        """Every subtask's result, in input order, once the task has ended."""
        await self.wait(on_progress=on_progress, timeout=timeout)
        outcomes, summary = await self._outcomes()
        if len(outcomes) != summary.total:
            raise TransportError(f"task {self.id}: {len(outcomes)} results of {summary.total} came back")
        return [Result.of(o) for o in sorted(outcomes, key=lambda o: o.index)]

    async def as_completed(self) -> AsyncIterator[Result]:
        """Each subtask's result as it is recorded (in no particular order)."""
        seen: set[int] = set()
        version = 0
        while True:
            outcomes, summary = await self._outcomes()
            for o in outcomes:
                if o.index not in seen:
                    seen.add(o.index)
                    yield Result.of(o)
            if summary.state in TERMINAL_STATES and len(seen) >= summary.total:
                return
            reply = await self._query(QueryOp.WAIT, version=max(version, summary.version), wait_s=WAIT_S, limit=1)
            version = reply.tasks[0].version

    async def cancel(self) -> TaskSummary:
        key = self.client.key
        if key is None:
            raise TaskRefused(TaskErrorCode.UNAUTHORIZED, "no submitter key: pass key=")
        now = time.time()
        signature = key.sign(cancel_body(self.task_id, now))
        reply = await self.client.request(lambda req: TaskCancel(
            req=req, task_id=self.task_id, key=public_key_of(key), signed_at=now, signature=signature))
        assert isinstance(reply, TaskCancelled)
        return reply.summary


class _LoopThread:
    """An event loop on a thread of its own, for the sync API."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="starmesh-client", daemon=True)
        self._thread.start()

    def run(self, coro: Awaitable[T]) -> T:
        async def wrapped() -> T:
            return await coro

        future: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(wrapped(), self.loop)
        return future.result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5.0)
        self.loop.close()


class MeshClient:
    """``AsyncMeshClient`` for plain scripts: the same methods, blocking."""

    def __init__(self, runner: _LoopThread, inner: AsyncMeshClient) -> None:
        self._runner = runner
        self.inner = inner

    @classmethod
    def connect(cls, address: Address | str = f"127.0.0.1:{DEFAULT_PORT}", *, mesh_secret: bytes | None = None,
                mesh_key_file: str | Path | None = None, key: Ed25519PrivateKey | None = None,
                key_file: str | Path | None = None, timeout: float = 10.0) -> MeshClient:
        """Connect to a node. The mesh secret comes from ``mesh_secret``, else ``mesh_key_file``
        (default ``./data/mesh.key``); the submitter key from ``key``, else ``key_file``, else
        the default path (made on first use)."""
        from node.identity import load_mesh_key
        from node.submitters.store import default_key_path, load_or_create_submitter_key

        secret = mesh_secret if mesh_secret is not None else load_mesh_key(
            Path(mesh_key_file) if mesh_key_file is not None else Path("data") / "mesh.key")
        if key is None:
            key = load_or_create_submitter_key(Path(key_file) if key_file is not None else default_key_path())
        runner = _LoopThread()
        try:
            inner = runner.run(AsyncMeshClient.connect(address, mesh_secret=secret, key=key, timeout=timeout))
        except BaseException:
            runner.close()
            raise
        return cls(runner, inner)

    def map(self, function: str, inputs: Iterable[Any], **options: Any) -> Task:
        return Task(self, self._runner.run(self.inner.map(function, list(inputs), **options)))

    def task(self, task_id: str | bytes) -> Task:
        return Task(self, self.inner.task(task_id))

    def tasks(self) -> list[TaskSummary]:
        return self._runner.run(self.inner.tasks())

    def blobs(self) -> BlobClient:
        """``AsyncMeshClient.blobs``, blocking: put, get, replicate... on the node this client talks to."""
        from node.blob_client import BlobClient

        return BlobClient(self._runner, self._runner.run(self.inner.blobs()), owns_runner=False)

    def run(self, coro: Awaitable[T]) -> T:
        return self._runner.run(coro)

    def close(self) -> None:
        try:
            self._runner.run(self.inner.close())
        finally:
            self._runner.close()

    def __enter__(self) -> MeshClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class Task:
    """``AsyncTask``, blocking."""

    def __init__(self, client: MeshClient, inner: AsyncTask) -> None:
        self._client = client
        self.inner = inner

    @property
    def id(self) -> str:
        return self.inner.id

    def status(self) -> TaskSummary:
        return self._client.run(self.inner.status())

    def subtasks(self) -> list[SubtaskReport]:
        return self._client.run(self.inner.subtasks())

    def wait(self, *, timeout: float | None = None) -> TaskSummary:
        return self._client.run(self.inner.wait(timeout=timeout))

    def results(self, *, timeout: float | None = None) -> list[Result]:
        return self._client.run(self.inner.results(timeout=timeout))

    def cancel(self) -> TaskSummary:
        return self._client.run(self.inner.cancel())

    def as_completed(self) -> Iterator[Result]:
        iterator = self.inner.as_completed()
        while True:
            try:
                yield self._client.run(iterator.__anext__())
            except StopAsyncIteration:
                return
