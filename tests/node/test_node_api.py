"""The ``Node`` API in one process: two nodes over loopback (integration)."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.config import Address, NodeConfig
from node.runtime import Node
from node.testing import until
from node.transport import Link
from protocol.connection import Channel
from protocol.errors import TransportError
from protocol.messages.gossip import Ack, MemberStatus
from protocol.schema import Message
from protocol.tags import MsgType

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def _config(tmp_path: Path, name: str, key: Path, seeds: tuple[Address, ...] = ()) -> NodeConfig:
    return NodeConfig(listen=Address("127.0.0.1", 0), data_dir=tmp_path / name, mesh_key_file=key,
                      seeds=seeds, preset="test", use_uvloop=False)


async def test_two_nodes_members_send_and_leave(tmp_path: Path) -> None:
    key = tmp_path / "mesh.key"
    got: list[tuple[bytes, Message]] = []

    async def on_ack(link: Link, message: Message) -> None:
        assert link.peer is not None
        got.append((link.peer.node_id, message))
        await link.send(Ack(seq=0))  # answer on the same connection

    async with Node(_config(tmp_path, "a", key)) as a:
        a.on_message(MsgType.ACK, on_ack)
        with pytest.raises(ValueError):
            a.on_message(MsgType.ACK, on_ack)
        seed = (Address("127.0.0.1", int(a.address.rsplit(":", 1)[1])),)
        async with Node(_config(tmp_path, "b", key, seed)) as b:
            replies: list[Message] = []

            async def on_reply(link: Link, message: Message) -> None:
                replies.append(message)

            b.on_message(MsgType.ACK, on_reply)
            events: list[str] = []
            a.on_member_event(lambda e: events.append(e.kind.name))

            def both_alive(node: Node) -> bool:
                return sum(m.status is MemberStatus.ALIVE for m in node.members()) == 2

            await until(lambda: both_alive(a) and both_alive(b))
            await b.send(a.node_id, Ack(seq=41))
            await until(lambda: bool(got) and bool(replies))
            assert got == [(b.node_id, Ack(seq=41))] and replies == [Ack(seq=0)]
            link = await b.link_to(a.node_id, channel=Channel.BULK)
            assert link.is_open and link.peer is not None and link.peer.node_id == a.node_id
            with pytest.raises(TransportError):
                await b.send(bytes(32), Ack(seq=1))
            b_id = b.node_id
        # b left: a records it as left, not dead
        await until(lambda: any(m.node_id == b_id and m.status is MemberStatus.LEFT for m in a.members()))
        assert "LEFT" in events
    assert (tmp_path / "a" / "incarnation").read_text().strip().isdigit()
