"""What a connection holds in memory: it grows with the bytes a peer actually sent, shrinks back
once a large frame is delivered, is all dropped when the connection ends, and never waits for
the cyclic garbage collector (issue 10, defects 5 and 7).

Memory is measured with ``tracemalloc`` (it sees bytearrays and numpy buffers alike), so the
tests say nothing about how the decoder is built inside."""

from __future__ import annotations

import gc
import tracemalloc
import weakref
from collections.abc import Callable, Iterator

import msgpack
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.connection import NEED_DATA, Channel, Connection, ConnState, HandshakeOptions, Role
from protocol.crypto import OPEN_SLACK, Cipher, RecordCipher
from protocol.errors import ErrorCode, RemoteProtocolError
from protocol.framing import HEADER, FrameDecoder, encode_frame
from protocol.limits import MAX_FRAME_BYTES
from protocol.messages import Ping
from protocol.messages.tensor import ArPart
from protocol.tensor import CodecSpec, encode_chunk
from protocol.testing import (
    ConnectionPair,
    drain,
    seeded_identity,
    seeded_token_bytes,
    terminated_with,
)

KIB = 1024
MIB = 1024 * KIB
#: What an idle or stalled connection may hold at most: a 256 KiB receive buffer and small change.
SMALL = 512 * KIB


@pytest.fixture
def traced() -> Iterator[Callable[[], int]]:
    """Bytes allocated (and still held) since the fixture started."""
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    yield lambda: tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()


def deliver(dec: FrameDecoder, data: bytes, *, step: int = 256 * KIB) -> None:
    """What a socket read loop does: reads of at most ``step`` bytes into ``get_buffer``."""
    view, pos = memoryview(data), 0
    while pos < len(view):
        buf = dec.get_buffer(-1)
        k = min(len(buf), step, len(view) - pos)
        buf[:k] = view[pos : pos + k]
        dec.buffer_updated(k)
        pos += k


# ---- the deframer ----------------------------------------------------------------------


@pytest.mark.parametrize("way", ["feed", "get_buffer"])
def test_a_header_announcing_the_largest_frame_costs_what_was_received(way: str, traced: Callable[[], int]) -> None:
    dec = FrameDecoder()
    stream = HEADER.pack(MAX_FRAME_BYTES) + b"12345"
    if way == "feed":
        dec.feed(stream)
    else:
        deliver(dec, stream)
    assert dec.next_frame(max_size=MAX_FRAME_BYTES) is None
    assert traced() < SMALL  # not the 8 MiB announced
    assert len(dec.get_buffer(-1)) <= 64 * KIB  # a socket is never lent the whole announced body


def test_the_buffer_grows_with_the_bytes_received_not_the_announced_length(traced: Callable[[], int]) -> None:
    body = bytes(range(256)) * (MAX_FRAME_BYTES // 256)
    stream = encode_frame(body, max_size=MAX_FRAME_BYTES)
    dec = FrameDecoder()
    sent, base = 0, traced()
    for stop in (100 * KIB, 1 * MIB, 3 * MIB):
        deliver(dec, stream[sent:stop])
        sent = stop
        assert dec.next_frame(max_size=MAX_FRAME_BYTES) is None
        assert traced() - base <= 4 * sent + 4 * SMALL, (sent, traced() - base)
    deliver(dec, stream[sent:])
    got = dec.next_frame(max_size=MAX_FRAME_BYTES)
    assert got is not None and bytes(got) == body


@pytest.mark.parametrize("way", ["feed", "get_buffer"])
def test_memory_returns_to_small_once_a_large_frame_is_delivered(way: str, traced: Callable[[], int]) -> None:
    bodies = [bytes([k]) * (MAX_FRAME_BYTES - k) for k in range(3)]
    dec, base = FrameDecoder(), traced()
    for body in bodies:
        stream, got = encode_frame(body, max_size=MAX_FRAME_BYTES), []
        for k in range(0, len(stream), 300 * KIB):  # read by read, asking for frames after each
            if way == "feed":
                dec.feed(stream[k : k + 300 * KIB])
            else:
                deliver(dec, stream[k : k + 300 * KIB])
            while (frame := dec.next_frame(max_size=MAX_FRAME_BYTES)) is not None:
                got.append(frame)
        assert len(got) == 1 and bytes(got[0]) == body
        del got, frame, stream
        assert traced() - base < SMALL, traced() - base  # nothing kept for the next frame
    assert dec.buffered == 0


def test_a_delivered_body_stays_intact_while_the_next_one_arrives() -> None:
    first, second = b"a" * (200 * KIB), b"b" * (300 * KIB)
    dec = FrameDecoder()
    deliver(dec, encode_frame(first, max_size=MIB), step=50 * KIB)
    got = dec.next_frame(max_size=MIB)
    assert got is not None
    deliver(dec, encode_frame(second, max_size=MIB), step=50 * KIB)
    assert bytes(got) == first
    assert bytes(dec.next_frame(max_size=MIB) or b"") == second


def test_a_released_decoder_holds_nothing_and_ignores_what_comes() -> None:
    dec = FrameDecoder()
    deliver(dec, HEADER.pack(MIB) + b"x" * (200 * KIB))
    assert dec.next_frame(max_size=MIB) is None
    dec.release()
    assert dec.buffered == 0
    buf = dec.get_buffer(-1)
    assert 0 < len(buf) <= 4 * KIB  # a late read still has somewhere to go
    buf[:3] = b"abc"
    dec.buffer_updated(3)
    dec.feed(b"more")
    assert dec.buffered == 0 and dec.next_frame(max_size=MIB) is None


# ---- connections -----------------------------------------------------------------------


def open_pair(seed: int = 0, cipher: Cipher = Cipher.AES_256_GCM) -> ConnectionPair:
    options = HandshakeOptions("10.0.0.1:1", Channel.BULK, ciphers=(cipher,))
    pair = ConnectionPair(seed=seed, initiator_options=options)
    pair.handshake()
    return pair


def test_stalled_maximal_frames_on_many_connections_cost_little(traced: Callable[[], int]) -> None:
    """The attack of defect 5: each member announces a maximal frame, sends 5 bytes, stops."""
    pairs = [open_pair(seed) for seed in range(20)]
    base = traced()
    for pair in pairs:
        conn = pair.responder
        buf = conn.get_buffer(-1)
        data = HEADER.pack(MAX_FRAME_BYTES) + b"12345"
        buf[: len(data)] = data
        conn.buffer_updated(len(data))
        assert conn.next_event() is NEED_DATA
    assert (traced() - base) / len(pairs) < SMALL


@pytest.mark.parametrize("cipher", list(Cipher))
def test_an_open_connection_shrinks_back_after_large_frames(cipher: Cipher, traced: Callable[[], int]) -> None:
    pair = open_pair(cipher=cipher)
    big = Ping(seq=1, target=b"\x07" * 32)
    raw = {**big.to_wire(), "padding": b"p" * (MAX_FRAME_BYTES - 1024)}  # unknown keys are ignored
    frame = pair.inject(pair.initiator, msgpack.packb(raw))
    base = traced()
    for _ in range(2):
        events = []
        for k in range(0, len(frame), 256 * KIB):  # read by read, as a socket delivers it
            pair.responder.receive_data(frame[k : k + 256 * KIB])
            events += drain(pair.responder)
        assert [e.message for e in events] == [big]  # type: ignore[union-attr]
        del events
        assert traced() - base < SMALL, traced() - base
        frame = pair.inject(pair.initiator, msgpack.packb(raw))


# ---- nothing waits for the cyclic GC ---------------------------------------------------


class Owner:
    """Stands for ``node.transport.Link``: holds the core and large buffers of its own, and
    drives the core from its own methods (so a traceback through the core reaches it)."""

    def __init__(self, conn: Connection) -> None:
        self.core = conn
        self.buffers = (bytearray(256 * KIB), bytearray(256 * KIB))

    def pump(self, data: bytes) -> list[object]:
        self.core.receive_data(data)
        return list(drain(self.core))


def bad_msgpack(pair: ConnectionPair) -> bytes:
    return pair.inject(pair.initiator, b"\xc1")  # 0xc1 is never valid msgpack


def bad_field(pair: ConnectionPair) -> bytes:
    return pair.inject(pair.initiator, msgpack.packb({"t": 16, "seq": -1, "target": b"x"}))


def forged(pair: ConnectionPair) -> bytes:
    frame = bytearray(pair.initiator.send(Ping(seq=1, target=b"\x07" * 32)))
    frame[-1] ^= 1
    return bytes(frame)


def truncated(pair: ConnectionPair) -> bytes:
    return HEADER.pack(0)


@pytest.mark.parametrize("attack", [bad_msgpack, bad_field, forged, truncated])
def test_a_connection_that_failed_is_freed_without_the_cyclic_gc(attack: Callable[[ConnectionPair], bytes]) -> None:
    pair = open_pair()
    data = attack(pair)
    owner = Owner(pair.responder)
    del pair
    gc.collect()
    gc.disable()
    try:
        events = owner.pump(data)
        err = terminated_with(events).error  # type: ignore[arg-type]
        assert isinstance(err, RemoteProtocolError)
        detached = err.__traceback__ is None and err.__context__ is None and err.__cause__ is None
        gone_owner, gone_core = weakref.ref(owner), weakref.ref(owner.core)
        del owner, events, err
        assert gone_owner() is None and gone_core() is None  # freed by reference counting alone
        assert detached
    finally:
        gc.enable()


def test_a_failed_handshake_is_freed_without_the_cyclic_gc() -> None:
    pair = ConnectionPair(responder_secret=b"\x43" * 32)  # wrong mesh secret
    data = pair.initiator.data_to_send()
    owner = Owner(pair.responder)
    del pair
    gc.collect()
    gc.disable()
    try:
        events = owner.pump(data)
        err = terminated_with(events).error  # type: ignore[arg-type]
        assert isinstance(err, RemoteProtocolError) and err.code is ErrorCode.AUTH_FAILED
        detached = err.__traceback__ is None and err.__context__ is None
        gone = weakref.ref(owner)
        del owner, events, err
        assert gone() is None  # freed by reference counting alone
        assert detached
    finally:
        gc.enable()


# ---- release ---------------------------------------------------------------------------


def test_release_drops_every_buffer_of_a_terminated_connection(traced: Callable[[], int]) -> None:
    pair = open_pair()
    conn = pair.responder
    frame = pair.initiator.send(Ping(seq=1, target=b"\x07" * 32))
    partial = HEADER.pack(MIB) + b"y" * (300 * KIB)  # a large frame half received when it ends
    base = traced()
    buf = conn.get_buffer(-1)
    buf[: len(frame)] = frame
    conn.buffer_updated(len(frame))
    assert len(drain(conn)) == 1
    del buf
    for k in range(0, len(partial), 100 * KIB):
        conn.receive_data(partial[k : k + 100 * KIB])
        assert conn.next_event() is NEED_DATA
    assert traced() - base > 300 * KIB
    goodbye = conn.close()
    assert goodbye and conn.state is ConnState.CLOSED
    assert traced() - base < 16 * KIB  # terminated: the receive side is gone already
    conn.release()
    conn.release()  # idempotent
    assert conn.data_to_send() == b"" and conn.buffered_bytes == 0
    buf = conn.get_buffer(-1)  # a read racing the close still has somewhere to go
    assert 0 < len(buf) <= 4 * KIB
    conn.buffer_updated(1)
    assert terminated_with([conn.next_event()]).error is None  # close() reports it once
    assert conn.next_event() is NEED_DATA
    with pytest.raises(Exception):  # noqa: B017 - any ProtocolError: it is over
        conn.send(Ping(seq=2, target=b"\x07" * 32))


def test_release_of_a_live_connection_ends_it_without_sending() -> None:
    conn = Connection(role=Role.INITIATOR, identity=seeded_identity(1), mesh_secret=b"\x42" * 32,
                      options=HandshakeOptions("10.0.0.1:1", Channel.CONTROL), now=0.0,
                      token_bytes=seeded_token_bytes(1))
    conn.release()
    assert conn.state is ConnState.CLOSED and conn.data_to_send() == b""
    assert terminated_with([conn.next_event()]).error is None
    assert conn.next_event() is NEED_DATA and conn.next_deadline() is None


# ---- a body in pieces opens like one buffer --------------------------------------------


@given(size=st.integers(0, 3000), cuts=st.lists(st.integers(0, 3100), max_size=6), flip=st.integers(-1, 3100))
def test_a_frame_opened_from_pieces_is_the_frame_opened_whole(size: int, cuts: list[int], flip: int) -> None:
    """``RecordCipher.opener`` over the parts ``next_frame_parts`` gives (cut anywhere, even
    inside the tag) decrypts and authenticates exactly as the joined frame does."""
    key, plaintext = bytes(range(32)), bytes(k % 251 for k in range(size))
    sealed = bytearray(RecordCipher(Cipher.AES_256_GCM, key).seal(plaintext))
    if 0 <= flip < len(sealed):
        sealed[flip] ^= 0x20
    points = sorted({c % (len(sealed) + 1) for c in cuts})
    parts = [memoryview(sealed)[a:b] for a, b in zip([0, *points], [*points, len(sealed)], strict=True) if b > a]
    opener = RecordCipher(Cipher.AES_256_GCM, key).opener(parts)
    assert opener is not None and opener.size == size
    out = bytearray(size + OPEN_SLACK)
    pos = 0
    for step in (7, 100, 1000, size):  # read in uneven steps, as split_head then the payload do
        n = min(step, size - pos)
        opener.read_into(memoryview(out)[pos:], n)
        pos += n
    opener.read_into(memoryview(out)[pos:], size - pos)
    if 0 <= flip < len(sealed):
        with pytest.raises(RemoteProtocolError) as exc:
            opener.finish()
        assert exc.value.code is ErrorCode.DECRYPT_FAILED
    else:
        opener.finish()
        assert bytes(out[:size]) == plaintext


@given(reads=st.lists(st.integers(1, 300_000), min_size=1, max_size=30), numel=st.sampled_from([20_000, 400_000]))
def test_large_tensor_frames_read_in_any_sizes_arrive_intact(reads: list[int], numel: int) -> None:
    """The node's way: every read straight into ``get_buffer``, events drained after each."""
    pair = open_pair()
    values = np.arange(numel, dtype=np.float32)
    msgs = [ArPart(round_id=b"R" * 16, slice=0, chunk=k, data=encode_chunk(values + k, CodecSpec.parse("none")))
            for k in range(2)]
    stream = pair.initiator.send_many(msgs)
    got, pos, k = [], 0, 0
    while pos < len(stream):
        buf = pair.responder.get_buffer(-1)
        n = min(len(buf), reads[k % len(reads)], len(stream) - pos)
        buf[:n] = stream[pos : pos + n]
        pair.responder.buffer_updated(n)
        got += drain(pair.responder)
        pos, k = pos + n, k + 1
    assert [e.message for e in got] == msgs  # type: ignore[union-attr]
