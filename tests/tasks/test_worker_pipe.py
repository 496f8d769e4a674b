"""The frames between a node and its worker processes, and the node's check of replies."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from node.tasks import worker_frames as frames
from node.tasks.worker_frames import PipeError
from node.tasks.worker_pipe import Done, parse_reply
from protocol.messages import tasks


def test_the_worker_copies_of_the_limits_match_the_wire() -> None:
    assert frames.MAX_VALUE_BYTES == tasks.MAX_VALUE_BYTES
    assert frames.MAX_TRACEBACK_CHARS == tasks.MAX_TRACEBACK_CHARS
    assert frames.MAX_OUTPUT_TAIL_CHARS == tasks.MAX_OUTPUT_TAIL_CHARS
    specs = {f.name: f.metadata["starmesh_spec"] for f in dataclasses.fields(tasks.Failure)}
    assert specs["message"].max_len == frames.MAX_MESSAGE_CHARS
    assert specs["type"].max_len == frames.MAX_TYPE_CHARS
    assert specs["traceback"].max_len == frames.MAX_TRACEBACK_CHARS


def test_frames_round_trip_and_are_bounded() -> None:
    frame = frames.encode_frame({"a": b"x"})
    assert frames.frame_length(frame[:4]) == len(frame) - 4
    assert frames.decode_body(frame[4:]) == {"a": b"x"}
    with pytest.raises(PipeError, match="exceeds"):
        frames.frame_length((frames.MAX_PIPE_FRAME + 1).to_bytes(4, "big"))
    with pytest.raises(PipeError):
        frames.decode_body(b"\xc1")
    with pytest.raises(PipeError, match="short"):
        frames.frame_length(b"\x00")


def test_split_items_by_size() -> None:
    items = [(0, b"a" * 5), (1, b"b" * 5), (2, b"c" * 20), (3, b"d")]
    assert list(frames.split_items(items, max_bytes=10)) == [items[:2], [items[2]], [items[3]]]
    assert list(frames.split_items([])) == []


def test_describe_exit() -> None:
    assert frames.describe_exit(3) == "exit code 3"
    assert frames.describe_exit(-11) == "signal SIGSEGV (11)"
    assert frames.describe_exit(None) == "no exit status"


def test_module_allowed() -> None:
    assert frames.module_allowed("node.tasks.builtins", ["node.tasks.builtins"])
    assert not frames.module_allowed("node.tasks.builtinsx", ["node.tasks.builtins"])
    assert frames.module_allowed("mylib.sub", ["mylib.*"]) and not frames.module_allowed("mylib", ["mylib.*"])


def _item(**changes: Any) -> dict[str, Any]:
    reply: dict[str, Any] = {"attempt": 7, "index": 2, "ok": True, "value": b"\x01", "failure": None}
    reply.update(changes)
    return reply


FAILURE = {"type": "ValueError", "message": "m", "traceback": "tb", "stdout": "o", "stderr": "e"}


def test_good_replies() -> None:
    ok = parse_reply(_item(), attempt=7, index=2)
    assert not isinstance(ok, Done) and ok.ok and ok.value == b"\x01"
    bad = parse_reply(_item(ok=False, value=None, failure=FAILURE), attempt=7, index=2)
    assert not isinstance(bad, Done) and bad.failure is not None
    assert (bad.failure.type, bad.failure.stdout, bad.failure.stderr) == ("ValueError", "o", "e")
    assert parse_reply({"attempt": 7, "done": True, "out": 3, "err": 0}, attempt=7, index=None) == Done(7, 3, 0)


def test_long_fields_are_cut_and_big_values_fail() -> None:
    long = dict(FAILURE, message="m" * 10_000, traceback="t" * 10_000 + "END", stdout="o" * 10_000)
    out = parse_reply(_item(ok=False, value=None, failure=long), attempt=7, index=2)
    assert not isinstance(out, Done) and out.failure is not None
    assert len(out.failure.message) == 4096
    assert len(out.failure.traceback) == tasks.MAX_TRACEBACK_CHARS and out.failure.traceback.endswith("END")
    assert len(out.failure.stdout) == tasks.MAX_OUTPUT_TAIL_CHARS
    big = parse_reply(_item(value=b"x" * (tasks.MAX_VALUE_BYTES + 1)), attempt=7, index=2)
    assert not isinstance(big, Done) and big.failure is not None and big.failure.type == "ResultTooLarge"


@pytest.mark.parametrize(("raw", "index"), [
    ([1], 2),
    (_item(attempt=8), 2),
    (_item(attempt=True), 2),
    (_item(index=3), 2),
    (_item(index=2.0), 2),
    (_item(extra=1), 2),
    (_item(ok=1), 2),
    (_item(value="text"), 2),
    (_item(value=b"x", failure=FAILURE), 2),
    (_item(ok=False, value=b"x", failure=FAILURE), 2),
    (_item(ok=False, value=None, failure=None), 2),
    (_item(ok=False, value=None, failure={**FAILURE, "type": 1}), 2),
    (_item(ok=False, value=None, failure={"type": "x"}), 2),
    (_item(), None),  # an item after the last
    ({"attempt": 7, "done": True, "out": 0, "err": 0}, 2),  # done too early
    ({"attempt": 7, "done": 1, "out": 0, "err": 0}, None),
    ({"attempt": 7, "done": True}, None),
])
def test_malformed_replies(raw: Any, index: int | None) -> None:
    with pytest.raises(PipeError):
        parse_reply(raw, attempt=7, index=index)
