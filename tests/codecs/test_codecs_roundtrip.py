"""Round-trip error bounds per codec on random and adversarial tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from protocol.tensor import CodecId, CodecSpec, ErrorFeedback, decode_chunk, encode_chunk
from protocol.tensor.values import FP16_MAX, INT8_TINY

Floats = np.ndarray

ALL_SPECS = [
    "none",
    "fp16",
    "bf16",
    "int8",
    "int8:8",
    "sigma8",
    "zstd",
    "fp16+zstd",
    "bf16+zstd",
    "int8+zstd",
    "sigma8+zstd",
    "topk:0.1",
    "topk:0.1+zstd",
    "topk:0.1+fp16+zstd",
    "topk:0.1+int8:16+zstd",
    "topk:0.1+sigma8",
    "topk:1.0+bf16",
]


def roundtrip(x: Floats, name: str) -> Floats:
    codec = CodecSpec.parse(name)
    chunk = encode_chunk(x, codec)
    y = decode_chunk(chunk)
    assert y.dtype == np.float32 and y.shape == x.shape
    # A plain NONE chunk (``none``, or ``zstd`` that did not compress) is zero-copy: its payload
    # is a view of x, the decoded values a read-only view of the payload. Every other chain
    # decodes into a new writable array.
    assert y.flags.writeable != (chunk.stages == (CodecId.NONE,))
    return y


def check_bound(x: Floats, y: Floats, codec: CodecSpec) -> None:
    """Assert the per-element error bound documented for the codec's value stage."""
    if codec.topk_ratio is not None:
        nz = y != 0
        x, y = x[nz], y[nz]  # kept entries carry the value stage's bound; others are 0
    v = codec.value
    if v is CodecId.NONE:
        np.testing.assert_array_equal(y, x)
    elif v is CodecId.FP16:
        x = np.clip(x, -FP16_MAX, FP16_MAX)  # finite overflow saturates
        bound = np.maximum(np.abs(x) * 2.0**-11, 2.0**-25)
        assert np.all(np.abs(y - x) <= bound)
    elif v is CodecId.BF16:
        assert np.all(np.abs(y - x) <= np.maximum(np.abs(x) * 2.0**-8, 2.0**-134))
    elif v is CodecId.INT8_ABSMAX:
        b = codec.int8_block
        pad = -x.size % b
        blocks = np.concatenate([np.abs(x), np.zeros(pad, np.float32)]).reshape(-1, b)
        half_step = (
            np.repeat(blocks.max(axis=1) / 127 / 2, b)[: x.size]
            if codec.topk_ratio is None
            else None
        )
        if half_step is not None:
            assert np.all(np.abs(y - x) <= half_step * 1.001 + INT8_TINY)


@pytest.mark.parametrize("name", ALL_SPECS)
@pytest.mark.parametrize("n", [0, 1, 7, 129, 1000, 4099, (1 << 16) + 1, 3 * (1 << 16) - 5])
def test_random_normal_roundtrip(name: str, n: int) -> None:
    rng = np.random.default_rng(n)
    x = (rng.standard_normal(n) * 0.02).astype(np.float32)
    y = roundtrip(x, name)
    check_bound(x, y, CodecSpec.parse(name))


@pytest.mark.parametrize("name", ALL_SPECS)
def test_adversarial_finite(name: str) -> None:
    cases = {
        "zeros": np.zeros(300, np.float32),
        "constant": np.full(300, 3.25, np.float32),
        "huge": np.array([3e38, -3e38, 1e30, 1.0, 0.0] * 20, np.float32),
        "tiny": np.array([1e-40, -1e-45, 1e-38, 0.0] * 20, np.float32),
        "one_spike": np.where(np.arange(500) == 250, 1e6, 1e-3).astype(np.float32),
    }
    codec = CodecSpec.parse(name)
    for label, x in cases.items():
        y = roundtrip(x, name)
        assert np.isfinite(y).all(), f"{label}: finite input must decode finite"
        exact = label == "zeros" or (label == "constant" and codec.value is not CodecId.INT8_ABSMAX)
        if exact and codec.topk_ratio is None:
            np.testing.assert_array_equal(y, x, err_msg=label)
        check_bound(x, y, codec)


def test_fp16_saturates_instead_of_overflowing() -> None:
    x = np.array([1e6, -1e6, 65504, 70000, -np.inf, np.inf, np.nan], np.float32)
    y = roundtrip(x, "fp16")
    np.testing.assert_array_equal(y[:4], [FP16_MAX, -FP16_MAX, FP16_MAX, FP16_MAX])
    assert y[4] == -np.inf and y[5] == np.inf and math.isnan(y[6])


def test_bf16_keeps_nan_inf_and_saturates_finite() -> None:
    nan_payload = np.array([0x7F800001, 0xFFFFFFFF], np.uint32).view(np.float32)  # sNaN, -NaN
    x = np.concatenate(
        [np.array([np.inf, -np.inf, 3.4028235e38, -3.4028235e38, 1.0], np.float32), nan_payload]
    )
    y = roundtrip(x, "bf16")
    assert y[0] == np.inf and y[1] == -np.inf
    assert np.isfinite(y[2:5]).all() and y[2] > 3.38e38 and y[3] < -3.38e38 and y[4] == 1.0
    assert np.isnan(y[5:]).all()


@pytest.mark.parametrize("name", ["int8", "int8+zstd", "int8:8"])
def test_int8_non_finite_become_nan_and_do_not_spoil_the_block(name: str) -> None:
    x = np.linspace(-1, 1, 64, dtype=np.float32)
    x[3], x[10], x[20] = np.nan, np.inf, -np.inf
    y = roundtrip(x, name)
    bad = np.zeros(64, bool)
    bad[[3, 10, 20]] = True
    assert np.isnan(y[bad]).all()
    assert np.all(np.abs(y[~bad] - x[~bad]) <= 1 / 127 / 2 * 1.001)


def test_sigma8_non_finite_are_contained_in_edge_buckets() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal(1000).astype(np.float32)
    x[5], x[6], x[7] = np.nan, np.inf, -np.inf
    y = roundtrip(x, "sigma8")
    assert not np.isfinite(y[[5, 6, 7]]).any()
    inner = np.abs(x) < 2.5  # far from the clipped edge buckets
    assert np.isfinite(y[inner]).all()


def test_topk_keeps_nan_and_the_largest() -> None:
    x = np.arange(100, dtype=np.float32)
    x[3] = np.nan
    y = roundtrip(x, "topk:0.05")
    assert math.isnan(y[3]) and set(np.flatnonzero(np.nan_to_num(y))) == {96, 97, 98, 99}


def test_sigma8_error_beats_absent_codebook_bound() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal(1 << 16).astype(np.float32)
    err = {n: np.linalg.norm(roundtrip(x, n) - x) / np.linalg.norm(x) for n in ("int8", "sigma8")}
    assert err["int8"] < err["sigma8"] < 0.03


def _running_gap(name: str, steps: int, *, feedback: bool) -> tuple[list[float], float]:
    """Relative gap ||sum(sent) - sum(inputs)|| / ||sum(inputs)|| per step, and the max
    over steps of |sum(sent) + residual - sum(inputs)| (0 up to float32 rounding)."""
    rng = np.random.default_rng(3)
    codec = CodecSpec.parse(name)
    n = 1000
    fb = ErrorFeedback(n) if feedback else None
    sum_in = np.zeros(n, np.float64)
    sum_sent = np.zeros(n, np.float64)
    gaps, worst = [], 0.0
    for _ in range(steps):
        x = rng.standard_normal(n).astype(np.float32)
        sum_in += x
        sum_sent += decode_chunk(encode_chunk(x, codec, feedback=fb))
        if fb is not None:
            worst = max(worst, float(np.abs(sum_sent + fb.residual - sum_in).max()))
        gaps.append(float(np.linalg.norm(sum_sent - sum_in) / np.linalg.norm(sum_in)))
    return gaps, worst


@pytest.mark.parametrize("name", ["topk:0.02", "topk:0.05+int8+zstd", "topk:0.02+fp16", "sigma8"])
def test_error_feedback_running_sums_converge(name: str) -> None:
    gaps, worst = _running_gap(name, 800, feedback=True)
    assert worst < 1e-2  # sum(sent) == sum(inputs) - residual, exactly up to rounding
    without, _ = _running_gap(name, 800, feedback=False)
    assert gaps[-1] < 0.2 * without[-1]
    if name.startswith("topk"):
        assert gaps[-1] < 0.3 * gaps[50] and gaps[-1] < 0.2  # bounded residual, growing sums
        assert without[-1] > 0.5  # plain top-k never catches up


def test_error_feedback_slices_share_memory_and_reset_non_finite() -> None:
    fb = ErrorFeedback(10)
    part = fb.slice(4, 3)
    x = np.array([1.0, np.nan, 2.0], np.float32)
    decode_chunk(encode_chunk(x, CodecSpec.parse("topk:0.34"), feedback=part))
    np.testing.assert_array_equal(fb.residual, [0, 0, 0, 0, 1.0, 0, 0, 0, 0, 0])
    fb.reset()
    assert not fb.residual.any()
