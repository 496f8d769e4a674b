"""``protocol.tensor.fastcast``: torch's casts give the numpy reference's bits exactly."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.tensor import fastcast
from protocol.tensor.values import _HALF_TO_FLOAT, float_to_bfloat16, float_to_half

pytest.importorskip("torch")
#: The numpy reference does float arithmetic on NaN bit patterns on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def _adversarial(seed: int) -> np.ndarray:
    """float32 values from random bit patterns (NaN payloads of both signs, Inf, fp32
    subnormals), the fp16/bf16 boundaries around each rounding and overflow threshold, and
    ordinary gradient-sized values."""
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 1 << 32, 20_000, dtype=np.uint64).astype(np.uint32)
    edges = np.array([0.0, -0.0, 65504.0, 65519.99, 65520.0, -65520.0, 2.0**-14, 2.0**-24, 2.0**-25,
                      2.0**-25 * 1.0000001, 5.96e-8, 3.3895314e38, 3.4028235e38, -3.4028235e38,
                      np.inf, -np.inf, np.nan, -np.nan, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11],
                     dtype=np.float32)
    with np.errstate(over="ignore"):
        edges = np.concatenate([edges, np.nextafter(edges, np.float32(np.inf)),
                                np.nextafter(edges, np.float32(-np.inf))]).astype(np.float32)
    normal = (rng.standard_normal(20_000) * 10.0 ** rng.integers(-12, 6, 20_000)).astype(np.float32)
    return np.concatenate([bits.view(np.float32), edges, normal])


@pytest.mark.parametrize("seed", range(3))
def test_half_encode_matches_the_reference_bit_for_bit(seed: int) -> None:
    x = _adversarial(seed)
    fast = fastcast.to_half(x)
    assert fast is not None and fast.dtype == np.float16
    np.testing.assert_array_equal(fast.view(np.uint16), float_to_half(x).view(np.uint16))


@pytest.mark.parametrize("seed", range(3))
def test_bfloat16_encode_matches_the_reference_bit_for_bit(seed: int) -> None:
    x = _adversarial(seed)
    fast = fastcast.to_bfloat16(x)
    assert fast is not None
    np.testing.assert_array_equal(fast, float_to_bfloat16(x))


def test_half_decode_matches_the_reference_on_every_pattern() -> None:
    half = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    half.flags.writeable = False  # payload views are read-only
    fast = fastcast.from_half(half)
    assert fast is not None and fast.dtype == np.float32 and fast.flags.writeable
    np.testing.assert_array_equal(fast.view(np.uint32), _HALF_TO_FLOAT.view(np.uint32))


def test_read_only_input_is_left_alone() -> None:
    x = np.array([1.5, 70000.0, np.nan], np.float32)
    x.flags.writeable = False
    before = x.copy()
    half = fastcast.to_half(x)
    assert half is not None
    np.testing.assert_array_equal(x.view(np.uint32), before.view(np.uint32))
    assert half.view(np.uint16).tolist() == [0x3E00, 0x7BFF, 0x7E00]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, (1 << 32) - 1), min_size=0, max_size=64))
def test_any_bits_encode_like_the_reference(words: list[int]) -> None:
    x = np.array(words, np.uint32).view(np.float32)
    half, bf = fastcast.to_half(x), fastcast.to_bfloat16(x)
    assert half is not None and bf is not None
    np.testing.assert_array_equal(half.view(np.uint16), float_to_half(x).view(np.uint16))
    np.testing.assert_array_equal(bf, float_to_bfloat16(x))


def test_codecs_give_the_same_bytes_without_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where torch is not installed the codecs use the numpy reference: same chunks."""
    from protocol.tensor import CodecSpec
    from protocol.tensor.pipeline import decode_chunk, encode_chunk

    x = _adversarial(7)
    specs = [CodecSpec.parse(name) for name in ("fp16", "bf16", "fp16+zstd")]
    with_torch = [encode_chunk(x, spec, offset=0) for spec in specs]
    decoded = [decode_chunk(chunk) for chunk in with_torch]
    monkeypatch.setattr(fastcast, "_torch", None)
    monkeypatch.setattr(fastcast, "_tried", True)
    assert fastcast.to_half(x) is None
    for spec, chunk, values in zip(specs, with_torch, decoded, strict=True):
        again = encode_chunk(x, spec, offset=0)
        assert bytes(again.payload) == bytes(chunk.payload)
        np.testing.assert_array_equal(decode_chunk(again).view(np.uint32), values.view(np.uint32))
