"""The node's side of the worker pipe: checking replies into ``Outcome`` s (sans-I/O).

``node.tasks.worker_frames`` has the frames and their fields. The worker runs user code, so
the node trusts none of it: ``parse_reply`` checks every field and the order, and anything off
is ``PipeError`` (the node then fails the item ``BadResult`` and kills the process). A value
over ``MAX_VALUE_BYTES`` is the item's ``ResultTooLarge``, and every text field is cut to the
wire's bounds again here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from node.tasks.worker_frames import PipeError
from protocol.messages.tasks import (
    MAX_OUTPUT_TAIL_CHARS,
    MAX_TRACEBACK_CHARS,
    MAX_VALUE_BYTES,
    Failure,
    Outcome,
)

_MESSAGE_CHARS = 4096
_TYPE_CHARS = 200


@dataclass(frozen=True, slots=True)
class Done:
    """The worker finished a request, having written ``out`` / ``err`` bytes of output."""

    attempt: int
    out: int
    err: int


def failure(type_: str, message: str, *, traceback: str = "", stdout: str = "",
            stderr: str = "") -> Failure:
    """A ``Failure`` with every field cut to its bound (message: head; the rest: tail)."""
    return Failure(type=type_[:_TYPE_CHARS] or "Error", message=message[:_MESSAGE_CHARS],
                   traceback=traceback[-MAX_TRACEBACK_CHARS:],
                   stdout=stdout[-MAX_OUTPUT_TAIL_CHARS:], stderr=stderr[-MAX_OUTPUT_TAIL_CHARS:])


def failed(index: int, type_: str, message: str, *, stdout: str = "", stderr: str = "") -> Outcome:
    return Outcome(index=index, ok=False,
                   failure=failure(type_, message, stdout=stdout, stderr=stderr))


_FAILURE_FIELDS = ("type", "message", "traceback", "stdout", "stderr")


def parse_reply(raw: Any, *, attempt: int, index: int | None) -> Outcome | Done:
    """Check one decoded reply: the outcome of item ``index`` (the one expected next; None
    when every item has replied and only the end marker may come) or the end marker."""
    if type(raw) is not dict:
        raise PipeError(f"reply is not a map: {type(raw).__name__}")
    if raw.get("attempt") != attempt or type(raw.get("attempt")) is not int:
        raise PipeError(f"reply for attempt {raw.get('attempt')!r:.30}, expected {attempt}")
    if "done" in raw:
        if (raw["done"] is not True or set(raw) != {"attempt", "done", "out", "err"}
                or type(raw["out"]) is not int or type(raw["err"]) is not int):
            raise PipeError("malformed end marker")
        if index is not None:
            raise PipeError(f"end marker before item {index} replied")
        return Done(attempt, raw["out"], raw["err"])
    if index is None:
        raise PipeError("reply for an item after the last one")
    if set(raw) != {"attempt", "index", "ok", "value", "failure"}:
        raise PipeError(f"reply fields {sorted(map(str, raw))!r:.120}")
    if raw["index"] != index or type(raw["index"]) is not int:
        raise PipeError(f"reply for item {raw['index']!r:.30}, expected {index}")
    if raw["ok"] is True:
        value = raw["value"]
        if type(value) is not bytes or raw["failure"] is not None:
            raise PipeError("ok reply without a bytes value, or with a failure")
        if len(value) > MAX_VALUE_BYTES:
            return failed(index, "ResultTooLarge",
                          f"result of {len(value)} bytes exceeds {MAX_VALUE_BYTES}")
        return Outcome(index=index, ok=True, value=value)
    if raw["ok"] is not False or raw["value"] is not None:
        raise PipeError("reply 'ok' is not a bool, or a failed reply carries a value")
    f = raw["failure"]
    if (type(f) is not dict or set(f) != set(_FAILURE_FIELDS)
            or any(type(f[k]) is not str for k in _FAILURE_FIELDS)):
        raise PipeError("reply failure is not a map of five strings")
    return Outcome(index=index, ok=False,
                   failure=failure(f["type"], f["message"], traceback=f["traceback"],
                                   stdout=f["stdout"], stderr=f["stderr"]))
