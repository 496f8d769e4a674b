"""Blobs between real node processes, through the CLI: put on one node, get on another, the
first one ``kill -9``ed once a third holds it, and the last still gets it (from the third);
every copy byte-identical; ls, pin, unpin and gc as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from simulations.nodeprocs import REPO_ROOT, LocalMesh, NodeProcess, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def blob(mesh: LocalMesh, node: NodeProcess, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "node", "blob", *args, "--connect", node.address,
               "--mesh-key-file", str(mesh.mesh_key)]
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ))


def test_put_get_kill_get_and_the_cache_commands(tmp_path: Path) -> None:
    mesh = LocalMesh(tmp_path / "mesh")
    try:
        first = mesh.add()
        mesh.wait_ready([first])
        others = [mesh.add(seeds=[first.address]) for _ in range(3)]
        mesh.wait_ready(others)
        wait_for(lambda: all(v is not None and sum(m["state"] == "alive" for m in v["members"]) == 4
                             for v in mesh.views(mesh.nodes).values()), 30, what="4 nodes to see each other")
        data = os.urandom(3 << 20) + bytes(5 << 20)  # random, then compressible
        source = tmp_path / "a.bin"
        source.write_bytes(data)
        put = blob(mesh, mesh.nodes[0], "put", str(source), "--json")
        assert put.returncode == 0, put.stderr
        blob_id = json.loads(put.stdout)["id"]
        assert len(blob_id) == 64

        got = blob(mesh, mesh.nodes[2], "get", blob_id, "--out", str(tmp_path / "c.bin"))
        assert got.returncode == 0, got.stderr
        assert (tmp_path / "c.bin").read_bytes() == data
        mesh.nodes[0].kill()
        got = blob(mesh, mesh.nodes[3], "get", blob_id, "--out", str(tmp_path / "d.bin"))
        assert got.returncode == 0, got.stderr
        assert (tmp_path / "d.bin").read_bytes() == data

        listed = blob(mesh, mesh.nodes[3], "ls", "--json")
        assert listed.returncode == 0, listed.stderr
        (entry,) = [e for e in json.loads(listed.stdout) if e["id"] == blob_id]
        assert entry["size"] == len(data)
        assert blob(mesh, mesh.nodes[3], "pin", blob_id).returncode == 0
        assert next(e for e in json.loads(blob(mesh, mesh.nodes[3], "ls", "--json").stdout)
                    if e["id"] == blob_id)["pinned"]
        assert blob(mesh, mesh.nodes[3], "unpin", blob_id).returncode == 0
        gc = blob(mesh, mesh.nodes[3], "gc")
        assert gc.returncode == 0 and "freed" in gc.stdout
        assert all(e["id"] != blob_id for e in json.loads(blob(mesh, mesh.nodes[3], "ls", "--json").stdout))

        missing = blob(mesh, mesh.nodes[1], "get", "ab" * 32, "--out", str(tmp_path / "x.bin"), "--timeout", "8")
        assert missing.returncode == 1 and not (tmp_path / "x.bin").exists()
        bad = blob(mesh, mesh.nodes[1], "get", "not-an-id", "--out", str(tmp_path / "x.bin"))
        assert bad.returncode == 2
    finally:
        mesh.close()
