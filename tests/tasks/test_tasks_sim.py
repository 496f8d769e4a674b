"""``python -m simulations tasks``: a small deterministic run (a coordinator crash, joins)
records every result exactly once and reports sane numbers; the CLI writes its JSON line
and its plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from simulations.__main__ import main
from simulations.tasks_sim import Params, simulate

SMALL = Params(nodes=20, subtasks=2000, crash_rate=1.0, join_rate=6.0, loss=0.01, duration_ms=500.0,
               detect_s=1.0, seed=1)


def test_a_small_run_with_a_coordinator_crash_and_joins_is_exactly_once_and_sane() -> None:
    r = simulate(SMALL)
    assert r.ok, r.problems
    assert r.finished and r.state == "done" and r.done == 2000 and r.failed == 0
    assert r.duplicates == 0 and r.problems == []
    assert r.crashes >= 1 and r.joins >= 1
    assert len(r.failovers) >= 1 and r.failovers[0].forced and r.takeovers >= 1
    ideal_s = 2000 * 0.5 / (20 * 2)
    assert 0.0 < r.throughput_ratio <= 1.0
    assert r.ideal_s == pytest.approx(ideal_s, rel=0.1)  # joins add slots, crashes take some
    assert r.ideal_s <= r.finish_s < 3 * ideal_s
    for f in r.failovers:
        assert f.takeover_s is not None and f.dispatch_s is not None and f.resume_s is not None
        # detection, then the successor takes over at once, dispatches, and its first result
        # counts after about one subtask: well within detection + a lease
        assert SMALL.detect_s <= f.takeover_s <= f.dispatch_s <= f.resume_s
        assert f.resume_s < SMALL.detect_s + SMALL.lease_s
    assert r.executions >= 2000  # at-least-once: work in flight at the crash ran again
    assert 4.0 < r.messages_per_subtask < 12.0
    assert set(r.by_type) >= {"TaskAssign", "TaskResult", "TaskReplicate", "TaskReplicateAck"}
    assert sum(t["messages"] for t in r.by_type.values()) == r.messages
    assert sum(t["bytes"] for t in r.by_type.values()) == r.bytes
    assert r.series["done"][-1] == 2000 and r.series["t"] == sorted(r.series["t"])


def test_same_seed_same_numbers_and_no_faults_is_near_ideal() -> None:
    quiet = Params(nodes=10, subtasks=600, crash_rate=0.0, join_rate=0.0, loss=0.0, duration_ms=200.0, seed=3)
    a, b = simulate(quiet), simulate(quiet)
    assert a.ok and not a.failovers and a.crashes == 0 and a.joins == 0
    assert (a.finish_s, a.messages, a.bytes) == (b.finish_s, b.messages, b.bytes)
    assert a.executions == 600 and a.duplicates == 0
    assert 0.8 < a.throughput_ratio <= 1.0


def test_cli_writes_a_json_line_and_a_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "tasks.png"
    rc = main(["tasks", "--nodes", "8", "--subtasks", "400", "--crash-rate", "2", "--join-rate", "4",
               "--duration-ms", "200", "--detect-s", "0.5", "--seed", "2", "--json", "--plot", str(png)])
    out = capsys.readouterr().out
    assert rc == 0, out
    line = json.loads(out.strip().splitlines()[-1])
    assert line["ok"] and line["duplicates"] == 0 and line["done"] == 400
    assert 0.0 < line["throughput_ratio"] <= 1.0 and line["failovers"]
    assert "series" not in line and "_replayed" not in line["failovers"][0]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" or "plot skipped" in out


def test_cli_refuses_impossible_knobs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tasks", "--nodes", "1", "--plot", ""]) == 2
    assert "--nodes" in capsys.readouterr().out
