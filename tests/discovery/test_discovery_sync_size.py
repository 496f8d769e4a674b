"""Push/pull is cut by encoded size, not by member count (issue 10, defect 6): a mesh of
thousands of members with near-maximal metadata syncs completely, every part under the cap."""

from __future__ import annotations

import functools

import pytest

from discovery.config import FloodPolicy, SwimConfig
from discovery.testing import MemoryMesh, node_id_for
from protocol.limits import MAX_MEMBERS_PER_SYNC, MAX_META_BYTES
from protocol.messages.gossip import (
    MAX_SYNC_BYTES,
    GpuInfo,
    MemberState,
    MemberStatus,
    NodeMeta,
    PushPull,
    encoded_meta_size,
    split_by_size,
)
from protocol.schema import encode_body

CFG = SwimConfig.test()
UNBOUNDED = FloodPolicy(max_new_per_sender=0)  # the tables are taught by injected syncs
A, B = "a:1", "b:1"
N = 3_000


@functools.cache
def big_meta(i: int) -> NodeMeta:
    """Metadata a few bytes under ``MAX_META_BYTES`` (16 GPUs, long UTF-8 names)."""
    gpu = GpuInfo(name="é" * 75 + "g" * 53, memory_bytes=2**36)
    return NodeMeta(hostname=f"h{i:06d}".ljust(128, "x"), cpus=64, memory_bytes=2**40,
                    torch_version="t" * 64, cuda_version="c" * 64, gpus=(gpu,) * 16, load=7)


def big_state(i: int) -> MemberState:
    address = f"m{i}.example:7946"
    return MemberState(node=node_id_for(address), address=address, incarnation=i,
                       status=MemberStatus.ALIVE, meta=big_meta(i))


@pytest.mark.parametrize(("sizes", "budget", "max_items", "want"), [
    ([], 10, 4, []),
    ([3, 3, 3], 10, 4, [(0, 3)]),
    ([3, 3, 3, 3], 10, 4, [(0, 3), (3, 4)]),
    ([5, 5, 5, 5, 5], 10, 4, [(0, 2), (2, 4), (4, 5)]),
    ([1] * 9, 100, 4, [(0, 4), (4, 8), (8, 9)]),
    ([20, 1, 1], 10, 4, [(0, 1), (1, 3)]),  # an item over the budget goes alone
])
def test_split_by_size(sizes: list[int], budget: int, max_items: int,
                       want: list[tuple[int, int]]) -> None:
    runs = split_by_size(sizes, budget=budget, max_items=max_items)
    assert [(r.start, r.stop) for r in runs] == want


def test_thousands_of_members_with_maximal_metadata_sync_completely_in_capped_parts() -> None:
    assert MAX_META_BYTES - 16 < encoded_meta_size(big_meta(0)) <= MAX_META_BYTES
    mesh = MemoryMesh(config=CFG, seed=1, flood=UNBOUNDED)
    a = mesh.add(A)
    states = [big_state(i) for i in range(N)]
    for i in range(0, N, 100):  # teach A the table (parts that ask for no answer)
        mesh.inject("x:1", A, PushPull(reply=True, members=tuple(states[i:i + 100])))
    assert len(a.members()) == N + 1
    b = mesh.add(B, seeds=[A])
    mesh.run_until(0.05)
    assert not b.joining
    assert {m.node_id for m in b.members()} == {m.node_id for m in a.members()}
    assert all(m.status is MemberStatus.ALIVE for m in b.members())
    answer = [d.msg for d in mesh.log if d.src == A and isinstance(d.msg, PushPull)]
    assert len(answer) >= N * 4_000 // MAX_SYNC_BYTES
    assert all(m.join and m.reply for m in answer)  # every part of a join's answer
    assert sum(len(m.members) for m in answer) == N + 1  # A answers before it merges B
    for d in mesh.log:
        if isinstance(d.msg, PushPull):
            assert len(encode_body(d.msg)) <= MAX_SYNC_BYTES
            assert len(d.msg.members) <= MAX_MEMBERS_PER_SYNC


def _groups(mesh: MemoryMesh, src: str, dst: str) -> list[list[PushPull]]:
    """The PushPull parts ``src`` sent ``dst``, grouped by send time (one sync or one answer)."""
    groups: dict[float, list[PushPull]] = {}
    for d in mesh.log:
        if d.src == src and d.dst == dst and isinstance(d.msg, PushPull):
            groups.setdefault(d.at, []).append(d.msg)
    return list(groups.values())


def test_a_large_sync_is_answered_exactly_once_with_every_part_under_the_cap() -> None:
    mesh = MemoryMesh(config=CFG, seed=1, flood=UNBOUNDED)
    a = mesh.add(A)
    mesh.inject("x:1", A, PushPull(reply=True, members=tuple(big_state(i) for i in range(600))))
    b = mesh.add(B, seeds=[A])
    mesh.run_until(3 * CFG.push_pull_interval)
    assert not b.joining
    for src, dst in ((A, B), (B, A)):
        asks = [g for g in _groups(mesh, src, dst) if not g[0].reply]
        answers = [g for g in _groups(mesh, dst, src) if g[0].reply]
        assert all(m.reply for g in asks for m in g[1:])  # continuation parts ask for nothing
        assert all(m.reply for g in answers for m in g)
        assert len(answers) == len(asks)
    follow_up = [g for g in _groups(mesh, B, A) if not g[0].reply and len(g[0].members) == 1]
    assert follow_up  # the pull after the join carries only B; A answers with everything
    big = [g for g in _groups(mesh, A, B) if len(g) > 1]
    assert big and all(sum(len(m.members) for m in g) > 600 for g in big)
    assert len(a.members()) >= 2 and len(b.members()) >= 2
    for d in mesh.log:
        if isinstance(d.msg, PushPull):
            assert len(encode_body(d.msg)) <= MAX_SYNC_BYTES
