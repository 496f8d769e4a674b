"""``bench tasks``: its ideal formula and options, and a short run of every case with real
node processes (checks that every result came back, not how fast: timings are never asserted)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from simulations.__main__ import build_parser
from simulations.bench_tasks import ideal_with_kill, run
from simulations.nodeprocs import REPO_ROOT


@pytest.mark.parametrize(
    ("n", "slots", "lost", "kill_at", "expected"),
    [(60, 3.0, 1.0, 1.0, 7.0),    # 3 s done by the kill, 12 s left on 2 slots
     (60, 6.0, 2.0, 1.0, 3.25),   # 6 s done by the kill, 9 s left on 4 slots
     (8, 4.0, 1.0, 1.0, 0.5),     # finished before the kill
     (60, 3.0, 1.0, 0.0, 7.5)],   # killed at once: all on the survivors
)
def test_ideal_with_kill(n: int, slots: float, lost: float, kill_at: float, expected: float) -> None:
    assert ideal_with_kill(n=n, d=0.25, slots=slots, lost=lost, kill_at=kill_at) == pytest.approx(expected)


def test_bench_tasks_options() -> None:
    args = build_parser(["bench", "tasks"]).parse_args(["bench", "tasks", "--tiny", "200"])
    assert (args.nodes, args.tiny, args.round_trips, args.slow, args.slots, args.lease_s) == (3, 200, 50, 60, 1.0, 2.0)
    assert args.cases == "a,b,c" and args._run is run


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_bench_tasks_short_run_checks_every_result() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "simulations", "bench", "tasks", "--tiny", "200", "--round-trips", "5",
         "--slow", "12", "--kill-at", "0.5", "--preset", "test", "--json"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["failures"] == []
    assert result["tiny_wrong"] == result["worker_kill_wrong"] == result["coordinator_kill_wrong"] == 0
    assert sum(result["tiny_per_node"].values()) == 200
    assert result["rtt_p50_ms"] is not None and result["rtt_after_tiny_p50_ms"] is not None
    assert result["coordinator_kill_coordinator_changed"] is True
    assert result["worker_kill_coordinator_changed"] is False
    assert "ray_2.60" in result["reference_quoted_from_issue_not_measured"]
