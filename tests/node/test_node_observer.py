"""``simulations.nodeprocs.Observer``: one persistent status link per node (integration)."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.config import Address, NodeConfig
from node.identity import create_mesh_key, load_mesh_key
from node.runtime import Node
from simulations.nodeprocs import NodeProcess, Observer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def _config(tmp_path: Path) -> NodeConfig:
    return NodeConfig(listen=Address("127.0.0.1", 0), data_dir=tmp_path / "n0", mesh_key_file=tmp_path / "mesh.key",
                      preset="test", use_uvloop=False)


async def test_polls_reuse_one_link_and_redial_after_a_restart(tmp_path: Path) -> None:
    create_mesh_key(tmp_path / "mesh.key")
    target = NodeProcess(data_dir=tmp_path / "n0", mesh_key=tmp_path / "mesh.key")  # never started
    async with Observer(load_mesh_key(tmp_path / "mesh.key")) as obs:
        async with Node(_config(tmp_path)) as node:
            target.address, target.node_id = node.address, node.node_id.hex()
            for _ in range(3):
                view = await obs.view(target)
                assert view is not None and view["self"]["id"] == target.node_id
            assert obs.dials == 1
        # the node stopped (its links said goodbye): the re-dial is refused
        assert await obs.view(target, timeout=0.5) is None and obs.dials == 2
        async with Node(_config(tmp_path)) as again:  # restarted: same identity, new port
            target.address = again.address
            views = await obs.views([target])
            view = views[target.node_id]
            assert view is not None and view["self"]["address"] == again.address
            assert await obs.view(target) is not None and obs.dials == 3
