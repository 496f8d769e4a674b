"""``Swim.stats()``: pure counters and gauges, checked on virtual time against what was sent."""

from __future__ import annotations

import random

from discovery.config import SwimConfig
from discovery.swim import Swim
from discovery.testing import MemoryMesh, node_id_for
from protocol.messages.gossip import Alive, MemberStatus, NodeMeta, Ping, PingReq, PushPull, Suspect

CFG = SwimConfig.test()
A, B, C, D = "a:1", "b:1", "c:1", "d:1"


def _swim(config: SwimConfig = CFG) -> Swim:
    return Swim(node_id=node_id_for(A), address=A, meta=NodeMeta(hostname="a"), config=config,
                rng=random.Random(1), now=0.0)


def _count(stats: dict[str, float | dict[str, float]], name: str) -> float:
    value = stats[name]
    assert isinstance(value, int | float)
    return value


def _mesh(*addresses: str, settle: float = 3.0) -> MemoryMesh:
    mesh = MemoryMesh(config=CFG, seed=1)
    mesh.add(addresses[0])
    for a in addresses[1:]:
        mesh.add(a, seeds=[addresses[0]])
    mesh.run_until(settle)
    assert mesh.converged()
    return mesh


def test_a_new_member_reports_itself_and_zero_counters() -> None:
    assert _swim().stats() == {
        "members": {"alive": 1, "suspect": 0, "dead": 0, "left": 0},
        "incarnation": 0,
        "local_health": 0,
        "gossip_pending_broadcasts": 1,  # our own Alive
        "gossip_dropped_messages_total": 0,
        "gossip_broadcasts_dropped_total": 0,
        "gossip_events_dropped_total": 0,
        "probes_total": 0,
        "probe_failures_total": 0,
        "indirect_probes_total": 0,
        "suspicions_total": 0,
        "refutations_total": 0,
        "implausible_claims_total": 0,
        "push_pull_rounds_total": 0,
        "unknown_members_refused_total": 0,
    }


def test_stats_changes_nothing() -> None:
    mesh = _mesh(A, B, C)
    a = mesh.nodes[A]
    deadline, first = a.next_deadline(), a.stats()
    assert a.stats() == first
    assert a.next_deadline() == deadline
    assert a.messages_to_send() == [] and a.next_event() is None


def test_every_drop_counter_counts_what_its_bound_dropped() -> None:
    cfg = CFG.replace(max_broadcasts=4, max_members=6, max_outbox=3, max_events=2)
    swim = _swim(cfg)
    for i in range(5):  # 5 joins: 5 JOINED events, 1 + 5 queued Alives
        addr = f"x{i}:1"
        swim.on_message(addr, node_id_for(addr),
                        Alive(incarnation=0, node=node_id_for(addr), address=addr,
                              meta=NodeMeta(hostname=f"x{i}")), now=0.0)
    for i in range(4):  # 4 Acks to send (each with up to max_piggyback broadcasts)
        swim.on_message(B, node_id_for(B), Ping(seq=i, target=node_id_for(A)), now=0.0)
    sent = len(swim.messages_to_send())
    stats = swim.stats()
    assert sent == 3
    assert stats["members"] == {"alive": 6, "suspect": 0, "dead": 0, "left": 0}
    assert stats["gossip_broadcasts_dropped_total"] == 6 - 4
    assert stats["gossip_events_dropped_total"] == 5 - 2
    assert stats["gossip_dropped_messages_total"] == swim.dropped_messages > 0
    assert stats["gossip_pending_broadcasts"] == swim.pending_broadcasts


def test_probes_and_push_pull_rounds_match_what_was_sent() -> None:
    mesh = _mesh(A, B, settle=10.0)
    stats = mesh.nodes[A].stats()
    probes = [d for d in mesh.sent(A) if isinstance(d.msg, Ping)]
    rounds = [d for d in mesh.sent(A)
              if isinstance(d.msg, PushPull) and not d.msg.reply and not d.msg.join]
    assert stats["probes_total"] == len(probes) > 10
    assert stats["push_pull_rounds_total"] == len(rounds) >= 3
    assert stats["probe_failures_total"] == stats["indirect_probes_total"] == 0
    assert stats["suspicions_total"] == stats["refutations_total"] == 0


def test_a_crash_is_counted_as_failed_probes_one_suspicion_and_one_dead() -> None:
    mesh = _mesh(A, B, C, D)
    mesh.hints = False
    mesh.crash(B)
    for _ in range(40):  # until every survivor has declared B dead (and before it is reaped)
        mesh.run_for(CFG.probe_interval)
        if all(mesh.view(a).get(B) is MemberStatus.DEAD for a in (A, C, D)):
            break
    for address in (A, C, D):
        stats = mesh.nodes[address].stats()
        assert stats["members"] == {"alive": 3, "suspect": 0, "dead": 1, "left": 0}
        assert stats["suspicions_total"] == 1  # B went ALIVE -> SUSPECT once here
        assert stats["refutations_total"] == 0
    a = mesh.nodes[A].stats()
    indirect = [d for d in mesh.sent(A) if isinstance(d.msg, PingReq)]
    assert _count(a, "probe_failures_total") >= 1 and _count(a, "indirect_probes_total") >= 1
    assert a["indirect_probes_total"] == len({d.msg.seq for d in indirect})  # type: ignore[attr-defined]


def test_a_refutation_is_counted_with_the_incarnation_and_health() -> None:
    mesh = _mesh(A, B, C)
    mesh.inject(C, B, Suspect(incarnation=0, node=node_id_for(B), sender=node_id_for(C)))
    stats = mesh.nodes[B].stats()
    assert (stats["refutations_total"], stats["incarnation"], stats["local_health"]) == (1, 1, 1)


def test_after_leaving_we_count_ourselves_left() -> None:
    mesh = _mesh(A, B)
    mesh.nodes[A].leave(now=mesh.now)
    assert mesh.nodes[A].stats()["members"] == {"alive": 1, "suspect": 0, "dead": 0, "left": 1}
    mesh.run_for(1.0)
    assert mesh.nodes[B].stats()["members"] == {"alive": 1, "suspect": 0, "dead": 0, "left": 1}
