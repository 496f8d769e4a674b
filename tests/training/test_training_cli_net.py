"""Training through the CLI between real node processes on loopback: ``python -m node train``
on a mesh of 3 nodes trains a tiny char GPT in sync mode, the loss goes down, every segment's
3 workers report the same state bytes (identical parameters), the ``--out`` dir holds the
model, the plot, the config and the metrics, and ``python -m node jobs`` on another node lists
the job; bad flags exit 2, a module the node does not allow is refused (exit 1), and a job
whose function raises fails (exit 1) with the error shown while its node keeps answering and
trains the next job.

The mesh is owned by the test session's submitter key (``XDG_CONFIG_HOME`` is private to the
session, ``tests/conftest.py``), as a first node's mesh is owned by its creator's.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from node.identity import load_mesh_key
from node.task_client import AsyncMeshClient
from protocol.messages.tasks import decode_struct
from protocol.messages.training import SegmentRecord
from simulations.nodeprocs import REPO_ROOT, LocalMesh, NodeProcess, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

STEPS = 24
#: A 1-layer, 32-wide char GPT with context 32: a step takes milliseconds on one thread.
TINY = ("n_layer=1", "n_head=2", "n_embd=32", "block_size=32", "batch_size=4", "eval_batches=2")
BAD_JOB = """
def make_job(options):
    raise ValueError("no job in this bundle")
"""
FAST = ("--threads", "1", "--segment-steps", "8", "--eval-every", "8", "--checkpoint-every", "8")


def cli(mesh: LocalMesh, node: NodeProcess, *args: str, timeout: float = 150) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "node", *args, "--connect", node.address,
               "--mesh-key-file", str(mesh.mesh_key)]
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ))


def start_mesh(mesh: LocalMesh, n: int) -> list[NodeProcess]:
    first = mesh.add()
    mesh.wait_ready([first])
    others = [mesh.add(seeds=[first.address]) for _ in range(n - 1)]
    mesh.wait_ready(others)
    wait_for(lambda: all(v is not None and sum(m["state"] == "alive" for m in v["members"]) == n
                         for v in mesh.views(mesh.nodes).values()), 30, what=f"{n} nodes to see each other")
    return mesh.nodes


def final_json(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"no JSON line (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def segment_records(mesh: LocalMesh, node: NodeProcess, job: str) -> list[SegmentRecord]:
    """The job's committed history (``AsyncTask.outcomes``, as ``train`` reads it), asked of ``node``."""

    async def ask() -> list[SegmentRecord]:
        client = await AsyncMeshClient.connect(node.address, mesh_secret=load_mesh_key(mesh.mesh_key),
                                               timeout=15)
        try:
            outcomes, _ = await client.task(job).outcomes()
        finally:
            await client.close()
        return sorted((decode_struct(SegmentRecord, o.value, what="SegmentRecord")
                       for o in outcomes if o.ok and o.value), key=lambda r: r.end)

    return asyncio.run(ask())


def test_three_nodes_train_the_char_gpt_in_sync_mode(tmp_path: Path) -> None:
    mesh = LocalMesh(tmp_path / "mesh", preset="local")
    try:
        nodes = start_mesh(mesh, 3)
        out = tmp_path / "out"
        args = ["train", "--model", "charlm", "--steps", str(STEPS), "--workers", "3", "--mode", "sync",
                "--json", "--no-progress", "--out", str(out), *FAST]
        for item in TINY:
            args += ["--job-arg", item]
        proc = cli(mesh, nodes[0], *args)
        output = f"{proc.stdout}\n{proc.stderr}"
        assert proc.returncode == 0, output + "\n".join(n.log_text()[-3000:] for n in nodes)
        result = final_json(proc)
        assert result["state"] == "done" and result["mode"] == "sync", output
        assert result["steps"] == STEPS and result["steps_total"] == STEPS
        assert sorted(result["workers_seen"]) == sorted(n.node_id for n in nodes), output
        assert result["val_loss"] is not None and math.isfinite(result["val_loss"]), output
        assert result["out"] == str(out) and result["model"] is not None

        # identical parameters: a record keeps the workers whose state blob agreed
        records = segment_records(mesh, nodes[1], result["job"])
        assert [(r.start, r.end) for r in records] == [(0, 8), (8, 16), (16, 24)]
        for r in records:
            assert len(r.group) == 3 and set(r.finished) == set(r.group), r
            assert len(r.losses) == 8 and all(math.isfinite(x) for x in r.losses)
        assert all(r.checkpoint for r in records)
        assert result["checkpoint"] == records[-1].state.hex()

        rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in rows if "loss" in r]
        assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
        assert all(r["workers"] == 3 for r in steps)
        first = sum(r["loss"] for r in steps[:4]) / 4
        last = sum(r["loss"] for r in steps[-4:]) / 4
        assert first - last > 0.3, f"loss {first:.3f} -> {last:.3f}"
        val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
        assert [step for step, _ in val] == [8, 16, 24]
        assert val[0][1] > val[1][1] > val[2][1] and val[2][1] == pytest.approx(result["val_loss"]), val

        from safetensors import safe_open

        with safe_open(str(out / "model.safetensors"), "pt") as f:
            assert len(list(f.keys())) > 0
        assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (out / "sample.txt").read_text(encoding="utf-8")
        config = json.loads((out / "config.json").read_text())
        assert config["steps"] == STEPS and config["mode"] == "sync" and config["workers_min"] == 3

        jobs = cli(mesh, nodes[2], "jobs", "--json", timeout=30)
        assert jobs.returncode == 0, jobs.stderr
        (job,) = [j for j in map(json.loads, jobs.stdout.splitlines()) if j["id"] == result["job"]]
        assert job["step"] == STEPS and job["steps"] == STEPS and job["mode"] == "sync", job
        assert job["state"] == "done"
    finally:
        mesh.close()


def subtask_failure(mesh: LocalMesh, node: NodeProcess, job: str) -> str:
    """The job's failure as the mesh keeps it (``AsyncTask.subtasks``), asked of ``node``."""

    async def ask() -> str:
        client = await AsyncMeshClient.connect(node.address, mesh_secret=load_mesh_key(mesh.mesh_key),
                                               timeout=15)
        try:
            reports = await client.task(job).subtasks()
        finally:
            await client.close()
        return "\n".join(f"{r.failure.type}: {r.failure.message}" for r in reports if r.failure)

    return asyncio.run(ask())


def test_bad_flags_exit_2_and_a_job_that_raises_fails_alone(tmp_path: Path) -> None:
    mesh = LocalMesh(tmp_path / "mesh", preset="local")
    try:
        (node,) = start_mesh(mesh, 1)
        bad = cli(mesh, node, "train", "--workers", "3-1", "--steps", "4", timeout=30)
        assert bad.returncode == 2, bad.stdout + bad.stderr
        assert "--workers '3-1'" in bad.stderr and "MIN <= MAX" in bad.stderr

        refused = cli(mesh, node, "train", "--job", "nosuchmodule:make_job", "--steps", "4", timeout=30)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert "NOT_ALLOWED" in refused.stderr and "nosuchmodule" in refused.stderr

        bundle = tmp_path / "bundle"
        bundle.mkdir()
        (bundle / "badjob.py").write_text(BAD_JOB)
        args = ["train", "--bundle", str(bundle), "--job", "badjob:make_job", "--steps", "4",
                "--retries", "0", "--segment-steps", "4", "--threads", "1", "--json", "--no-progress"]
        proc = cli(mesh, node, *args, timeout=90)
        output = f"{proc.stdout}\n{proc.stderr}"
        assert proc.returncode == 1, output
        result = final_json(proc)
        assert result["state"] == "failed" and result["steps"] == 0, output
        assert "no job in this bundle" in proc.stderr, output
        assert "no job in this bundle" in subtask_failure(mesh, node, result["job"])
        assert node.proc is not None and node.proc.poll() is None, node.log_text()[-3000:]
        status = cli(mesh, node, "status", "--json", timeout=30)
        assert status.returncode == 0, status.stderr
        assert [m["state"] for m in json.loads(status.stdout)["members"]] == ["alive"]
        # and the node trains the next job as if nothing happened
        again = ["train", "--steps", "4", "--segment-steps", "4", "--threads", "1", "--json",
                 "--no-progress", *(a for item in TINY for a in ("--job-arg", item))]
        ok = cli(mesh, node, *again, timeout=90)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert final_json(ok)["steps"] == 4
    finally:
        mesh.close()
