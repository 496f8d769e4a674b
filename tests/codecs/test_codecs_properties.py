"""Hypothesis: round-trip error bounds on arbitrary float32 vectors, NaN and Inf included."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from protocol.tensor import CodecId, CodecSpec, ErrorFeedback, decode_chunk, encode_chunk
from protocol.tensor.values import FP16_MAX, INT8_TINY

finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
any32 = st.floats(width=32)
vectors = hnp.arrays(np.float32, st.integers(0, 300), elements=finite32)
wild = hnp.arrays(np.float32, st.integers(0, 300), elements=any32)
specs = st.builds(
    CodecSpec,
    value=st.sampled_from(
        [CodecId.NONE, CodecId.FP16, CodecId.BF16, CodecId.INT8_ABSMAX, CodecId.SIGMA8]
    ),
    topk_ratio=st.one_of(st.none(), st.sampled_from([0.01, 0.1, 0.5, 1.0])),
    zstd_level=st.one_of(st.none(), st.sampled_from([-3, 1, 5])),
    int8_block=st.sampled_from([8, 13, 128]),
    chunk_elements=st.just(4096),
)


def int8_bound(x: np.ndarray, block: int) -> np.ndarray:
    pad = -x.size % block
    blocks = np.concatenate([np.abs(x.astype(np.float64)), np.zeros(pad)]).reshape(-1, block)
    return np.repeat(blocks.max(axis=1) / 127 / 2, block)[: x.size] * (1 + 1e-5) + INT8_TINY


def dense_bound(x: np.ndarray, spec: CodecSpec) -> np.ndarray | None:
    """Per-element |error| bound of the value stage for finite x (None: no elementwise bound)."""
    ax = np.abs(x.astype(np.float64))
    if spec.value is CodecId.NONE:
        return np.zeros_like(ax)
    if spec.value is CodecId.FP16:
        return np.maximum(np.minimum(ax, FP16_MAX) * 2.0**-11, 2.0**-25) + np.maximum(
            ax - FP16_MAX, 0
        )
    if spec.value is CodecId.BF16:
        return np.maximum(ax * 2.0**-8, 2.0**-134)
    if spec.value is CodecId.INT8_ABSMAX:
        return int8_bound(x, spec.int8_block)
    return None


@given(x=vectors, spec=specs)
def test_finite_inputs_round_trip_within_the_bound(x: np.ndarray, spec: CodecSpec) -> None:
    y = decode_chunk(encode_chunk(x, spec))
    assert y.shape == x.shape and y.dtype == np.float32
    assert np.isfinite(y).all()
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    if spec.topk_ratio is not None:
        kept = np.flatnonzero(y) if spec.value is not CodecId.NONE else np.flatnonzero(y != 0)
        dropped = np.setdiff1d(np.arange(x.size), kept)
        if kept.size and dropped.size and spec.value is CodecId.NONE:
            assert np.abs(x[dropped]).max() <= np.abs(x[kept]).min()  # the largest were kept
        return
    bound = dense_bound(x, spec)
    if bound is not None:
        assert np.all(np.abs(y64 - x64) <= bound)
    else:  # SIGMA8: every output is a codebook entry = a mean of inputs, so within their range
        if x.size:
            lo, hi = x64.min(), x64.max()
            assert np.all((y64 >= lo - 1e-6 * abs(lo)) & (y64 <= hi + 1e-6 * abs(hi)))


@given(x=wild, spec=specs, feedback=st.booleans())
def test_any_input_encodes_and_non_finite_stays_non_finite(
    x: np.ndarray, spec: CodecSpec, feedback: bool
) -> None:
    fb = ErrorFeedback(x.size) if feedback else None
    y = decode_chunk(encode_chunk(x, spec, feedback=fb))
    assert y.shape == x.shape
    bad = ~np.isfinite(x)
    if spec.topk_ratio is None:
        assert not np.isfinite(y[bad]).any()  # a diverged value is never hidden
        if spec.value is not CodecId.SIGMA8:  # (SIGMA8 spoils only the edge buckets)
            assert np.isfinite(y[~bad]).all() or spec.value is CodecId.NONE
    if fb is not None:
        assert np.isfinite(fb.residual).all()


@given(x=vectors, level=st.sampled_from([1, 3]))
def test_zstd_is_lossless(x: np.ndarray, level: int) -> None:
    for value in ("none", "fp16", "int8"):
        plain = decode_chunk(encode_chunk(x, CodecSpec.parse(value)))
        packed = decode_chunk(encode_chunk(x, CodecSpec.parse(f"{value}+zstd:{level}")))
        np.testing.assert_array_equal(plain, packed)


def reference_topk(x: np.ndarray, k: int) -> np.ndarray:
    """k largest |x| (NaN largest), ties to the lower index, ascending."""
    key = (x.view(np.uint32) & np.uint32(0x7FFFFFFF)).astype(np.int64)
    order = np.lexsort((np.arange(x.size), -key))
    return np.sort(order[:k])


@given(
    x=hnp.arrays(
        np.float32,
        st.integers(1, 3000),
        elements=st.sampled_from([0.0, -0.0, 1.5, -1.5, 2.0, np.nan, np.inf]),
    )
    | hnp.arrays(np.float32, st.integers(1, 3000), elements=any32),
    frac=st.floats(0.0, 1.0),
)
def test_topk_selection_matches_a_sort(x: np.ndarray, frac: float) -> None:
    from protocol.tensor.registry import TOPK

    k = int(frac * x.size)
    np.testing.assert_array_equal(TOPK.select(x, k), reference_topk(x, k))


def test_topk_selection_on_large_inputs_with_many_ties() -> None:
    from protocol.tensor.registry import TOPK

    rng = np.random.default_rng(5)
    n = 200_000
    rows = np.where((np.arange(n) // 192) % 8 != 0, 0, rng.standard_normal(n)).astype(np.float32)
    cases = [
        rows,
        np.zeros(n, np.float32),
        rng.integers(0, 4, n).astype(np.float32),
        np.where(rng.random(n) < 0.9, 1.5, rng.standard_normal(n)).astype(np.float32),
    ]
    for x in cases:
        for k in (1, 200, 2000, 60_000):
            np.testing.assert_array_equal(TOPK.select(x, k), reference_topk(x, k))
