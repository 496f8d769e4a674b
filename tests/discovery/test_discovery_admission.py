"""A fake-member flood is bounded where it enters, and cannot starve anti-entropy (issue 10):
explicit now=, injected random.Random, no sleeps.

A member holding the mesh key can gossip ALIVE for random node ids that do not exist. One
sender may introduce at most ``max_new_per_sender`` members unknown to us per
``admission_window`` (local policy); the push/pull period scales with the members we heard
from directly, and half the syncs go to one of them, so a member someone forgot is learned
again within a few sync periods however many fakes the table holds.
"""

from __future__ import annotations

import itertools
import random

import pytest

from discovery.config import FloodPolicy, SwimConfig
from discovery.swim import Swim, push_pull_period
from discovery.testing import MemoryMesh, node_id_for
from protocol.messages.gossip import Alive, MemberState, MemberStatus, NodeMeta, PushPull

CFG = SwimConfig.test()
A, B, C, H = "a:1", "b:1", "c:1", "h:1"


def _fake(rng: random.Random, i: int) -> Alive:
    return Alive(incarnation=1, node=rng.randbytes(32), address=f"x{i}:1", meta=NodeMeta())


def _swim(flood: FloodPolicy | None = None) -> Swim:
    return Swim(node_id=node_id_for(A), address=A, meta=NodeMeta(), config=CFG,
                rng=random.Random(5), now=0.0, flood=flood)  # fmt: skip


def _state(address: str, inc: int = 0) -> MemberState:
    return MemberState(node=node_id_for(address), address=address, incarnation=inc,
                       status=MemberStatus.ALIVE, meta=NodeMeta())  # fmt: skip


@pytest.mark.parametrize(("n_confirmed", "want"), [
    (1, 2.0), (32, 2.0), (33, 2.0 * 33 / 32), (64, 4.0), (320, 20.0),
])
def test_push_pull_period(n_confirmed: int, want: float) -> None:
    assert push_pull_period(CFG, n_confirmed) == pytest.approx(want)


def test_one_sender_introduces_at_most_max_new_per_sender_unknown_members_per_window() -> None:
    swim = _swim()
    rng = random.Random(9)
    fakes = [_fake(rng, i) for i in range(100)]
    for f in fakes:
        swim.on_message(H, node_id_for(H), f, now=1.0)  # H: the hostile member
    known = {m.node_id for m in swim.members()}
    assert len(known) == 1 + 64  # us and the first 64
    assert {f.node for f in fakes[:64]} <= known
    assert swim.unknown_members_refused == 36
    # Another sender has its own budget; H itself may always speak for itself.
    swim.on_message(B, node_id_for(B), _fake(rng, 100), now=2.0)
    swim.on_message(H, node_id_for(H), Alive(incarnation=0, node=node_id_for(H), address=H,
                                             meta=NodeMeta()), now=2.0)  # fmt: skip
    assert len(swim.members()) == 1 + 64 + 2
    # News about members we know is not bounded; a new window restarts every count.
    swim.on_message(H, node_id_for(H), Alive(incarnation=2, node=fakes[0].node,
                                             address="x0:1", meta=NodeMeta()), now=3.0)  # fmt: skip
    assert swim.member(fakes[0].node).incarnation == 2  # type: ignore[union-attr]
    swim.on_message(H, node_id_for(H), fakes[64], now=1.0 + FloodPolicy().admission_window)
    assert swim.member(fakes[64].node) is not None
    assert swim.unknown_members_refused == 36


def test_an_unsolicited_sync_is_bounded_the_answer_to_ours_is_not() -> None:
    swim = _swim()
    entries = tuple(_state(f"m{i}:1") for i in range(100))
    swim.on_message(H, node_id_for(H), PushPull(members=(_state(H), *entries)), now=1.0)
    assert len(swim.members()) == 1 + 1 + 64  # H announcing itself is not counted
    assert swim.unknown_members_refused == 36
    # Our join asks the seed C for its table: the whole answer gets in.
    swim.join([C], now=2.0)
    swim.messages_to_send()
    more = tuple(_state(f"n{i}:1") for i in range(100))
    swim.on_message(C, node_id_for(C), PushPull(join=True, reply=True, members=more), now=2.5)
    assert len(swim.members()) == 1 + 1 + 64 + 100
    # An answer nobody asked for (reply set) is bounded like any unsolicited sync.
    late = tuple(_state(f"o{i}:1") for i in range(100))
    swim.on_message(B, node_id_for(B), PushPull(reply=True, members=late), now=3.0)
    assert len(swim.members()) == 1 + 1 + 64 + 100 + 64
    assert swim.unknown_members_refused == 36 + 36


def test_a_bound_of_zero_admits_everyone() -> None:
    swim = _swim(FloodPolicy(max_new_per_sender=0))
    rng = random.Random(9)
    for i in range(300):
        swim.on_message(H, node_id_for(H), _fake(rng, i), now=1.0)
    assert len(swim.members()) == 301 and swim.unknown_members_refused == 0


def _flooded_mesh() -> tuple[MemoryMesh, list[bytes]]:
    """A, B, C converged; then A learns 600 members that do not exist (from many senders,
    so the admission bound lets them all in): 3 confirmed among 603."""
    mesh = MemoryMesh(config=CFG, seed=3)
    mesh.add(A)
    mesh.add(B, seeds=[A])
    mesh.add(C, seeds=[A])
    mesh.run_until(3.0)
    assert mesh.converged()
    rng = random.Random(11)
    fakes = []
    for i in range(600):
        f = _fake(rng, i)
        mesh.inject(f"s{i // 50}:1", A, f)
        fakes.append(f.node)
    assert A in mesh.nodes and len(mesh.nodes[A].members()) == 603
    return mesh, fakes


def test_members_only_heard_of_do_not_stretch_the_push_pull_period() -> None:
    mesh, _ = _flooded_mesh()
    since = mesh.now
    mesh.run_for(10 * CFG.push_pull_interval)
    starts = sorted({d.at for d in mesh.sent(A, since=since)
                     if isinstance(d.msg, PushPull) and not d.msg.reply})  # fmt: skip
    # 603 members would stretch the period to 2.0 * 603 / 32 = 37.7 s: one sync at most.
    assert len(starts) >= 8
    assert all(b - a == pytest.approx(CFG.push_pull_interval) for a, b in itertools.pairwise(starts))


def test_half_the_syncs_go_to_a_member_heard_from_directly_whatever_the_flood() -> None:
    mesh, _ = _flooded_mesh()
    since = mesh.now
    mesh.run_for(10 * CFG.push_pull_interval)
    asks = [d for d in mesh.sent(A, since=since) if isinstance(d.msg, PushPull) and not d.msg.reply]
    rounds: dict[float, str] = {}
    for d in asks:
        rounds.setdefault(d.at, d.dst)  # the first part of each sync (no dead partner here)
    real = [dst for dst in rounds.values() if dst in (B, C)]
    assert len(rounds) >= 8 and len(real) >= len(rounds) // 2  # ~1 in 200 by chance alone


def test_a_forgotten_member_is_learned_again_through_a_flood() -> None:
    """C reaped B (its death was a lie B could not refute in time); A still knows B. With
    600 fakes at A, C's syncs (and A's) still reach a real member and C learns B again."""
    mesh, _ = _flooded_mesh()
    c = mesh.nodes[C]
    c._table.dead(node_id_for(B), 0, node_id_for(A), now=mesh.now)  # as if C missed B's refutation
    c._table.handle_timer(mesh.now + CFG.dead_reap_after)  # forgotten
    assert c.member(node_id_for(B)) is None
    mesh.run_for(6 * CFG.push_pull_interval)
    b = c.member(node_id_for(B))
    assert b is not None and b.status is MemberStatus.ALIVE
