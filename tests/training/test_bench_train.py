"""``bench train``: its options, the pure helpers (links, segment figures, checks), and a tiny
run with real node processes on loopback (the JSON line's shape and that both jobs and the
reference finished with a validation loss; timings and the goals are never asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from simulations.__main__ import build_parser
from simulations.bench_train import RunResult, checks, parse_link, run, segments, steady_per_step
from simulations.nodeprocs import REPO_ROOT


def test_bench_train_options() -> None:
    args = build_parser(["bench", "train"]).parse_args(["bench", "train"])
    assert (args.steps, args.workers, args.inner_steps, args.codec, args.shape, args.threads) == (
        200, 3, 50, "int8+zstd", "loopback", 1)
    assert args._run is run
    shaped = build_parser(["bench", "train"]).parse_args(["bench", "train", "--shape"])
    assert shaped.shape == "wan"


def test_wan_is_a_rate_and_says_its_delay_is_not_emulated() -> None:
    wan = parse_link("wan")
    assert (wan.rate, wan.rtt_s) == ("100mbit", 0.05)
    assert wan.as_json()["delay_emulated"] is False and "NOT emulated" in wan.note
    assert parse_link("loopback").rate is None and parse_link("1gbit").rtt_s is None
    with pytest.raises(ValueError):
        parse_link("fast")


def test_segments_and_steady_figures_from_metrics(tmp_path: Path) -> None:
    rows = [{"step": 1, "loss": 3.0, "wall_s": 5.0}, {"step": 2, "loss": 2.9, "wall_s": 10.0, "compute_s": 1.0,
             "comm_s": 0.5}, {"step": 3, "loss": 2.8, "wall_s": 11.0},
            {"step": 4, "loss": 2.7, "wall_s": 12.0, "compute_s": 1.5, "comm_s": 0.1},
            {"step": 4, "val_loss": 2.75, "wall_s": 12.0}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    segs = segments(path)
    assert segs == [{"wall": 10.0, "compute": 1.0, "comm": 0.5, "steps": 2},
                    {"wall": 2.0, "compute": 1.5, "comm": 0.1, "steps": 2}]
    steady = steady_per_step(segs)
    assert steady["wall"] == 1.0 and steady["utilization"] == 0.75 and steady["segments"] == 1
    assert steady["wait"] == pytest.approx(0.2)
    last = {"wall": 9.0, "compute": 1.0, "comm": 0.0, "steps": 2}  # evaluation, checkpoint, export
    assert steady_per_step([*segs, last]) == steady


def test_checks_compare_the_runs() -> None:
    runs = {"reference": RunResult("reference", "1 process", steps=100, val_loss=2.0),
            "sync": RunResult("sync", "sync", steps=100, rounds=100, val_loss=2.02, bytes_sent=5000,
                              train_s=10.0, compute_s=5.0),
            "diloco": RunResult("diloco", "diloco", steps=100, rounds=2, val_loss=2.2, bytes_sent=100,
                                train_s=10.0, compute_s=9.6)}
    got = {(c["check"], c["what"].split()[0] + c["what"].split()[1]): c["pass"] for c in checks(runs, 50)}
    assert got == {("a", "syncval_loss"): True, ("b", "dilocoval_loss"): False, ("b", "syncrounds"): True,
                   ("b", "syncbytes"): True, ("c", "dilococompute"): True}


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_bench_train_tiny_run() -> None:
    # ~20 s alone; a loaded 2-core CI box (the whole suite, other node processes) has taken 110 s
    done = subprocess.run(
        [sys.executable, "-m", "simulations", "bench", "train", "--steps", "8", "--model-size", "tiny",
         "--segment-steps", "4", "--inner-steps", "4"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["bench"] == "train" and result["failures"] == [] and result["link"]["name"] == "loopback"
    runs = result["runs"]
    assert set(runs) == {"reference", "sync", "diloco"}
    assert all(r["val_loss"] is not None and r["steps"] == 8 for r in runs.values())
    assert runs["sync"]["rounds"] == 8 and runs["diloco"]["rounds"] == 2
    assert runs["sync"]["bytes_sent"] > runs["diloco"]["bytes_sent"] > 0
    assert {c["check"] for c in result["checks"]} == {"a", "b", "c"}
