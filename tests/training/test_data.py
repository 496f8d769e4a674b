"""The shipped text and the (shard, position) windows: exact coverage, wrap-around, determinism."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import pytest
import torch

from node.training.runner import data


def test_shipped_shakespeare_is_the_reference_text() -> None:
    raw = data.shakespeare_bytes()
    assert len(raw) == data.SHAKESPEARE_BYTES == 1_115_394
    assert hashlib.sha256(raw).hexdigest() == data.SHAKESPEARE_SHA256
    assert data.shakespeare_text().startswith("First Citizen:")


def _windows(n: int = 1000, **kw: int) -> data.Windows:
    args = {"block": 8, "batch": 5, "shards": 4, "seed": 7} | kw
    return data.Windows(torch.arange(n), **args)


def test_windows_per_epoch_do_not_depend_on_the_offset() -> None:
    w = _windows()
    assert w.count == (1000 - 16) // 8 + 1 == 124
    for epoch in range(20):
        last = w.window_start(w.count - 1, epoch)
        assert 0 <= w.window_start(0, epoch) < 8 and last + 8 + 1 <= 1000


def test_a_shard_reads_each_of_its_windows_once_per_epoch_then_wraps() -> None:
    w = _windows()
    size = w.shard_size(1)
    assert size == 31
    stream = [w.stream(1, e) for e in range(3 * size)]
    for epoch in range(3):
        chunk = stream[epoch * size:(epoch + 1) * size]
        assert sorted(i for i, _ in chunk) == list(range(1, 124, 4))
        assert {e for _, e in chunk} == {epoch}
    # a batch crossing the end of epoch 0 takes the rest from epoch 1's order
    crossing = size // w.batch
    starts = w.starts(1, crossing)
    expected = [w.window_start(*stream[e]) for e in range(crossing * 5, crossing * 5 + 5)]
    assert starts == expected
    assert {stream[e][1] for e in range(crossing * 5, crossing * 5 + 5)} == {0, 1}


def test_shards_partition_an_epoch() -> None:
    w = _windows()
    seen = Counter(w.stream(k, e)[0] for k in range(4) for e in range(w.shard_size(k)))
    assert sorted(seen) == list(range(w.count)) and set(seen.values()) == {1}


def test_batches_are_deterministic_shifted_and_seeded() -> None:
    a, b, other = _windows(), _windows(), _windows(seed=8)
    x, y = a.batch_at(2, 9)
    assert x.shape == y.shape == (5, 8) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y - x, torch.ones_like(x))
    assert torch.equal(x, b.batch_at(2, 9)[0])
    assert not torch.equal(x, other.batch_at(2, 9)[0])
    assert a.starts(2, 9) != a.starts(2, 10)


def test_bad_cursors_and_too_little_text_are_refused() -> None:
    w = _windows()
    with pytest.raises(data.DataError):
        w.starts(4, 0)
    with pytest.raises(data.DataError):
        w.starts(0, -1)
    with pytest.raises(data.DataError, match="fewer than the 4 shards"):
        _windows(n=30)


def test_read_text(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_bytes("héllo\n".encode())
    assert data.read_text(path) == "héllo\n"
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(data.DataError):
        data.read_text(path)
