"""A member that lies about our incarnation at the wire maximum (issue 10, defect 2) on real
loopback connections: the claim is refused, status still answers, the node leaves within
seconds, and it starts again from what it persisted."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from node.config import Address, NodeConfig
from node.identity import load_mesh_key
from node.membership import MAX_START_INCARNATION
from node.runtime import Node
from node.status import fetch_status
from node.testing import until
from protocol.connection import Channel
from protocol.messages.gossip import Alive, Dead, MemberStatus, NodeMeta, Suspect

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

WIRE_MAX = 2**64 - 1


def _config(tmp_path: Path, name: str, **changes: object) -> NodeConfig:
    return NodeConfig(listen=Address("127.0.0.1", 0), data_dir=tmp_path / name,
                      mesh_key_file=tmp_path / "mesh.key", preset="test", use_uvloop=False,
                      **changes)  # type: ignore[arg-type]


def _stat(node: Node, name: str) -> float:
    value = node.stats()[name]
    assert isinstance(value, int | float)
    return float(value)


def _port(node: Node) -> int:
    return int(node.address.rsplit(":", 1)[1])


async def test_a_lie_at_the_wire_maximum_is_refused_and_the_node_still_leaves(tmp_path: Path) -> None:
    victim = Node(_config(tmp_path, "victim"))
    await victim.__aenter__()
    closed = False
    try:
        seeds = (Address("127.0.0.1", _port(victim)),)
        async with Node(_config(tmp_path, "liar", seeds=seeds)) as liar:
            await until(lambda: sum(m.status is MemberStatus.ALIVE for m in victim.members()) == 2)
            me = victim.node_id
            for lie in (Suspect(incarnation=WIRE_MAX, node=me, sender=liar.node_id),
                        Dead(incarnation=WIRE_MAX, node=me, sender=liar.node_id),
                        Alive(incarnation=WIRE_MAX, node=me, address=victim.address,
                              meta=NodeMeta(hostname="forged")),
                        Suspect(incarnation=1 << 62, node=me, sender=liar.node_id)):
                await liar.send(me, lie, channel=Channel.CONTROL)
            await until(lambda: _stat(victim, "implausible_claims_total") == 4)
            assert _stat(victim, "incarnation") <= MAX_START_INCARNATION
            status = await fetch_status(Address("127.0.0.1", _port(victim)),
                                        mesh_secret=load_mesh_key(tmp_path / "mesh.key"))
            assert status.self_report.incarnation == _stat(victim, "incarnation")
            async with asyncio.timeout(5.0):  # SIGTERM's path: leave, flush, close
                closed = True
                await victim.__aexit__(None, None, None)
            await until(lambda: {m.node_id: m.status for m in liar.members()}.get(me)
                        is MemberStatus.LEFT)
    finally:
        if not closed:
            await victim.__aexit__(None, None, None)
    async with asyncio.timeout(10.0), Node(_config(tmp_path, "victim")) as again:  # restarts
        assert _stat(again, "incarnation") <= MAX_START_INCARNATION
