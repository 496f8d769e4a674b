"""Table tests for the field specs and the one body decoder in protocol/schema.py."""

from __future__ import annotations

import enum
import math

import msgpack
import pytest

from protocol.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from protocol.messages import Alive, MemberStatus, NodeMeta, Ping, PushPull
from protocol.schema import (
    Bool,
    Bytes,
    EnumOf,
    Float,
    IntRange,
    ListOf,
    Optional,
    SchemaViolation,
    Spec,
    Str,
    UInt,
    decode_body,
    encode_body,
)

NODE = bytes(range(32))


class Color(enum.IntEnum):
    RED = 1
    BLUE = 2


@pytest.mark.parametrize(
    ("s", "good", "bad"),
    [
        (UInt(8), [0, 255], [-1, 256, True, 1.0, "1"]),
        (IntRange(-2, 2), [-2, 0, 2], [-3, 3, None]),
        (Float(0.0, 1.0), [0.0, 0.5, 1.0], [math.nan, math.inf, -0.1, 1]),
        (Bool(), [True, False], [0, 1, None]),
        (Bytes(3, min_len=1), [b"a", b"abc"], [b"", b"abcd", "abc", bytearray(b"a"), memoryview(b"ab")]),
        (Bytes(8, views=True), [b"ab", memoryview(b"abcd"), memoryview(bytes(range(8))).cast("d")[:1].cast("B")],
         [memoryview(bytearray(2)), memoryview(b"abcd").cast("i"), memoryview(bytes(9)), memoryview(bytes(8))[::2]]),
        (Str(3), ["", "abc"], ["abcd", b"ab"]),
        (Str(20, pattern=r"[a-z]+:[0-9]+"), ["ab:1"], ["AB:1", "ab:", "ab:1x"]),
        (EnumOf(Color), [Color.RED], [1, 3]),
        (Optional(UInt(8)), [None, 3], [-1]),
        (ListOf(UInt(8), max_len=2), [(), (1, 2)], [(1, 2, 3), [1], (1, -1)]),
    ],
)
def test_spec_accepts_good_and_rejects_bad(s: Spec, good: list[object], bad: list[object]) -> None:
    for v in good:
        s.check(v, "f")
    for v in bad:
        with pytest.raises(SchemaViolation):
            s.check(v, "f")


def test_invalid_message_cannot_be_constructed() -> None:
    with pytest.raises(LocalProtocolError) as info:
        Ping(seq=1, target=b"short")
    assert info.value.code is ErrorCode.SCHEMA_VIOLATION


def test_nested_round_trip_and_wire_is_a_named_map() -> None:
    meta = NodeMeta(cpus=4, memory_bytes=1 << 34, torch_version="2.13.0")
    msg = Alive(incarnation=7, node=NODE, address="[::1]:7400", meta=meta)
    body = encode_body(msg)
    raw = msgpack.unpackb(body)
    assert raw["t"] == 20 and raw["incarnation"] == 7 and raw["meta"]["cpus"] == 4
    assert decode_body(body) == msg


def test_enum_and_float_decode_from_wire_values() -> None:
    body = msgpack.packb(
        {"t": 23, "members": [{"node": NODE, "address": "a:1", "incarnation": 1, "status": 1, "meta": {}}]}
    )
    msg = decode_body(body)
    assert isinstance(msg, PushPull) and msg.members[0].status is MemberStatus.SUSPECT


def test_unknown_keys_are_ignored_for_forward_compatibility() -> None:
    assert decode_body(msgpack.packb({"t": 18, "seq": 3, "future_field": [1, 2]})) == decode_body(
        msgpack.packb({"t": 18, "seq": 3})
    )


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"", ErrorCode.BAD_MSGPACK),
        (b"\xc1", ErrorCode.BAD_MSGPACK),
        (msgpack.packb({"t": 18, "seq": 1}) + b"\x00", ErrorCode.BAD_MSGPACK),
        (msgpack.packb([18, 1]), ErrorCode.SCHEMA_VIOLATION),
        (msgpack.packb({"seq": 1}), ErrorCode.SCHEMA_VIOLATION),
        (msgpack.packb({"t": 9999}), ErrorCode.UNKNOWN_MESSAGE),
        (msgpack.packb({"t": 18, "seq": "1"}), ErrorCode.SCHEMA_VIOLATION),
        (msgpack.packb({"t": 18, "seq": 1 << 40}), ErrorCode.SCHEMA_VIOLATION),
        (msgpack.packb({"t": 18, "seq": msgpack.ExtType(1, b"x")}), ErrorCode.BAD_MSGPACK),
        (msgpack.packb({1: 2}), ErrorCode.BAD_MSGPACK),
        (b"\x91" * 5000 + b"\x00", ErrorCode.BAD_MSGPACK),
        (msgpack.packb({"t": 23, "members": [{"node": NODE}]}), ErrorCode.SCHEMA_VIOLATION),
    ],
)
def test_decoder_rejects_with_typed_error(body: bytes, code: ErrorCode) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode_body(body)
    assert info.value.code is code


def test_allowed_filter_rejects_out_of_state_messages() -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode_body(encode_body(Ping(seq=1, target=NODE)), allowed=lambda t: False)
    assert info.value.code is ErrorCode.UNEXPECTED_MESSAGE
