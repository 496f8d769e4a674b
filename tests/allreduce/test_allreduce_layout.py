"""Table tests for the all-reduce's pure pieces: layout formulas, buffers, outbox, config."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from node.allreduce.buffers import SliceBuffer, chunk_sq, reduce_mean, sq_norm
from node.allreduce.config import AllReduceConfig
from node.allreduce.events import TensorKind
from node.allreduce.layout import (
    canonical_group,
    chunk_count,
    chunk_span,
    layout_digest,
    median,
    norm_outliers,
    ring_order,
    round_id,
    slice_sizes,
    weights_for,
)
from node.allreduce.outbox import Job, Outbox
from protocol.errors import ConfigError

A, B, C = (bytes([i]) * 32 for i in (3, 1, 2))


@pytest.mark.parametrize(
    ("numel", "weights", "sizes"),
    [
        (10, [1, 1, 1], (4, 3, 3)),
        (10, [1, 0, 1], (5, 0, 5)),
        (7, [2, 1], (5, 2)),
        (3, [1, 1, 1, 1], (1, 1, 1, 0)),
        (1, [1, 1], (1, 0)),
        (12, [0.5, 0.25, 0.25], (6, 3, 3)),
        (5, [1e-300, 1], (0, 5)),
    ],
)
def test_slice_sizes(numel: int, weights: list[float], sizes: tuple[int, ...]) -> None:
    assert slice_sizes(numel, weights) == sizes


@pytest.mark.parametrize("weights", [[], [-1.0, 1.0], [0.0, 0.0], [float("nan")], [float("inf"), 1.0]])
def test_slice_sizes_rejects(weights: list[float]) -> None:
    with pytest.raises(ConfigError):
        slice_sizes(10, weights)


@given(st.integers(0, 10**7), st.lists(st.floats(0, 1e6), min_size=1, max_size=40))
def test_slice_sizes_largest_remainder(numel: int, weights: list[float]) -> None:
    if not any(weights):
        return
    sizes = slice_sizes(numel, weights)
    total = sum(Fraction(w) for w in weights)
    assert sum(sizes) == numel and all(s >= 0 for s in sizes)
    for s, w in zip(sizes, weights, strict=True):
        assert abs(s - numel * Fraction(w) / total) < 1


def test_group_and_round_id() -> None:
    assert canonical_group([A, B, C]) == (B, C, A)
    rid = round_id([A, B, C], b"step-1")
    assert len(rid) == 16 and rid == round_id([C, A, B], b"step-1")
    assert rid != round_id([A, B, C], b"step-2") and rid != round_id([A, B], b"step-1")
    for bad in ([A, A], [b"short"], [], ["x" * 32]):
        with pytest.raises(ConfigError):
            canonical_group(bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        round_id([A], b"k" * 257)


def test_weights_for() -> None:
    assert weights_for((B, C), None) == (1.0, 1.0)
    assert weights_for((B, C), {C: 2.0}) == (0.0, 2.0)
    with pytest.raises(ConfigError):
        weights_for((B, C), {A: 1.0})


def test_layout_digest_covers_every_input() -> None:
    base = layout_digest(10, (5, 5), 4, "none")
    assert len(base) == 16
    others = [layout_digest(11, (5, 6), 4, "none"), layout_digest(10, (4, 6), 4, "none"),
              layout_digest(10, (5, 5), 5, "none"), layout_digest(10, (5, 5), 4, "fp16")]
    assert base not in others and len(set(others)) == 4
    with pytest.raises(ConfigError):
        layout_digest(0, (), 4, "none")


@pytest.mark.parametrize(
    ("length", "chunk", "count", "spans"),
    [(0, 4, 0, []), (4, 4, 1, [(0, 4)]), (9, 4, 3, [(0, 4), (4, 4), (8, 1)]), (3, 8, 1, [(0, 3)])],
)
def test_chunks(length: int, chunk: int, count: int, spans: list[tuple[int, int]]) -> None:
    assert chunk_count(length, chunk) == count
    assert [chunk_span(length, chunk, i) for i in range(count)] == spans


def test_ring_order_and_median() -> None:
    assert ring_order(4, 1) == (2, 3, 0)
    assert ring_order(1, 0) == ()
    assert median([3.0, 1.0, 2.0]) == 2.0 and median([4.0, 1.0, 2.0, 3.0]) == 2.5


@pytest.mark.parametrize(
    ("norms", "factor", "out"),
    [
        ({0: 1.0, 1: 1.0}, 2.0, set()),
        ({0: 1.0, 1: 1e9}, 2.0, set()),  # two: nobody is the odd one out
        ({0: 1.0, 1: 1.2, 2: 50.0}, 10.0, {2}),
        ({0: 1.0, 1: 1.2, 2: 5.0}, 10.0, set()),
        ({0: 0.0, 1: 0.0, 2: 0.1}, 10.0, {2}),  # median 0: any nonzero norm stands out
        ({0: 1.0, 1: 30.0, 2: 40.0}, 10.0, set()),  # a majority cannot be outliers
        ({0: 1.0, 1: 1.0, 2: 1e9}, None, set()),
    ],
)
def test_norm_outliers(norms: dict[int, float], factor: float | None, out: set[int]) -> None:
    assert norm_outliers(norms, factor) == out


@given(st.lists(hnp.arrays(np.float32, 37, elements=st.floats(width=32, allow_nan=False, allow_infinity=False)), min_size=1, max_size=9))
def test_reduce_mean_is_numpy_fp64_mean_bit_for_bit(parts: list[np.ndarray]) -> None:
    want = np.stack(parts).astype(np.float64).mean(axis=0).astype(np.float32)
    assert np.array_equal(reduce_mean(parts, 5), want)


def test_slice_buffer_any_order_and_duplicates() -> None:
    values = np.arange(10, dtype=np.float32)
    buf = SliceBuffer(10, 4, norms=True)
    assert buf.expects(2, 2) and not buf.expects(2, 4) and not buf.expects(3, 1)
    assert not buf.put(2, values[8:], sq=chunk_sq(values[8:])) and not buf.put(0, values[:4], sq=chunk_sq(values[:4]))
    assert not buf.put(0, values[:4] + 100, sq=1e9)  # a duplicate is ignored
    assert buf.put(1, values[4:8], sq=chunk_sq(values[4:8])) and buf.complete
    assert np.array_equal(buf.values, values) and buf.sq_norm == float(np.dot(values, values))
    assert buf.sq_norm == SliceBuffer.full(values, 4).sq_norm  # same sum as the sender's own
    lazy = SliceBuffer.mean_of([values, 3 * values], 4, epoch=1, owner=0)
    lazy.ensure(1)
    assert lazy.remaining == 2 and np.array_equal(lazy.values[4:8], 2 * values[4:8])
    lazy.ensure_all()
    assert lazy.complete and np.array_equal(lazy.values, 2 * values)
    assert math.isfinite(chunk_sq(values)) and not math.isfinite(chunk_sq(np.array([1, np.inf], np.float32)))
    assert sq_norm(np.array([3, 4], np.float32), 1) == 25.0


@pytest.mark.parametrize("n", [1, 4095, 4096, 4097, 3 * 4096 + 17])
def test_chunk_sq_is_close_to_fp64_and_finite_iff_values_are(n: int) -> None:
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    exact = float(np.sum(x.astype(np.float64) ** 2))
    assert chunk_sq(x) == pytest.approx(exact, rel=1e-6)
    huge = x.copy()
    huge[n // 2] = 3e38  # finite, but its fp32 square overflows: the exact sum decides
    assert math.isfinite(chunk_sq(huge))
    for bad in (np.nan, np.inf, -np.inf):
        y = x.copy()
        y[-1] = bad
        assert not math.isfinite(chunk_sq(y))


def _job(n: int, slice_: int = 0) -> Job:
    return Job(TensorKind.PART, 0, slice_, 100, np.arange(n, dtype=np.float32))


def test_outbox_window_backpressure() -> None:
    box = Outbox(round_id=b"r" * 16, order=(B, C), window_bytes=40, chunk_elements=4)
    box.add(B, _job(18))
    box.add(C, _job(3, slice_=1))
    sends = box.drain()
    # round-robin: B, C, B, then B's window (40 bytes) is full after 2 chunks of 16 bytes + ...
    assert [(s.dest, s.message.chunk, s.message.offset, s.message.nbytes) for s in sends] == [
        (B, 0, 100, 16), (C, 0, 100, 12), (B, 1, 104, 16)]
    assert box.drain() == [] and box.in_flight(B) == 32
    box.on_sent(B, 16)
    assert [(s.message.chunk, s.message.values.tolist()) for s in box.drain()] == [(2, [8.0, 9.0, 10.0, 11.0])]
    box.on_sent(B, 32)
    assert [s.message.chunk for s in box.drain()] == [3, 4] and box.pending() == 0


def test_outbox_one_chunk_always_fits_and_cancel() -> None:
    box = Outbox(round_id=b"r" * 16, order=(B,), window_bytes=1, chunk_elements=4)
    box.add(B, _job(8))
    box.add(B, _job(0))  # empty slices are not queued
    assert [s.message.chunk for s in box.drain()] == [0]
    box.cancel(lambda dest, job: False)
    box.on_sent(B, 16)
    assert box.drain() == [] and box.pending() == 0


@pytest.mark.parametrize(
    "kw",
    [{"chunk_elements": 0}, {"window_bytes": 0}, {"part_timeout": 0.0}, {"round_timeout": float("inf")},
     {"max_epochs": 0}, {"max_epochs": 65}, {"outlier_factor": 1.0}, {"outlier_factor": float("nan")}],
)
def test_config_rejects(kw: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        AllReduceConfig(**kw)  # type: ignore[arg-type]


def test_config_presets_and_transfer_scaling() -> None:
    for cfg in (AllReduceConfig.lan(), AllReduceConfig.local(), AllReduceConfig.test()):
        assert cfg.round_timeout > cfg.part_timeout + cfg.gather_timeout
    big = AllReduceConfig.for_transfer(numel=250_000_000, bytes_per_s=1.25e8)
    assert big.part_timeout == pytest.approx(32.0) and big.round_timeout > 2 * 32.0
    assert AllReduceConfig.for_transfer(numel=10, bytes_per_s=1e9).part_timeout == 30.0
    assert AllReduceConfig(outlier_factor=None).outlier_factor is None
