"""Hostile chunks: wrong lengths, zstd bombs, bad chains and dtypes are rejected, nothing else escapes."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack
import numpy as np
import pytest
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from protocol.errors import LocalProtocolError, RemoteCodecError, RemoteProtocolError
from protocol.limits import MAX_DECOMPRESSED_CHUNK_BYTES
from protocol.schema import SchemaViolation
from protocol.tensor import CodecId, CodecSpec, TensorChunk, decode_chunk, encode_chunk
from protocol.tensor.layout import raw_size

N = 1000
VALUES = (np.random.default_rng(7).standard_normal(N) * 0.1).astype(np.float32)
SPECS = [
    "none",
    "fp16",
    "bf16+zstd",
    "int8:16",
    "int8+zstd",
    "sigma8+zstd",
    "topk:0.05+zstd",
    "topk:0.1+int8:8",
]
GOOD = {name: encode_chunk(VALUES, CodecSpec.parse(name)) for name in SPECS}


def from_wire(raw: Any) -> TensorChunk:
    """What a message decoder does with an embedded chunk: schema errors are the peer's fault."""
    try:
        chunk: TensorChunk = TensorChunk.from_wire(
            msgpack.unpackb(msgpack.packb(raw, use_bin_type=True))
        )
    except SchemaViolation as exc:
        raise RemoteProtocolError(str(exc)) from None
    except LocalProtocolError as exc:
        raise exc.to_remote() from None
    return chunk


def decode_or_reject(raw: Any) -> np.ndarray | None:
    """Decode a wire map; None when rejected with a RemoteProtocolError (RemoteCodecError is one)."""
    try:
        chunk = from_wire(raw)
    except RemoteProtocolError:
        return None
    try:
        out = decode_chunk(chunk)
    except RemoteCodecError:
        return None
    assert out.dtype == np.float32 and out.shape == (chunk.numel,)
    return out


def with_(chunk: TensorChunk, **changes: Any) -> dict[str, Any]:
    return {**chunk.to_wire(), **changes}


@pytest.mark.parametrize("name", SPECS)
def test_good_chunks_survive_the_wire(name: str) -> None:
    out = decode_or_reject(GOOD[name].to_wire())
    assert out is not None
    np.testing.assert_array_equal(out, decode_chunk(GOOD[name]))


@pytest.mark.parametrize("name", SPECS)
def test_wrong_lengths_are_rejected(name: str) -> None:
    good = GOOD[name]
    p = bytes(good.payload)  # as a receiver sees it (a sender may hold a view)
    for payload in (p[:-1], p + b"\0", b"", p[: len(p) // 2]):
        assert decode_or_reject(with_(good, payload=payload)) is None
    fields = ("kept", "raw_bytes") if name.startswith("topk") else ("numel", "kept", "raw_bytes")
    for field in fields:  # (a top-k chunk may legitimately claim any numel above its last index)
        for delta in (-1, 1):
            assert decode_or_reject(with_(good, **{field: getattr(good, field) + delta})) is None


def test_bad_dtype_and_unknown_stage_are_rejected_by_the_schema() -> None:
    good = GOOD["int8+zstd"]
    for changes in (
        {"dtype": 1},
        {"dtype": "f4"},
        {"stages": [3, 99]},
        {"stages": [3, 6, 6, 6]},
        {"numel": -1},
        {"numel": 2**40},
        {"block": 2**20},
        {"payload": "text"},
    ):
        with pytest.raises(RemoteProtocolError):
            from_wire(with_(good, **changes))


@pytest.mark.parametrize(
    "stages",
    [[], [6], [5], [5, 6], [0, 1], [6, 0], [0, 5], [5, 5, 0], [0, 6, 6], [3, 5, 6]],
)
def test_malformed_chains_are_rejected(stages: list[int]) -> None:
    chunk = from_wire(with_(GOOD["none"], stages=stages))
    with pytest.raises(RemoteCodecError):
        decode_chunk(chunk)


def test_block_must_match_the_value_stage() -> None:
    with pytest.raises(RemoteCodecError):
        decode_chunk(dataclasses.replace(GOOD["none"], block=16))
    bad = dataclasses.replace(GOOD["int8:16"], block=0, raw_bytes=GOOD["int8:16"].raw_bytes)
    with pytest.raises(RemoteCodecError):
        decode_chunk(bad)


def _zstd_chunk(
    raw: bytes, *, numel: int, content_size: bool = True, declared: int | None = None
) -> TensorChunk:
    frame = zstandard.ZstdCompressor(level=3, write_content_size=content_size).compress(raw)
    return TensorChunk(
        stages=(CodecId.NONE, CodecId.ZSTD),
        numel=numel,
        kept=numel,
        raw_bytes=len(raw) if declared is None else declared,
        payload=frame,
    )


def test_zstd_bomb_with_a_lying_header_fails_fast() -> None:
    bomb = bytes(MAX_DECOMPRESSED_CHUNK_BYTES)  # 64 MiB of zeros: a frame of a few KiB
    chunk = _zstd_chunk(bomb, numel=1000, declared=4000)
    assert len(chunk.payload) < 10_000
    with pytest.raises(RemoteCodecError, match="declares"):
        decode_chunk(chunk)


def test_zstd_frame_whose_header_understates_its_content_is_rejected() -> None:
    """A frame header claiming 4000 bytes whose blocks expand to 100 000: zstd stops at the
    4000-byte output buffer (nothing larger is ever allocated)."""
    frame = zstandard.ZstdCompressor(level=3, write_content_size=True).compress(bytes(100_000))
    fhd = frame[4]
    assert fhd >> 6 == 2 and (fhd >> 5) & 1  # 4-byte content size, single segment: no window byte
    lying = frame[:5] + (4000).to_bytes(4, "little") + frame[9:]
    chunk = TensorChunk(
        stages=(CodecId.NONE, CodecId.ZSTD), numel=1000, kept=1000, raw_bytes=4000, payload=lying
    )
    with pytest.raises(RemoteCodecError, match="decompression failed"):
        decode_chunk(chunk)


def test_zstd_frame_without_content_size_is_rejected() -> None:
    with pytest.raises(RemoteCodecError, match="unknown"):
        decode_chunk(_zstd_chunk(bytes(4000), numel=1000, content_size=False))


def test_zstd_trailing_data_second_frame_and_garbage_are_rejected() -> None:
    good = _zstd_chunk(VALUES.tobytes(), numel=N)
    assert decode_chunk(good).size == N
    frame = good.payload
    for payload in (
        frame + b"\0",
        frame + frame,
        b"\x28\xb5\x2f\xfd" + bytes(20),
        bytes(30),
        frame[:-3],
    ):
        with pytest.raises(RemoteCodecError):
            decode_chunk(dataclasses.replace(good, payload=payload))


def test_declared_size_over_the_cap_is_rejected_before_decompressing() -> None:
    n = MAX_DECOMPRESSED_CHUNK_BYTES // 4
    huge = {
        "stages": [5, 0, 6],
        "numel": n,
        "kept": n,
        "block": 0,
        "raw_bytes": raw_size((CodecId.TOPK, CodecId.NONE), kept=n, block=0),
        "payload": b"x",
    }
    assert decode_or_reject(huge) is None  # 128 MiB declared: the schema's raw_bytes range says no
    huge["raw_bytes"] = MAX_DECOMPRESSED_CHUNK_BYTES
    assert decode_or_reject(huge) is None  # in range, but not what the header implies


def test_topk_indices_must_ascend_and_stay_in_range() -> None:
    good = GOOD["topk:0.1+int8:8"]
    k = good.kept
    head = np.frombuffer(good.payload, "<u4", count=k).copy()
    tail = good.payload[4 * k :]
    for deltas in (
        np.r_[head[:1], np.zeros(k - 1, np.uint32)],
        np.full(k, 0xFFFFFFFF, np.uint32),
        np.r_[np.uint32(N), head[1:]],
    ):
        bad = dataclasses.replace(good, payload=deltas.astype("<u4").tobytes() + tail)
        with pytest.raises(RemoteCodecError, match="top-k"):
            decode_chunk(bad)


def test_nan_values_from_a_peer_pass_through() -> None:
    good = GOOD["int8:16"]
    nb = -(-N // 16)
    scales = np.full(nb, np.nan, "<f4").tobytes()
    out = decode_chunk(dataclasses.replace(good, payload=scales + good.payload[4 * nb :]))
    assert np.isnan(out).all()


def _field_values() -> st.SearchStrategy[Any]:
    ints = st.one_of(
        st.integers(-2, 70),
        st.integers(0, 2**26),
        st.sampled_from([2**31, 2**32, 2**64 - 1, -(2**63)]),
    )
    return st.one_of(
        ints,
        st.binary(max_size=64),
        st.none(),
        st.lists(st.integers(-1, 8), max_size=5),
        st.floats(),
        st.text(max_size=4),
    )


@given(
    name=st.sampled_from(SPECS),
    changes=st.dictionaries(
        st.sampled_from(
            ["stages", "dtype", "offset", "numel", "kept", "block", "raw_bytes", "payload"]
        ),
        _field_values(),
        max_size=3,
    ),
)
def test_arbitrary_field_values_give_an_array_or_a_remote_error(
    name: str, changes: dict[str, Any]
) -> None:
    decode_or_reject(with_(GOOD[name], **changes))


@given(name=st.sampled_from(SPECS), data=st.data())
def test_corrupted_payload_bytes_give_an_array_or_a_remote_error(
    name: str, data: st.DataObject
) -> None:
    good = GOOD[name]
    payload = bytearray(good.payload)
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(payload) - 1))
        payload[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.sampled_from([None, 0, 1, len(payload) // 2, len(payload) - 1]))
    if cut is not None:
        payload = payload[:cut] if data.draw(st.booleans()) else payload + payload[:cut]
    decode_or_reject(with_(good, payload=bytes(payload)))
