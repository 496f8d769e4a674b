"""Pure helpers of the membership benchmark (no processes)."""

from __future__ import annotations

import pytest

from simulations.bench_membership import percentile
from simulations.nodeprocs import converged


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [([], 50, None), ([3.0], 95, 3.0), ([float(i) for i in range(1, 21)], 95, 19.0),
     ([float(i) for i in range(1, 21)], 50, 10.0), ([5.0, 1.0, 3.0], 100, 5.0)],
)
def test_percentile_nearest_rank(values: list[float], q: float, expected: float | None) -> None:
    assert percentile(values, q) == expected


def _view(*members: tuple[str, str, int]) -> dict[str, object]:
    return {"members": [{"id": i, "state": s, "incarnation": n} for i, s, n in members]}


def test_converged_needs_identical_complete_alive_views() -> None:
    same = _view(("a", "alive", 1), ("b", "alive", 2))
    assert converged({"a": same, "b": same}, ["a", "b"])
    assert not converged({"a": same, "b": None}, ["a", "b"])
    assert not converged({"a": same, "b": _view(("a", "alive", 1), ("b", "alive", 3))}, ["a", "b"])
    assert not converged({"a": same, "b": same}, ["a", "b", "c"])
    suspect = _view(("a", "alive", 1), ("b", "suspect", 2))
    assert not converged({"a": suspect, "b": suspect}, ["a", "b"])
