"""Members only heard of second hand (a fake-member flood) stay local: explicit now=, no sleeps.

A member holding the mesh key can gossip ALIVE for node ids that do not exist. A failed
probe of a member we never heard from directly must not raise our Lifeguard health score,
and our own suspicion and death of it are not gossiped (nobody could refute them, and they
crowd out the news honest members need).
"""

from __future__ import annotations

import random

from discovery.config import FloodPolicy, SwimConfig
from discovery.swim import Swim
from discovery.testing import MemoryMesh, node_id_for
from protocol.messages.gossip import (
    Alive,
    Dead,
    MemberState,
    MemberStatus,
    NodeMeta,
    PushPull,
    Suspect,
)

CFG = SwimConfig.test()
A, B, C = "a:1", "b:1", "c:1"
FAKE = "fake:1"


def _mesh() -> MemoryMesh:
    mesh = MemoryMesh(config=CFG, seed=3)
    mesh.add(A)
    mesh.add(B, seeds=[A])
    mesh.add(C, seeds=[A])
    mesh.run_until(3.0)
    assert mesh.converged()
    return mesh


def test_a_member_never_heard_from_dies_quietly_and_costs_no_health() -> None:
    mesh = _mesh()
    fake = Alive(incarnation=7, node=node_id_for(FAKE), address=FAKE, meta=NodeMeta())
    mesh.inject(B, A, fake)  # B (a member) vouches for a node that does not exist
    since = mesh.now
    mesh.run_for(10.0)
    a = mesh.nodes[A]
    kinds = [k for k, who in mesh.kinds(A, since=since) if who == FAKE]
    assert kinds[:3] == ["JOINED", "SUSPECTED", "DEAD"]  # probed out here...
    accusations = [
        d for d in mesh.sent(A, since=since)
        if isinstance(d.msg, (Suspect, Dead)) and d.msg.node == node_id_for(FAKE)
        and d.msg.sender == node_id_for(A) and d.dst != FAKE  # (the buddy Suspect to it is fine)
    ]  # fmt: skip
    assert accusations == []  # ...without telling anyone
    assert a.stats()["local_health"] == 0
    assert mesh.converged([A, B, C])


def test_a_member_that_spoke_to_us_is_still_suspected_out_loud() -> None:
    mesh = _mesh()
    since = mesh.now
    mesh.crash(C)
    mesh.run_for(10.0)
    told = [
        d for d in mesh.sent(A, since=since) + mesh.sent(B, since=since)
        if isinstance(d.msg, Suspect) and d.msg.node == node_id_for(C)
    ]  # fmt: skip
    assert told
    assert ("DEAD", C) in mesh.kinds(A, since=since) and ("DEAD", C) in mesh.kinds(B, since=since)


def test_reaping_at_a_deadline_that_rounds_moves_the_deadline() -> None:
    """``state_change + dead_reap_after <= now`` but ``state_change > now - dead_reap_after``
    in floating point: the reap must still happen (it once spun at one instant for ever)."""
    cfg = SwimConfig.local()
    swim = Swim(node_id=node_id_for(A), address=A, meta=NodeMeta(), config=cfg,
                rng=random.Random(1), now=0.0)  # fmt: skip
    r, t = cfg.dead_reap_after, 0.1
    while not t > (t + r) - r:  # a death time that rounds the wrong way
        t += 0.1
    swim.on_message(B, node_id_for(B), Alive(incarnation=0, node=node_id_for(B), address=B,
                                             meta=NodeMeta()), now=0.0)  # fmt: skip
    swim.on_message(B, node_id_for(B), Dead(incarnation=0, node=node_id_for(B),
                                            sender=node_id_for(B)), now=t)  # fmt: skip
    reap_at = t + cfg.dead_reap_after
    swim.handle_timer(now=reap_at)
    assert swim.member(node_id_for(B)) is None
    deadline = swim.next_deadline()
    assert deadline is None or deadline > reap_at


def _swim_knowing_b(now: float = 0.0, flood: FloodPolicy | None = None) -> Swim:
    swim = Swim(node_id=node_id_for(A), address=A, meta=NodeMeta(), config=CFG,
                rng=random.Random(5), now=now, flood=flood)  # fmt: skip
    b = Alive(incarnation=0, node=node_id_for(B), address=B, meta=NodeMeta())
    swim.on_message(B, node_id_for(B), b, now=now)  # B speaks for itself: confirmed
    swim.messages_to_send()
    return swim


def test_a_suspicion_heard_by_gossip_is_handed_to_the_suspect_itself() -> None:
    swim = _swim_knowing_b()
    claim = Suspect(incarnation=0, node=node_id_for(B), sender=node_id_for(C))
    swim.on_message(C, node_id_for(C), claim, now=1.0)
    assert (B, claim) in swim.messages_to_send()


def test_a_refutation_goes_straight_to_the_accuser_and_the_messenger() -> None:
    swim = _swim_knowing_b()
    c = Alive(incarnation=0, node=node_id_for(C), address=C, meta=NodeMeta())
    swim.on_message(C, node_id_for(C), c, now=0.5)
    swim.messages_to_send()
    claim = Suspect(incarnation=0, node=node_id_for(A), sender=node_id_for(C))
    swim.on_message(B, node_id_for(B), claim, now=1.0)  # B passes on C's suspicion of us
    assert swim.incarnation == 1
    refutation = Alive(incarnation=1, node=node_id_for(A), address=A, meta=NodeMeta())
    sent = swim.messages_to_send()
    assert (B, refutation) in sent and (C, refutation) in sent


def test_urgent_gossip_reaches_a_member_heard_from_among_a_flood_of_fakes() -> None:
    swim = _swim_knowing_b(flood=FloodPolicy(max_new_per_sender=0))  # 300 fakes get in
    rng = random.Random(9)
    fakes = [Alive(incarnation=1, node=rng.randbytes(32), address=f"x{i}:1", meta=NodeMeta())
             for i in range(300)]  # fmt: skip
    for f in fakes:
        swim.on_message(B, node_id_for(B), f, now=1.0)  # B is the hostile member here
    claim = Suspect(incarnation=1, node=fakes[0].node, sender=node_id_for(B))
    swim.on_message(B, node_id_for(B), claim, now=1.0)  # urgent news
    swim.messages_to_send()
    told = []
    for step in range(1, 21):
        swim.handle_timer(now=1.0 + step * CFG.gossip_interval)
        told += [dst for dst, msg in swim.messages_to_send() if msg == claim]
    assert told and B in told  # without the extra target: ~3 of 301 members per round


def test_a_restarted_member_announcing_itself_is_urgent_news_a_fresh_one_is_not() -> None:
    def join_from(address: str, inc: int) -> Swim:
        swim = _swim_knowing_b()
        while swim._table.broadcasts.get(8, n_members=2):  # drain what is queued already
            pass
        me = MemberState(node=node_id_for(address), address=address, incarnation=inc,
                         status=MemberStatus.ALIVE, meta=NodeMeta())  # fmt: skip
        swim.on_message(address, node_id_for(address), PushPull(join=True, members=(me,)), now=1.0)
        return swim

    assert join_from(C, 3)._table.broadcasts.has_urgent()  # reaches members that forgot it
    assert not join_from(C, 0)._table.broadcasts.has_urgent()  # an honest join storm is not
