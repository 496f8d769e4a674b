"""CodecSpec text form, validation, and the registry's completeness."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.errors import ConfigError
from protocol.tensor import STAGES, CodecId, CodecSpec, chunk_ranges
from protocol.tensor.ids import VALUE_CODECS
from protocol.tensor.spec import MAX_CHUNK_ELEMENTS, topk_count

T = CodecId


@pytest.mark.parametrize(
    ("text", "stages", "name"),
    [
        ("none", (T.NONE,), "none"),
        ("fp32", (T.NONE,), "none"),
        ("fp16", (T.FP16,), "fp16"),
        ("BF16", (T.BF16,), "bf16"),
        ("int8", (T.INT8_ABSMAX,), "int8"),
        ("int8:512", (T.INT8_ABSMAX,), "int8"),
        ("int8:128", (T.INT8_ABSMAX,), "int8:128"),
        ("int8:64+zstd", (T.INT8_ABSMAX, T.ZSTD), "int8:64+zstd"),
        ("sigma8+zstd:3", (T.SIGMA8, T.ZSTD), "sigma8+zstd:3"),
        ("zstd", (T.NONE, T.ZSTD), "zstd"),
        ("none+zstd:1", (T.NONE, T.ZSTD), "zstd"),
        ("topk", (T.TOPK, T.NONE), "topk:0.01"),
        ("topk:0.01+zstd", (T.TOPK, T.NONE, T.ZSTD), "topk:0.01+zstd"),
        ("topk:0.005+fp16+zstd:-3", (T.TOPK, T.FP16, T.ZSTD), "topk:0.005+fp16+zstd:-3"),
        (" int8 + zstd + chunk:4096 ", (T.INT8_ABSMAX, T.ZSTD), "int8+zstd+chunk:4096"),
    ],
)
def test_parse_and_name(text: str, stages: tuple[CodecId, ...], name: str) -> None:
    spec = CodecSpec.parse(text)
    assert spec.stages == stages
    assert spec.name == name == str(spec)
    assert CodecSpec.parse(spec.name) == spec


@pytest.mark.parametrize(
    "text",
    [
        "",
        "+",
        "gzip",
        "int8+fp16",
        "zstd+int8",
        "zstd+zstd",
        "topk:0",
        "topk:1.5",
        "topk:nan",
        "topk:-0.1",
        "int8:4",
        "int8:x",
        "int8:",
        "fp16:3",
        "zstd:0",
        "zstd:23",
        "chunk",
        "chunk:0",
        f"chunk:{MAX_CHUNK_ELEMENTS + 1}",
        "chunk:10+int8",
        "topk:0.9",
        "x" * 300,
    ],
)
def test_garbage_is_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError):
        CodecSpec.parse(text)


def test_direct_construction_is_validated() -> None:
    with pytest.raises(ConfigError):
        CodecSpec(value=T.TOPK)
    with pytest.raises(ConfigError):
        CodecSpec(topk_ratio=1)  # an int is not a ratio
    assert CodecSpec(topk_ratio=0.9, chunk_elements=1 << 19).stages == (T.TOPK, T.NONE)


@given(
    value=st.sampled_from(sorted(VALUE_CODECS)),
    ratio=st.one_of(st.none(), st.floats(1e-6, 0.5)),
    level=st.one_of(st.none(), st.integers(-7, 22).filter(bool)),
    block=st.integers(8, 1 << 16),
    chunk=st.integers(1, 1 << 20),
)
def test_name_round_trips(
    value: CodecId, ratio: float | None, level: int | None, block: int, chunk: int
) -> None:
    spec = CodecSpec(
        value=value, topk_ratio=ratio, zstd_level=level, int8_block=block, chunk_elements=chunk
    )
    again = CodecSpec.parse(spec.name)
    assert again.stages == spec.stages and again.name == spec.name
    if value is T.INT8_ABSMAX:
        assert again == spec
    assert spec.max_payload_bytes() <= 6 * 1024 * 1024


def test_registry_is_complete() -> None:
    assert set(STAGES) == set(CodecId)
    assert all(s.codec_id is c for c, s in STAGES.items())


@pytest.mark.parametrize(
    ("n", "ratio", "k"),
    [
        (0, 0.5, 0),
        (1, 0.01, 1),
        (100, 0.01, 1),
        (100, 0.015, 2),
        (1000, 0.01, 10),
        (7, 1.0, 7),
        (3, 0.34, 2),
    ],
)
def test_topk_count(n: int, ratio: float, k: int) -> None:
    assert topk_count(n, ratio) == k


def test_chunk_ranges_cover_the_tensor() -> None:
    spec = CodecSpec.parse("int8+chunk:1000")
    assert chunk_ranges(2500, spec) == [(0, 1000), (1000, 1000), (2000, 500)]
    assert chunk_ranges(1000, spec) == [(0, 1000)]
    assert chunk_ranges(0, spec) == [(0, 0)]
