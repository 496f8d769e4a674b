"""``python -m simulations chaos`` for a minute: 4 nodes and 2 trainers, real processes.

One run (module fixture) under the seeded schedule of ``--seed 1``: kill -9 + restart,
SIGSTOP freezes, the hostile member (bad frames, lies, incarnation extremes, fake-member
floods, PING_REQs to closed ports, AR_REPORT floods) and its keyless strangers, all-reduce
rounds between the trainers. Each test judges one kind of count, never a timing: crashes,
rejoins, fds and links, queue sizes, lock-outs, results. ``simulations.chaos_report`` says
how each is measured; a failing test prints the report's own lines for its kind.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from simulations.chaos_report import PENDING_BYTES_LIMIT

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

ROOT = Path(__file__).resolve().parents[2]

ARGS = ["--nodes", "4", "--trainers", "2", "--minutes", "1", "--seed", "1", "--heal-timeout", "30", "--json"]


@pytest.fixture(scope="module")
def chaos(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, dict[str, Any]]:
    work = tmp_path_factory.mktemp("chaos")
    proc = subprocess.run([sys.executable, "-m", "simulations", "chaos", *ARGS, "--dir", str(work)],
                          cwd=ROOT, capture_output=True, text=True, timeout=380)
    lines = proc.stdout.strip().splitlines()
    assert lines and lines[-1].startswith("{"), proc.stdout[-3000:] + proc.stderr[-3000:]
    report: dict[str, Any] = json.loads(lines[-1])
    return proc.returncode, report


def _failures(report: dict[str, Any], prefix: str) -> list[str]:
    return [f for f in report["failures"] if f.startswith(prefix)]


def test_the_schedule_and_the_hostile_member_ran(chaos: tuple[int, dict[str, Any]]) -> None:
    _, report = chaos
    assert report["kills"] >= 1 and report["freezes"] >= 1
    acts = report["hostile_acts"]
    assert sum(n for n, _ in acts.values()) >= 10, acts


def test_no_crash(chaos: tuple[int, dict[str, Any]]) -> None:
    _, report = chaos
    assert report["crashes"] == 0
    assert _failures(report, "crash") == []


def test_every_restart_rejoins(chaos: tuple[int, dict[str, Any]]) -> None:
    _, report = chaos
    assert report["rejoins"] >= 1
    assert report["rejoins_failed"] == 0, _failures(report, "rejoin")


def test_no_fd_link_or_memory_leak(chaos: tuple[int, dict[str, Any]]) -> None:
    _, report = chaos
    leaks = [f for f in _failures(report, "leak") if "rounds not started" not in f]
    assert leaks == []


def test_queues_stay_bounded(chaos: tuple[int, dict[str, Any]]) -> None:
    _, report = chaos
    for m in report["members"]:
        assert m["allreduce_pending_bytes_max"] <= PENDING_BYTES_LIMIT, m


def test_no_lockout(chaos: tuple[int, dict[str, Any]]) -> None:
    _, report = chaos
    assert [f for f in _failures(report, "lock-out") if "identical view" not in f] == []
    for m in report["members"]:
        assert m["lockouts"] == 0, m


def test_one_view_at_the_end(chaos: tuple[int, dict[str, Any]]) -> None:
    _, report = chaos
    assert report["final_view_ok"], report["final_view_disagreements"]


def test_all_reduce_results_are_exact_means(chaos: tuple[int, dict[str, Any]]) -> None:
    _, report = chaos
    rounds = report["rounds"]
    assert rounds["attempted"] >= 5 and rounds["completed"] >= 1, rounds
    assert rounds["wrong_results"] == 0, rounds


def test_exit_status_is_the_verdict(chaos: tuple[int, dict[str, Any]]) -> None:
    """Exit status 1 exactly when the report lists a failure (a leak, lock-out or crash)."""
    rc, report = chaos
    assert (rc == 0) == report["ok"], report["failures"]
