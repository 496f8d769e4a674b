"""Worker processes that run subtasks, never in the node's process (``ProcessPool``).

Theory of operation:

* **Slots.** The node offers ``slots`` CPUs. An attempt takes ``resources.cpus`` of them
  (clamped to ``slots``: a request larger than the node runs alone) for as long as it runs;
  attempts that do not fit wait in FIFO order, so a large one is not starved by small ones.
* **Processes.** A worker process (``node.tasks.task_worker``) serves one key, ``(bundle
  path, resources)``: its ``sys.path``, memory limit and thread count are fixed at start.
  An attempt takes a warm process of its key or starts one; a process that finished a run
  cleanly goes back to the warm pool, where it waits ``idle_s`` at most, and at most
  ``max_idle_processes`` wait at once (the longest idle is retired first). Processes are
  started from the event loop's thread (``PR_SET_PDEATHSIG`` is tied to the forking thread),
  their stdout and stderr drained continuously into bounded tails.
* **Faults are outcomes.** Nothing a subtask does raises out of ``run``. Per item: past
  ``timeout_s`` the process is killed and the item fails ``Timeout``; a process that exits or
  dies by a signal fails the item it was running ``WorkerCrashed`` (exit code or signal, and
  the output tails); a malformed reply fails it ``BadResult`` and the process is killed. In
  each case the items after it run again on a fresh process. ``cancel`` kills an attempt's
  process and fails what is left ``Cancelled``; so does ``close``.
* **Never outliving the node.** Each child sets ``PR_SET_PDEATHSIG`` and exits when its
  request pipe reaches EOF, so even a ``kill -9`` of the node takes its workers with it.
  ``close`` kills and reaps every child.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import math
import os
import sys
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from node.tasks import worker_frames as frames
from node.tasks.worker_frames import PipeError
from node.tasks.worker_pipe import Done, failed, parse_reply
from protocol.messages.tasks import MAX_OUTPUT_TAIL_CHARS, Outcome, Resources

#: The smallest share of a slot an attempt takes (``cpus=0`` still counts, so the number of
#: processes stays bounded).
MIN_CPUS = 0.01
#: How long to wait for a dead process's output pipes to close (a grandchild may hold them).
DRAIN_GRACE_S = 1.0
#: How long a process that closed its reply pipe may take to exit before it is killed.
EXIT_GRACE_S = 1.0
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
_EPS = 1e-9
#: The directory holding the ``node`` package: a worker imports it from there.
_PROJECT_ROOT = str(Path(__file__).resolve().parents[1])

Key = tuple[str | None, Resources]


class _Tail:
    """The last bytes of a stream, as text of at most ``MAX_OUTPUT_TAIL_CHARS``; bytes before
    the ``floor`` offset (the output of runs already finished) are left out."""

    def __init__(self, limit: int = MAX_OUTPUT_TAIL_CHARS * 4) -> None:
        self._limit = limit
        self._parts: deque[bytes] = deque()
        self._size = 0
        self._end = 0
        self._floor = 0

    def add(self, data: bytes) -> None:
        self._parts.append(data)
        self._size += len(data)
        self._end += len(data)
        while self._size - len(self._parts[0]) >= self._limit:
            self._size -= len(self._parts.popleft())

    def floor(self, offset: int) -> None:
        self._floor = max(self._floor, offset)

    def text(self) -> str:
        data = b"".join(self._parts)
        start = self._end - len(data)
        data = data[max(0, self._floor - start):][-self._limit:]
        return data.decode("utf-8", "replace")[-MAX_OUTPUT_TAIL_CHARS:]


class _WritePipe(asyncio.Protocol):
    """The request pipe's protocol: nothing to receive; writes are buffered by the transport."""


def worker_env(threads: int) -> dict[str, str]:
    """The environment of a child that runs project code: ``threads`` BLAS/OpenMP threads and
    the project on its path."""
    env = dict(os.environ)
    for name in THREAD_ENV:
        env[name] = str(threads)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = _PROJECT_ROOT + (os.pathsep + path if path else "")
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # the bundle cache stays as unpacked
    return env


async def spawn_piped(command: Callable[[int, int], list[str]], *, env: dict[str, str], cwd: str | Path | None,
                      stdout: int) -> tuple[asyncio.subprocess.Process, asyncio.StreamReader,
                                            asyncio.WriteTransport, asyncio.ReadTransport]:
    """Start ``command(request_fd, reply_fd)`` with a request pipe (ours: write) and a reply pipe
    (ours: read, frames of at most ``MAX_PIPE_FRAME``), stderr piped; the process, the reply
    reader, the request transport and the reply transport."""
    loop = asyncio.get_running_loop()
    req_r, req_w = os.pipe()
    rep_r, rep_w = os.pipe()
    try:
        proc = await asyncio.create_subprocess_exec(
            *command(req_r, rep_w), stdin=asyncio.subprocess.DEVNULL, stdout=stdout,
            stderr=asyncio.subprocess.PIPE, pass_fds=(req_r, rep_w), env=env, cwd=cwd)
    except BaseException:
        for fd in (req_w, rep_r):
            os.close(fd)
        raise
    finally:
        os.close(req_r)
        os.close(rep_w)
    replies = asyncio.StreamReader(limit=frames.MAX_PIPE_FRAME + 64)
    reply_transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(replies), os.fdopen(rep_r, "rb", buffering=0))
    requests, _ = await loop.connect_write_pipe(_WritePipe, os.fdopen(req_w, "wb", buffering=0))
    return proc, replies, requests, reply_transport


@dataclass(eq=False)
class _Worker:
    key: Key
    proc: asyncio.subprocess.Process
    replies: asyncio.StreamReader
    requests: asyncio.WriteTransport
    reply_transport: asyncio.ReadTransport
    out: _Tail = field(default_factory=_Tail)
    err: _Tail = field(default_factory=_Tail)
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once the process has exited and its output is drained."""
    idle_since: float = 0.0
    idle_timer: asyncio.TimerHandle | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()

    def tails(self) -> dict[str, str]:
        return {"stdout": self.out.text(), "stderr": self.err.text()}


@dataclass(eq=False)
class _Attempt:
    attempt: int
    cancelled: bool = False
    waiter: asyncio.Future[bool] | None = None
    worker: _Worker | None = None


class _Slots:
    """CPU slots, granted in FIFO order; a request of the whole node runs alone."""

    def __init__(self, total: float) -> None:
        self.total = total
        self.used = 0.0
        self.holders = 0
        self._waiters: deque[tuple[float, asyncio.Future[bool]]] = deque()

    def _fits(self, need: float) -> bool:
        return self.holders == 0 or self.used + need <= self.total + _EPS

    async def acquire(self, need: float, attempt: _Attempt) -> bool:
        """True once granted; False if the attempt was cancelled (or the pool closed) first."""
        if not self._waiters and self._fits(need):
            self._grant(need)
            return True
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiters.append((need, fut))
        attempt.waiter = fut
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.result():
                self.release(need)
            raise
        finally:
            attempt.waiter = None

    def _grant(self, need: float) -> None:
        self.used += need
        self.holders += 1

    def release(self, need: float) -> None:
        self.used = max(0.0, self.used - need)
        self.holders -= 1
        if self.holders == 0:
            self.used = 0.0
        self._wake()

    def refuse(self, fut: asyncio.Future[bool]) -> None:
        if not fut.done():
            fut.set_result(False)
        self._wake()

    def refuse_all(self) -> None:
        for _, fut in self._waiters:
            if not fut.done():
                fut.set_result(False)
        self._waiters.clear()

    def _wake(self) -> None:
        while self._waiters:
            need, fut = self._waiters[0]
            if fut.done():
                self._waiters.popleft()
                continue
            if not self._fits(need):
                return
            self._waiters.popleft()
            self._grant(need)
            fut.set_result(True)


class _Gone(Exception):
    """The reply pipe reached EOF: the process exited or closed it."""


class ProcessPool:
    """Runs attempts' items in worker processes (the module docstring has the rules)."""

    def __init__(
        self,
        *,
        slots: float,
        allow_modules: tuple[str, ...] = ("node.tasks.builtins",),
        idle_s: float = 60.0,
        max_idle_processes: int = 8,
        python: str = sys.executable,
    ) -> None:
        if not slots > 0:
            raise ValueError(f"slots must be > 0, got {slots}")
        self.slots = float(slots)
        self.allow_modules = tuple(allow_modules)
        self.idle_s = idle_s
        self.max_idle_processes = max_idle_processes
        self.python = python
        self._slots = _Slots(self.slots)
        self._attempts: dict[int, _Attempt] = {}
        self._running = 0
        self._warm: dict[Key, list[_Worker]] = {}
        self._live: set[_Worker] = set()
        self._supervisors: set[asyncio.Task[None]] = set()
        self._closed = False
        self._started = 0
        self._failures = 0

    # ---- the interface

    async def run(
        self,
        *,
        attempt: int,
        function: str,
        bundle_path: Path | None,
        items: Sequence[tuple[int, bytes]],
        timeout_s: float,
        resources: Resources,
        on_outcome: Callable[[Outcome], None] | None = None,
    ) -> list[Outcome]:
        """One outcome per item, in ``items``' order; ``on_outcome`` is called as each arrives.
        Never raises for a subtask's fault (``ValueError`` if ``attempt`` is already running)."""
        if attempt in self._attempts:
            raise ValueError(f"attempt {attempt} is already running")
        att = _Attempt(attempt)
        self._attempts[attempt] = att
        results: dict[int, Outcome] = {}

        def emit(outcome: Outcome) -> None:
            results[outcome.index] = outcome
            if not outcome.ok:
                self._failures += 1
            if on_outcome is not None:
                on_outcome(outcome)

        key: Key = (None if bundle_path is None else str(bundle_path), resources)
        need = min(max(resources.cpus, MIN_CPUS), self.slots)
        try:
            granted = not self._closed and await self._slots.acquire(need, att)
            if granted:
                self._running += 1
            try:
                pending = list(items)
                while pending:
                    if att.cancelled or self._closed or not granted:
                        for index, _ in pending:
                            emit(failed(index, "Cancelled", "the attempt was cancelled"))
                        break
                    pending = await self._run_some(att, key, function, pending, timeout_s, emit)
            finally:
                if granted:
                    self._running -= 1
                    self._slots.release(need)
        finally:
            del self._attempts[attempt]
        return [results[index] for index, _ in items]

    def cancel(self, attempt: int) -> None:
        """Stop ``attempt``: kill its process; its remaining items fail ``Cancelled``."""
        att = self._attempts.get(attempt)
        if att is None:
            return
        att.cancelled = True
        if att.waiter is not None:
            self._slots.refuse(att.waiter)
        if att.worker is not None:
            att.worker.kill()

    async def close(self) -> None:
        """Kill every worker process and wait for them (no zombies); later runs are cancelled."""
        self._closed = True
        self._slots.refuse_all()
        for workers in self._warm.values():
            for w in workers:
                if w.idle_timer is not None:
                    w.idle_timer.cancel()
        self._warm.clear()
        for w in list(self._live):
            w.kill()
        while self._supervisors:
            await asyncio.gather(*list(self._supervisors), return_exceptions=True)

    def stats(self) -> dict[str, float]:
        return {
            "processes_started_total": float(self._started),
            "processes_live": float(len(self._live)),
            "processes_warm": float(sum(len(ws) for ws in self._warm.values())),
            "attempts_running": float(self._running),
            "subtask_failures_total": float(self._failures),
        }

    # ---- one process's share of an attempt

    async def _run_some(
        self,
        att: _Attempt,
        key: Key,
        function: str,
        pending: list[tuple[int, bytes]],
        timeout_s: float,
        emit: Callable[[Outcome], None],
    ) -> list[tuple[int, bytes]]:
        """Run ``pending`` on one process until done or it fails; the items left to rerun."""
        w = self._take(key)
        if w is None:
            try:
                w = await self._start(key)
            except (OSError, ValueError) as exc:
                for index, _ in pending:
                    emit(failed(index, "WorkerCrashed", f"could not start a worker process: {exc}"))
                return []
        att.worker = w
        clean = False
        try:
            if att.cancelled or self._closed:
                clean = True
                return pending
            position = 0
            for group in frames.split_items(pending):
                w.requests.write(frames.encode_frame(frames.run_request(
                    attempt=att.attempt, function=function, path=key[0], items=group)))
                for index, _ in group:
                    position += 1
                    outcome, gone = await self._outcome(w, att, index, timeout_s)
                    if outcome is not None:
                        emit(outcome)
                    if not gone:
                        continue
                    if att.cancelled or self._closed:
                        for later, _ in pending[position:]:
                            emit(failed(later, "Cancelled", "the attempt was cancelled"))
                        return []
                    return pending[position:]
                _end, gone = await self._outcome(w, att, None, timeout_s)
                if gone:  # the process failed after its last item: nothing of this group to rerun
                    return pending[position:]
            clean = True
            return []
        finally:
            att.worker = None
            if clean:
                self._give_back(w)
            else:
                w.kill()

    async def _outcome(self, w: _Worker, att: _Attempt, index: int | None,
                       timeout_s: float) -> tuple[Outcome | None, bool]:
        """``(outcome, gone)`` of the next reply: the outcome of item ``index``, or, when
        ``index`` is None, the end marker (no outcome). A dead, late or garbled process is
        ``gone`` (and dead by then), with a failed outcome of ``index`` when there is one."""
        try:
            async with asyncio.timeout(timeout_s):
                header = await w.replies.readexactly(frames.HEADER_BYTES)
                body = await w.replies.readexactly(frames.frame_length(header))
            reply = parse_reply(frames.decode_body(body), attempt=att.attempt, index=index)
        except asyncio.IncompleteReadError:
            await self._reap(w)
            if att.cancelled or self._closed:
                return _failed(index, "Cancelled", "the attempt was cancelled", w), True
            what = f"subtask {index}" if index is not None else "its last subtask"
            return _failed(index, "WorkerCrashed",
                           f"the worker process died ({frames.describe_exit(w.proc.returncode)}) "
                           f"after {what} started", w), True
        except builtins.TimeoutError:
            w.kill()
            await self._reap(w)
            return _failed(index, "Timeout",
                           f"subtask {index} ran past its timeout of {timeout_s:g} s", w), True
        except PipeError as exc:
            w.kill()
            await self._reap(w)
            return _failed(index, "BadResult",
                           f"the worker process sent a malformed reply: {exc}", w), True
        if isinstance(reply, Done):
            w.out.floor(reply.out)
            w.err.floor(reply.err)
            return None, False
        return reply, False

    async def _reap(self, w: _Worker) -> None:
        """Wait for ``w`` to exit and its output to drain (killing it if it lingers)."""
        try:
            async with asyncio.timeout(EXIT_GRACE_S + DRAIN_GRACE_S):
                await w.finished.wait()
                return
        except builtins.TimeoutError:
            w.kill()
        await w.finished.wait()

    # ---- processes

    def _take(self, key: Key) -> _Worker | None:
        workers = self._warm.get(key)
        while workers:
            w = workers.pop()
            if not workers:
                del self._warm[key]
            if w.idle_timer is not None:
                w.idle_timer.cancel()
                w.idle_timer = None
            if w.proc.returncode is None and not w.finished.is_set():
                return w
            workers = self._warm.get(key)
        return None

    def _give_back(self, w: _Worker) -> None:
        if self._closed or w.proc.returncode is not None or self.max_idle_processes <= 0:
            w.kill()
            return
        loop = asyncio.get_running_loop()
        w.idle_since = loop.time()
        w.idle_timer = loop.call_later(self.idle_s, self._retire, w)
        self._warm.setdefault(w.key, []).append(w)
        while sum(len(ws) for ws in self._warm.values()) > self.max_idle_processes:
            oldest = min((x for ws in self._warm.values() for x in ws), key=lambda x: x.idle_since)
            self._retire(oldest)

    def _retire(self, w: _Worker) -> None:
        workers = self._warm.get(w.key, [])
        if w in workers:
            workers.remove(w)
            if not workers:
                del self._warm[w.key]
        if w.idle_timer is not None:
            w.idle_timer.cancel()
            w.idle_timer = None
        w.kill()

    def _command(self, key: Key, request_fd: int, reply_fd: int) -> list[str]:
        resources = key[1]
        cmd = [self.python, "-P", "-m", "node.tasks.task_worker",
               "--request-fd", str(request_fd), "--reply-fd", str(reply_fd),
               "--parent-pid", str(os.getpid()), "--memory-mb", str(resources.memory_mb)]
        for pattern in self.allow_modules:
            cmd += ["--allow", pattern]
        return cmd

    async def _start(self, key: Key) -> _Worker:
        proc, replies, requests, reply_transport = await spawn_piped(
            lambda req_r, rep_w: self._command(key, req_r, rep_w),
            env=worker_env(max(1, math.ceil(key[1].cpus))), cwd=key[0], stdout=asyncio.subprocess.PIPE)
        self._started += 1
        w = _Worker(key=key, proc=proc, replies=replies, requests=requests,
                    reply_transport=reply_transport)
        self._live.add(w)
        task = asyncio.get_running_loop().create_task(self._supervise(w), name=f"worker-{proc.pid}")
        self._supervisors.add(task)
        task.add_done_callback(self._supervisors.discard)
        if self._closed:
            w.kill()
        return w

    async def _supervise(self, w: _Worker) -> None:
        """Drain ``w``'s output until it exits; then retire it for good."""
        assert w.proc.stdout is not None and w.proc.stderr is not None
        drains = [asyncio.get_running_loop().create_task(_drain(s, t))
                  for s, t in ((w.proc.stdout, w.out), (w.proc.stderr, w.err))]
        try:
            await w.proc.wait()
            _, late = await asyncio.wait(drains, timeout=DRAIN_GRACE_S)
            for task in late:
                task.cancel()
            await asyncio.gather(*drains, return_exceptions=True)
        finally:
            for task in drains:
                task.cancel()
            self._live.discard(w)
            if w.idle_timer is not None:
                w.idle_timer.cancel()
            workers = self._warm.get(w.key)
            if workers is not None and w in workers:
                workers.remove(w)
                if not workers:
                    del self._warm[w.key]
            w.requests.close()
            w.reply_transport.close()
            w.finished.set()


def _failed(index: int | None, type_: str, message: str, w: _Worker) -> Outcome | None:
    return None if index is None else failed(index, type_, message, **w.tails())


async def _drain(stream: asyncio.StreamReader, tail: _Tail) -> None:
    while chunk := await stream.read(65536):
        tail.add(chunk)
