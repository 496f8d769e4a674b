"""The gossip simulator: same seed, same numbers; the scenario's phases all happen."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from protocol.errors import ConfigError
from simulations.gossip_sim import Result, Scenario, add_arguments


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def _run(*argv: str) -> Result:
    args = _args(*argv)
    return Scenario(args, args.nodes).run()


def _numbers(res: Result) -> dict[str, object]:
    out = dataclasses.asdict(res)
    out.pop("wall_s")
    return out


SMALL = (
    "--nodes",
    "16",
    "--loss",
    "0.05",
    "--crash",
    "2",
    "--preset",
    "test",
    "--idle",
    "2",
    "--duration",
    "60",
)


def test_same_seed_same_result_and_every_phase_completes() -> None:
    first = _run(*SMALL, "--seed", "3")
    again = _run(*SMALL, "--seed", "3")
    assert _numbers(first) == _numbers(again)
    assert first.converged_s is not None
    assert first.update_rounds is not None
    assert first.crashed == 2 and first.undetected == 0
    assert first.detect_max_s is not None and first.detect_p50_s is not None
    assert first.false_deaths == 0
    assert first.idle_bytes_per_node_s is not None and first.idle_bytes_per_node_s > 0
    other = _run(*SMALL, "--seed", "4")
    assert _numbers(other) != _numbers(first)


def test_crashed_nodes_are_detected_within_the_suspicion_bound_without_loss() -> None:
    res = _run("--nodes", "12", "--crash", "3", "--preset", "test", "--idle", "1", "--seed", "5")
    assert res.undetected == 0 and res.false_suspicions == 0 and res.false_deaths == 0
    # test preset: a probe period 0.25 s, max suspicion timeout 3 s for N <= 10.
    assert res.detect_max_s is not None and res.detect_max_s < 12 * 0.25 + 3.0 + 1.0


def test_bad_arguments_are_config_errors() -> None:
    with pytest.raises(ConfigError):
        Scenario(_args("--nodes", "1"), 1)
    with pytest.raises(ConfigError):
        Scenario(_args("--nodes", "4", "--crash", "3"), 4)
    with pytest.raises(ConfigError):
        Scenario(_args("--nodes", "4", "--loss", "1.5"), 4)
