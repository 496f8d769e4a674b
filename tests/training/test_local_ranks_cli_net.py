"""``python -m node train --local 2 --local-ranks 2`` between real node processes: each worker's
training process spawns a gradient helper (gloo, on the CPU), the two ranks split every step's
micro-batches, the job ends with both workers reporting the same state bytes, and no rank
outlives the mesh.

The job is the char GPT wrapped by a bundle that appends ``pid ppid shard position`` to a trace
file at every batch it reads, so the test sees who read what: a helper's parent is a training
process that reads too.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from simulations.nodeprocs import REPO_ROOT, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

TINY = ("n_layer=1", "n_head=2", "n_embd=32", "block_size=16", "batch_size=4", "eval_batches=2", "shards=8")
TRACE_JOB = '''
import os

from node.training.runner import charlm


def make_job(options):
    options = dict(options)
    trace = options.pop("trace")
    job = charlm.make_job(options)
    batch = job.batch

    def read(shard, position):
        with open(trace, "a") as f:
            f.write(f"{os.getpid()} {os.getppid()} {shard} {position}\\n")
        return batch(shard, position)

    job.batch = read
    return job
'''
STEPS = 4


def test_two_workers_with_two_local_ranks_each(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "tracejob.py").write_text(TRACE_JOB)
    trace = tmp_path / "reads.txt"
    command = [sys.executable, "-m", "node", "train", "--local", "2", "--local-ranks", "2",
               "--bundle", str(bundle), "--job", "tracejob:make_job", "--job-arg", f"trace={trace}",
               "--steps", str(STEPS), "--global-batch", "4", "--threads", "1", "--shards", "8",
               "--segment-steps", "2", "--eval-every", "4", "--checkpoint-every", "4", "--json", "--no-progress"]
    for arg in TINY:
        command += ["--job-arg", arg]
    proc = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=150, env=dict(os.environ))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert proc.returncode == 0 and lines, f"rc {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    result = json.loads(lines[-1])
    assert result["state"] == "done" and result["steps"] == STEPS and result["segments"] == 2, result
    assert len(result["workers_seen"]) == 2 and math.isfinite(result["loss"])
    # identical state: the last record's finishers are both workers, nobody was dropped
    assert sorted(result["group"]) == sorted(result["workers_seen"]), result
    assert not [e for e in result["events"] if e["change"] == "failed"], result["events"]

    reads = [tuple(map(int, ln.split())) for ln in trace.read_text().splitlines()]
    readers = {pid for pid, _, _, _ in reads}
    trainers = {ppid for _, ppid, _, _ in reads if ppid in readers}  # the helpers' parents
    helpers = {pid for pid, ppid, _, _ in reads if ppid in trainers}
    assert len(trainers) == 2 and len(helpers) == 2, reads
    per_pid = Counter(pid for pid, _, _, _ in reads)
    # global batch 4 over 2 workers: 2 micro-batches a step each, one per local rank
    assert all(per_pid[h] == STEPS for h in helpers), per_pid
    assert sorted(per_pid[t] for t in trainers) == [STEPS, STEPS + 1], per_pid  # + the export's input
    training = Counter((shard, position) for pid, _, shard, position in reads)
    assert len(training) == 4 * STEPS + 1 and set(training.values()) == {1}  # no micro-batch twice
    # the mesh is gone, and every training process and helper with it
    wait_for(lambda: not [pid for pid in trainers | helpers if alive(pid)], 15, what="the ranks to exit")


def alive(pid: int) -> bool:
    """``pid`` runs (a zombie nobody reaped yet has exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")
