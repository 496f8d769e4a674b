"""The frames between a node and its task worker processes (sans-I/O; the worker's side).

A worker process (``node.tasks.task_worker``) inherits two pipes: requests flow node -> worker,
replies worker -> node. Each message is a frame: a 4-byte big-endian length, then that many
bytes of msgpack (at most ``MAX_PIPE_FRAME`` bytes). Values travel as ``pack_value`` bytes
(``protocol.messages.tasks``).

Request (node -> worker)::

    {"op": "run", "attempt": a, "function": "mod:fn", "path": str | None,
     "items": [[index, input], ...]}

Replies (worker -> node), one per item in the request's order, then one end marker::

    {"attempt": a, "index": i, "ok": bool, "value": bytes | None,
     "failure": {"type", "message", "traceback", "stdout", "stderr"} | None}
    {"attempt": a, "done": true, "out": n, "err": m}

``out`` / ``err`` count the bytes the worker has written to its stdout / stderr through
Python's ``sys.stdout`` / ``sys.stderr`` since it started, so the node, which drains those
pipes on its own schedule, can tell a later failure's output from an earlier run's.

This module is all a worker process imports of the project besides ``protocol.schema``:
``protocol.messages`` costs a worker ~0.2 s of start-up, so the few limits it needs are copied
here (a test keeps them equal). The node checks every reply again (``worker_pipe``) against
the real ones: a worker runs user code and is trusted with nothing.
"""

from __future__ import annotations

import fnmatch
import signal
from collections.abc import Iterator, Sequence
from typing import Any

import msgpack

from protocol.errors import RemoteProtocolError, StarmeshError
from protocol.schema import unpack_body

#: Largest frame body either way.
MAX_PIPE_FRAME = 16 * 1024 * 1024
#: Bytes of encoded inputs the node puts in one request (the rest go in the next ones).
MAX_REQUEST_INPUT_BYTES = 8 * 1024 * 1024
HEADER_BYTES = 4
#: Copies of ``protocol.messages.tasks``' limits (see the module docstring).
MAX_VALUE_BYTES = 1024 * 1024
MAX_TRACEBACK_CHARS = 8192
MAX_OUTPUT_TAIL_CHARS = 4096
#: Bounds of a failure's ``message`` and ``type`` (``protocol.messages.tasks.Failure``).
MAX_MESSAGE_CHARS = 4096
MAX_TYPE_CHARS = 200


class PipeError(StarmeshError):
    """A frame on a worker pipe is malformed, too large or out of order."""


def encode_frame(obj: Any) -> bytes:
    """``obj`` as one frame (``PipeError`` if its body exceeds ``MAX_PIPE_FRAME``)."""
    body: bytes = msgpack.packb(obj, use_bin_type=True)
    if len(body) > MAX_PIPE_FRAME:
        raise PipeError(f"frame of {len(body)} bytes exceeds {MAX_PIPE_FRAME}")
    return len(body).to_bytes(HEADER_BYTES, "big") + body


def frame_length(header: bytes) -> int:
    """The body length a 4-byte header announces (``PipeError`` past ``MAX_PIPE_FRAME``)."""
    if len(header) != HEADER_BYTES:
        raise PipeError("short frame header")
    size = int.from_bytes(header, "big")
    if size > MAX_PIPE_FRAME:
        raise PipeError(f"frame of {size} bytes exceeds {MAX_PIPE_FRAME}")
    return size


def decode_body(body: bytes) -> Any:
    """One frame body, unpacked with the wire's caps (``PipeError``)."""
    try:
        return unpack_body(body, what="worker pipe frame")
    except RemoteProtocolError as exc:
        raise PipeError(str(exc)) from None


def run_request(*, attempt: int, function: str, path: str | None,
                items: Sequence[tuple[int, bytes]]) -> dict[str, Any]:
    return {"op": "run", "attempt": attempt, "function": function, "path": path,
            "items": [[i, x] for i, x in items]}


def split_items(items: Sequence[tuple[int, bytes]], *,
                max_bytes: int = MAX_REQUEST_INPUT_BYTES) -> Iterator[list[tuple[int, bytes]]]:
    """``items`` in consecutive groups of at most ``max_bytes`` of input (at least one each)."""
    group: list[tuple[int, bytes]] = []
    size = 0
    for item in items:
        if group and size + len(item[1]) > max_bytes:
            yield group
            group, size = [], 0
        group.append(item)
        size += len(item[1])
    if group:
        yield group


def tail(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[-limit:]


def failure_fields(type_: str, message: str, *, traceback: str = "", stdout: str = "",
                   stderr: str = "") -> dict[str, str]:
    """A reply's ``failure`` map, every field cut to its bound (message: head; rest: tail)."""
    return {"type": type_[:MAX_TYPE_CHARS] or "Error", "message": message[:MAX_MESSAGE_CHARS],
            "traceback": tail(traceback, MAX_TRACEBACK_CHARS),
            "stdout": tail(stdout, MAX_OUTPUT_TAIL_CHARS),
            "stderr": tail(stderr, MAX_OUTPUT_TAIL_CHARS)}


def describe_exit(returncode: int | None) -> str:
    """``"exit code 3"`` / ``"signal SIGSEGV (11)"`` for a process's return code."""
    if returncode is None:
        return "no exit status"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "signal"
        return f"signal {name} ({-returncode})"
    return f"exit code {returncode}"


def module_allowed(module: str, patterns: Sequence[str]) -> bool:
    """Whether ``module`` (dotted) matches one of the ``fnmatch`` ``patterns``."""
    return any(fnmatch.fnmatchcase(module, p) for p in patterns)
