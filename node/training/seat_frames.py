"""The frames between a node and a job's training process (sans-I/O; both sides import it).

A node runs each training job it works for in one long-lived *training process*
(``node.training.train_worker``), started at the job's first seat and kept across segments so
the model and optimizer stay in memory. Like a task worker it inherits two pipes (requests
node -> process, replies process -> node) carrying frames of ``node.tasks.worker_frames``: a
4-byte big-endian length, then msgpack. Tensors never go through the pipes: the gradient (or
DiLoCo pseudo-gradient) buffer is a file in shared memory that both sides map, and blobs go
by path in the node's data dir.

Node -> process::

    {"op": "open", "function": "mod:fn", "path": str | None, "options": {str: str},
     "mode": "sync" | "diloco", "outer_lr": f, "outer_momentum": f, "threads": n,
     "cpus": [int, ...], "prune": f, "quantize": "none" | "int8", "work": str}
        -> {"op": "opened", "numel": n, "tokens_per_batch": t}
    {"op": "attach", "path": str}          # the shared buffer: numel float32s
        -> {"op": "attached"}
    {"op": "seat", "seat": bytes, "state": str | None}
        # seat: an encoded ``Seat``; state: the path of the seat's state blob when the
        # process does not hold it already (the node tracks what it reported last)
        -> any number of "exchange" / "put" / "progress", then one "report" or "failed"
    {"op": "reduced", "ok": True, "contributors": k, "bytes": b[, "state": str]}
    {"op": "reduced", "ok": False, "error": str}        # the answer to one "exchange"
        # contributors: those with a share of the batch; "state" (once, to a listener): the
        # path of the state its seat starts from, fetched while it listened
    {"op": "state", "ok": True, "state": str}
    {"op": "state", "ok": False, "error": str}          # the answer to one "state"
    {"op": "stored", "ok": True, "id": bytes}
    {"op": "stored", "ok": False, "error": str}         # the answer to one "put"
    {"op": "close"}                                     # exit now

Process -> node::

    {"op": "exchange", "step": s, "examples": f}   # the buffer holds this worker's part
    {"op": "state"}                                # a listener waits for its state
    {"op": "put", "path": str, "what": "state" | "model", "copies": k}
    {"op": "progress", "step": s, "loss": f, "tokens_s": f}
    {"op": "report", "report": bytes}              # an encoded ``SeatReport``
    {"op": "failed", "failure": {"type", "message", "traceback", "stdout", "stderr"}}

One seat runs at a time and every request waits for its answer, so the order is fixed: the
node answers each "exchange" by all-reducing the buffer in place over the seat's committed
group with the round key of (job, epoch, plan, step), and each "put" by adding the file to
its blob store (moving it: the file is the node's afterwards) and, with ``copies``, keeping
leased copies on that many other members. ``put`` paths must lie under the ``work`` dir the
node gave at "open". The node checks every frame from the process (``parse_from_process``):
the process runs user code and is trusted with nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from node.tasks.worker_frames import PipeError

#: Most bytes of a path in a frame.
MAX_PATH = 4096
#: Most shared-buffer elements (4 GiB of float32).
MAX_NUMEL = 1 << 30
PUT_WHAT = ("state", "model")


@dataclass(frozen=True, slots=True)
class Opened:
    numel: int
    tokens_per_batch: int


@dataclass(frozen=True, slots=True)
class Attached:
    pass


@dataclass(frozen=True, slots=True)
class Exchange:
    step: int
    examples: float


@dataclass(frozen=True, slots=True)
class Put:
    path: str
    what: str
    copies: int


@dataclass(frozen=True, slots=True)
class Progress:
    step: int
    loss: float
    tokens_s: float


@dataclass(frozen=True, slots=True)
class Report:
    report: bytes


@dataclass(frozen=True, slots=True)
class Failed:
    failure: dict[str, str]


@dataclass(frozen=True, slots=True)
class StateWanted:
    """A listener has listened to every round and needs its state now."""


FromProcess = Opened | Attached | Exchange | StateWanted | Put | Progress | Report | Failed

_FAILURE_FIELDS = frozenset({"type", "message", "traceback", "stdout", "stderr"})


def _int(raw: dict[str, Any], key: str, *, hi: int) -> int:
    v = raw.get(key)
    if type(v) is not int or not 0 <= v <= hi:
        raise PipeError(f"{raw.get('op')!r:.20}: {key} must be an int in 0..{hi}, got {v!r:.30}")
    return v


def _float(raw: dict[str, Any], key: str) -> float:
    v = raw.get(key)
    if not isinstance(v, int | float) or isinstance(v, bool):
        raise PipeError(f"{raw.get('op')!r:.20}: {key} must be a number, got {v!r:.30}")
    return float(v)


def _fields(raw: dict[str, Any], *names: str) -> None:
    if set(raw) != {"op", *names}:
        raise PipeError(f"{raw['op']!r:.20} frame fields {sorted(map(str, raw))!r:.200}")


def parse_from_process(raw: Any) -> FromProcess:
    """One decoded frame from a training process, checked (``PipeError`` if anything is off)."""
    if type(raw) is not dict or type(raw.get("op")) is not str:
        raise PipeError(f"frame is not a map with an op: {type(raw).__name__}")
    op = raw["op"]
    if op == "opened":
        _fields(raw, "numel", "tokens_per_batch")
        return Opened(_int(raw, "numel", hi=MAX_NUMEL), _int(raw, "tokens_per_batch", hi=1 << 40))
    if op == "attached":
        _fields(raw)
        return Attached()
    if op == "exchange":
        _fields(raw, "step", "examples")
        examples = _float(raw, "examples")
        if not math.isfinite(examples) or examples < 0:
            raise PipeError(f"exchange: examples {examples}")
        return Exchange(_int(raw, "step", hi=1 << 32), examples)
    if op == "state":
        _fields(raw)
        return StateWanted()
    if op == "put":
        _fields(raw, "path", "what", "copies")
        path, what = raw["path"], raw["what"]
        if type(path) is not str or not 0 < len(path) <= MAX_PATH or what not in PUT_WHAT:
            raise PipeError("put: a path of 1..4096 chars and what in (state, model) are needed")
        return Put(path, what, _int(raw, "copies", hi=8))
    if op == "progress":
        _fields(raw, "step", "loss", "tokens_s")
        return Progress(_int(raw, "step", hi=1 << 32), _float(raw, "loss"), _float(raw, "tokens_s"))
    if op == "report":
        _fields(raw, "report")
        if type(raw["report"]) is not bytes:
            raise PipeError("report: bytes expected")
        return Report(raw["report"])
    if op == "failed":
        _fields(raw, "failure")
        f = raw["failure"]
        if type(f) is not dict or set(f) != _FAILURE_FIELDS or any(type(v) is not str for v in f.values()):
            raise PipeError("failed: a failure map of five strings expected")
        return Failed(dict(f))
    raise PipeError(f"unknown op {op!r:.30}")
