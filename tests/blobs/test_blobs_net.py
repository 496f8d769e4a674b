"""Blob service on real nodes in this process (loopback, port 0): put on one, get on another,
the first stopped once a third has it, and the fourth still gets it, byte-identical."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from node.blobs.service import BlobService
from node.config import Address, NodeConfig, parse_address
from node.runtime import Node

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


def _config(tmp_path: Path, name: str, seeds: tuple[Address, ...] = ()) -> NodeConfig:
    return NodeConfig(listen=Address("127.0.0.1", 0), data_dir=tmp_path / name, mesh_key_file=tmp_path / "mesh.key",
                      seeds=seeds, preset="test", use_uvloop=False, log_level="WARNING")


async def _with_blobs(node: Node) -> BlobService:
    """The node's own blob service (every node runs one)."""
    return node.blobs


async def _wait_members(nodes: list[Node], n: int) -> None:
    for _ in range(200):
        if all(len([m for m in x.members() if m.status.name == "ALIVE"]) >= n for x in nodes):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the nodes did not join")


async def test_put_get_and_get_again_after_the_first_holder_is_gone(tmp_path: Path) -> None:
    data = bytes(range(256)) * (4096 * 3) + os.urandom(2 << 20) + b"tail"  # 3 MiB compressible, 2 MiB not
    async with Node(_config(tmp_path, "a")) as a:
        seed = (parse_address(a.address),)
        async with Node(_config(tmp_path, "b", seed)) as b, Node(_config(tmp_path, "c", seed)) as c, \
                Node(_config(tmp_path, "d", seed)) as d:
            blobs = {n: await _with_blobs(n) for n in (a, b, c, d)}
            await _wait_members([a, b, c, d], 4)
            blob_id = await blobs[a].put(data)
            await asyncio.sleep(0.3)  # the provide reaches the directory members
            path_c = await asyncio.wait_for(blobs[c].get(blob_id), 30)
            assert path_c.read_bytes() == data
            await asyncio.sleep(0.3)
            await a.__aexit__(None, None, None)  # the first holder leaves
            path_d = await asyncio.wait_for(blobs[d].get(blob_id), 30)
            assert path_d.read_bytes() == data
            served = blobs[c].counters
            assert 0 < served["uploaded_bytes"] < served["uploaded_raw_bytes"]  # zstd where it shrank
            assert blobs[d].store.has(blob_id) and not blobs[b].store.has(blob_id)


async def _until(check: object, timeout: float = 20.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if check():  # type: ignore[operator]
            return
        await asyncio.sleep(0.05)
    raise AssertionError("not within the timeout")


async def test_replicate_keeps_two_leased_copies_replaces_a_lost_one_and_releases(tmp_path: Path) -> None:
    data = os.urandom(3 << 20)
    async with Node(_config(tmp_path, "a")) as a:
        seed = (parse_address(a.address),)
        async with Node(_config(tmp_path, "b", seed)) as b, Node(_config(tmp_path, "c", seed)) as c, \
                Node(_config(tmp_path, "d", seed)) as d:
            nodes = {n.node_id: n for n in (b, c, d)}
            await _wait_members([a, b, c, d], 4)
            blob_id = await a.blobs.put(data)
            holders = await asyncio.wait_for(a.blobs.replicate(blob_id, copies=2, timeout=30), 40)
            assert len(holders) == 2 and set(holders) <= set(nodes)
            for node_id in holders:
                store = nodes[node_id].blobs.store
                assert store.held(blob_id) and store.path(blob_id) is not None
                assert store.path(blob_id).read_bytes() == data  # type: ignore[union-attr]
            assert a.blobs.stats()["blob_replica_copies"] == 2.0
            lost = nodes.pop(holders[0])
            await lost.__aexit__(None, None, None)  # a copy's member leaves: another takes its place
            await _until(lambda: len(a.blobs.replicas(blob_id)) == 2 and holders[0] not in a.blobs.replicas(blob_id))
            now = a.blobs.replicas(blob_id)
            assert set(now) == set(nodes)
            a.blobs.release(blob_id)
            await _until(lambda: not any(n.blobs.store.held(blob_id) for n in nodes.values()))
            assert a.blobs.replicas(blob_id) == []
