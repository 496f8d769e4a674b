"""Real ``python -m node`` processes on loopback: join, failure, leave, restart, hostile peers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.identity import create_mesh_key
from simulations.nodeprocs import REPO_ROOT, LocalMesh, NodeProcess, View, states, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture
def local_mesh(tmp_path: Path) -> Iterator[LocalMesh]:
    mesh = LocalMesh(tmp_path, preset="test")
    try:
        yield mesh
    finally:
        mesh.close()
    crashed = [n for n in mesh.nodes if "Traceback" in n.log_text()]
    assert not crashed, _logs(crashed)  # nothing a peer did raised out of the node


def _logs(nodes: list[NodeProcess]) -> str:
    return "\n".join(f"--- {n.data_dir.name} {n.address}\n{n.log_text()[-3000:]}" for n in nodes)


def _all_see(mesh: LocalMesh, observers: list[NodeProcess], expected: dict[str, str],
             timeout: float) -> dict[str, View | None]:
    """Poll until every observer reports each id in ``expected`` with that state."""
    last: dict[str, View | None] = {}

    def check() -> bool:
        nonlocal last
        last = mesh.views(observers)
        return all(
            {i: states(v).get(i, ("?", 0))[0] for i in expected} == expected for v in last.values()
        )

    wait_for(check, timeout, what=f"views {expected}",
             detail=lambda: json.dumps({k: states(v) for k, v in last.items()}) + _logs(observers))
    return last


def _start_mesh(mesh: LocalMesh, n: int) -> list[NodeProcess]:
    seed = mesh.add()
    mesh.wait_ready([seed])
    others = [mesh.add(seeds=[seed.address]) for _ in range(n - 1)]
    mesh.wait_ready(others)
    nodes = [seed, *others]
    _all_see(mesh, nodes, {n.node_id: "alive" for n in nodes}, timeout=20)
    return nodes


def _remembered(node: NodeProcess) -> list[str]:
    try:
        return (node.data_dir / "peers").read_text().split()
    except OSError:
        return []


def test_join_kill_leave_restart(local_mesh: LocalMesh) -> None:
    nodes = _start_mesh(local_mesh, 5)
    victim, leaver, *rest = nodes  # the victim is the seed: on restart it rejoins by itself

    out = subprocess.run(
        [sys.executable, "-m", "node", "status", "--json", "--connect", rest[0].address,
         "--mesh-key-file", str(local_mesh.mesh_key)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=30, check=True,
    )
    view = json.loads(out.stdout)
    assert view["self"]["id"] == rest[0].node_id
    assert sorted(m["id"] for m in view["members"]) == sorted(n.node_id for n in nodes)
    assert {m["state"] for m in view["members"]} == {"alive"}
    assert all(m["cpus"] >= 1 and m["address"].startswith("127.0.0.1:") for m in view["members"])
    observer = rest[0]
    before = states(local_mesh.views([observer])[observer.node_id])[victim.node_id][1]

    # the victim writes the peers it will rejoin through at most once a second (write-behind):
    # kill it only once they are on disk, as a node running for more than a second has them
    others = {n.address for n in nodes if n is not victim}
    wait_for(lambda: others <= set(_remembered(victim)), 10, what="the victim to remember its peers")
    victim.kill()  # SIGKILL: no goodbye
    survivors = [leaver, *rest]
    _all_see(local_mesh, survivors, {victim.node_id: "dead"}, timeout=20)

    started = time.monotonic()
    leaver.signal(signal.SIGTERM)
    assert leaver.proc is not None
    assert leaver.proc.wait(5) == 0
    assert time.monotonic() - started < 2.0
    survivors = rest
    _all_see(local_mesh, survivors, {leaver.node_id: "left", victim.node_id: "dead"}, timeout=10)

    victim.restart()  # same data dir: same identity, new port, no --join: remembered peers
    local_mesh.wait_ready([victim])
    views = _all_see(local_mesh, [*survivors, victim],
                     {victim.node_id: "alive", **{n.node_id: "alive" for n in rest}}, timeout=20)
    for v in views.values():
        assert states(v)[victim.node_id][1] > before
    assert "rejoining through" in victim.log_text()
    assert "member dead" in observer.log_text() and "member left" in observer.log_text()


def test_wrong_key_and_hostile_clients_do_not_disturb(local_mesh: LocalMesh, tmp_path: Path) -> None:
    nodes = _start_mesh(local_mesh, 3)
    seed = nodes[0]
    other_key = tmp_path / "other.key"
    create_mesh_key(other_key)  # another mesh's key: a joiner never makes one up
    intruder = local_mesh.add(seeds=[seed.address], mesh_key=other_key,
                              extra_args=["--join-timeout", "0"])  # keeps trying while we look
    local_mesh.wait_ready([intruder])

    host, port = seed.address.rsplit(":", 1)
    silent = socket.create_connection((host, int(port)))
    junk = socket.create_connection((host, int(port)))
    try:
        with pytest.raises(OSError):  # the seed closes it: a reset while we are still writing
            junk.sendall(os.urandom(1 << 20))
            junk.settimeout(10)
            while junk.recv(65536):
                pass
            raise ConnectionResetError("closed by the node")
        wait_for(lambda: "refused our handshake" in intruder.log_text(), 20, what="intruder refused",
                 detail=lambda: _logs([intruder, seed]))
        wait_for(lambda: "AUTH_FAILED" in seed.log_text() and "rejected" in seed.log_text(), 10,
                 what="seed logs the rejected peer", detail=lambda: _logs([seed]))
        views = _all_see(local_mesh, nodes, {n.node_id: "alive" for n in nodes}, timeout=10)
        for v in views.values():
            assert intruder.node_id not in states(v)
    finally:
        silent.close()
        junk.close()
    assert intruder.stop() == 0


def test_node_creates_identity_and_prints_join_command(local_mesh: LocalMesh) -> None:
    node = local_mesh.add()
    local_mesh.wait_ready([node])
    wait_for(lambda: "python -m node --join" in node.log_text(), 10, what="join command")
    assert f"--join {node.address} --mesh-key-file {local_mesh.mesh_key}" in node.log_text()
    assert (node.data_dir / "identity.key").stat().st_mode & 0o777 == 0o600
    assert node.stop() == 0
