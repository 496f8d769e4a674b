"""Groups scoped by tags on real nodes (loopback, port 0, in this process): tags gossip to
every member and show in ``status``; ``wait_for_members`` counts only the tagged alive
members; ``min_contributors`` refuses a group of one and a result averaged over too few."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
import pytest

from node.allreduce import AllReduceError
from node.config import Address, NodeConfig, parse_address
from node.embedded import MeshNode, TooFewContributors, wait_for_members
from node.identity import load_mesh_key
from node.runtime import Node
from node.status import fetch_status, reply_to_json
from protocol.errors import ConfigError, TimeoutError

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def _config(tmp_path: Path, name: str, *, seeds: tuple[Address, ...] = (), tags: tuple[str, ...] = ()) -> NodeConfig:
    return NodeConfig(listen=Address("127.0.0.1", 0), data_dir=tmp_path / name, mesh_key_file=tmp_path / "mesh.key",
                      seeds=seeds, preset="test", use_uvloop=False, tags=tags, log_level="WARNING")


async def test_wait_for_members_counts_only_the_tagged(tmp_path: Path) -> None:
    async with Node(_config(tmp_path, "daemon")) as daemon:
        seed = (parse_address(daemon.address),)
        async with Node(_config(tmp_path, "w1", seeds=seed, tags=("job=a", "rack=1"))) as w1, \
                Node(_config(tmp_path, "w2", seeds=seed, tags=("job=a",))) as w2, \
                Node(_config(tmp_path, "other", seeds=seed, tags=("job=b",))) as other:
            job = sorted([w1.node_id, w2.node_id])
            for node in (w1, w2, daemon, other):  # the caller counts only if it has the tag
                assert await wait_for_members(node, 2, tag="job=a", timeout=20) == job
            assert await wait_for_members(other, 1, tag="job=b", timeout=5) == [other.node_id]
            assert len(await wait_for_members(daemon, 4, timeout=20)) == 4  # no tag: every alive member
            with pytest.raises(TimeoutError, match="saw 2 of 3 alive members tagged job=a"):
                await wait_for_members(w1, 3, tag="job=a", timeout=0.3)
            with pytest.raises(ConfigError):
                await wait_for_members(w1, 2, tag="job")

            # the tags reach status (its JSON) through gossip
            reply = await fetch_status(parse_address(daemon.address), mesh_secret=load_mesh_key(tmp_path / "mesh.key"))
            report = reply_to_json(reply)
            tags = {m["id"]: m["tags"] for m in report["members"]}
            assert tags == {daemon.node_id.hex(): [], w1.node_id.hex(): ["job=a", "rack=1"],
                            w2.node_id.hex(): ["job=a"], other.node_id.hex(): ["job=b"]}

            # a round over the job's group; min_contributors=3 cannot be met by two
            x = np.arange(4, dtype=np.float32)
            outs = await asyncio.gather(w1.all_reduce(x, group=job), w2.all_reduce(3 * x, group=job))
            for out in outs:
                np.testing.assert_array_equal(out.tensor, 2 * x)
            with pytest.raises(TooFewContributors, match="2 members, min_contributors is 3"):
                await w1.all_reduce(x, group=job, min_contributors=3)
        # the others left: the job has nobody alive now
        with pytest.raises(TimeoutError):
            await wait_for_members(daemon, 1, tag="job=a", timeout=0.3)


async def test_a_group_of_one_never_succeeds_unless_asked_for(tmp_path: Path) -> None:
    async with Node(_config(tmp_path, "alone", tags=("job=a",))) as node:
        group = await wait_for_members(node, 1, tag="job=a", timeout=5)
        assert group == [node.node_id]
        x = np.ones(8, np.float32)
        with pytest.raises(TooFewContributors, match="this node alone") as info:
            await node.all_reduce(x, group=group)
        assert isinstance(info.value, AllReduceError) and info.value.outcome is None
        assert node.allreduce.stats()["allreduce_rounds_total"]["finished"] == 0  # type: ignore[index]
        out = await node.all_reduce(x, group=group, min_contributors=1)
        assert out.contributors == (node.node_id,)
        np.testing.assert_array_equal(out.tensor, x)

        # a peer that is gone: the round gives this node's tensor alone, and says so
        ghost = bytes(32)
        with pytest.raises(TooFewContributors, match=r"1 contributor\(s\), min_contributors is 2") as info:
            await node.all_reduce(x, group=[node.node_id, ghost], timeout=10)
        outcome = info.value.outcome
        assert outcome is not None and outcome.contributors == (node.node_id,) and ghost in outcome.dropped
        with pytest.raises(ConfigError):
            await node.all_reduce(x, group=group, min_contributors=0)
        with pytest.raises(ConfigError, match="not in the all-reduce group"):
            await node.all_reduce(x, group=[ghost])


def test_mesh_node_wait_for_members_with_a_tag(tmp_path: Path) -> None:
    with MeshNode(_config(tmp_path, "a", tags=("job=x",))) as a, \
            MeshNode(_config(tmp_path, "b", seeds=(parse_address(a.address),), tags=("job=x",))) as b, \
            MeshNode(_config(tmp_path, "c", seeds=(parse_address(a.address),))) as c:
        job = sorted([a.node_id, b.node_id])
        assert a.wait_for_members(2, tag="job=x", timeout=20) == job
        assert c.wait_for_members(2, tag="job=x", timeout=20) == job
        x = np.arange(3.0)
        outs: list[object] = []
        t = threading.Thread(target=lambda: outs.append(b.all_reduce(x + 2, group=job, key="k")))
        t.start()
        out = a.all_reduce(x, group=job, key="k")
        t.join(30)
        np.testing.assert_array_equal(out.tensor, x + 1)
        with pytest.raises(TooFewContributors):
            c.all_reduce(x, group=[c.node_id])
        assert c.all_reduce(x, group=[c.node_id], min_contributors=1).contributors == (c.node_id,)
