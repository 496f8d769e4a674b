"""``bench elastic --part speedup``: its options, the pure parts (time to target, the batch splits,
the speed-up table, the bar), CPU caps (as root: a child lands in its parent's capped cgroup and
every group is removed), and a tiny run with real node processes (capped at 0.5 core when this
machine allows it, else uncapped), asserting the JSON line's shape, never timings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from simulations.__main__ import build_parser
from simulations.bench_elastic import PARTS
from simulations.bench_elastic import run as run_elastic
from simulations.bench_elastic.cluster import descendants
from simulations.bench_elastic.speedup import (
    Crossing,
    Run,
    checks,
    eval_windows,
    parse_counts,
    speedups,
    splits,
    time_to_target,
)
from simulations.cpucaps import CGROUP_ROOT, CpuCaps, group_of, quota_us, unavailable
from simulations.nodeprocs import REPO_ROOT


def test_options_and_parts() -> None:
    args = build_parser(["bench", "elastic"]).parse_args(["bench", "elastic"])
    assert args._run is run_elastic and args.part == "speedup" and set(PARTS) >= {"speedup", "newcomer"}
    assert (args.workers, args.modes, args.cap, args.shape, args.global_batch, args.single_batches) == (
        "1,2,4,8", "sync,diloco", 0.2, "100mbit", 8, "1")
    assert parse_counts("1,2, 4,8", "--workers") == [1, 2, 4, 8] and parse_counts("", "x") == []
    with pytest.raises(ValueError):
        parse_counts("1,0", "--workers")


def rows(*points: tuple[int, float, float]) -> list[dict[str, float]]:
    return [{"step": s, "wall_s": w, "val_loss": v} for s, w, v in points]


@pytest.mark.parametrize(("points", "target", "expected"), [
    (((10, 5.0, 3.0), (20, 15.0, 2.0)), 2.5, Crossing(10.0, 15.0, 20)),  # half way down the chord
    (((10, 5.0, 3.0), (20, 15.0, 2.0)), 2.0, Crossing(15.0, 15.0, 20)),  # exactly at an evaluation
    (((10, 5.0, 1.0),), 2.5, Crossing(5.0, 5.0, 10)),  # the first evaluation is already below
    (((10, 5.0, 3.0), (20, 15.0, float("nan")), (30, 25.0, 2.0)), 2.5, Crossing(15.0, 25.0, 30)),
    (((10, 5.0, 3.0), (20, 15.0, 2.6)), 2.5, None),  # never reached
])
def test_time_to_target(points: tuple[tuple[int, float, float], ...], target: float,
                        expected: Crossing | None) -> None:
    got = time_to_target(rows(*points), target)
    assert got == (pytest.approx(expected) if expected else None)


def test_splits_keep_the_global_batch_and_the_validation_windows() -> None:
    runs = [(8, 1), (8, 2), (8, 4), (8, 8), (1, 1)]
    flagged = splits(runs, how="global-batch", batch=12, eval_batches=20)
    assert [s.flags for s in flagged] == [("--global-batch", "8")] * 4 + [("--global-batch", "1")]
    assert all(s.job_args == {} for s in flagged)
    by_size = splits(runs, how="batch-size", batch=12, eval_batches=20)
    per = [int(s.job_args["batch_size"]) for s in by_size]
    assert per == [96, 48, 24, 12, 12]
    assert [b * n for b, (_, n) in zip(per, runs, strict=True)] == [96] * 4 + [12]
    windows = {int(s.job_args["batch_size"]) * int(s.job_args["eval_batches"]) for s in by_size}
    assert windows == {288}  # 240 rounded up to a multiple of 96: one validation set for all
    assert eval_windows([12], batch=12, eval_batches=20) == 240
    with pytest.raises(ValueError, match="do not split"):
        splits([(1, 8)], how="batch-size", batch=12, eval_batches=20)


def run_at(mode: str, n: int, g: int, t: float | None) -> Run:
    r = Run(mode, n, g, "same" if g == 8 else "single")
    r.crossing = Crossing(t, t, 100) if t is not None else None
    return r


def test_speedups_and_the_bar() -> None:
    runs = [run_at("sync", 1, 8, 1000.0), run_at("sync", 8, 8, 150.0), run_at("sync", 1, 1, 500.0),
            run_at("sync", 2, 8, None), run_at("diloco", 1, 8, 800.0), run_at("diloco", 8, 8, 200.0)]
    table = speedups(runs)
    assert set(table["sync"]) == {1, 8}  # N=2 never reached the target; N=1 G=1 is a baseline only
    eight = table["sync"][8]
    assert eight["speedup"] == pytest.approx(1000 / 150) and eight["saved"] == pytest.approx(0.85)
    assert eight["speedup_best"] == pytest.approx(500 / 150) and eight["saved_best"] == pytest.approx(0.7)
    assert table["diloco"][8]["saved"] == pytest.approx(0.75)
    got = {(c["mode"], c["what"]): c["pass"] for c in checks(table)}
    assert got == {("sync", "time saved vs N=1 at the same batch"): True,
                   ("sync", "time saved vs the best N=1 run"): False,
                   ("diloco", "time saved vs N=1 at the same batch"): False,
                   ("diloco", "time saved vs the best N=1 run"): False}
    assert checks(speedups([run_at("sync", 1, 8, 10.0), run_at("sync", 2, 8, 6.0)])) == []


def test_descendants_walk_the_process_tree() -> None:
    table = {10: (1, "a"), 11: (10, "b"), 12: (11, "c"), 13: (1, "d")}
    assert descendants(10, table) == [11, 12] and descendants(13, table) == []


def test_quota() -> None:
    assert quota_us(0.2) == 20_000 and quota_us(0.001) == 1000
    with pytest.raises(ValueError):
        quota_us(0)


def _cgroups_of(pid: int | None = None) -> list[str]:
    """``starmesh-cap-*`` groups of ``pid`` (None: of every process that is gone)."""
    def mine(name: str) -> bool:
        if pid is not None:
            return name.startswith(f"starmesh-cap-{pid}-")
        owner = name.split("-")[2] if name.startswith("starmesh-cap-") else ""
        return owner.isdigit() and not Path(f"/proc/{owner}").exists()

    return sorted(p.name for h in ("cpu", "cpuacct") if (CGROUP_ROOT / h).is_dir()
                  for p in (CGROUP_ROOT / h).iterdir() if mine(p.name))


@pytest.mark.skipif(unavailable() is not None, reason=f"no CPU caps here: {unavailable()}")
def test_a_child_starts_in_its_parents_capped_group_and_close_removes_it() -> None:
    child = "import subprocess, sys; c = subprocess.Popen(['sleep', '30']); print(c.pid, flush=True); c.wait()"
    with CpuCaps(2, cores=0.5) as caps:
        assert (caps.path(1) / "cpu.cfs_quota_us").read_text().strip() == "50000"
        proc = subprocess.Popen(caps.wrap(1, [sys.executable, "-c", child]), stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        grandchild = int(proc.stdout.readline())
        assert group_of(proc.pid) == group_of(grandchild) == caps.group(1)
        assert sorted(caps.members(1)) == sorted([proc.pid, grandchild]) and caps.members(0) == []
    assert proc.wait(timeout=10) != 0  # close() killed what was left in the group
    assert _cgroups_of(os.getpid()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="as root the caps can be made")
def test_without_root_it_skips_cleanly() -> None:
    done = subprocess.run([sys.executable, "-m", "simulations", "bench", "elastic", "--json"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "needs root" in json.loads(done.stdout.strip().splitlines()[-1])["skipped"]


@pytest.mark.integration
@pytest.mark.timeout(150)
def test_bench_elastic_tiny_run(tmp_path: Path) -> None:
    capped = unavailable() is None
    done = subprocess.run(
        [sys.executable, "-m", "simulations", "bench", "elastic", "--workers", "1,2", "--modes", "sync",
         "--cap", "0.5" if capped else "0", "--shape", "loopback", "--model-size", "tiny", "--steps", "8",
         "--segment-steps", "4", "--eval-every", "4", "--global-batch", "2", "--single-steps", "8", "--target", "9",
         "--plot", str(tmp_path / "speedup.png"), "--json"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=140)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    final = lines[-1]
    assert final["part"] == "speedup" and final["failures"] == [] and final["checks"] == []
    runs = final["runs"]
    assert [(r["workers"], r["global_batch"], r["run"]) for r in runs] == [(1, 2, "same"), (2, 2, "same"),
                                                                            (1, 1, "single")]
    assert [line["run"] for line in lines[:-1]] == runs  # a JSON line per run as it finished
    for r in runs:
        assert r["steps"] == 8 and len(r["val"]) == 2 and r["t_target_s"] is not None  # 9: the first eval
        if capped:
            assert r["cgroups"]["nodes_with_training_process_in_own_group"] == r["workers"]
            assert r["cgroups"]["strays"] == [] and len(r["cpu"]["used_s"]) == r["workers"]
    assert set(final["speedup"]["sync"]) == {"1", "2"}
    assert (tmp_path / "speedup.png").stat().st_size > 0
    assert _cgroups_of() == []  # the bench's process is gone and left no group behind
