"""Real node processes on loopback: a grant made through one node reaches every member, a node
started later or offline at the time catches up, and a revoke spreads the same way.

The first node starts a new mesh with no key file, so it writes the owner line: the public key
of the person's default submitter key (``XDG_CONFIG_HOME`` is private to the test session,
``tests/conftest.py``), which then signs grants with ``python -m node submitters add``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from node import submitters_cli
from node.client_link import ClientLink
from node.config import parse_address
from node.identity import load_mesh_key, load_mesh_owner
from node.submitters.keys import owner_line, public_key_of, public_key_to_text
from node.submitters.log import SubmitterLog
from node.submitters.store import default_key_path, load_submitter_key, log_path
from protocol import crypto
from simulations.nodeprocs import NodeProcess, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]



def SubmittersNode(*, data_dir: Path, mesh_key: Path, seeds: tuple[str, ...] = ()) -> NodeProcess:
    """A plain ``python -m node`` process (every node runs the submitter service), logging at INFO."""
    return NodeProcess(data_dir=data_dir, mesh_key=mesh_key, seeds=seeds, extra_args=("--log-level", "info"))


class Mesh:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.key = root / "mesh.key"
        self.nodes: list[NodeProcess] = []

    def add(self, *, seeds: tuple[str, ...] = ()) -> NodeProcess:
        node = SubmittersNode(data_dir=self.root / f"n{len(self.nodes)}", mesh_key=self.key, seeds=seeds)
        self.nodes.append(node)
        node.start()
        wait_for(node.poll_ready, 20, what="the node to listen", detail=lambda: node.log_text()[-3000:])
        return node

    def log_of(self, node: NodeProcess) -> SubmitterLog | None:
        """The node's submitter log over a CLIENT link (None if it does not answer)."""
        secret = load_mesh_key(self.key)

        async def body(client: ClientLink) -> SubmitterLog:
            return await submitters_cli.fetch_log(client, timeout=2.0)

        try:
            log: SubmitterLog = asyncio.run(submitters_cli._with_client(
                parse_address(node.address), secret, 2.0, body))
        except Exception:
            return None
        return log

    def wait_authorized(self, node: NodeProcess, key: bytes, expected: bool) -> None:
        def check() -> bool:
            log = self.log_of(node)
            return log is not None and log.is_authorized(key) is expected

        wait_for(check, 20, what=f"{node.data_dir.name} to see {public_key_to_text(key)} "
                                 f"{'granted' if expected else 'revoked'}",
                 detail=lambda: node.log_text()[-3000:], interval=0.1)

    def close(self) -> None:
        for node in self.nodes:
            node.kill()


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    m = Mesh(tmp_path)
    try:
        yield m
    finally:
        m.close()


def _cli(capsys: pytest.CaptureFixture[str], mesh: Mesh, node: NodeProcess, *argv: str) -> str:
    code = submitters_cli.main([*argv, "--connect", node.address, "--mesh-key-file", str(mesh.key),
                                "--timeout", "5"])
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out


def test_grants_and_revokes_reach_every_node(mesh: Mesh, capsys: pytest.CaptureFixture[str]) -> None:
    first = mesh.add()
    owner_key = load_submitter_key(default_key_path())
    owner = public_key_of(owner_key)
    assert load_mesh_owner(mesh.key) == owner  # a fresh first node names its person the owner
    assert mesh.key.read_text().splitlines()[1] == owner_line(owner)
    others = [mesh.add(seeds=(first.address,)) for _ in range(2)]

    alice = public_key_of(crypto.generate_identity())
    assert not (mesh.log_of(others[1]) or SubmitterLog(None)).is_authorized(alice)
    out = _cli(capsys, mesh, first, "add", public_key_to_text(alice), "--name", "alice")
    assert "granted" in out
    mesh.wait_authorized(others[1], alice, True)  # node 2 learned it from node 0

    late = mesh.add(seeds=(others[0].address,))  # started after the grant: catches up on join
    mesh.wait_authorized(late, alice, True)

    offline = others[1]
    assert offline.stop() == 0
    bob = public_key_of(crypto.generate_identity())
    _cli(capsys, mesh, others[0], "add", bob.hex(), "--name", "bob")
    mesh.wait_authorized(late, bob, True)  # sign the revoke on top of the grant (no fork)
    _cli(capsys, mesh, late, "revoke", public_key_to_text(alice))
    mesh.wait_authorized(first, alice, False)
    offline.restart()  # its persisted log has alice; members send it bob and the revoke
    wait_for(offline.poll_ready, 20, what="the restarted node to listen")
    mesh.wait_authorized(offline, bob, True)
    mesh.wait_authorized(offline, alice, False)
    assert len(log_path(offline.data_dir).read_text().splitlines()) == 3

    listing = _cli(capsys, mesh, offline, "--json")
    assert '"version": 3' in listing and public_key_to_text(bob) in listing
    assert public_key_to_text(alice) not in listing and public_key_to_text(owner) in listing


def test_only_the_owner_key_signs(mesh: Mesh, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    first = mesh.add()
    stranger = tmp_path / "stranger.key"
    assert submitters_cli.main(["key", "--key", str(stranger)]) == 0
    capsys.readouterr()
    code = submitters_cli.main(["add", public_key_to_text(bytes(32)), "--key", str(stranger),
                                "--connect", first.address, "--mesh-key-file", str(mesh.key)])
    err = capsys.readouterr().err
    assert code == 2 and "is not the mesh owner" in err and "--key PATH" in err
    log = mesh.log_of(first)
    assert log is not None and log.version == 0
