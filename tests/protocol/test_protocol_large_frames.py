"""The zero-copy paths for large frames: receiving in place (``get_buffer``), sealing a tensor
message from its payload (``encode_split``), and opening it into the payload's own buffer
(``split_head`` + ``FrameOpener``). Each must be indistinguishable on the wire and in what
the receiver gets from the plain paths, including for hostile input."""

from __future__ import annotations

import random

import msgpack
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.connection import Channel, ConnState, HandshakeOptions, MessageReceived
from protocol.crypto import Cipher
from protocol.errors import ErrorCode, RemoteProtocolError
from protocol.framing import HEADER, RECEIVE_BYTES, FrameDecoder, encode_frame
from protocol.messages import PushPull
from protocol.messages.tensor import ArAverage, ArPart
from protocol.schema import SPLIT_HEAD_BYTES, decode_body, encode_body, put_blob, split_head
from protocol.tensor import CodecSpec, decode_chunk, encode_chunk
from protocol.testing import ConnectionPair, drain, terminated_with

RID = b"R" * 16


def part(numel: int, *, seed: int = 0, codec: str = "none") -> ArPart:
    values = np.random.default_rng(seed).standard_normal(numel, dtype=np.float32)
    return ArPart(round_id=RID, slice=3, chunk=1, data=encode_chunk(values, CodecSpec.parse(codec), offset=7))


def bulk_pair(cipher: Cipher = Cipher.AES_256_GCM) -> ConnectionPair:
    pair = ConnectionPair(initiator_options=HandshakeOptions("10.0.0.1:1", Channel.BULK, ciphers=(cipher,)))
    pair.handshake()
    return pair


# ---- receiving in place ----------------------------------------------------------------


@given(sizes=st.lists(st.sampled_from([1, 5, 300, 70_000, 300_000]), min_size=1, max_size=6),
       reads=st.lists(st.integers(1, 400_000), min_size=1, max_size=40))
def test_get_buffer_yields_the_same_frames_as_feed(sizes: list[int], reads: list[int]) -> None:
    bodies = [bytes([i % 251]) * n for i, n in enumerate(sizes)]
    stream = b"".join(encode_frame(b, max_size=1 << 20) for b in bodies)
    dec, got, pos, k = FrameDecoder(), [], 0, 0
    while pos < len(stream):
        buf = dec.get_buffer(-1)
        n = min(len(buf), reads[k % len(reads)], len(stream) - pos)
        buf[:n] = stream[pos:pos + n]  # what the socket does
        dec.buffer_updated(n)
        pos, k = pos + n, k + 1
        while (body := dec.next_frame(max_size=1 << 20)) is not None:
            got.append(bytes(body))
    assert got == bodies and dec.buffered == 0


def test_a_large_body_is_received_in_place() -> None:
    body = bytes(range(256)) * 2048  # 512 KiB
    stream = encode_frame(body, max_size=len(body))
    dec = FrameDecoder()
    buf = dec.get_buffer(-1)
    assert len(buf) == RECEIVE_BYTES
    buf[:100] = stream[:100]
    dec.buffer_updated(100)
    assert dec.next_frame(max_size=len(body)) is None  # FILL mode starts: the body gets buffers
    pos, lent = 100, []
    while pos < len(stream):
        buf = dec.get_buffer(-1)
        # room in the body's own pieces, which grow with what arrived: at least 64 KiB (or
        # what the body lacks), never the whole announced body up front
        assert min(64 * 1024, len(stream) - pos) <= len(buf) < len(stream) - 100
        buf[:] = stream[pos : pos + len(buf)]
        dec.buffer_updated(len(buf))
        pos += len(buf)
        lent.append(buf.obj)
    parts = dec.next_frame_parts(max_size=len(body))
    assert parts is not None and b"".join(parts) == body and dec.buffered == 0
    # written in place: every read went straight into a piece of the body, no bounce buffer
    pieces = [p.obj for p in parts if isinstance(p, memoryview)]
    assert len(pieces) == len(parts) > 1
    assert all(any(obj is piece for piece in pieces) for obj in lent)


# ---- sealing and opening tensor messages -------------------------------------------------


@pytest.mark.parametrize("cipher", list(Cipher))
@pytest.mark.parametrize("numel", [100, 16_384, 16_385, 1 << 20])
def test_tensor_messages_cross_intact_and_keep_the_payload_without_copies(cipher: Cipher, numel: int) -> None:
    pair = bulk_pair(cipher)
    msgs: list[ArPart | ArAverage] = [part(numel, seed=1), ArAverage(round_id=RID, epoch=2, slice=0, chunk=0, data=part(numel, seed=2).data)]
    for m in msgs:
        data = pair.initiator.send(m)
        assert len(data) == HEADER.size + len(encode_body(m)) + 16  # the same bytes as the plain path
        pair.responder.receive_data(data)
        (event,) = drain(pair.responder)
        assert isinstance(event, MessageReceived) and event.message == m
        got = event.message
        assert isinstance(got, ArPart | ArAverage)
        if numel * 4 >= 64 * 1024 and cipher is Cipher.AES_256_GCM:
            assert isinstance(got.data.payload, memoryview) and got.data.payload.readonly  # its own buffer
        assert np.array_equal(decode_chunk(got.data), decode_chunk(m.data))


def test_a_large_message_of_another_kind_takes_the_plain_path() -> None:
    pair = bulk_pair()
    big = PushPull(members=(), join=False)
    raw = {**big.to_wire(), "padding": "x" * 200_000}  # unknown keys are ignored
    pair.responder.receive_data(pair.inject(pair.initiator, msgpack.packb(raw)))
    (event,) = drain(pair.responder)
    assert isinstance(event, MessageReceived) and event.message == big


def test_a_tampered_large_frame_fails_authentication() -> None:
    pair = bulk_pair()
    frame = bytearray(pair.initiator.send(part(1 << 18)))
    frame[len(frame) // 2] ^= 1
    pair.responder.receive_data(bytes(frame))
    err = terminated_with(drain(pair.responder)).error
    assert isinstance(err, RemoteProtocolError) and err.code is ErrorCode.DECRYPT_FAILED
    assert pair.responder.state is ConnState.ERROR


def test_a_tampered_header_is_not_acted_on_before_the_tag_check() -> None:
    pair = bulk_pair()
    frame = bytearray(pair.initiator.send(part(1 << 18)))
    frame[HEADER.size + 10] ^= 0xFF  # inside the msgpack head: would parse as something else
    pair.responder.receive_data(bytes(frame))
    err = terminated_with(drain(pair.responder)).error
    assert isinstance(err, RemoteProtocolError) and err.code is ErrorCode.DECRYPT_FAILED


@pytest.mark.parametrize("mutate", ["short_bin", "long_bin", "payload_not_last", "bad_field", "no_t_first"])
def test_hostile_large_tensor_bodies_get_the_same_verdict_as_the_plain_decoder(mutate: str) -> None:
    good = part(1 << 16)
    wire = good.to_wire()
    if mutate == "short_bin":
        body = encode_body(good)[:-1]
    elif mutate == "long_bin":
        body = encode_body(good) + b"\0"
    elif mutate == "payload_not_last":
        data = wire["data"]
        wire["data"] = {"payload": data.pop("payload"), **data}
        body = msgpack.packb(wire)
    elif mutate == "bad_field":
        wire["data"]["numel"] = -1
        body = msgpack.packb(wire)
    else:
        body = msgpack.packb({k: v for k, v in wire.items() if k != "t"} | {"t": wire["t"]})
    try:
        want: object = decode_body(body)
    except RemoteProtocolError as exc:
        want = exc.code
    pair = bulk_pair()
    pair.responder.receive_data(pair.inject(pair.initiator, body))
    events = drain(pair.responder)
    if isinstance(want, ErrorCode):
        err = terminated_with(events).error
        assert isinstance(err, RemoteProtocolError) and err.code is want
    else:
        assert events == [MessageReceived(want)]  # type: ignore[arg-type]


# ---- split_head is exactly the full decoder, minus the copy ------------------------------


def _body_variants(seed: int) -> list[bytes]:
    rng = random.Random(seed)
    base = bytearray(encode_body(part(rng.choice([0, 3, 4096, 20_000]), seed=seed,
                                      codec=rng.choice(["none", "int8", "fp16+zstd"]))))
    out = [bytes(base)]
    for _ in range(20):  # random corruption of the head, the one place split_head reads
        b = bytearray(base)
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(min(len(b), 200))] = rng.randrange(256)
        out.append(bytes(b))
    return out


@pytest.mark.parametrize("seed", range(12))
def test_split_head_agrees_with_unpacking_the_whole_body(seed: int) -> None:
    for body in _body_variants(seed):
        found = split_head(body[:SPLIT_HEAD_BYTES], len(body))
        if found is None:
            continue  # the caller decodes the whole body: nothing to compare
        raw, offset = found
        put_blob(raw, body[offset:])
        assert raw == msgpack.unpackb(body, raw=False, strict_map_key=True)


def test_split_head_needs_the_payload_to_end_the_body() -> None:
    body = encode_body(part(50_000))
    assert split_head(body[:SPLIT_HEAD_BYTES], len(body)) is not None
    assert split_head(body[:SPLIT_HEAD_BYTES], len(body) + 1) is None
    assert split_head(body[:20], len(body)) is None  # the head does not reach the payload
    ping = encode_body(PushPull(members=(), join=True))
    assert split_head(ping, len(ping)) is None


@given(head=st.binary(max_size=300), extra=st.integers(0, 1 << 20))
def test_split_head_never_raises_on_garbage(head: bytes, extra: int) -> None:
    found = split_head(head, len(head) + extra)
    if found is not None:  # then it is a tensor message's head, payload bytes still to come
        raw, offset = found
        assert raw["t"] in (int(ArPart.TAG), int(ArAverage.TAG)) and offset <= len(head)
