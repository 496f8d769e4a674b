"""``python -m node train --local 2 --data ...`` between real node processes: a tiny text file
and a directory of token arrays go to the workers through the blob cache (put on the node the
submitter talks to, a copy on the other), both workers train on them, and the summary and
``config.json`` name the data (name, kind, bytes, sha256, blob id) with a finite loss."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from node import training_data
from simulations.nodeprocs import REPO_ROOT

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

TINY = ("n_layer=1", "n_head=2", "n_embd=32", "block_size=16", "batch_size=4", "eval_batches=2", "shards=8")


def train(data: Path, out: Path) -> dict[str, Any]:
    command = [sys.executable, "-m", "node", "train", "--local", "2", "--steps", "4", "--threads", "1",
               "--shards", "8", "--segment-steps", "2", "--eval-every", "4", "--checkpoint-every", "4",
               "--data", str(data), "--out", str(out), "--json", "--no-progress"]
    for arg in TINY:
        command += ["--job-arg", arg]
    proc = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=200, env=dict(os.environ))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert proc.returncode == 0 and lines, f"rc {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    result: dict[str, Any] = json.loads(lines[-1])
    assert result["state"] == "done" and result["steps"] == 4 and len(result["workers_seen"]) == 2
    assert math.isfinite(result["loss"]) and math.isfinite(result["val_loss"])
    assert f"data {data.name} (" in proc.stderr
    blob = result["data"]["blob"]
    assert len(blob) == 64 and len(result["data"]["holders"]) == 2  # put on one node, a copy on the other
    config = json.loads((out / "config.json").read_text())
    assert config["data"] == blob and config["data_name"] == data.name
    assert config["data_bytes"] == result["data"]["bytes"]
    return result


def test_train_on_a_text_file_through_the_blob_cache(tmp_path: Path) -> None:
    rng = random.Random(5)
    words = ["to", "be", "or", "not", "that", "is", "the", "question", "whether", "tis", "nobler", "in", "mind"]
    text = tmp_path / "tiny.txt"
    text.write_text(" ".join(rng.choice(words) for _ in range(500)) + "\n")
    result = train(text, tmp_path / "out")
    d = result["data"]
    assert (d["name"], d["kind"], d["bytes"]) == ("tiny.txt", "text", text.stat().st_size)
    assert d["sha256"] == training_data.sha256_of(text)
    assert set(result["sample"]) <= set(text.read_text())  # the vocabulary is the file's characters


def test_train_on_a_directory_of_token_arrays(tmp_path: Path) -> None:
    d = tmp_path / "tokens"
    d.mkdir()
    rng = np.random.default_rng(3)
    np.save(d / "part-000.npy", rng.integers(0, 40, 1200).astype(np.uint16))
    np.save(d / "part-001.npy", rng.integers(0, 40, 1200).astype(np.int32))
    result = train(d, tmp_path / "out")
    got = result["data"]
    assert (got["name"], got["kind"], got["files"], got["tokens"], got["vocab"]) == ("tokens", "tokens", 2, 2400, 40)
