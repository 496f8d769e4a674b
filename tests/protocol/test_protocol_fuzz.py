"""Fuzz invariant (STYLE 27): any bytes, chunked any way, give valid events or a connection
terminated by ``RemoteProtocolError`` - nothing else escapes, nothing follows termination,
and buffered bytes stay bounded."""

from __future__ import annotations

from typing import Any

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.connection import (
    NEED_DATA,
    Connection,
    ConnectionTerminated,
    ConnState,
    Event,
    HandshakeComplete,
    MessageReceived,
)
from protocol.errors import RemoteProtocolError
from protocol.framing import HEADER
from protocol.limits import MAX_FRAME_BYTES, MAX_HANDSHAKE_FRAME_BYTES
from protocol.schema import REGISTRY, Message, _fields_of, decode_body, encode_body
from protocol.testing import ConnectionPair, drain

TAGS = sorted(int(t) for t in REGISTRY)
FIELD_NAMES = sorted({name for cls in REGISTRY.values() for name, _, _ in _fields_of(cls)})

chunkings = st.lists(st.integers(min_value=1, max_value=300), min_size=1, max_size=20)

scalars = st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1) | st.floats() | st.text(max_size=8) | st.binary(max_size=40)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(FIELD_NAMES), inner, max_size=4), max_leaves=12)
message_like = st.builds(
    lambda tag, fields: {**fields, "t": tag},
    st.sampled_from(TAGS) | st.integers(-5, 300),
    st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=4), values, max_size=8),
)


def msgpack_body(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def feed_and_check(conn: Connection, data: bytes, sizes: list[int], *, cap: int) -> list[Event]:
    """Feed ``data`` in pieces of ``sizes`` (cycled), draining after each; check the invariant."""
    events: list[Event] = []
    pos, k = 0, 0
    while pos < len(data):
        piece = data[pos : pos + sizes[k % len(sizes)]]
        pos, k = pos + len(piece), k + 1
        conn.receive_data(piece)
        while (ev := conn.next_event()) is not NEED_DATA:
            assert not any(isinstance(e, ConnectionTerminated) for e in events), "event after termination"
            events.append(ev)
        assert conn.buffered_bytes <= cap + 4
    for ev in events:
        if isinstance(ev, ConnectionTerminated):  # a typed error, or a well-formed GOODBYE
            assert isinstance(ev.error, RemoteProtocolError) or ev.error is None, ev
            assert conn.state is (ConnState.CLOSED if ev.error is None else ConnState.ERROR)
        else:
            assert isinstance(ev, HandshakeComplete | MessageReceived), ev
    return events


@given(st.binary(max_size=2000))
def test_decode_body_any_bytes(data: bytes) -> None:
    try:
        msg = decode_body(data)
    except RemoteProtocolError:
        return
    assert isinstance(msg, Message)


@settings(max_examples=150)
@given(message_like)
def test_decode_body_message_shaped_maps(obj: dict[str, Any]) -> None:
    try:
        msg = decode_body(msgpack_body(obj))
    except RemoteProtocolError:
        return
    assert decode_body(encode_body(msg)) == msg


@given(st.binary(max_size=3000), chunkings, st.booleans())
def test_responder_fed_garbage(data: bytes, sizes: list[int], with_header: bool) -> None:
    if with_header:  # get past the length check more often
        data = HEADER.pack(min(len(data), MAX_HANDSHAKE_FRAME_BYTES) or 1) + data
    events = feed_and_check(ConnectionPair().responder, data, sizes, cap=MAX_HANDSHAKE_FRAME_BYTES)
    assert not any(isinstance(e, HandshakeComplete) for e in events)


@given(st.binary(max_size=3000), chunkings)
def test_initiator_fed_garbage(data: bytes, sizes: list[int]) -> None:
    events = feed_and_check(ConnectionPair().initiator, data, sizes, cap=MAX_HANDSHAKE_FRAME_BYTES)
    assert not any(isinstance(e, HandshakeComplete) for e in events)


@settings(max_examples=60)
@given(st.binary(max_size=3000), chunkings)
def test_open_connection_fed_garbage(data: bytes, sizes: list[int]) -> None:
    pair = ConnectionPair()
    pair.handshake()
    events = feed_and_check(pair.responder, data, sizes, cap=MAX_FRAME_BYTES)
    assert not any(isinstance(e, MessageReceived) for e in events)  # nothing unauthenticated gets through


@settings(max_examples=60)
@given(st.lists(message_like | st.binary(min_size=1, max_size=64), min_size=1, max_size=5), chunkings)
def test_authenticated_peer_sending_arbitrary_bodies(bodies: list[Any], sizes: list[int]) -> None:
    pair = ConnectionPair()
    pair.handshake()
    raw = [b if isinstance(b, bytes) else msgpack_body(b) for b in bodies]
    data = b"".join(pair.inject(pair.initiator, b) for b in raw)
    events = feed_and_check(pair.responder, data, sizes, cap=MAX_FRAME_BYTES)
    for ev, body in zip(events, raw, strict=False):  # each accepted message is what was sent
        if isinstance(ev, MessageReceived):
            assert decode_body(body) == ev.message


@settings(max_examples=80)
@given(
    flight=st.integers(0, 2),
    position=st.integers(min_value=0),
    edit=st.sampled_from(["flip", "delete", "insert", "truncate"]),
    byte=st.integers(0, 255),
    sizes=chunkings,
)
def test_mutated_handshake_flights(flight: int, position: int, edit: str, byte: int, sizes: list[int]) -> None:
    """Mutate one byte of one real flight; both sides still end in valid events or a typed error."""
    pair = ConnectionPair()
    sender = [pair.initiator, pair.responder, pair.initiator][flight]
    for k in range(flight):  # run the handshake up to the chosen flight
        conn = [pair.initiator, pair.responder][k % 2]
        pair.other(conn).receive_data(conn.data_to_send())
        drain(pair.other(conn))
    data = bytearray(sender.data_to_send())
    p = position % len(data)
    if edit == "flip":
        data[p] ^= byte or 1
    elif edit == "delete":
        del data[p]
    elif edit == "insert":
        data.insert(p, byte)
    else:
        del data[p:]
    receiver = pair.other(sender)
    feed_and_check(receiver, bytes(data), sizes, cap=MAX_FRAME_BYTES)
    ev_i, ev_r = pair.pump()  # let the rest play out
    for events in (ev_i, ev_r):
        for ev in events:
            assert not isinstance(ev, ConnectionTerminated) or isinstance(ev.error, RemoteProtocolError)
