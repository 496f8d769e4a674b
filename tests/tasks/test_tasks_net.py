"""Tasks between real node processes on loopback, driven through the CLI and the Python API:
submit on 3 nodes, a crashing worker process retried, a failing function reported, an
unauthorized key refused (nothing runs), results again from another node, cancel, and the
coordinator ``kill -9``ed mid-task with nothing lost and its worker processes gone with it.

The mesh is owned by the test session's submitter key (``XDG_CONFIG_HOME`` is private to the
session, ``tests/conftest.py``), as a first node's mesh is owned by its creator's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.identity import load_mesh_key
from node.task_client import MeshClient
from protocol.messages.tasks import TaskState
from simulations.nodeprocs import REPO_ROOT, LocalMesh, NodeProcess, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

JOB = textwrap.dedent('''
    import os, time

    def square(x):
        return x * x

    def crash_once(arg):
        marker = os.path.join(arg["dir"], "m%d" % arg["i"])
        if not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(3)
        return arg["i"] * 2

    def picky(x):
        if x % 3 == 0:
            print("about to fail on", x)
            raise ValueError("no multiples of three: %d" % x)
        return x

    def slow(x):
        time.sleep(0.3)
        return x + 1

    def touch(arg):
        open(os.path.join(arg["dir"], "ran%d" % arg["i"]), "w").close()
        return arg["i"]
''')


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    mesh = LocalMesh(tmp_path_factory.mktemp("tasks-mesh"))
    first = mesh.add(extra_args=["--task-lease-s", "2"])
    mesh.wait_ready([first])
    others = [mesh.add(seeds=[first.address], extra_args=["--task-lease-s", "2"]) for _ in range(2)]
    mesh.wait_ready(others)
    wait_for(lambda: all(v is not None and sum(m["state"] == "alive" for m in v["members"]) == 3
                         for v in mesh.views(mesh.nodes).values()), 30, what="3 nodes to see each other")
    try:
        yield mesh
    finally:
        mesh.close()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bundle")
    (root / "job.py").write_text(JOB)
    return root


def cli(mesh: LocalMesh, node: NodeProcess, *args: str, stdin: str | None = None,
        env: dict[str, str] | None = None, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "node", *args[:1], "--connect", node.address,
               "--mesh-key-file", str(mesh.mesh_key), *args[1:]]
    return subprocess.run(command, cwd=REPO_ROOT, input=stdin, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_submit_through_the_cli_returns_every_result_in_input_order(mesh: LocalMesh, bundle: Path,
                                                                    tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    done = cli(mesh, mesh.nodes[1], "submit", "--bundle", str(bundle), "job:square", "--inputs", "-",
               "--out", str(out), "--json", stdin="".join(f"{i}\n" for i in range(300)))
    assert done.returncode == 0, done.stderr
    rows = lines(out.read_text())
    assert rows == [{"index": i, "ok": True, "value": i * i} for i in range(300)]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["state"] == "done" and summary["done"] == 300 and summary["failed"] == 0
    # again, from another node, once finished
    again = cli(mesh, mesh.nodes[2], "results", summary["task_id"])
    assert again.returncode == 0, again.stderr
    assert lines(again.stdout) == rows
    listed = cli(mesh, mesh.nodes[0], "tasks", "--json")
    assert any(t["id"] == summary["task_id"] and t["state"] == "done" for t in json.loads(listed.stdout))


def test_a_crashing_worker_process_is_retried(mesh: LocalMesh, bundle: Path, tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    inputs = "".join(json.dumps({"i": i, "dir": str(marks)}) + "\n" for i in range(6))
    done = cli(mesh, mesh.nodes[0], "submit", "--bundle", str(bundle), "job:crash_once", "--inputs", "-",
               "--json", stdin=inputs)
    assert done.returncode == 0, done.stderr
    rows = lines(done.stdout)
    assert [r["value"] for r in rows[:-1]] == [2 * i for i in range(6)]
    assert int(str(rows[-1]["retried"])) >= 6


def test_a_failing_function_is_reported_with_its_traceback_and_output(mesh: LocalMesh, bundle: Path) -> None:
    done = cli(mesh, mesh.nodes[2], "submit", "--bundle", str(bundle), "job:picky", "--inputs", "-",
               "--retries", "1", "--json", stdin="".join(f"{i}\n" for i in range(7)))
    assert done.returncode == 1, done.stderr
    rows = lines(done.stdout)[:-1]
    failed = [r for r in rows if not r["ok"]]
    assert [r["index"] for r in failed] == [0, 3, 6]
    error = failed[1]["error"]
    assert isinstance(error, dict) and error["type"] == "ValueError" and "multiples of three: 3" in error["message"]
    assert "raise ValueError" in error["traceback"] and "about to fail on 3" in error["stdout"]
    assert failed[1]["attempts"] == 2
    assert "subtask 3 failed after 2 attempts: ValueError" in done.stderr
    task_id = json.loads(done.stdout.splitlines()[-1])["task_id"]
    shown = cli(mesh, mesh.nodes[0], "task", task_id, "--json")
    doc = json.loads(shown.stdout)
    assert doc["state"] == "failed" and doc["subtasks"][3]["error"]["type"] == "ValueError"


def test_an_unauthorized_key_is_refused_and_nothing_runs(mesh: LocalMesh, bundle: Path, tmp_path: Path) -> None:
    marks = tmp_path / "ran"
    marks.mkdir()
    stranger = tmp_path / "stranger"
    inputs = "".join(json.dumps({"i": i, "dir": str(marks)}) + "\n" for i in range(3))
    done = cli(mesh, mesh.nodes[1], "submit", "--bundle", str(bundle), "job:touch", "--inputs", "-",
               stdin=inputs, env={"XDG_CONFIG_HOME": str(stranger)})
    assert done.returncode == 1
    assert "UNAUTHORIZED" in done.stderr and "ed25519:" in done.stderr
    assert list(marks.iterdir()) == []
    assert any("unauthorized key" in n.log_text() for n in mesh.nodes)


def test_the_python_api_maps_cancels_and_reattaches(mesh: LocalMesh, bundle: Path) -> None:
    with MeshClient.connect(mesh.nodes[0].address, mesh_secret=load_mesh_key(mesh.mesh_key)) as client:
        task = client.map("job:square", range(20), bundle=bundle, retries=0)
        assert [r.value for r in task.results()] == [i * i for i in range(20)]
        seen = {r.index for r in client.task(task.id).as_completed()}
        assert seen == set(range(20))
        slow = client.map("job:slow", range(200), bundle=bundle)
        wait_for(lambda: slow.status().done > 0, 30, what="the slow task to start")
        summary = slow.cancel()
        assert summary.state is TaskState.CANCELLED
        final = slow.wait(timeout=30)
        assert final.state is TaskState.CANCELLED and final.done < 200
        results = slow.results()
        assert any(r.error is not None and r.error["type"] == "Cancelled" for r in results)
        assert task.id in {s.task_id.hex() for s in client.tasks()}


def test_builtins_run_without_a_bundle(mesh: LocalMesh) -> None:
    done = cli(mesh, mesh.nodes[0], "submit", "node.tasks.builtins:double", "--inputs", "-",
               stdin="1\n2\n")
    assert done.returncode == 0, done.stderr
    assert [r["value"] for r in lines(done.stdout)] == [2, 4]
    refused = cli(mesh, mesh.nodes[0], "submit", "os:getcwd", "--inputs", "-", stdin="1\n")
    assert refused.returncode == 1 and "NOT_ALLOWED" in refused.stderr


def test_the_client_carries_on_through_another_member_when_its_node_dies(mesh: LocalMesh, bundle: Path) -> None:
    """The submitter is a client of the mesh: its node killed mid-task, it re-attaches elsewhere."""
    entry = mesh.nodes[2]
    with MeshClient.connect(entry.address, mesh_secret=load_mesh_key(mesh.mesh_key)) as client:
        task = client.map("job:slow", range(30), bundle=bundle)
        wait_for(lambda: task.status().done >= 3, 60, what="some subtasks to finish")
        entry.kill()
        try:
            results = task.results(timeout=120)
        finally:
            entry.restart()
        assert [r.value for r in results] == [i + 1 for i in range(30)]
    mesh.wait_ready([entry])


def _descendants(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    kids = [int(p) for p in out.split()]
    return kids + [d for k in kids for d in _descendants(k)]


def test_the_coordinator_killed_mid_task_loses_nothing(tmp_path: Path, bundle: Path) -> None:
    mesh = LocalMesh(tmp_path / "mesh")
    try:
        first = mesh.add(extra_args=["--task-lease-s", "2"])
        mesh.wait_ready([first])
        others = [mesh.add(seeds=[first.address], extra_args=["--task-lease-s", "2"]) for _ in range(3)]
        mesh.wait_ready(others)
        wait_for(lambda: all(v is not None and sum(m["state"] == "alive" for m in v["members"]) == 4
                             for v in mesh.views(mesh.nodes).values()), 30, what="4 nodes to see each other")
        with MeshClient.connect(first.address, mesh_secret=load_mesh_key(mesh.mesh_key)) as client:
            task = client.map("job:slow", range(60), bundle=bundle)
            wait_for(lambda: task.status().done >= 5, 60, what="some subtasks to finish")
            coordinator = task.status().coordinator.hex()
            victim = next(n for n in mesh.nodes if n.node_id == coordinator)
            assert victim.proc is not None
            workers = _descendants(victim.proc.pid)
            victim.kill()
            killed = time.monotonic()
            results = task.results(timeout=120)
            assert [r.value for r in results] == [i + 1 for i in range(60)]
            assert task.status().coordinator.hex() != coordinator
            assert time.monotonic() - killed < 90
        wait_for(lambda: not any(_alive(p) for p in workers), 10, what="the dead node's worker processes to exit")
    finally:
        mesh.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False
