"""All-reduce wire messages: round trips, schema bounds, cross-field checks, hostile bodies."""

from __future__ import annotations

import contextlib
import dataclasses

import msgpack
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.allreduce.validate import check_commit, check_report
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.messages.tensor import (
    ArAverage,
    ArBegin,
    ArCancel,
    ArCommit,
    ArFinish,
    ArPart,
    ArReport,
    ArTakeover,
    DropReason,
    Exclusion,
    Holding,
    Resend,
)
from protocol.schema import decode_body, encode_body, encode_split
from protocol.tags import MsgType
from protocol.tensor import CodecSpec, encode_chunk

RID = bytes(range(16))
CHUNK = encode_chunk(np.arange(8, dtype=np.float32), CodecSpec.parse("fp16"))
COMMIT = ArCommit(round_id=RID, epoch=2, leader=0, contributors=(0, 2), contributors_since=2,
                  receivers=(0, 1, 2), owners=(0, 1, 2, 2), resend=(Resend(slice=3, senders=(0,)),),
                  dropped=(Exclusion(member=1, reason=DropReason.NON_FINITE),
                           Exclusion(member=3, reason=DropReason.DIED)))
REPORT = ArReport(round_id=RID, epoch=1, leader=0, averages=(0, 2),
                  holdings=(Holding(slice=2, senders=(0, 2), sq_norms=(1.5, 0.0)),),
                  exclusions=(Exclusion(member=3, reason=DropReason.CANCELLED),))
MESSAGES = [
    ArBegin(round_id=RID, numel=1 << 33, layout=b"L" * 16),
    ArPart(round_id=RID, slice=255, chunk=7, data=CHUNK),
    ArAverage(round_id=RID, epoch=64, slice=0, chunk=0, data=CHUNK),
    REPORT,
    COMMIT,
    ArFinish(round_id=RID, epoch=3, leader=1, aborted=True),
    ArCancel(round_id=RID),
    ArTakeover(round_id=RID, epoch=0, leader=4),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: object) -> None:
    assert decode_body(encode_body(msg)) == msg  # type: ignore[arg-type]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_tensor_messages_split_at_their_payload(msg: object) -> None:
    split = encode_split(msg)  # type: ignore[arg-type]
    if not isinstance(msg, ArPart | ArAverage):
        assert split is None
        return
    assert split is not None
    head, blob = split
    assert head + bytes(blob) == encode_body(msg) and bytes(blob) == bytes(msg.data.payload)
    for size in (0, 255, 256, 65535, 65536, 70000):  # every bin header width
        values = np.arange(size // 4, dtype=np.float32)
        big = dataclasses.replace(msg, data=encode_chunk(values, CodecSpec.parse("none")))
        head, blob = encode_split(big)  # type: ignore[misc]
        assert head + bytes(blob) == encode_body(big) and decode_body(head + bytes(blob)) == big


def test_tags_are_in_the_all_reduce_range() -> None:
    assert sorted(int(type(m).TAG) for m in MESSAGES) == list(range(48, 56))
    assert all(48 <= t <= 79 for t in MsgType if t.name.startswith("AR_"))


@pytest.mark.parametrize(
    ("msg", "change"),
    [
        (MESSAGES[0], {"round_id": b"short"}),
        (MESSAGES[0], {"numel": 0}),
        (MESSAGES[0], {"layout": b"L" * 17}),
        (MESSAGES[1], {"slice": 256}),
        (MESSAGES[2], {"epoch": -1}),
        (MESSAGES[2], {"epoch": 65}),
        (REPORT, {"averages": tuple(range(257))}),
        (COMMIT, {"contributors_since": -1}),
        (MESSAGES[7], {"leader": -1}),
    ],
)
def test_schema_bounds(msg: object, change: dict[str, object]) -> None:
    with pytest.raises(LocalProtocolError):
        dataclasses.replace(msg, **change)  # type: ignore[type-var]
    raw = msg.to_wire()  # type: ignore[attr-defined]
    raw.update({k: list(v) if isinstance(v, tuple) else v for k, v in change.items()})
    with pytest.raises(RemoteProtocolError):
        decode_body(msgpack.packb(raw, use_bin_type=True))


def test_norms_must_be_finite() -> None:
    with pytest.raises(LocalProtocolError):
        Holding(slice=0, senders=(0,), sq_norms=(float("nan"),))
    raw = REPORT.to_wire()
    raw["holdings"][0]["sq_norms"] = [float("inf"), 1.0]
    with pytest.raises(RemoteProtocolError):
        decode_body(msgpack.packb(raw, use_bin_type=True))


@pytest.mark.parametrize(
    "change",
    [
        {"contributors": (0, 3)},  # not a receiver
        {"contributors": ()},
        {"contributors": (2, 0), "receivers": (0, 1, 2)},  # not ascending
        {"leader": 1},
        {"owners": (0, 1, 2)},
        {"owners": (0, 1, 2, 3)},  # 3 is not a receiver
        {"resend": (Resend(slice=3, senders=(1,)),)},  # 1 is not a contributor
        {"dropped": (Exclusion(member=0, reason=DropReason.STALLED),)},
        {"contributors_since": 3},
        {"contributors_since": 0},  # 0 (early averages stand) needs the whole group as S
        {"receivers": (0, 1, 2, 4)},
    ],
)
def test_commit_cross_checks(change: dict[str, object]) -> None:
    check_commit(COMMIT, 4)
    with pytest.raises(RemoteProtocolError):
        check_commit(dataclasses.replace(COMMIT, **change), 4)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "change",
    [
        {"leader": 4},
        {"holdings": (Holding(slice=2, senders=(0, 2), sq_norms=(1.0,)),)},
        {"holdings": (Holding(slice=2, senders=(2, 0), sq_norms=(1.0, 1.0)),)},
        {"holdings": (Holding(slice=1, senders=(0,), sq_norms=(1.0,)),) * 2},
        {"holdings": (Holding(slice=9, senders=(0,), sq_norms=(1.0,)),)},
        {"averages": (2, 0)},
        {"exclusions": (Exclusion(member=5, reason=DropReason.DIED),)},
    ],
)
def test_report_cross_checks(change: dict[str, object]) -> None:
    check_report(REPORT, 4)
    with pytest.raises(RemoteProtocolError):
        check_report(dataclasses.replace(REPORT, **change), 4)  # type: ignore[arg-type]


@given(st.binary(max_size=200), st.integers(48, 55))
def test_hostile_bodies_are_remote_protocol_errors(junk: bytes, tag: int) -> None:
    for body in (junk, msgpack.packb({"t": tag, "round_id": junk, "slice": 1, "chunk": 0, "epoch": 1,
                                      "leader": 0, "data": {"payload": junk}}, use_bin_type=True)):
        with contextlib.suppress(RemoteProtocolError):
            decode_body(body)
