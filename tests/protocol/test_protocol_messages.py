"""Every message type round-trips (through the codec and through a live connection); the tag table is complete."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import wire
from protocol.errors import LocalProtocolError
from protocol.handshake import HANDSHAKE_TYPES
from protocol.schema import (
    REGISTRY,
    Bool,
    Bytes,
    EnumOf,
    Float,
    IntRange,
    ListOf,
    Message,
    Optional,
    Spec,
    Str,
    Struct,
    StructOf,
    UInt,
    _fields_of,
    decode_body,
    encode_body,
)
from protocol.tags import MsgType
from protocol.testing import ConnectionPair

#: Tags owned by the handshake, gossip and control modules (tensor messages test themselves).
OURS = sorted((t for t in REGISTRY if t < 48), key=int)


def strategy_for(s: Spec) -> st.SearchStrategy[Any]:
    """Valid Python-side values for a field spec (small sizes: this is about shape, not volume)."""
    if isinstance(s, UInt):
        return st.integers(0, (1 << s.bits) - 1)
    if isinstance(s, IntRange):
        return st.integers(s.lo, s.hi)
    if isinstance(s, Float):
        return st.floats(None if math.isinf(s.lo) else s.lo, None if math.isinf(s.hi) else s.hi,
                         allow_nan=False, allow_infinity=False)
    if isinstance(s, Bool):
        return st.booleans()
    if isinstance(s, Bytes):
        return st.binary(min_size=s.min_len, max_size=max(s.min_len, min(s.max_len, 40)))
    if isinstance(s, Str):
        if s.pattern is None:
            return st.text(max_size=min(s.max_len, 12))
        return st.from_regex(s.pattern, fullmatch=True).filter(lambda v: len(v) <= s.max_len)
    if isinstance(s, EnumOf):
        return st.sampled_from(list(s.enum_cls))
    if isinstance(s, Optional):
        return st.none() | strategy_for(s.inner)
    if isinstance(s, ListOf):
        return st.lists(strategy_for(s.item), max_size=min(s.max_len, 3)).map(tuple)
    if isinstance(s, StructOf):
        return struct_strategy(s.cls)
    raise NotImplementedError(type(s).__name__)


def _build(cls: type[Struct], kwargs: dict[str, Any]) -> Struct | None:
    try:
        return cls(**kwargs)
    except LocalProtocolError:  # a cross-field rule (e.g. min_version <= version)
        return None


def struct_strategy(cls: type[Struct]) -> st.SearchStrategy[Any]:
    fields = {name: strategy_for(s) for name, s, _ in _fields_of(cls)}
    return st.fixed_dictionaries(fields).map(lambda kw: _build(cls, kw)).filter(lambda m: m is not None)


def test_tag_table_is_complete() -> None:
    wire.check_complete()
    for cls in HANDSHAKE_TYPES:
        assert REGISTRY[cls.TAG] is cls
    assert all(MsgType(int(t)) is t for t in REGISTRY)


@pytest.mark.parametrize("tag", OURS, ids=[t.name for t in OURS])
@settings(max_examples=30)
@given(data=st.data())
def test_message_round_trips(tag: MsgType, data: st.DataObject) -> None:
    msg: Message = data.draw(struct_strategy(REGISTRY[tag]))
    assert decode_body(encode_body(msg)) == msg
    assert msg.to_wire()["t"] == int(tag)


@pytest.mark.parametrize(
    "tag", [t for t in OURS if REGISTRY[t] not in HANDSHAKE_TYPES],
    ids=[t.name for t in OURS if REGISTRY[t] not in HANDSHAKE_TYPES],
)
@settings(max_examples=8)
@given(data=st.data())
def test_message_crosses_a_connection(tag: MsgType, data: st.DataObject) -> None:
    msgs = data.draw(st.lists(struct_strategy(REGISTRY[tag]), min_size=1, max_size=3))
    pair = ConnectionPair()
    pair.handshake()
    pair.exchange(pair.initiator, msgs)
    pair.exchange(pair.responder, msgs)


@st.composite
def mutated_wire_maps(draw: st.DrawFn) -> dict[str, Any]:
    """A valid message's wire map with one field replaced by an arbitrary msgpack value."""
    tag = draw(st.sampled_from(OURS))
    wire_map = draw(struct_strategy(REGISTRY[tag])).to_wire()
    ints = st.integers(-(1 << 63), (1 << 64) - 1)
    junk = st.none() | st.booleans() | ints | st.floats() | st.text(max_size=5) | st.binary(max_size=70) \
        | st.lists(ints, max_size=3) | st.dictionaries(st.text(max_size=3), ints, max_size=3)
    key = draw(st.sampled_from(sorted(wire_map)))
    wire_map[key] = draw(junk)
    return dict(wire_map)


@settings(max_examples=100)
@given(mutated_wire_maps())
def test_one_bad_field_rejects_the_message(wire_map: dict[str, Any]) -> None:
    import msgpack

    from protocol.errors import RemoteProtocolError

    body = msgpack.packb(wire_map, use_bin_type=True)
    try:
        msg = decode_body(body)
    except RemoteProtocolError:
        return
    # The replacement happened to be valid: then it must round-trip exactly.
    assert decode_body(encode_body(msg)) == msg
