"""Pure helpers of the membership benchmark (no processes)."""

from __future__ import annotations

import pytest

from simulations.__main__ import build_parser
from simulations.bench_membership import percentile, run
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


def test_bench_join_and_detect_options() -> None:
    join = build_parser(["bench", "join"]).parse_args(["bench", "join", "--nodes", "4"])
    assert (join._bench, join.nodes, join.trials, join.timeout) == ("join", 4, 20, 10.0)
    assert not hasattr(join, "freeze_trials") and join._run is run
    detect = build_parser(["bench", "detect"]).parse_args(["bench", "detect", "--freeze-trials", "2"])
    assert (detect._bench, detect.trials, detect.timeout, detect.freeze_trials) == ("detect", 10, 20.0, 2)
