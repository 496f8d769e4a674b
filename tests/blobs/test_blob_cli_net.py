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


def test_put_with_copies_through_the_cli_and_the_python_api(tmp_path: Path) -> None:
    from node.blob_client import BlobClient, BlobId

    mesh = LocalMesh(tmp_path / "mesh")
    try:
        first = mesh.add()
        mesh.wait_ready([first])
        others = [mesh.add(seeds=[first.address]) for _ in range(2)]
        mesh.wait_ready(others)
        wait_for(lambda: all(v is not None and sum(m["state"] == "alive" for m in v["members"]) == 3
                             for v in mesh.views(mesh.nodes).values()), 30, what="3 nodes to see each other")
        data = os.urandom(3 << 20)
        source = tmp_path / "a.bin"
        source.write_bytes(data)
        put = blob(mesh, first, "put", str(source), "--copies", "2", "--json")
        assert put.returncode == 0, put.stderr
        out = json.loads(put.stdout)
        assert out["wanted"] == 2 and len(out["copies"]) == 2 and len(set(out["copies"])) == 2
        plain = blob(mesh, first, "put", str(source), "--copies", "2")  # the same blob: the same copies
        assert plain.returncode == 0, plain.stderr
        lines = plain.stdout.splitlines()
        assert lines[0] == out["id"] and lines[1] == "copies: 2 of 2 confirmed"
        assert {line.strip() for line in lines[2:]} == set(out["copies"])
        for node in others:  # each other member holds it under the lease
            (entry,) = [e for e in json.loads(blob(mesh, node, "ls", "--json").stdout) if e["id"] == out["id"]]
            assert entry["held"] and not entry["pinned"] and entry["size"] == len(data)

        with BlobClient.connect(others[0].address, mesh_key_file=mesh.mesh_key, timeout=30) as api:
            small = api.put(b"hello blobs")
            assert isinstance(small, BlobId) and len(small) == 64
            holders = api.replicate(small, copies=2, timeout=30)
            assert len(holders) == 2 and others[0].node_id not in holders
            got = api.get(out["id"], tmp_path / "via-api.bin")
            assert got.read_bytes() == data
            api.unpin(small)  # also ends its copies
            assert not any(b.id == small and b.pinned for b in api.ls())
        too_many = blob(mesh, first, "put", str(source), "--copies", "3", "--copies-timeout", "2")
        assert too_many.returncode == 1 and "copies: 2 of 3 confirmed" in too_many.stdout
    finally:
        mesh.close()
