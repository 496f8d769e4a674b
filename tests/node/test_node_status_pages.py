"""Status answers are paged by encoded size (issue 10, defect 6): ``build_status_reply`` pages,
the wire stays compatible both ways, and a real node with thousands of members of maximal
metadata shows every one of them to ``fetch_status``."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgpack
import pytest

from discovery.members import MemberView
from discovery.testing import node_id_for
from node.config import Address, NodeConfig
from node.identity import load_mesh_key
from node.runtime import Node
from node.status import MAX_PAGE_BYTES, build_status_reply, fetch_status
from protocol.errors import RemoteProtocolError
from protocol.messages.control import MetricSample, StatusReply, StatusRequest
from protocol.messages.gossip import GpuInfo, MemberState, MemberStatus, NodeMeta, PushPull
from protocol.schema import decode_body, encode_body

N = 3_000
SELF = node_id_for("self:1")


def big_meta(i: int) -> NodeMeta:
    """Metadata a few bytes under the 4 096-byte cap."""
    gpu = GpuInfo(name="é" * 75 + "g" * 53, memory_bytes=2**36)
    return NodeMeta(hostname=f"h{i:06d}".ljust(128, "x"), cpus=64, memory_bytes=2**40,
                    torch_version="t" * 64, cuda_version="c" * 64, gpus=(gpu,) * 16, load=7)


def views(n: int) -> list[MemberView]:
    out = [MemberView(node_id=SELF, address="self:1", status=MemberStatus.ALIVE, incarnation=3,
                      meta=big_meta(0), last_heard=0.0)]
    for i in range(n):
        address = f"m{i}.example:7946"
        out.append(MemberView(node_id=node_id_for(address), address=address,
                              status=MemberStatus(i % 4), incarnation=i, meta=big_meta(i),
                              last_heard=0.5))
    return sorted(out, key=lambda v: v.node_id)


METRICS = tuple(MetricSample(name=f"m{i}", value=float(i)) for i in range(1_000))


def test_pages_cover_every_member_once_in_order_each_under_the_cap() -> None:
    members = views(N)
    after: bytes | None = None
    pages = []
    while True:
        page = build_status_reply(members, self_id=SELF, now=1.0, uptime_s=9.0, metrics=METRICS,
                                  after=after)
        body = encode_body(page)
        assert len(body) <= MAX_PAGE_BYTES
        assert decode_body(body) == page
        pages.append(page)
        if page.next_after is None:
            break
        assert page.next_after == page.members[-1].node
        after = page.next_after
    assert len(pages) >= N * 4_000 // MAX_PAGE_BYTES
    assert [r.node for p in pages for r in p.members] == [v.node_id for v in members]
    assert pages[0].metrics == METRICS and all(p.metrics == () for p in pages[1:])
    assert all(p.total == N + 1 and p.self_report.node == SELF for p in pages)


def test_a_member_joining_between_pages_shifts_nothing() -> None:
    members = views(600)
    first = build_status_reply(members, self_id=SELF, now=1.0, uptime_s=9.0)
    assert first.next_after is not None
    newcomer = MemberView(node_id=b"\x00" * 32, address="new:1", status=MemberStatus.ALIVE,
                          incarnation=0, meta=NodeMeta(), last_heard=1.0)
    rest = build_status_reply([newcomer, *members], self_id=SELF, now=2.0, uptime_s=10.0,
                              after=first.next_after)
    seen = [r.node for r in first.members] + [r.node for r in rest.members]
    assert len(set(seen)) == len(seen)
    while rest.next_after is not None:
        rest = build_status_reply(members, self_id=SELF, now=2.0, uptime_s=10.0, after=rest.next_after)
        seen += [r.node for r in rest.members]
    assert seen == [v.node_id for v in members]


def test_small_views_are_one_page_and_the_wire_is_unchanged_without_paging() -> None:
    reply = build_status_reply(views(3), self_id=SELF, now=1.0, uptime_s=2.0)
    assert (reply.next_after, reply.total, len(reply.members)) == (None, 4, 4)
    assert msgpack.unpackb(encode_body(StatusRequest())) == {"t": 32}  # as before paging
    wire = msgpack.unpackb(encode_body(reply))
    assert "next_after" not in wire and wire["total"] == 4
    legacy = {k: v for k, v in wire.items() if k != "total"}  # a node that predates paging
    old = decode_body(msgpack.packb(legacy))
    assert isinstance(old, StatusReply) and (old.next_after, old.total) == (None, 0)
    newer = decode_body(msgpack.packb({"t": 32, "after": b"\x01" * 32, "page_size": 9}))
    assert newer == StatusRequest(after=b"\x01" * 32)  # unknown keys are ignored


@pytest.mark.parametrize("cursor", [b"\x01", b"\x01" * 31, b"\x01" * 33])
def test_a_cursor_is_a_node_id_or_empty(cursor: bytes) -> None:
    with pytest.raises(RemoteProtocolError, match=r"StatusRequest\.after"):
        decode_body(msgpack.packb({"t": 32, "after": cursor}))


# ------------------------------------------------------------------ a real node


@pytest.mark.integration
@pytest.mark.timeout(120)
async def test_status_of_a_node_with_thousands_of_large_members(tmp_path: Path) -> None:
    config = NodeConfig(listen=Address("127.0.0.1", 0), data_dir=tmp_path / "a",
                        mesh_key_file=tmp_path / "mesh.key", preset="test", use_uvloop=False)
    async with Node(config) as node:
        membership = node._membership
        assert membership is not None
        states = [MemberState(node=node_id_for(f"f{i}"), incarnation=0, status=MemberStatus.ALIVE,
                              address=f"127.1.{i // 250}.{i % 250 + 1}:9", meta=big_meta(i))
                  for i in range(N)]
        membership.join(["127.0.0.9:9"])  # we ask that seed: its answer is admitted whole
        for i in range(0, N, 200):  # what a seed's answer teaches a joiner
            membership.swim.on_message("127.0.0.9:9", node_id_for("x"),
                                       PushPull(reply=True, members=tuple(states[i:i + 200])),
                                       now=asyncio.get_running_loop().time())
        membership.step()
        assert len(node.members()) == N + 1
        port = int(node.address.rsplit(":", 1)[1])
        status = await fetch_status(Address("127.0.0.1", port),
                                    mesh_secret=load_mesh_key(tmp_path / "mesh.key"), timeout=10.0)
        assert len(status.members) == N + 1
        assert {r.node for r in status.members} == {m.node_id for m in node.members()}
        assert status.self_report.node == node.node_id
        names = {m.name for m in status.metrics}
        assert 'members{state="alive"}' in names
