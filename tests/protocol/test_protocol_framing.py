"""Frame decoder: any chunking gives the same frames; caps are enforced from the header."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from protocol.framing import HEADER, FrameDecoder, encode_frame


def frames(dec: FrameDecoder, max_size: int = 1 << 20) -> list[bytes]:
    out = []
    while (body := dec.next_frame(max_size=max_size)) is not None:
        out.append(bytes(body))
    return out


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    return [p for p in pieces if p]  # b"" would mean EOF


@given(
    bodies=st.lists(st.binary(min_size=1, max_size=300), max_size=8),
    big=st.sampled_from([0, 70_000, 200_000]),
    cuts=st.lists(st.integers(min_value=0), max_size=12),
    as_type=st.sampled_from([bytes, bytearray, memoryview]),
)
def test_any_chunking_yields_the_same_frames(bodies: list[bytes], big: int, cuts: list[int], as_type: type) -> None:
    if big:
        bodies = [*bodies[:2], bytes(range(256)) * (big // 256), *bodies[2:]]
    stream = b"".join(encode_frame(b, max_size=1 << 20) for b in bodies)
    dec, got = FrameDecoder(), []
    for piece in split_at(stream, cuts):
        buf = as_type(piece)
        dec.feed(buf)
        if isinstance(buf, bytearray):
            buf[:] = b"\xff" * len(buf)  # the caller may reuse its buffer: we must have copied
        got.extend(frames(dec))
    assert got == bodies
    assert dec.buffered == 0
    dec.feed(b"")
    assert dec.next_frame(max_size=10) is None and dec.eof


def test_views_stay_valid_while_more_data_arrives() -> None:
    dec = FrameDecoder()
    dec.feed(encode_frame(b"abc", max_size=10) + HEADER.pack(3))
    first = dec.next_frame(max_size=10)
    assert first is not None
    for _ in range(100):  # small feeds coalesce; the viewed chunk must not be resized under the view
        dec.feed(b"x")
    assert bytes(first) == b"abc"
    assert bytes(dec.next_frame(max_size=10) or b"") == b"xxx"


def test_large_body_is_assembled_in_place_and_buffer_is_bounded() -> None:
    body = bytes(range(256)) * 4096  # 1 MiB
    stream = encode_frame(body, max_size=len(body))
    dec = FrameDecoder()
    for k in range(0, len(stream), 65_536 + 3):
        dec.feed(stream[k : k + 65_536 + 3])
        got = dec.next_frame(max_size=len(body))
        assert dec.buffered <= len(stream)
        if got is not None:
            assert bytes(got) == body
            break
    else:
        pytest.fail("frame never completed")
    assert dec.buffered == 0


def test_oversize_header_rejected_before_the_body() -> None:
    dec = FrameDecoder()
    dec.feed(HEADER.pack(101))
    with pytest.raises(RemoteProtocolError) as exc:
        dec.next_frame(max_size=100)
    assert exc.value.code is ErrorCode.FRAME_TOO_LARGE


def test_cap_is_chosen_per_frame() -> None:
    dec = FrameDecoder()
    dec.feed(encode_frame(b"a" * 10, max_size=10) + encode_frame(b"b" * 50, max_size=50))
    assert bytes(dec.next_frame(max_size=10) or b"") == b"a" * 10
    assert bytes(dec.next_frame(max_size=50) or b"") == b"b" * 50


@pytest.mark.parametrize("stream", [b"\x00", b"\x00\x00\x00\x05ab", HEADER.pack(70_000) + b"x" * 100])
def test_eof_inside_a_frame_is_malformed(stream: bytes) -> None:
    dec = FrameDecoder()
    dec.feed(stream)
    assert dec.next_frame(max_size=1 << 20) is None
    dec.feed(b"")
    with pytest.raises(RemoteProtocolError) as exc:
        dec.next_frame(max_size=1 << 20)
    assert exc.value.code is ErrorCode.MALFORMED_FRAME


def test_zero_length_frame_is_malformed() -> None:
    dec = FrameDecoder()
    dec.feed(HEADER.pack(0))
    with pytest.raises(RemoteProtocolError) as exc:
        dec.next_frame(max_size=10)
    assert exc.value.code is ErrorCode.MALFORMED_FRAME


def test_encode_frame_enforces_the_cap() -> None:
    assert encode_frame(b"xy", max_size=2) == b"\x00\x00\x00\x02xy"
    with pytest.raises(LocalProtocolError):
        encode_frame(b"xyz", max_size=2)
    with pytest.raises(LocalProtocolError):
        encode_frame(b"", max_size=2)


def test_one_byte_feeds_do_not_cost_an_object_each() -> None:
    dec = FrameDecoder()
    body = b"z" * 50_000
    stream = encode_frame(body, max_size=len(body))
    for k in range(len(stream)):
        dec.feed(stream[k : k + 1])
    assert len(dec._chunks) <= 2  # coalesced
    assert bytes(dec.next_frame(max_size=len(body)) or b"") == body
