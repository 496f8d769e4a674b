"""``python -m simulations train --json`` end to end: real worker processes on loopback,
each embedding a node, train an MLP with gradients averaged over the mesh; and the verdict
(``summarize``) on worker results that diverged or did not learn."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from simulations.allreduce_procs import child_env
from simulations.nodeprocs import REPO_ROOT
from simulations.train import summarize


def _run_train(tmp_path: Path, *extra: str) -> tuple[int, dict[str, Any], str]:
    argv = [sys.executable, "-m", "simulations", "train", "--nodes", "2", "--steps", "60",
            "--json", "--out-dir", str(tmp_path), *extra]
    proc = subprocess.run(argv, cwd=REPO_ROOT, env=child_env(), capture_output=True, text=True,
                          timeout=120)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"no JSON line (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    result: dict[str, Any] = json.loads(lines[-1])
    return proc.returncode, result, proc.stdout + proc.stderr


@pytest.mark.integration
@pytest.mark.timeout(150)
def test_two_node_mesh_trains_and_workers_stay_identical(tmp_path: Path) -> None:
    rc, result, output = _run_train(tmp_path, "--codec", "int8+zstd")
    assert rc == 0 and result["ok"] is True, output
    assert result["nodes"] == 2 and result["steps"] == 60
    assert result["final_loss"] < 0.5 * result["first_loss"], output
    assert result["params_identical"] is True and len(result["params_sha256"]) == 1
    assert result["accuracy"] > result["chance_accuracy"] + 0.4, output
    # the mesh run matches the same model trained in one process on the same examples
    assert abs(result["accuracy"] - result["reference"]["accuracy"]) < 0.05, output
    assert abs(result["final_loss"] - result["reference"]["final_loss"]) < 0.05, output
    assert result["partial_rounds"] == 0 and result["wire_bytes"] > 0
    assert (tmp_path / "node0" / "progress.jsonl").read_text().count("\n") == 60


_ARGS = argparse.Namespace(nodes=2, steps=10, batch=8, codec="fp16", seed=0)
_REFERENCE = {"final_loss": 0.2, "accuracy": 0.9, "seconds": 1.0, "params_sha256": "r"}


def _worker_result(digest: str, final_loss: float) -> dict[str, Any]:
    return {"params_sha256": digest, "final_loss": final_loss, "accuracy": 0.9, "seconds": 1.0,
            "sent_bytes": 100, "partial_rounds": 0, "dropped": {}, "parameters": 10}


def test_summary_accepts_identical_workers_whose_loss_fell() -> None:
    s = summarize(_ARGS, [_worker_result("a", 0.2)] * 2, _REFERENCE, 5.0, [1.8, 1.7])
    assert s["ok"] and s["params_identical"] and s["loss_decreased"]
    assert s["first_loss"] == pytest.approx(1.75) and s["wire_bytes"] == 200


def test_summary_fails_workers_that_diverged() -> None:
    s = summarize(_ARGS, [_worker_result("a", 0.2), _worker_result("b", 0.2)], _REFERENCE, 5.0, [1.8])
    assert not s["ok"] and not s["params_identical"] and s["params_sha256"] == ["a", "b"]


def test_summary_fails_a_loss_that_did_not_fall_enough() -> None:
    s = summarize(_ARGS, [_worker_result("a", 1.5)] * 2, _REFERENCE, 5.0, [1.8, 1.8])
    assert not s["ok"] and not s["loss_decreased"] and s["params_identical"]
