"""The node's part in training jobs: it runs the seats the jobs' coordinators give it.

A seat (``protocol.messages.training.Seat``) is an attempt of a ``"train"`` task; the task
service hands it here (``TaskService.runners["train"]``) instead of to the map process pool.
Each job this node works for gets one long-lived *training process*
(``node.training.train_worker``), started at the job's first seat and kept between segments so
the model and optimizer stay in memory; a CUDA error, an OOM or a crash there fails the seat,
never the node. The frames between them are ``node.training.seat_frames``.

Per seat this service

1. fetches the seat's state blob through the blob cache (from the last group, ``holders``)
   unless the process already holds that state, and passes the process its path;
2. answers the process's requests: an *exchange* is an all-reduce of the shared-memory buffer
   in place over the seat's committed group (``Seat.group``, never "every live member") with
   the round key ``job:epoch:plan:step`` and at least ``workers_min`` contributors; a *put*
   adds a file from the job's work dir to the blob store (checkpoints and the final model
   pinned, with leased copies on other members); *progress* rides on the task's heartbeats;
3. turns the process's report (or failure, or death, or the seat's timeout) into the
   attempt's outcome.

Bounds: at most ``MAX_JOBS`` training processes; one idle for ``IDLE_S`` exits; every frame
from a process is checked (``seat_frames.parse_from_process``), and one that is off kills it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
import secrets
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from discovery.events import MemberEvent
from node.context import Handlers, NodeContext
from node.core import Stats
from node.process_pool import spawn_piped, worker_env
from node.tasks.worker_frames import (
    PipeError,
    decode_body,
    describe_exit,
    encode_frame,
    frame_length,
)
from node.tasks.worker_pipe import failure
from node.training import elastic
from node.training import seat_frames as sf
from protocol.errors import StarmeshError
from protocol.messages.tasks import Outcome, TaskAssign, decode_struct, encode_struct
from protocol.messages.training import JobSpec, Seat, SeatProgress, SeatReport

log = logging.getLogger("starmesh.training")

#: Training processes (jobs) one node runs at once.
MAX_JOBS = 4
#: A training process with no seat for this long exits.
IDLE_S = 120.0
#: Seconds a process gets to open its job (import torch, build the model).
OPEN_TIMEOUT_S = 180.0
#: DiLoCo rounds wait this long for the group's AR_BEGIN: workers reach the outer step after
#: their inner steps, at different times when their shares or speeds differ (a dead one is
#: dropped at once by the membership all the same).
DILOCO_JOIN_S = 300.0
#: Seconds a listener waits for another member to begin a round before it gives up.
LISTEN_S = 900.0
#: Seconds a listener that has heard every round waits for its state before its seat fails
#: (the segment then closes with the others' reports instead of waiting for good).
STATE_WAIT_S = 600.0
#: Seconds a leaving node waits for its rounds in flight to finish.
LEAVE_ROUND_S = 10.0
#: Bytes of a process's stderr kept for failure reports.
TAIL_BYTES = 16384


class Tasks(Protocol):
    """What this service needs of the task service."""

    def set_progress(self, task_id: bytes, data: bytes) -> None: ...


class AllReduce(Protocol):
    """What this service needs of the all-reduce service."""

    @property
    def sent_bytes(self) -> int: ...

    async def all_reduce(self, tensor: Any, *, group: Sequence[bytes], codec: str, key: str,
                         in_place: bool, min_contributors: int, join_timeout: float | None = None,
                         weights: Mapping[bytes, float] | None = None) -> Any: ...

    async def begun_elsewhere(self, *, group: Sequence[bytes], key: str, timeout: float) -> bool: ...


class Blobs(Protocol):
    """What this service needs of the blob service."""

    async def get(self, blob_id: bytes, *, holders: tuple[bytes, ...] = ()) -> Path: ...

    async def put(self, data: Path, *, pin: bool = True) -> bytes: ...

    async def replicate(self, blob_id: bytes, *, copies: int = 2) -> list[bytes]: ...

    def release(self, blob_id: bytes) -> None: ...

    def unpin(self, blob_id: bytes) -> None: ...


class SeatFailed(StarmeshError):
    """A seat could not run or finish (the attempt's failure)."""

    def __init__(self, type_: str, message: str) -> None:
        super().__init__(message)
        self.type = type_


def round_key(seat: Seat, step: int) -> str:
    """The all-reduce round key of ``step`` of ``seat``: every member of the group derives it
    alike, and a retried or replanned segment never meets a stale try's rounds."""
    return f"train:{seat.job.hex()}:{seat.epoch}:{seat.plan}:{step}"


def is_listener(seat: Seat) -> bool:
    """A newcomer's seat: no share of the batch; it fetches the state while the segment runs."""
    return elastic.group_shares(seat.shares, len(seat.group))[seat.rank] == 0


@dataclass(eq=False)
class _Rounds:
    """A seat's rounds as this node saw them: who is still in them, and who gave to how many.

    Round i+1 all-reduces over the contributors of round i: every member that finished round i
    got the same contributor set from the all-reduce, and one that was dropped from it fails its
    seat, so they all agree, and nobody waits again for a member that stalled (a newcomer
    still starting, a frozen node) or died."""

    group: tuple[bytes, ...]
    members: list[int] = field(init=False)
    rounds_of: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.members = list(range(len(self.group)))
        self.rounds_of = [0] * len(self.group)

    @property
    def current(self) -> tuple[bytes, ...]:
        return tuple(self.group[r] for r in self.members)


@dataclass(eq=False)
class _Fetch:
    """A listener's state download, running while its seat listens to the rounds."""

    task: asyncio.Future[Path]
    started: float = field(default_factory=time.monotonic)
    seconds: float = 0.0
    delivered: bool = False

    def __post_init__(self) -> None:
        self.task.add_done_callback(lambda _: setattr(self, "seconds", time.monotonic() - self.started))


@dataclass(eq=False)
class _Process:
    """One job's training process, as the node holds it."""

    job: bytes
    spec: JobSpec
    proc: asyncio.subprocess.Process
    replies: asyncio.StreamReader
    requests: asyncio.WriteTransport
    work: Path
    buffer: np.ndarray | None = None
    mapping: mmap.mmap | None = None
    holds: bytes | None = None
    """The state blob the process holds in memory (the last one it reported)."""
    idle_since: float = field(default_factory=time.monotonic)
    busy: asyncio.Lock = field(default_factory=asyncio.Lock)
    err: bytearray = field(default_factory=bytearray)
    checkpoint: bytes | None = None
    """The newest checkpoint this node pinned for the job (unpinned when a newer one comes)."""
    attempt: int | None = None
    between_rounds: asyncio.Event = field(default_factory=asyncio.Event)
    """Set while no all-reduce round of the process is in flight (a leaving node waits for it)."""

    def __post_init__(self) -> None:
        self.between_rounds.set()

    def send(self, obj: Any) -> None:
        self.requests.write(encode_frame(obj))

    async def receive(self) -> sf.FromProcess:
        try:
            header = await self.replies.readexactly(4)
            body = await self.replies.readexactly(frame_length(header))
        except asyncio.IncompleteReadError:
            raise SeatFailed("WorkerDied", f"the training process exited ({await self._exit()})"
                             f"{self.tail()}") from None
        return sf.parse_from_process(decode_body(body))

    async def _exit(self) -> str:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.proc.wait(), 2.0)
        return describe_exit(self.proc.returncode)

    def tail(self) -> str:
        text = self.err.decode("utf-8", "replace").strip()
        return f": {text[-2000:]}" if text else ""

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.requests.close()
        if self.mapping is not None:
            self.buffer = None
            with contextlib.suppress(BufferError):
                self.mapping.close()
        shutil.rmtree(self.work, ignore_errors=True)


class TrainingService:
    """Runs this node's seats of training jobs (module docstring)."""

    name = "training"

    def __init__(self, ctx: NodeContext, *, tasks: Tasks, allreduce: AllReduce, blobs: Blobs,
                 slots: float) -> None:
        self._ctx = ctx
        self._tasks = tasks
        self._allreduce = allreduce
        self._blobs = blobs
        self._slots = slots
        self._jobs: dict[bytes, _Process] = {}
        self._closed = False
        self.counters = {"seats": 0, "seats_failed": 0, "processes_started": 0, "rounds": 0,
                         "state_fetches": 0}

    # ---- Service --------------------------------------------------------------------

    def handlers(self) -> Handlers:
        return {}

    def on_member_event(self, event: MemberEvent) -> None:
        pass

    async def start(self) -> None:
        self._ctx.spawn(self._reap_idle())

    async def close(self) -> None:
        """Leave: let the rounds in flight finish (at most ``LEAVE_ROUND_S``; no new one starts), so
        the group averages this node's last contribution, then stop the training processes. The
        coordinator drops the member at the next boundary (its shards move by what it gave)."""
        self._closed = True
        rounds = [p.between_rounds.wait() for p in self._jobs.values() if not p.between_rounds.is_set()]
        if rounds:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*rounds), LEAVE_ROUND_S)
        for p in list(self._jobs.values()):
            p.kill()
        self._jobs.clear()

    def stats(self) -> Stats:
        out: dict[str, Any] = {f"training_{k}_total": float(v) for k, v in self.counters.items()}
        out["training_processes"] = float(len(self._jobs))
        return out

    # ---- KindRunner -----------------------------------------------------------------

    async def run(self, task_id: bytes, assign: TaskAssign, *, bundle_path: Path | None,
                  attempt_id: int) -> list[Outcome]:
        outcomes = []
        for item in assign.items:
            self.counters["seats"] += 1
            try:
                seat = decode_struct(Seat, item.input, what="Seat")
                if seat.job != task_id or seat.job_spec is None or self._ctx.node_id not in seat.group:
                    raise SeatFailed("BadSeat", "the seat is not for this task, names no job, or not this node")
                value = await asyncio.wait_for(
                    self._run_seat(seat, seat.job_spec, assign, bundle_path, attempt_id), assign.timeout_s)
                outcomes.append(Outcome(index=item.index, ok=True, value=value))
            except (SeatFailed, StarmeshError, OSError, TimeoutError) as exc:
                self.counters["seats_failed"] += 1
                kind = exc.type if isinstance(exc, SeatFailed) else (
                    "Timeout" if isinstance(exc, TimeoutError) else type(exc).__name__)
                if not isinstance(exc, SeatFailed) or exc.type in ("WorkerDied", "BadFrame", "Timeout"):
                    self._drop(task_id)
                log.warning("training: seat of job %s failed: %s: %s", task_id.hex()[:12], kind, exc)
                outcomes.append(Outcome(index=item.index, ok=False, failure=failure(kind, str(exc) or kind)))
        return outcomes

    def cancel(self, attempt_id: int) -> None:
        for job, p in list(self._jobs.items()):
            if p.attempt == attempt_id:
                self._drop(job)

    # ---- one seat -------------------------------------------------------------------

    async def _run_seat(self, seat: Seat, spec: JobSpec, assign: TaskAssign, bundle: Path | None,
                        attempt_id: int) -> bytes:
        fetch = None
        if is_listener(seat) and seat.state is not None:  # fetched while its process starts and the
            # segment runs (node.training.elastic): a newcomer's download waits for nothing
            self.counters["state_fetches"] += 1
            fetch = _Fetch(asyncio.ensure_future(self._blobs.get(seat.state, holders=seat.holders)))
        try:
            p = await self._process(seat.job, spec, assign, bundle)
        except BaseException:
            if fetch is not None:
                fetch.task.cancel()
            raise
        async with p.busy:
            p.attempt = attempt_id
            try:
                state_path = None
                if fetch is not None and seat.state == p.holds:
                    fetch.task.cancel()  # the process holds it already
                    fetch = None
                if fetch is None and seat.state is not None and seat.state != p.holds:
                    self.counters["state_fetches"] += 1
                    state_path = str(await self._blobs.get(seat.state, holders=seat.holders))
                p.send({"op": "seat", "seat": encode_struct(seat), "state": state_path})
                return await self._serve_seat(p, seat, spec, fetch)
            finally:
                if fetch is not None:
                    fetch.task.cancel()
                p.attempt = None
                p.idle_since = time.monotonic()

    async def _serve_seat(self, p: _Process, seat: Seat, spec: JobSpec, fetch: _Fetch | None) -> bytes:
        sent = 0
        rounds = _Rounds(seat.group)
        while True:
            try:
                msg = await p.receive()
            except PipeError as exc:
                raise SeatFailed("BadFrame", f"the training process sent a bad frame: {exc}") from None
            if isinstance(msg, sf.Exchange):
                sent += await self._exchange(p, seat, spec, msg, rounds, fetch)
            elif isinstance(msg, sf.StateWanted):
                p.send(await self._state_reply(fetch, wait=True))
            elif isinstance(msg, sf.Put):
                await self._put(p, msg)
            elif isinstance(msg, sf.Progress):
                self._tasks.set_progress(seat.job, encode_struct(SeatProgress(
                    segment=seat.segment, step=msg.step, loss=msg.loss if np.isfinite(msg.loss) else 0.0,
                    tokens_s=max(0.0, msg.tokens_s), bytes_sent=sent)))
            elif isinstance(msg, sf.Report):
                try:
                    report = decode_struct(SeatReport, msg.report, what="SeatReport")
                except StarmeshError as exc:
                    raise SeatFailed("BadReport", str(exc)) from None
                p.holds = report.state
                return encode_struct(replace(report, rounds_of=tuple(rounds.rounds_of),
                                             fetch_s=fetch.seconds if fetch is not None else 0.0))
            elif isinstance(msg, sf.Failed):
                p.holds = None
                f = msg.failure
                raise SeatFailed(f["type"], f"{f['message']}\n{f['traceback'][-3000:]}".strip())
            else:
                raise SeatFailed("BadFrame", f"unexpected {type(msg).__name__} during a seat")

    async def _exchange(self, p: _Process, seat: Seat, spec: JobSpec, msg: sf.Exchange,
                        rounds: _Rounds, fetch: _Fetch | None) -> int:
        """One round: the buffer's share-weighted mean over the members still in the seat's rounds
        (``_Rounds``; ``node.training.elastic``: each part scaled by its rank's share, the mean by
        the contributors' total share)."""
        assert p.buffer is not None
        before = self._allreduce.sent_bytes
        self.counters["rounds"] += 1
        shares = elastic.group_shares(seat.shares, len(seat.group))
        key = round_key(seat, msg.step)
        active = sum(1 for x in shares if x > 0)
        if self._closed:
            p.send({"op": "reduced", "ok": False, "error": "NodeLeaving: this node is leaving the mesh"})
            return 0
        p.between_rounds.clear()
        try:
            if shares[seat.rank] == 0:
                p.buffer[:] = 0.0
                if not await self._allreduce.begun_elsewhere(group=rounds.current, key=key, timeout=LISTEN_S):
                    raise SeatFailed("GroupGone", f"no member began the round of step {msg.step} "
                                     f"in {LISTEN_S:g} s")
            elif shares[seat.rank] != 1:
                p.buffer *= np.float32(shares[seat.rank])
            # listeners own no slice of the round: they add zeros (a few bytes once compressed)
            # and take the result, so a newcomer still starting or downloading slows nobody
            group = rounds.current
            weights = {seat.group[r]: float(shares[r] > 0) for r in rounds.members} if active < len(shares) else None
            out = await self._allreduce.all_reduce(
                p.buffer, group=group, codec=spec.codec, key=key, in_place=True, min_contributors=1,
                join_timeout=DILOCO_JOIN_S if spec.mode == "diloco" else None, weights=weights)
            contributors = [seat.group.index(n) for n in out.contributors if n in seat.group]
            total = sum(shares[r] for r in contributors)
            trained = sum(1 for r in contributors if shares[r] > 0)
            if trained < min(spec.workers_min, active):
                raise SeatFailed("TooFewContributors", f"round of step {msg.step}: {trained} of the group's "
                                 f"{active} trained contributions, the job needs {spec.workers_min}")
            if total != len(contributors):
                p.buffer *= np.float32(len(contributors) / total)
        except (StarmeshError, TimeoutError) as exc:
            error = f"{type(exc).__name__}: {exc}"
            if shares[seat.rank] == 0:  # most often: its training process was still starting
                error = (f"ListenerLate: a listener missed the round of step {msg.step} ({error}); "
                         "it listens again from the next segment")
            p.send({"op": "reduced", "ok": False, "error": error[:2000]})
            return 0
        finally:
            p.between_rounds.set()
        for r in contributors:
            rounds.rounds_of[r] += 1
        rounds.members = sorted(contributors)
        sent = max(0, self._allreduce.sent_bytes - before)
        reply = {"op": "reduced", "ok": True, "contributors": trained, "bytes": sent}
        if fetch is not None and fetch.task.done() and not fetch.delivered and fetch.task.exception() is None:
            reply["state"] = str(fetch.task.result())
            fetch.delivered = True
        p.send(reply)
        return sent

    async def _state_reply(self, fetch: _Fetch | None, *, wait: bool) -> dict[str, Any]:
        """The ``state`` frame for a listener: its fetched state's path, or why there is none."""
        if fetch is None:
            return {"op": "state", "ok": False, "error": "this seat fetches no state"}
        try:
            path = await asyncio.wait_for(asyncio.shield(fetch.task), STATE_WAIT_S) if wait else fetch.task.result()
        except (StarmeshError, OSError, TimeoutError) as exc:
            return {"op": "state", "ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
        fetch.delivered = True
        return {"op": "state", "ok": True, "state": str(path)}

    async def _put(self, p: _Process, msg: sf.Put) -> None:
        path = Path(msg.path).resolve()
        if not path.is_relative_to(p.work.resolve()) or not path.is_file():
            p.send({"op": "stored", "ok": False, "error": f"not a file in the job's work dir: {msg.path}"})
            return
        keep = msg.what == "model" or msg.copies > 0
        try:
            blob_id = await self._blobs.put(path, pin=keep)
        except (StarmeshError, OSError) as exc:
            p.send({"op": "stored", "ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]})
            return
        finally:
            path.unlink(missing_ok=True)
        if msg.what == "state" and keep:
            if p.checkpoint is not None and p.checkpoint != blob_id:
                self._blobs.release(p.checkpoint)
                with contextlib.suppress(StarmeshError, OSError):
                    self._blobs.unpin(p.checkpoint)
            p.checkpoint = blob_id
        if msg.copies:
            self._ctx.spawn(self._replicate(blob_id, msg.copies))
        p.send({"op": "stored", "ok": True, "id": blob_id})

    async def _replicate(self, blob_id: bytes, copies: int) -> None:
        try:
            held = await self._blobs.replicate(blob_id, copies=copies)
            log.info("training: blob %s held by %d more members", blob_id.hex()[:12], len(held))
        except (StarmeshError, TimeoutError) as exc:
            log.warning("training: copies of blob %s: %s", blob_id.hex()[:12], exc)

    # ---- processes ------------------------------------------------------------------

    async def _process(self, job: bytes, spec: JobSpec, assign: TaskAssign, bundle: Path | None) -> _Process:
        p = self._jobs.get(job)
        if p is not None and p.proc.returncode is None:
            return p
        if p is not None:
            self._drop(job)
        if self._closed:
            raise SeatFailed("ShuttingDown", "the node is shutting down")
        if len(self._jobs) >= MAX_JOBS:
            raise SeatFailed("Busy", f"this node already trains {MAX_JOBS} jobs")
        p = await self._start(job, spec)
        self._jobs[job] = p
        try:
            await asyncio.wait_for(self._open(p, spec, assign, bundle), OPEN_TIMEOUT_S)
        except BaseException:
            self._drop(job)
            raise
        return p

    async def _start(self, job: bytes, spec: JobSpec) -> _Process:
        work = (self._ctx.data_dir / "training" / f"{job.hex()[:16]}-{secrets.token_hex(4)}").resolve()
        work.mkdir(parents=True, exist_ok=True)
        proc, replies, requests, _ = await spawn_piped(
            lambda req_r, rep_w: [sys.executable, "-m", "node.training.train_worker", "--requests", str(req_r),
                                  "--replies", str(rep_w), "--parent-pid", str(os.getpid())],
            env=worker_env(spec.threads or max(1, int(self._slots))), cwd=work,
            stdout=asyncio.subprocess.DEVNULL)
        self.counters["processes_started"] += 1
        p = _Process(job=job, spec=spec, proc=proc, replies=replies, requests=requests, work=work)
        self._ctx.spawn(self._drain_stderr(p))
        log.info("training: job %s: training process %d started", job.hex()[:12], proc.pid)
        return p

    async def _open(self, p: _Process, spec: JobSpec, assign: TaskAssign, bundle: Path | None) -> None:
        options = {o.key: o.value for o in spec.options}
        options.setdefault("seed", str(spec.seed))
        options.update(await self._data_options(spec))
        threads = spec.threads or max(1, int(self._slots))
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        p.send({"op": "open", "function": assign.function, "path": None if bundle is None else str(bundle),
                "options": options, "mode": spec.mode, "outer_lr": spec.outer_lr,
                "outer_momentum": spec.outer_momentum, "threads": threads, "cpus": cpus,
                "prune": spec.prune, "quantize": spec.quantize.name.lower(), "work": str(p.work),
                "gpus": spec.gpus_per_worker, "local_ranks": spec.local_ranks})
        opened = await p.receive()
        if isinstance(opened, sf.Failed):
            f = opened.failure
            raise SeatFailed(f["type"], f"the job did not build: {f['message']}\n{f['traceback'][-3000:]}".strip())
        if not isinstance(opened, sf.Opened) or opened.numel == 0:
            raise SeatFailed("BadFrame", "the training process did not open the job")
        shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else p.work
        buf = shm / f"starmesh-{os.getpid()}-{secrets.token_hex(8)}"
        fd = os.open(buf, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, opened.numel * 4)
            p.mapping = mmap.mmap(fd, opened.numel * 4)
            p.buffer = np.frombuffer(p.mapping, dtype=np.float32)
            p.send({"op": "attach", "path": str(buf)})
            if not isinstance(await p.receive(), sf.Attached):
                raise SeatFailed("BadFrame", "the training process did not attach its buffer")
        finally:
            os.close(fd)
            buf.unlink(missing_ok=True)  # both sides have it mapped: nothing left to clean up

    async def _data_options(self, spec: JobSpec) -> dict[str, str]:
        """The job's data blob (``JobSpec.data``, ``node.training_data``) fetched through the
        blob cache: the job options ``data`` (its local path) and ``data_kind``. ``SeatFailed``
        (``DataUnavailable``) if no member can serve it."""
        if spec.data is None:
            return {}
        try:
            path = await self._blobs.get(spec.data, holders=spec.data_holders)
        except (StarmeshError, OSError) as exc:
            raise SeatFailed("DataUnavailable", f"cannot fetch the job's data {spec.data_name!r} "
                             f"(blob {spec.data.hex()}): {type(exc).__name__}: {exc}") from None
        return {"data": str(path), "data_kind": spec.data_kind}

    def _drop(self, job: bytes) -> None:
        p = self._jobs.pop(job, None)
        if p is not None:
            p.kill()

    async def _drain_stderr(self, p: _Process) -> None:
        stream = p.proc.stderr
        assert stream is not None
        while chunk := await stream.read(65536):
            p.err += chunk
            del p.err[:-TAIL_BYTES]

    async def _reap_idle(self) -> None:
        while not self._closed:
            await asyncio.sleep(IDLE_S / 4)
            now = time.monotonic()
            for job, p in list(self._jobs.items()):
                if p.proc.returncode is not None or (not p.busy.locked() and now - p.idle_since > IDLE_S):
                    log.info("training: job %s: training process ends (idle or exited)", job.hex()[:12])
                    self._drop(job)
