"""A job's training process: one per training job a node works for, kept across its seats.

Started by the node as::

    python -P -m node.training.train_worker --requests R --replies W [--parent-pid P]
        [--allow PATTERN ...]

Theory of operation
-------------------
The frames are ``node.training.seat_frames``' (``node.tasks.worker_frames`` framing); the
training itself is ``node.training.runner.seat.Session``. Like a task worker
(``node.tasks.task_worker``, whose pieces this reuses) it dies with its node (PDEATHSIG, the
``--parent-pid`` check, and exit at EOF of the request pipe, which a daemon thread reads into a
queue) and writes nothing but frames to the reply pipe.

The main thread serves one frame at a time:

* ``open``: pin to ``cpus`` with ``threads`` torch threads, import the job function under the
  module policy (the built-in ``node.training.runner.*`` is always allowed, with or without a
  bundle ``path``; ``--allow`` adds patterns), build the ``Session`` (``function(options)``
  must return a ``Job``) and reply ``opened``. Anything that fails (import, refusal, the
  function raising, bad values) replies ``failed`` instead and the process stays without a
  job: a later ``open`` may try again, a ``seat`` fails ``NotOpen``. Optional fields beyond
  the contract: ``gpus`` (int: the job's GPUs per worker; absent: the first visible CUDA device,
  or the CPU when none is visible, so a node that wants the CPU for a job hides the GPUs with
  ``CUDA_VISIBLE_DEVICES=``), ``local_ranks`` (int, ``JobSpec.local_ranks``; default 0) and
  ``fine_tune_steps`` (after pruning; default 20).
* *Local ranks* (``runner.local_ranks.rank_devices``: one per GPU of ``gpus``, or
  ``local_ranks`` gloo ranks on the CPU): with G > 1 this process is local rank 0 and, after
  building its session, spawns G - 1 gradient helpers (``GradientRanks``) that compute their
  slices of every step's gradient; ``cpus`` are split between the ranks (``split_cpus``) and
  ``threads`` too (each rank ``max(1, threads // G)``). A helper that cannot start or builds
  another model fails the ``open``; one that fails later fails its seat (``LocalRankFailed``)
  and the next seat spawns the helpers afresh. They stop when this process ends.
* ``attach``: map the node's file of ``numel`` float32s (``mmap``, shared) as the session's
  buffer; ``attached``, or ``failed`` if the file cannot be mapped.
* ``seat``: run it; each ``exchange`` and ``put`` the seat needs is a request frame answered
  by the node's next frame (``reduced`` / ``stored``), ``progress`` frames at most every 0.5 s;
  then ``report``, or ``failed`` for any raise (the process stays up, its session dirty, so
  the next seat needs the state file or a start from the seed).
* ``close``, also while waiting for an answer: exit 0.

A frame that is malformed or out of order (an answer nobody waits for, a second ``open`` after
one succeeded, a reply of the wrong kind) exits the process with status 2 and a line on stderr.
"""

from __future__ import annotations

import argparse
import faulthandler
import mmap
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from queue import SimpleQueue
from typing import Any, TextIO, cast

import torch

from node.tasks import worker_frames as frames
from node.tasks.task_worker import Runner, Tee, die_with_parent, pipe_writer, read_requests
from node.training.runner.job import Job
from node.training.runner.local_group import pin_threads, split_cpus
from node.training.runner.local_ranks import GradientRanks, JobRecipe, rank_devices
from node.training.runner.seat import FINE_TUNE_STEPS, SeatError, Session, SessionConfig
from protocol.messages.tasks import decode_struct, encode_struct
from protocol.messages.training import Seat

#: Modules a job function may come from without a bundle: the built-in jobs.
BUILTIN_ALLOW = ("node.training.runner.*",)
#: Least seconds between two progress frames.
PROGRESS_EVERY_S = 0.5


class _Close(BaseException):
    """The node said ``close`` (a BaseException: no ``except Exception`` swallows it)."""


class ExchangeError(Exception):
    """The node's all-reduce of a round failed (its ``reduced`` frame's error)."""


class StoreError(Exception):
    """The node could not store a file as a blob (its ``stored`` frame's error)."""


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m node.training.train_worker")
    p.add_argument("--requests", type=int, required=True, help="fd of the node's frames")
    p.add_argument("--replies", type=int, required=True, help="fd of this process's frames")
    p.add_argument("--parent-pid", type=int, default=0, help="exit if the parent is not this pid")
    p.add_argument("--allow", action="append", default=[], help="fnmatch pattern of allowed modules")
    return p.parse_args(argv)


def _need(frame: dict[str, Any], key: str, *types: type) -> Any:
    value = frame.get(key)
    if type(value) not in types:
        raise frames.PipeError(f"{frame.get('op')!r:.20}: {key} is {type(value).__name__}")
    return value


class TrainProcess:
    """The frame loop (module docstring)."""

    def __init__(self, *, requests: SimpleQueue[Any], write: Callable[[bytes], None],
                 allow: Sequence[str], stdout: Tee | None = None, stderr: Tee | None = None) -> None:
        self._requests = requests
        self._write = write
        self._stdout, self._stderr = stdout, stderr
        self._runner = Runner(allow=(*BUILTIN_ALLOW, *allow), write=write, stdout=stdout, stderr=stderr)
        self.session: Session | None = None
        self._open_error = "no job is open"
        self._mapped: mmap.mmap | None = None
        self._last_progress = -PROGRESS_EVERY_S
        self._arrived: str | None = None  # a listener's state file (``_state``)
        self._handlers: dict[str, Callable[[dict[str, Any]], None]] = {
            "open": self._open, "attach": self._attach, "seat": self._seat}

    def serve(self) -> int:
        """Serve frames until ``close`` (0) or a malformed frame (``PipeError``); the local
        ranks stop either way."""
        try:
            while True:
                frame = self._next()
                handler = self._handlers.get(frame["op"])
                if handler is None:
                    raise frames.PipeError(f"unexpected op {frame['op']!r:.30}")
                handler(frame)
        except _Close:
            return 0
        finally:
            if self.session is not None and self.session.helpers is not None:
                self.session.helpers.close()

    def _next(self) -> dict[str, Any]:
        frame = self._requests.get()
        if type(frame) is not dict or type(frame.get("op")) is not str:
            raise frames.PipeError("frame is not a map with an op")
        if frame["op"] == "close":
            raise _Close
        return cast(dict[str, Any], frame)

    def _send(self, obj: dict[str, Any]) -> None:
        self._write(frames.encode_frame(obj))

    def _fail(self, exc: BaseException) -> None:
        kind = exc.kind if isinstance(exc, SeatError) else type(exc).__name__
        try:
            message = str(exc)
        except Exception:
            message = f"<{type(exc).__name__}>"
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        self._send({"op": "failed", "failure": frames.failure_fields(
            kind, message, traceback=tb, stdout=self._take(self._stdout),
            stderr=self._take(self._stderr))})

    @staticmethod
    def _take(tee: Tee | None) -> str:
        if tee is None:
            return ""
        tee.flush()
        return tee.take()

    # ------------------------------------------------------------------ open, attach

    def _open(self, frame: dict[str, Any]) -> None:
        if self.session is not None:
            raise frames.PipeError("a second open")
        function = _need(frame, "function", str)
        path = _need(frame, "path", str, type(None))
        options = _need(frame, "options", dict)
        if not all(type(k) is str and type(v) is str for k, v in options.items()):
            raise frames.PipeError("open: options must map strings to strings")
        cpus = _need(frame, "cpus", list)
        if not all(type(c) is int for c in cpus):
            raise frames.PipeError("open: cpus must be ints")
        threads = _need(frame, "threads", int)
        gpus = frame.get("gpus")
        if gpus is not None and type(gpus) is not int:
            raise frames.PipeError("open: gpus must be an int")
        local_ranks = frame.get("local_ranks", 0)
        if type(local_ranks) is not int:
            raise frames.PipeError("open: local_ranks must be an int")
        try:
            config = SessionConfig(
                work=Path(_need(frame, "work", str)), mode=_need(frame, "mode", str),
                outer_lr=float(_need(frame, "outer_lr", int, float)),
                outer_momentum=float(_need(frame, "outer_momentum", int, float)),
                prune=float(_need(frame, "prune", int, float)), quantize=_need(frame, "quantize", str),
                fine_tune_steps=_need(frame, "fine_tune_steps", int) if "fine_tune_steps" in frame
                else FINE_TUNE_STEPS)
            devices = rank_devices(gpus, local_ranks)
            world = len(devices)
            rank_cpus = split_cpus(cpus, world) if cpus else None
            rank_threads = max(1, threads // world) if threads else None
            if rank_cpus:
                pin_threads(rank_cpus[0], threads=rank_threads)
            elif rank_threads:
                torch.set_num_threads(rank_threads)
            self._take(self._stdout), self._take(self._stderr)
            fn = self._runner.resolve(function, path)
            if isinstance(fn, dict):
                self._open_error = f"{fn['type']}: {fn['message']}"
                self._send({"op": "failed", "failure": fn})
                return
            session = Session(_builder(fn, function, dict(options)), config, device=devices[0])
            if world > 1:
                session.helpers = GradientRanks(
                    JobRecipe(function, path, dict(options), self._runner.allow), devices=devices,
                    shapes=session.shapes, cpus=rank_cpus, threads=rank_threads)
            self.session = session
        except BaseException as exc:  # user code and bad values: the open fails, the process lives
            self._open_error = f"{type(exc).__name__}: {exc}"[:500]
            self._fail(exc)
            return
        self._send({"op": "opened", "numel": self.session.numel,
                    "tokens_per_batch": self.session.tokens_per_batch})

    def _attach(self, frame: dict[str, Any]) -> None:
        path = _need(frame, "path", str)
        if self.session is None:
            raise frames.PipeError("attach before a successful open")
        try:
            size = 4 * self.session.numel
            with open(path, "r+b") as f:
                mapped = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_WRITE)
            self.session.attach(torch.frombuffer(mapped, dtype=torch.float32, count=self.session.numel))
        except Exception as exc:  # a missing or short file
            self._fail(exc)
            return
        self._mapped = mapped  # kept open while the session's buffer views it
        self._send({"op": "attached"})

    # ------------------------------------------------------------------ seat

    def _seat(self, frame: dict[str, Any]) -> None:
        raw = _need(frame, "seat", bytes)
        state = _need(frame, "state", str, type(None))
        try:
            seat = decode_struct(Seat, raw, what="Seat")
        except Exception as exc:
            raise frames.PipeError(f"seat: {exc}") from None
        self._take(self._stdout), self._take(self._stderr)
        try:
            if self.session is None:
                raise SeatError("NotOpen", self._open_error)
            if self._mapped is None:
                raise SeatError("NotAttached", "no shared buffer is attached")
            self._arrived = None
            report = self.session.run_seat(seat, exchange=self._exchange, put=self._put,
                                           progress=self._progress, state_file=state,
                                           arrived=self._state)
            body = encode_struct(report)
        except (_Close, frames.PipeError):
            raise
        except BaseException as exc:  # user code: anything, SystemExit included
            self._fail(exc)
            return
        self._send({"op": "report", "report": body})

    def _exchange(self, step: int, buffer: torch.Tensor, examples: float) -> tuple[int, int]:
        self._send({"op": "exchange", "step": step, "examples": float(examples)})
        reply = self._answer("reduced")
        if reply.get("ok") is not True:
            raise ExchangeError(str(_need(reply, "error", str))[:1000])
        contributors = _need(reply, "contributors", int)
        sent = _need(reply, "bytes", int)
        if "state" in reply:
            self._arrived = _need(reply, "state", str)
        if contributors < 0 or sent < 0:
            raise frames.PipeError("reduced: negative contributors or bytes")
        return contributors, sent

    def _state(self, wait: bool) -> str | None:
        """A listener's state file: the path the node sent with a round, or (``wait``) asked for."""
        if self._arrived is None and wait:
            self._send({"op": "state"})
            reply = self._answer("state")
            if reply.get("ok") is not True:
                raise StoreError(str(_need(reply, "error", str))[:1000])
            self._arrived = _need(reply, "state", str)
        return self._arrived

    def _put(self, path: Path, what: str, copies: int) -> bytes:
        self._send({"op": "put", "path": str(path), "what": what, "copies": copies})
        reply = self._answer("stored")
        if reply.get("ok") is not True:
            raise StoreError(str(_need(reply, "error", str))[:1000])
        blob_id: bytes = _need(reply, "id", bytes)
        return blob_id

    def _progress(self, step: int, loss: float, tokens_s: float) -> None:
        now = time.monotonic()
        if now - self._last_progress >= PROGRESS_EVERY_S:
            self._last_progress = now
            self._send({"op": "progress", "step": step, "loss": loss, "tokens_s": tokens_s})

    def _answer(self, op: str) -> dict[str, Any]:
        frame = self._next()
        if frame["op"] != op or type(frame.get("ok")) is not bool:
            raise frames.PipeError(f"expected {op}, got {frame['op']!r:.30}")
        return frame


def _builder(fn: Callable[[Any], Any], name: str, options: dict[str, str]) -> Callable[[], Job]:
    def build() -> Job:
        job = fn(dict(options))
        if not isinstance(job, Job):
            raise TypeError(f"{name} returned {type(job).__name__}, not a Job")
        return job
    return build


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    if args.parent_pid:
        die_with_parent(args.parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C is for the node
    faulthandler.enable()
    stdout, stderr = Tee(sys.stdout), Tee(sys.stderr)
    sys.stdout, sys.stderr = cast(TextIO, stdout), cast(TextIO, stderr)
    requests: SimpleQueue[Any] = SimpleQueue()
    threading.Thread(target=read_requests, args=(args.requests, requests),
                     name="request-reader", daemon=True).start()
    process = TrainProcess(requests=requests, write=pipe_writer(args.replies), allow=args.allow,
                           stdout=stdout, stderr=stderr)
    try:
        return process.serve()
    except frames.PipeError as exc:
        os.write(2, f"train worker: bad frame: {exc}\n".encode())
        return 2


if __name__ == "__main__":
    sys.exit(main())
