"""``bench elastic --part speedup``: its options, the pure parts (time to target, the batch splits,
the speed-up table, the bar), CPU caps (as root: a child lands in its parent's capped cgroup and
every group is removed), and a tiny run with real node processes (capped at 0.5 core when this
machine allows it, else uncapped), asserting the JSON line's shape, never timings."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, cast

import pytest

from simulations.__main__ import build_parser
from simulations.bench_elastic import PARTS
from simulations.bench_elastic import run as run_elastic
from simulations.bench_elastic.churn import Event as ChurnEvent
from simulations.bench_elastic.churn import Run as ChurnRun
from simulations.bench_elastic.churn import (
    compare,
    data_read,
    event_counts,
    in_segment_loss,
    median_step_s,
    pick_victim,
)
from simulations.bench_elastic.cluster import descendants
from simulations.bench_elastic.follow import (
    BlobWatch,
    Stalled,
    TrainRun,
    committed_step,
    submitted_job,
)
from simulations.bench_elastic.newcomer import (
    Join,
    commit_rate,
    download_bound,
    join_figures,
    segment_rows,
)
from simulations.bench_elastic.newcomer import Run as NewcomerRun
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
    assert args._run is run_elastic and args.part == "speedup" and set(PARTS) == {"speedup", "newcomer", "churn"}
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


# ------------------------------------------------------------------------------ newcomer, churn


def record(segment: int, start: int, end: int, wall_s: float, events: list[dict[str, object]] | None = None,
           state: str = "", cursors: list[dict[str, int]] | None = None) -> dict[str, object]:
    return {"segment": segment, "start": start, "end": end, "wall_s": wall_s, "events": events or [],
            "state": state or f"s{segment}", "shares": [1, 1], "cursors": cursors or []}


def test_join_figures_read_the_newcomers_events_and_the_step_times() -> None:
    new = "ab" * 32
    records = [record(0, 0, 10, 30.0), record(1, 10, 20, 10.0), record(2, 20, 30, 12.0),
               record(3, 30, 40, 11.0, [{"change": "joined", "node": new, "step": 30, "seconds": 1.5}]),
               record(4, 40, 50, 9.0, [{"change": "active", "node": new, "step": 40, "seconds": 14.0},
                                       {"change": "gone", "node": "cd" * 32, "step": 40, "reason": "left"}])]
    j = join_figures(records, new)
    assert (j.listened, j.active, j.joined_s, j.active_s, j.failed) == (3, 4, 1.5, 14.0, [])
    assert j.state == "s2" and j.before_segments == [1, 2] and j.next_boundary
    assert j.before_s == pytest.approx(1.1) and j.during_s == pytest.approx(1.1) and j.change == pytest.approx(0.0)
    assert join_figures(records, "ef" * 32) == Join()  # never joined: nothing to say
    late = [*records[:4], record(4, 40, 50, 9.0), records[4] | {"segment": 5, "start": 50, "end": 60}]
    assert not join_figures(late, new).next_boundary
    assert download_bound(10_000_000, 12.5e6) == pytest.approx(0.96) and download_bound(1, None) is None
    assert commit_rate([(1.0, 10), (3.0, 20), (6.0, 40)], 10, 40) == pytest.approx(5.0 / 30)
    assert commit_rate([(1.0, 10)], 10, 40) is None
    assert segment_rows(records[:1]) == [[0, 0, 10, 3.0, [1, 1]]]


def test_newcomer_checks() -> None:
    run = NewcomerRun("sync", 2, state_bytes=10_000_000, bytes_per_s=12.5e6, download_s=0.9)
    run.join = Join(listened=3, active=4, before_s=1.0, during_s=1.2)
    got = {c["what"]: c["pass"] for c in run.checks()}
    assert got == {"state download vs 1.2 x state bytes / bandwidth": True,
                   "active at the first boundary after listening": True,
                   "others' step time during the join vs before": False}
    assert NewcomerRun("sync", 2).checks() == []


def test_the_train_cli_lines_and_the_blob_store_watch(tmp_path: Path) -> None:
    assert committed_step("step 40/200 (live 43)  loss 2.1  val 2.3") == 40 and committed_step("data x") is None
    assert submitted_job("job " + "0f" * 16 + " submitted: charlm") == "0f" * 16
    blob = "ab" * 32
    watch = BlobWatch(tmp_path, origin=time.monotonic())
    watch.sample()
    assert watch.fetches == {}
    (tmp_path / "partial" / blob).mkdir(parents=True)
    watch.sample()
    (tmp_path / "partial" / blob / "0").write_bytes(b"x")
    watch.sample()
    (tmp_path / blob).write_bytes(b"x" * 100)
    watch.sample()
    f = watch.fetches[blob]
    assert f.began is not None and f.first_chunk is not None and f.done is not None and f.size == 100
    assert f.began <= f.first_chunk <= f.done and f.seconds == f.done - f.began


def test_pick_victim_takes_the_coordinator_once_and_workers_otherwise() -> None:
    alive = {"a": 0, "b": 1, "c": 2, "d": 3}
    rng = random.Random(0)
    assert pick_victim(number=2, coordinator_kill=2, coordinator="b", group=["a", "b", "c"], alive=alive,
                       rng=rng) == (1, True)
    for _ in range(20):
        i, coord = pick_victim(number=1, coordinator_kill=2, coordinator="b", group=["a", "b", "c"],
                               alive=alive, rng=rng) or (None, None)
        assert i in (0, 2) and coord is False  # a group member, never the coordinator
    assert pick_victim(number=1, coordinator_kill=2, coordinator="b", group=["b"], alive=alive,
                       rng=rng) in ((0, False), (2, False), (3, False))
    for _ in range(20):  # a listener only when no active worker is left
        assert pick_victim(number=1, coordinator_kill=2, coordinator="b", group=["a", "b", "c"], alive=alive,
                           rng=rng, listeners=["c"]) == (0, False)
    assert pick_victim(number=1, coordinator_kill=2, coordinator="b", group=["b", "c"], alive=alive, rng=rng,
                       listeners=["c"]) == (2, False)
    assert pick_victim(number=1, coordinator_kill=1, coordinator="z", group=[], alive={"z": 5},
                       rng=rng) == (5, True)
    assert pick_victim(number=1, coordinator_kill=2, coordinator="z", group=[], alive={"z": 5}, rng=rng) is None


def test_churn_figures_and_comparison() -> None:
    gone = [{"change": "gone", "node": "aa", "step": 10, "reason": "its worker left the mesh"}]
    joined = [{"change": "joined", "node": "bb", "step": 20, "seconds": 0.5}]
    cursors = [{"shard": 0, "position": 50}, {"shard": 1, "position": 48}]
    records = [record(0, 0, 10, 20.0), record(1, 10, 20, 15.0, gone), record(2, 20, 30, 12.0, joined),
               record(3, 30, 40, 10.0, cursors=cursors)]
    assert event_counts(records) == {"joined": 1, "active": 0, "gone": 1, "failed": 0}
    assert data_read(records) == 98 and data_read([]) is None
    assert median_step_s(records) == pytest.approx(1.2)
    assert in_segment_loss(records, 1.0) == pytest.approx(5.0 + 2.0) and in_segment_loss(records, None) is None
    churn = ChurnRun("sync", "churn", 6, steps=40, steps_done=40, state="done", val_loss=2.05, wall_s=130.0,
                     records=records, events=[ChurnEvent(5.0, "kill", 3, "aa", 10, True),
                                              ChurnEvent(9.0, "join", 6, "bb", 10)])
    base = ChurnRun("sync", "baseline", 6, steps=40, steps_done=40, state="done", val_loss=2.0, wall_s=100.0,
                    records=[record(0, 0, 10, 20.0), record(1, 10, 40, 30.0)])
    c = compare(churn, base, global_batch=3)
    assert c["val_loss_change"] == pytest.approx(0.025) and c["lost_s"] == pytest.approx(30.0)
    assert c["lost_per_event_s"] == pytest.approx(15.0) and c["lost_per_death_s"] == pytest.approx(30.0)
    assert c["lost_in_segments_s"] == pytest.approx(15.0 - 10.0 + 12.0 - 10.0)
    assert (c["data_read"], c["data_expected"]) == (98, 120)
    assert [ch["pass"] for ch in c["checks"]] == [True, True, True]
    assert compare(churn, None, global_batch=3)["checks"][-1]["what"] == "the coordinator among the victims"
    assert churn.as_json()["coordinator_killed"] and churn.as_json()["deaths"] == 1


def _final_json(done: subprocess.CompletedProcess[str]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return lines[:-1], lines[-1]


def _tiny(part: str, *args: str) -> list[str]:
    """Uncapped on loopback (the caps are checked by the speedup run above: a capped tiny job with
    a newcomer or a death takes minutes on 2 cores), so it runs without root too."""
    return [sys.executable, "-m", "simulations", "bench", "elastic", "--part", part, "--modes", "sync",
            "--cap", "0", "--shape", "loopback", "--model-size", "tiny", "--json", *args]


@pytest.mark.integration
@pytest.mark.timeout(200)
def test_bench_elastic_newcomer_tiny_run(tmp_path: Path) -> None:
    done = subprocess.run(_tiny("newcomer", "--segment-steps", "200", "--newcomer-steps", "1600", "--join-after",
                                "1", "--global-batch", "3", "--dir", str(tmp_path)),
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=190)
    assert done.returncode == 0, done.stdout + done.stderr
    runs, final = _final_json(done)
    assert final["part"] == "newcomer" and final["failures"] == [] and final["link"]["delay_emulated"] is False
    (r,) = final["runs"]
    assert [x["run"] for x in runs] == [r]
    # under load a listener may miss a round and listen again (a FAILED event, then JOINED again): not asserted
    assert r["listened_segment"] is not None and r["active_segment"] is not None
    assert isinstance(r["newcomer_failed"], list) and isinstance(r["blob_is_listener_state"], bool)
    assert r["state_bytes"] and r["download_s"] is not None
    assert r["step_s_before"] is not None and r["step_s_during"] is not None
    assert {c["what"] for c in r["checks"]} == {"active at the first boundary after listening",
                                                "others' step time during the join vs before"}  # no link rate
    assert any(e["change"] == "joined" for e in r["events"]) and any(e["change"] == "active" for e in r["events"])


@pytest.mark.integration
@pytest.mark.timeout(200)
def test_bench_elastic_churn_tiny_run(tmp_path: Path) -> None:
    done = subprocess.run(_tiny("churn", "--segment-steps", "100", "--churn-steps", "1200", "--churn-workers", "3",
                                "--churn-min", "1", "--period", "8", "--max-events", "1", "--coordinator-kill", "1",
                                "--no-baseline", "--global-batch", "3", "--dir", str(tmp_path)),
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=190)
    assert done.returncode == 0, done.stdout + done.stderr
    runs, final = _final_json(done)
    assert final["part"] == "churn" and final["failures"] == []
    (r,) = final["runs"]
    assert [x["run"] for x in runs] == [r]
    assert r["finished"] and r["deaths"] == 1 and r["joins"] == 1 and r["coordinator_killed"]
    assert [e["kind"] for e in r["bench_events"]] == ["kill", "join"]
    assert r["group_events"]["gone"] >= 1 and r["data_read"] is not None
    (comparison,) = final["comparisons"]
    assert {c["what"]: c["pass"] for c in comparison["checks"]} == {"the job under churn finished": True,
                                                                   "the coordinator among the victims": True}


def test_a_train_run_that_commits_nothing_for_too_long_is_killed_as_stalled() -> None:
    run = TrainRun(cast(Any, None), 0, [])
    run.began = time.monotonic()
    run.proc = subprocess.Popen(["sleep", "30"], text=True)
    run.commits = [(0.0, 0)]
    with pytest.raises(Stalled, match=r"no step committed for 0\.3 s"):
        run.wait(timeout=20, stall=0.3)
    assert run.proc.poll() is not None
