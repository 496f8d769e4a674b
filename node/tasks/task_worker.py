"""A task worker process: runs subtasks' functions for its node, never in the node's process.

Started by ``node.process_pool`` as::

    python -P -m node.tasks.task_worker --request-fd R --reply-fd W --parent-pid P
        [--memory-mb M] [--cpus 0,1,...] [--allow PATTERN ...]

Theory of operation:

* It must never outlive its node. First ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` (Linux): the
  kernel kills it when the thread that started it dies. Then, because the node may have died
  before that call, it exits at once if its parent is no longer ``--parent-pid``. Last, a daemon
  thread reads the request pipe and exits the process when it reaches EOF (the node closed it,
  or died) - on any OS, and even if the node's loop thread was not the one that forked.
* Limits come from argv: ``RLIMIT_AS`` of ``--memory-mb`` MiB (a function that allocates past
  it gets ``MemoryError``), CPU affinity to ``--cpus``; the node sets ``OMP_NUM_THREADS`` and
  friends in the environment.
* Requests (``node.tasks.worker_frames``) are run one at a time, their items in order, one reply
  per item as it finishes, then ``done``. The function is imported once per process, after the
  module policy: with a bundle (``path``), the function's top-level module must come from the
  bundle directory unless it matches an ``--allow`` pattern; without one, it must match a
  pattern. Otherwise every item fails ``NotAllowed``.
* A raise fails that item (type, message, traceback, and this item's Python-level stdout and
  stderr tails); so does a result ``pack_value`` refuses (``NotSerializable``) or one over
  ``MAX_VALUE_BYTES`` (``ResultTooLarge``). ``os._exit``, a segfault or a hang is for the node
  to see: it notices the process end or the timeout, and fails the item itself.
* Nothing but frames is ever written to the reply pipe; user prints go to this process's
  stdout and stderr, which the node drains.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import faulthandler
import importlib
import importlib.util
import io
import os
import signal
import sys
import threading
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from queue import SimpleQueue
from typing import Any, TextIO, cast

import msgpack

from node.tasks import worker_frames as frames
from node.tasks.worker_frames import MAX_OUTPUT_TAIL_CHARS, MAX_TRACEBACK_CHARS, MAX_VALUE_BYTES
from protocol.schema import unpack_body

PR_SET_PDEATHSIG = 1


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m node.tasks.task_worker")
    p.add_argument("--request-fd", type=int, required=True)
    p.add_argument("--reply-fd", type=int, required=True)
    p.add_argument("--parent-pid", type=int, required=True)
    p.add_argument("--memory-mb", type=int, default=0)
    p.add_argument("--cpus", default="", help="comma-separated CPU ids to pin to")
    p.add_argument("--allow", action="append", default=[], help="fnmatch pattern of allowed modules")
    return p.parse_args(argv)


def die_with_parent(parent_pid: int) -> None:
    """PDEATHSIG (Linux), then exit if the parent is already gone."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:
        os._exit(0)


def _read_exact(fd: int, n: int) -> bytes | None:
    chunks: list[bytes] = []
    while n:
        try:
            chunk = os.read(fd, min(n, 1 << 20))
        except InterruptedError:
            continue
        except OSError:
            return None
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def read_requests(fd: int, out: SimpleQueue[Any]) -> None:
    """The watchdog and reader: every request frame into ``out``; at EOF the process exits."""
    while True:
        header = _read_exact(fd, frames.HEADER_BYTES)
        if header is None:
            os._exit(0)  # the node is gone, or let us go
        try:
            body = _read_exact(fd, frames.frame_length(header))
            if body is None:
                os._exit(0)
            out.put(frames.decode_body(body))
        except frames.PipeError as exc:
            os.write(2, f"task worker: bad request frame: {exc}\n".encode())
            os._exit(2)


class Tee(io.TextIOBase):
    """A text stream that writes through and keeps a bounded tail since the last ``take``."""

    def __init__(self, inner: TextIO, limit: int = MAX_OUTPUT_TAIL_CHARS) -> None:
        self._inner = inner
        self._limit = limit
        self._parts: deque[str] = deque()
        self._size = 0
        self.written = 0
        """Bytes written through this stream since the process started (its encoding's)."""

    def write(self, s: str) -> int:
        n = self._inner.write(s)
        self.written += len(s.encode(self._inner.encoding or "utf-8", "replace"))
        self._parts.append(s)
        self._size += len(s)
        while self._size - len(self._parts[0]) >= self._limit:
            self._size -= len(self._parts.popleft())
        return n

    def flush(self) -> None:
        self._inner.flush()

    def fileno(self) -> int:
        return self._inner.fileno()

    def isatty(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self._inner.encoding

    @property
    def errors(self) -> str | None:  # type: ignore[override]
        return self._inner.errors

    def __getattr__(self, name: str) -> Any:
        # ``buffer``, ``errors``, ``reconfigure``...: the real stream's (bytes written through
        # ``buffer`` reach the node's tail but not this one's).
        return getattr(self._inner, name)

    def take(self) -> str:
        text = "".join(self._parts)[-self._limit:]
        self._parts.clear()
        self._size = 0
        return text


class _Refused(Exception):
    """The module policy refused a function (reported as ``NotAllowed``)."""


class Runner:
    """Resolves functions under the module policy and runs requests' items."""

    def __init__(self, *, allow: Sequence[str], write: Callable[[bytes], None],
                 stdout: Tee | None = None, stderr: Tee | None = None) -> None:
        self.allow = tuple(allow)
        self._write = write
        self._stdout = stdout
        self._stderr = stderr
        self._functions: dict[tuple[str, str | None], Callable[[Any], Any] | dict[str, str]] = {}

    def handle(self, request: Any) -> None:
        if (type(request) is not dict or request.get("op") != "run"
                or type(request.get("attempt")) is not int
                or type(request.get("function")) is not str
                or type(request.get("items")) is not list):
            raise frames.PipeError("malformed request")
        attempt: int = request["attempt"]
        path = request.get("path")
        self._take_output()
        fn = self.resolve(request["function"], path if isinstance(path, str) else None)
        for item in request["items"]:
            index, data = item
            self._write(frames.encode_frame(self.run_item(attempt, index, data, fn)))
        self._take_output()
        self._write(frames.encode_frame({
            "attempt": attempt, "done": True,
            "out": self._stdout.written if self._stdout else 0,
            "err": self._stderr.written if self._stderr else 0}))

    def resolve(self, function: str, path: str | None) -> Callable[[Any], Any] | dict[str, str]:
        """The function, or the failure (a reply's ``failure`` map) its import raised."""
        key = (function, path)
        got = self._functions.get(key)
        if got is None:
            try:
                got = self._import(function, path)
            except BaseException as exc:  # an import runs user code: anything may come out
                got = self._failure(_kind(exc), _message(exc), _traceback(exc))
            self._functions[key] = got
        return got

    def _import(self, function: str, path: str | None) -> Callable[[Any], Any]:
        module_name, _, name = function.partition(":")
        if not module_name or not name:
            raise ValueError(f"function {function!r} is not 'module:function'")
        if path is not None and path not in sys.path:
            sys.path.insert(0, path)
            importlib.invalidate_caches()
        if not frames.module_allowed(module_name, self.allow):
            if path is None:
                raise _Refused(f"module {module_name!r} is not allowed on this node "
                               f"(allowed: {', '.join(self.allow) or 'none'}) and no bundle was given")
            top = module_name.split(".")[0]
            spec = importlib.util.find_spec(top)
            if spec is None:
                raise ModuleNotFoundError(f"No module named {top!r} in the bundle", name=top)
            if not _inside(spec, path):
                raise _Refused(f"module {top!r} is not in the bundle and not allowed on this node "
                               f"(allowed: {', '.join(self.allow) or 'none'})")
        module = importlib.import_module(module_name)
        fn = getattr(module, name)
        if not callable(fn):
            raise TypeError(f"{function} is not callable")
        return cast(Callable[[Any], Any], fn)

    def run_item(self, attempt: int, index: int, data: bytes,
                 fn: Callable[[Any], Any] | dict[str, str]) -> dict[str, Any]:
        reply: dict[str, Any] = {"attempt": attempt, "index": index, "ok": False, "value": None,
                                 "failure": None}
        if isinstance(fn, dict):
            reply["failure"] = dict(fn)
            return reply
        try:
            try:
                arg = unpack_body(data, what="value")  # = protocol.messages.tasks.unpack_value
            except Exception as exc:
                raise _BadInput(str(exc)) from None
            result = fn(arg)
        except BaseException as exc:  # user code: SystemExit and KeyboardInterrupt included
            reply["failure"] = self._failure(_kind(exc), _message(exc), _traceback(exc))
            return reply
        try:
            value: bytes = msgpack.packb(result, use_bin_type=True)  # = pack_value
        except BaseException as exc:  # TypeError, OverflowError, recursion in a deep value...
            reply["failure"] = self._failure(
                "NotSerializable", f"value is not msgpack-serializable: {_message(exc)}", "")
            return reply
        if len(value) > MAX_VALUE_BYTES:
            reply["failure"] = self._failure(
                "ResultTooLarge", f"result of {len(value)} bytes exceeds {MAX_VALUE_BYTES}", "")
            return reply
        self._take_output()
        reply["ok"], reply["value"] = True, value
        return reply

    def _take_output(self) -> tuple[str, str]:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        return (self._stdout.take() if self._stdout else "",
                self._stderr.take() if self._stderr else "")

    def _failure(self, type_: str, message: str, tb: str) -> dict[str, str]:
        out, err = self._take_output()
        return frames.failure_fields(type_, message, traceback=tb, stdout=out, stderr=err)


class _BadInput(Exception):
    """An input that is not a valid packed value."""


def _inside(spec: importlib.machinery.ModuleSpec, path: str) -> bool:
    if spec.has_location and spec.origin:
        places = [spec.origin]
    else:
        places = list(spec.submodule_search_locations or [])
    root = os.path.realpath(path)
    return bool(places) and all(
        os.path.commonpath([root, os.path.realpath(p)]) == root for p in places)


def _kind(exc: BaseException) -> str:
    if isinstance(exc, _Refused):
        return "NotAllowed"
    if isinstance(exc, _BadInput):
        return "BadInput"
    return type(exc).__name__


def _message(exc: BaseException) -> str:
    try:
        return str(exc)
    except BaseException:
        return f"<{type(exc).__name__}: str() failed>"


def _traceback(exc: BaseException) -> str:
    try:
        tb = exc.__traceback__
        # Drop this module's own frames at the top: the user's code starts below them.
        while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
            tb = tb.tb_next
        text = "".join(traceback.format_exception(type(exc), exc, tb))
    except BaseException:
        return ""
    return text[-MAX_TRACEBACK_CHARS:]


def pipe_writer(fd: int) -> Callable[[bytes], None]:
    """Write whole frames to ``fd``; exit quietly once the node is gone."""

    def write(data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(fd, view)
            except InterruptedError:
                continue
            except OSError:
                os._exit(0)  # the node is gone
            view = view[n:]
    return write


def _limit_memory(memory_mb: int) -> None:
    import resource

    limit = memory_mb * 1024 * 1024
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    die_with_parent(args.parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C is for the node, not us
    faulthandler.enable()  # a segfault leaves its Python stack in the stderr tail
    if args.cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",") if c.strip()})
    stdout, stderr = Tee(sys.stdout), Tee(sys.stderr)
    sys.stdout, sys.stderr = cast(TextIO, stdout), cast(TextIO, stderr)
    requests: SimpleQueue[Any] = SimpleQueue()
    threading.Thread(target=read_requests, args=(args.request_fd, requests),
                     name="request-reader", daemon=True).start()
    if args.memory_mb > 0:
        _limit_memory(args.memory_mb)
    runner = Runner(allow=args.allow, write=pipe_writer(args.reply_fd), stdout=stdout, stderr=stderr)
    while True:
        try:
            runner.handle(requests.get())
        except (frames.PipeError, ValueError, TypeError) as exc:
            os.write(2, f"task worker: bad request: {exc}\n".encode())
            return 2


if __name__ == "__main__":
    sys.exit(main())
