"""Elastic training between real node processes on loopback, through the CLI.

* A node that joins the mesh while a job runs enters the group as a listener (it fetches the
  state while the others train and replays the segment's round means), reports the same state
  bytes as the others at the end of that segment, and from the next one trains with a share of
  the global batch, which stays the same every segment; ``jobs --json`` and the summary show it.
* The job's coordinator and the node ``train`` talks to are ``kill -9``ed at once mid-job: a
  task replica takes the job over from the replicated log, the survivors go on, ``train``
  follows through another member, and the job completes with both deaths recorded.
* A worker whose node is stopped (SIGTERM: it leaves the mesh) exits cleanly, is dropped from
  the group, and the job completes with the others.

The job is a tiny char GPT; a segment is 4 steps so that group changes come quickly.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from simulations.nodeprocs import REPO_ROOT, LocalMesh, NodeProcess, wait_for
from tests.training.test_training_cli_net import TINY, cli, final_json, segment_records, start_mesh

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

FAST = ("--threads", "1", "--segment-steps", "4", "--eval-every", "40", "--checkpoint-every", "8")


def train(mesh: LocalMesh, node: NodeProcess, steps: int, *args: str, progress: bool = False) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "node", "train", "--model", "charlm", "--steps", str(steps), "--json",
            *(() if progress else ("--no-progress",)), *FAST, *args, "--connect", node.address, "--mesh-key-file", str(mesh.mesh_key)]
    for item in TINY:
        argv += ["--job-arg", item]
    return subprocess.Popen(argv, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ))


def jobs(mesh: LocalMesh, nodes: list[NodeProcess]) -> dict[str, Any] | None:
    """The one job ``jobs --json`` lists on the first node that answers."""
    for node in nodes:
        if node.proc is None or node.proc.poll() is not None:
            continue
        proc = cli(mesh, node, "jobs", "--json", timeout=30)
        rows = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode == 0 and rows:
            row: dict[str, Any] = rows[-1]
            return row
    return None


def finish(proc: subprocess.Popen[str], nodes: list[NodeProcess]) -> tuple[dict[str, Any], str]:
    """The final JSON line of ``train`` and its stderr (progress and group changes)."""
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
    done = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert proc.returncode == 0, f"{stdout}\n{stderr}\n" + "\n".join(n.log_text()[-3000:] for n in nodes)
    return final_json(done), stderr


def test_a_node_that_joins_mid_job_listens_then_trains_with_the_same_parameters(tmp_path: Path) -> None:
    mesh = LocalMesh(tmp_path / "mesh", preset="local")
    try:
        nodes = start_mesh(mesh, 2)
        proc = train(mesh, nodes[0], 120, "--workers", "2-3", "--global-batch", "3", progress=True)
        wait_for(lambda: (j := jobs(mesh, nodes)) is not None and j["step"] >= 8, 120,
                 what="the job to reach step 8")
        newcomer = mesh.add(seeds=[nodes[0].address])
        mesh.wait_ready([newcomer])
        wait_for(lambda: (j := jobs(mesh, nodes)) is not None and len(j["workers"]) == 3, 120,
                 what="the newcomer to be counted among the workers")
        row = jobs(mesh, nodes)
        assert row is not None and row["batch"] == 3
        result, shown = finish(proc, [*nodes, newcomer])
        assert result["state"] == "done" and result["steps"] == 120
        # the progress view and jobs show the change as it commits
        assert f"+ {newcomer.node_id[:8]} joined (listening" in shown, shown
        assert f"+ {newcomer.node_id[:8]} trains: first contribution" in shown, shown
        listed = cli(mesh, nodes[1], "jobs", timeout=30).stdout
        assert f"+ {newcomer.node_id[:8]} trains: first contribution" in listed, listed

        records = segment_records(mesh, nodes[1], result["job"])
        joined = newcomer.node_id
        listening = [r for r in records if joined in (g.hex() for g in r.group)
                     and r.shares[[g.hex() for g in r.group].index(joined)] == 0]
        assert listening, "the newcomer never listened"
        # it listened at the end of the group, fetched the state, replayed: the same state bytes.
        # (A listener whose training process was still starting when the segment's first round
        # began is dropped from that round: it listens again in the next segment, warm.)
        assert all([g.hex() for g in r.group][-1] == joined for r in listening)
        assert all("ListenerLate" in e.reason for r in listening[:-1] for e in r.events if e.change.name == "FAILED")
        first = listening[-1]
        assert joined in (f.hex() for f in first.finished), [e.reason for e in first.events]
        assert sorted(first.shares) == [0, 1, 2]
        later = [r for r in records if r.start >= first.end]
        assert later and joined in (g.hex() for g in later[0].group), later[:1]
        active = later[0].shares[[g.hex() for g in later[0].group].index(joined)]
        assert active == 1 and sorted(later[0].shares) == [1, 1, 1]
        assert set(later[0].finished) == set(later[0].group)  # identical parameters after it trains
        # the global batch is the same in every segment, and no micro-batch is read twice
        assert all(sum(r.shares) == 3 for r in records)
        assert sum(c.position for c in records[-1].cursors) == 120 * 3

        changes = [(e["change"], e["node"]) for e in result["events"]]
        assert ("joined", joined) in changes and ("active", joined) in changes
        assert changes.index(("joined", joined)) < changes.index(("active", joined))
        assert joined in result["workers_seen"] and result["newcomers"][joined] > 0
        assert result["val_loss"] is not None and math.isfinite(result["val_loss"])
    finally:
        mesh.close()


def test_the_job_completes_after_its_coordinator_and_the_submitters_node_are_killed(tmp_path: Path) -> None:
    """Two nodes at once, the coordinator among them, and the one ``train`` talks to: a task
    replica takes the job over, ``train`` follows it through another member, 2 workers remain."""
    mesh = LocalMesh(tmp_path / "mesh", preset="local")
    try:
        nodes = start_mesh(mesh, 4)
        proc = train(mesh, nodes[0], 80, "--workers", "2-4")
        wait_for(lambda: (j := jobs(mesh, nodes)) is not None and j["step"] >= 8, 120,
                 what="the job to reach step 8")
        row = jobs(mesh, nodes)
        assert row is not None
        (coordinator,) = [n for n in nodes if n.node_id == row["coordinator"]]
        victims = [coordinator, nodes[0] if coordinator is not nodes[0] else nodes[1]]
        for victim in victims:
            victim.kill()
        survivors = [n for n in nodes if n not in victims]
        result, _ = finish(proc, nodes)
        assert result["state"] == "done" and result["steps"] == 80, result
        assert result["val_loss"] is not None and math.isfinite(result["val_loss"])

        records = segment_records(mesh, survivors[0], result["job"])
        assert [r.end for r in records] == list(range(4, 81, 4))  # every segment committed once
        assert set(records[-1].finished) == {bytes.fromhex(n.node_id) for n in survivors}
        assert all(len(r.finished) >= 2 for r in records)
        gone = [e for e in result["events"] if e["change"] == "gone"]
        assert sorted(e["node"] for e in gone) == sorted(v.node_id for v in victims), result["events"]
        last_loss = max(e["step"] for e in gone)
        assert all(not {v.node_id for v in victims} & {g.hex() for g in r.group}
                   for r in records if r.start > last_loss)
    finally:
        mesh.close()


def test_a_worker_that_leaves_gracefully_is_dropped_and_the_job_goes_on(tmp_path: Path) -> None:
    mesh = LocalMesh(tmp_path / "mesh", preset="local")
    try:
        nodes = start_mesh(mesh, 3)
        proc = train(mesh, nodes[0], 600, "--workers", "2-3")  # long enough to outlast the leave
        wait_for(lambda: (j := jobs(mesh, nodes)) is not None and j["step"] >= 8, 120,
                 what="the job to reach step 8")
        row = jobs(mesh, nodes)
        assert row is not None
        (leaver,) = [n for n in nodes[1:] if n.node_id != row["coordinator"]][:1]
        assert leaver.stop(timeout=20) == 0, leaver.log_text()[-3000:]  # SIGTERM: leave, exit 0
        after = jobs(mesh, [n for n in nodes if n is not leaver])
        assert after is not None and after["step"] < after["steps"], "the job ended before the leave: lengthen it"
        result, _ = finish(proc, nodes)
        assert result["state"] == "done" and result["steps"] == 600, result
        gone = [e for e in result["events"] if e["change"] == "gone"]
        assert [e["node"] for e in gone] == [leaver.node_id], result["events"]
        records = segment_records(mesh, nodes[0], result["job"])
        assert all(leaver.node_id not in (g.hex() for g in r.group) for r in records if r.start > gone[0]["step"])
        assert set(records[-1].finished) == {bytes.fromhex(n.node_id) for n in nodes if n is not leaver}
    finally:
        mesh.close()
