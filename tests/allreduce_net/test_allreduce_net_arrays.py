"""``node.arrays``: tensors in, flat float32 to the mesh, the caller's kind of tensor out."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from node.arrays import flatten
from protocol.errors import ConfigError


def test_contiguous_float32_is_a_view_and_restores_shape() -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    flat, restore = flatten(x)
    assert flat.base is x or np.shares_memory(flat, x)
    avg = (flat * 2).astype(np.float32)
    out = restore(avg, in_place=False)
    assert out.shape == (3, 4) and out.dtype == np.float32 and out.flags.writeable
    np.testing.assert_array_equal(out, x * 2)
    assert x[1, 1] == 5  # the input is untouched


def test_other_float_dtypes_convert_and_come_back() -> None:
    x = np.linspace(-1, 1, 10).reshape(2, 5)  # float64, and a non-contiguous view below
    flat, restore = flatten(x.T)
    assert flat.dtype == np.float32 and flat.shape == (10,)
    out = restore(flat.copy(), in_place=False)
    assert out.dtype == np.float64 and out.shape == (5, 2)
    np.testing.assert_allclose(out, x.T, rtol=1e-7)


def test_in_place_writes_into_the_input() -> None:
    x = np.ones((2, 3), np.float16)
    _, restore = flatten(x)
    out = restore(np.full(6, 0.5, np.float32), in_place=True)
    assert out is x and np.all(x == 0.5)


def test_read_only_average_is_made_writable() -> None:
    x = np.zeros(4, np.float32)
    _, restore = flatten(x)
    avg = np.ones(4, np.float32)
    avg.flags.writeable = False
    out = restore(avg, in_place=False)
    out[0] = 7.0
    assert out[0] == 7.0


def test_torch_in_torch_out() -> None:
    t = torch.arange(6, dtype=torch.float64).reshape(2, 3)
    flat, restore = flatten(t)
    assert flat.dtype == np.float32 and flat.size == 6
    out = restore((flat + 1).astype(np.float32), in_place=False)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64 and out.shape == (2, 3)
    assert torch.equal(out, t + 1)
    same = restore(np.zeros(6, np.float32), in_place=True)
    assert same is t and torch.count_nonzero(t) == 0


@pytest.mark.parametrize("bad", [np.arange(3), np.zeros(0, np.float32), [1.0, 2.0],
                                 torch.arange(3), torch.zeros(0)])
def test_rejects_non_float_and_empty(bad: object) -> None:
    with pytest.raises(ConfigError):
        flatten(bad)
