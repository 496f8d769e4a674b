"""SWIM state-machine tests on virtual time: several cores through an in-memory network.

No sleeps and no wall clock: ``MemoryMesh.run_until(t)`` advances explicit virtual time.
Every message crosses the real codec. Where practical the exact messages are asserted.
"""

from __future__ import annotations

import random

import pytest

from discovery.config import SwimConfig
from discovery.events import EventKind
from discovery.probes import relay_timeout
from discovery.swim import Swim
from discovery.testing import Delivery, MemoryMesh, node_id_for
from protocol.messages.gossip import (
    Ack,
    Alive,
    Dead,
    MemberState,
    MemberStatus,
    Nack,
    NodeMeta,
    Ping,
    PingReq,
    PushPull,
    Suspect,
)
from protocol.schema import Message

CFG = SwimConfig.test()
A, B, C, D = "a:1", "b:1", "c:1", "d:1"
ALIVE, SUSPECT, DEAD, LEFT = (
    MemberStatus.ALIVE,
    MemberStatus.SUSPECT,
    MemberStatus.DEAD,
    MemberStatus.LEFT,
)


def meta(address: str) -> NodeMeta:
    return NodeMeta(hostname=address.split(":")[0])


def state(address: str, inc: int = 0, status: MemberStatus = ALIVE) -> MemberState:
    return MemberState(
        node=node_id_for(address),
        address=address,
        incarnation=inc,
        status=status,
        meta=meta(address),
    )


def mesh_of(
    *addresses: str, seed: int = 1, config: SwimConfig = CFG, settle: float = 3.0
) -> MemoryMesh:
    """Start ``addresses`` (the first is the seed of all others) and let them converge."""
    mesh = MemoryMesh(config=config, seed=seed)
    mesh.add(addresses[0])
    for a in addresses[1:]:
        mesh.add(a, seeds=[addresses[0]])
    mesh.run_until(settle)
    assert mesh.converged()
    return mesh


def of_type(log: list[Delivery], cls: type[Message]) -> list[Delivery]:
    return [d for d in log if isinstance(d.msg, cls)]


def first_ping(mesh: MemoryMesh, src: str, dst: str, *, since: float) -> Delivery:
    """Run until ``src`` probes ``dst``; return that Ping (not one relayed for a PingReq)."""
    for _ in range(200):
        relayed_at = {
            d.at + mesh.latency for d in of_type(mesh.sent(since=since), PingReq) if d.dst == src
        }
        pings = [
            d
            for d in of_type(mesh.sent(src, since=since), Ping)
            if d.dst == dst and d.at not in relayed_at
        ]
        if pings:
            return pings[0]
        mesh.run_for(CFG.probe_interval)
    raise AssertionError(f"{src} never probed {dst}")


# ------------------------------------------------------------------ join


def test_join_pushes_our_state_to_every_seed_and_the_seed_answers_with_its_own() -> None:
    mesh = MemoryMesh(config=CFG, seed=1)
    a = mesh.add(A)
    b = mesh.add(B, seeds=[A, C, B])  # our own address is skipped; C does not exist
    join = PushPull(join=True, reply=False, members=(state(B),))
    assert [(d.dst, d.msg, d.dropped) for d in mesh.log] == [(A, join, False), (C, join, True)]
    assert b.joining
    mesh.run_until(0.01)
    assert mesh.log[2].msg == PushPull(join=True, reply=True, members=(state(A),))
    assert (mesh.log[2].src, mesh.log[2].dst) == (A, B)
    assert mesh.kinds(A) == [("JOINED", B)]
    assert mesh.kinds(B) == [("JOINED", A)]
    assert not b.joining
    assert [m.address for m in a.members()] == sorted([A, B], key=node_id_for)
    assert sorted(m.node_id for m in b.members()) == [m.node_id for m in b.members()]


def test_unreachable_seeds_are_reported_and_retried_until_one_answers() -> None:
    mesh = MemoryMesh(config=CFG, seed=1)
    b = mesh.add(B, seeds=[A])
    mesh.run_until(CFG.join_retry_interval)
    kinds = [(e.kind, e.seeds) for _, addr, e in mesh.events if addr == B]
    assert kinds == [(EventKind.SEED_UNREACHABLE, (A,))]
    joins = of_type(mesh.sent(B), PushPull)
    assert [(d.at, d.dst, d.dropped) for d in joins] == [
        (0.0, A, True),
        (CFG.join_retry_interval, A, True),
    ]
    mesh.add(A)  # the seed comes up
    mesh.run_until(2 * CFG.join_retry_interval + 0.01)
    assert not b.joining
    retry = of_type(mesh.sent(B), PushPull)[2]
    assert (retry.at, retry.dst, retry.dropped) == (2 * CFG.join_retry_interval, A, False)
    assert ("JOINED", A) in mesh.kinds(B)
    mesh.run_until(4.0)
    assert mesh.converged()
    assert [k for k, _ in mesh.kinds(B)].count("SEED_UNREACHABLE") == 2


def test_a_join_through_us_does_not_end_our_own_join() -> None:
    # B's join to A is lost; C joins through B. B must still retry A, or B and C would
    # form a mesh of their own.
    mesh = MemoryMesh(config=CFG, seed=1)
    mesh.add(A)
    mesh.drop(lambda s, d, m: isinstance(m, PushPull) and (s, d) == (B, A))
    b = mesh.add(B, seeds=[A])
    mesh.clear_drops()
    mesh.add(C, seeds=[B])
    mesh.run_until(0.01)
    answer = [d.msg for d in of_type(mesh.sent(B), PushPull) if d.dst == C]
    assert answer == [PushPull(join=True, reply=True, members=(state(B),))]
    assert b.joining
    assert not mesh.nodes[C].joining
    mesh.run_until(2.0)
    assert not b.joining
    assert mesh.converged()


def test_a_mesh_of_eight_converges_through_one_seed_with_exact_joined_events() -> None:
    addresses = [f"n{i}:7000" for i in range(8)]
    mesh = mesh_of(*addresses, settle=2.0)
    for a in addresses:
        joined = sorted(addr for kind, addr in mesh.kinds(a) if kind == "JOINED")
        assert joined == sorted(set(addresses) - {a})
        assert [k for k, _ in mesh.kinds(a)] == ["JOINED"] * 7
    views = {
        tuple((m.node_id, m.status, m.incarnation) for m in mesh.nodes[a].members())
        for a in addresses
    }
    assert len(views) == 1


# ----------------------------------------------------------------- probes


def test_probe_is_a_ping_answered_by_an_ack_and_lowers_nothing() -> None:
    mesh = mesh_of(A, B)
    ping = first_ping(mesh, A, B, since=0.0)
    assert ping.msg == Ping(seq=1, target=node_id_for(B))  # our first probe
    mesh.run_until(ping.at + CFG.probe_interval)
    acks = [d for d in of_type(mesh.sent(B, since=ping.at), Ack) if d.dst == A]
    assert acks[0].msg == Ack(seq=1)
    assert acks[0].at == ping.at + mesh.latency
    assert not [k for k, _ in mesh.kinds(A) if k != "JOINED"]
    assert mesh.nodes[A].health == 0


def test_probe_timer_runs_round_robin_over_every_member() -> None:
    addresses = [A, B, C, D]
    mesh = mesh_of(*addresses)
    start = mesh.now
    mesh.run_for(3 * CFG.probe_interval)
    targets = [d.dst for d in of_type(mesh.sent(A, since=start), Ping)]
    assert sorted(targets) == sorted([B, C, D])  # one full round, each member once


def test_missed_direct_ack_triggers_ping_req_through_k_peers_which_relay_the_ack() -> None:
    mesh = mesh_of(A, B, C, D)
    # The A<->B link is broken; everything else works.
    mesh.drop(lambda s, d, m: {s, d} == {A, B})
    t = mesh.now
    ping = first_ping(mesh, A, B, since=t)
    mesh.run_until(ping.at + CFG.probe_interval - 1e-6)
    seq = ping.msg.seq  # type: ignore[attr-defined]
    reqs = [d for d in of_type(mesh.sent(A, since=ping.at), PingReq)]
    assert sorted(d.dst for d in reqs) == [C, D]  # k = 3 but only two helpers exist
    for d in reqs:
        assert d.at == ping.at + CFG.probe_timeout
        assert d.msg == PingReq(seq=seq, target=node_id_for(B), address=B, nack=True)
    relayed = [d for d in of_type(mesh.sent(since=ping.at), Ack) if d.dst == A and d.src in (C, D)]
    assert [d.msg for d in relayed] == [Ack(seq=seq), Ack(seq=seq)]
    mesh.run_for(1.0)
    assert ("SUSPECTED", B) not in mesh.kinds(A)
    assert mesh.view(A)[B] is ALIVE


def test_unanswered_probe_gets_nacks_then_suspicion_and_death_after_the_timeout() -> None:
    mesh = mesh_of(A, B, C, D)
    mesh.hints = False  # pure SWIM: no transport hints
    mesh.crash(B)
    t = mesh.now
    ping = first_ping(mesh, A, B, since=t)
    seq = ping.msg.seq  # type: ignore[attr-defined]
    end = ping.at + CFG.probe_interval
    mesh.run_until(end)
    nacks = [d for d in of_type(mesh.sent(since=ping.at), Nack) if d.dst == A]
    assert sorted(d.src for d in nacks) == [C, D]
    assert all(d.msg == Nack(seq=seq) for d in nacks)
    # A helper waits min(probe_timeout, 0.8 * (interval - timeout)) = 0.1 s for the target.
    assert relay_timeout(CFG) == 0.1
    assert all(d.at == ping.at + CFG.probe_timeout + mesh.latency + 0.1 for d in nacks)
    # Both helpers answered: the failure is not ours, so our health is unchanged (Lifeguard).
    assert mesh.nodes[A].health == 0
    # A suspects B (maybe C or D told it first: then A's own failure is a confirmation,
    # re-gossiped with A as the sender all the same).
    assert ("SUSPECTED", B) in mesh.kinds(A, since=t)
    suspects = [d.msg for d in of_type(mesh.sent(A, since=end), Suspect)]
    assert suspects[0] == Suspect(incarnation=0, node=node_id_for(B), sender=node_id_for(A))
    # Everyone suspects B (their own probes fail too) and B is declared dead no later
    # than the maximum suspicion timeout after the first suspicion.
    first = min(at for at, _, e in mesh.events if e.kind is EventKind.SUSPECTED)
    mesh.run_until(first + 3.0 + 1.0)
    for a in (A, C, D):
        assert mesh.view(a)[B] is DEAD
        assert [k for k, addr in mesh.kinds(a, since=t) if addr == B] == ["SUSPECTED", "DEAD"]


def test_suspicion_timeout_is_the_lifeguard_formula() -> None:
    # N = 4 live members, suspicion_mult 4: min = 4 * 1 * 0.25 = 1.0 s, max = 3.0 s, k = 2.
    swim = Swim(
        node_id=node_id_for(A), address=A, meta=meta(A), config=CFG, rng=random.Random(1), now=0.0
    )
    for addr in (B, C, D):
        swim.on_message(
            addr,
            node_id_for(addr),
            Alive(incarnation=0, node=node_id_for(addr), address=addr, meta=meta(addr)),
            now=0.0,
        )
    swim.on_message(
        C,
        node_id_for(C),
        Suspect(incarnation=0, node=node_id_for(B), sender=node_id_for(C)),
        now=10.0,
    )
    assert swim.member(node_id_for(B)).status is SUSPECT  # type: ignore[union-attr]
    assert min(d for d in [swim._table.next_deadline()] if d is not None) == 13.0
    # An independent confirmation: 3 - log(2)/log(3) * 2 = 1.738 s
    swim.on_message(
        D,
        node_id_for(D),
        Suspect(incarnation=0, node=node_id_for(B), sender=node_id_for(D)),
        now=10.5,
    )
    assert swim._table.next_deadline() == pytest.approx(11.738)
    swim.on_message(
        D,
        node_id_for(D),
        Suspect(incarnation=0, node=node_id_for(B), sender=node_id_for(C)),
        now=10.6,
    )
    assert swim._table.next_deadline() == pytest.approx(11.738)  # C was the first suspector
    swim.on_message(
        D,
        node_id_for(D),
        Suspect(incarnation=0, node=node_id_for(B), sender=node_id_for(A)),
        now=10.7,
    )
    assert swim._table.next_deadline() == pytest.approx(11.0)  # k = 2 reached: the minimum
    swim.handle_timer(now=10.999)
    assert swim.member(node_id_for(B)).status is SUSPECT  # type: ignore[union-attr]
    swim.handle_timer(now=11.0)
    assert swim.member(node_id_for(B)).status is DEAD  # type: ignore[union-attr]
    kinds = []
    while (e := swim.next_event()) is not None:
        kinds.append(e.kind)
    assert kinds[-2:] == [EventKind.SUSPECTED, EventKind.DEAD]


# ------------------------------------------------------------- refutation


def test_a_suspected_member_refutes_by_bumping_its_incarnation() -> None:
    mesh = mesh_of(A, B, C)
    t = mesh.now
    b = mesh.nodes[B]
    mesh.inject(C, B, Suspect(incarnation=0, node=node_id_for(B), sender=node_id_for(C)))
    assert b.incarnation == 1
    assert b.health == 1  # Lifeguard: being suspected hints that we are the slow one
    assert mesh.kinds(B, since=t) == [("REFUTED", B)]
    assert b._table.broadcasts.pending()[0] == Alive(
        incarnation=1, node=node_id_for(B), address=B, meta=meta(B)
    )
    mesh.inject(C, A, Suspect(incarnation=0, node=node_id_for(B), sender=node_id_for(C)))
    assert mesh.view(A)[B] is SUSPECT
    mesh.run_for(1.0)  # B's Alive(1) spreads; A's suspicion is cancelled
    assert mesh.kinds(A, since=t) == [("SUSPECTED", B), ("REFUTED", B)]
    assert mesh.nodes[A].member(node_id_for(B)).incarnation == 1  # type: ignore[union-attr]
    mesh.run_for(5.0)
    assert all(mesh.view(a)[B] is ALIVE for a in (A, B, C))


def test_old_incarnation_suspicion_is_ignored_and_dead_about_us_is_refuted() -> None:
    mesh = mesh_of(A, B)
    b = mesh.nodes[B]
    mesh.inject(A, B, Dead(incarnation=0, node=node_id_for(B), sender=node_id_for(A)))
    assert b.incarnation == 1
    mesh.inject(A, B, Suspect(incarnation=0, node=node_id_for(B), sender=node_id_for(A)))
    assert b.incarnation == 1  # stale accusation: nothing to refute
    mesh.inject(A, B, Dead(incarnation=5, node=node_id_for(B), sender=node_id_for(A)))
    assert b.incarnation == 6


def test_probing_a_suspect_sends_it_the_suspicion_first_so_it_can_refute() -> None:
    swim = Swim(
        node_id=node_id_for(A), address=A, meta=meta(A), config=CFG, rng=random.Random(3), now=0.0
    )
    swim.on_message(
        B,
        node_id_for(B),
        Alive(incarnation=0, node=node_id_for(B), address=B, meta=meta(B)),
        now=0.0,
    )
    swim.on_message(
        C,
        node_id_for(C),
        Suspect(incarnation=0, node=node_id_for(B), sender=node_id_for(C)),
        now=0.0,
    )
    swim.messages_to_send()
    ping: list[tuple[str, Message]] = []
    while not ping:
        deadline = swim.next_deadline()
        assert deadline is not None
        swim.handle_timer(now=deadline)
        out = swim.messages_to_send()
        ping = out if out and isinstance(out[0][1], Ping) else []
    assert ping[:2] == [
        (B, Ping(seq=1, target=node_id_for(B))),
        (B, Suspect(incarnation=0, node=node_id_for(B), sender=node_id_for(A))),
    ]
    assert len(ping) <= CFG.max_piggyback + 1


def test_unreachable_hint_probes_that_member_next_and_skips_the_direct_wait() -> None:
    mesh = mesh_of(A, B, C, D)
    a = mesh.nodes[A]
    mesh.crash(D)
    t = mesh.now
    a.on_unreachable(D, now=t)
    mesh.run_for(CFG.probe_interval)
    pings = of_type(mesh.sent(A, since=t), Ping)
    assert pings[0].dst == D
    # The dial to D fails at once (hint): A asks helpers without waiting probe_timeout.
    reqs = of_type(mesh.sent(A, since=t), PingReq)
    assert reqs and all(d.at == pings[0].at for d in reqs)
    a.on_unreachable("nobody:1", now=mesh.now)  # unknown address: ignored
    assert a.messages_to_send() == []


# ------------------------------------------------------------------ leave


def test_graceful_leave_is_a_dead_from_the_member_itself_and_means_left() -> None:
    mesh = mesh_of(A, B, C)
    t = mesh.now
    c = mesh.nodes[C]
    c.leave(now=t)
    assert c.left
    sent = mesh.nodes[C].messages_to_send()
    assert sent and all(
        m == Dead(incarnation=0, node=node_id_for(C), sender=node_id_for(C)) for _, m in sent[:1]
    )
    for dst, m in sent:
        mesh._route(c, C, dst, m)
    mesh._collect(C)
    assert mesh.kinds(C, since=t) == [("LEFT", C)]
    mesh.run_for(1.0)
    for a in (A, B):
        assert mesh.view(a)[C] is LEFT
        assert mesh.kinds(a, since=t) == [("LEFT", C)]
    # A left member is not probed, and is not suspected although it stopped probing.
    mesh.run_for(2.0)
    assert not [d for d in of_type(mesh.sent(A, since=t + 1.0), Ping) if d.dst == C]
    assert not of_type(mesh.sent(C, since=t + 0.5), Ping)
    # It still answers a stray ping (it has not shut down yet) but refutes nothing.
    mesh.inject(A, C, Dead(incarnation=0, node=node_id_for(C), sender=node_id_for(A)))
    assert c.incarnation == 0


# ------------------------------------------------------- partition and heal


def test_partition_declares_the_other_side_dead_and_healing_restores_one_view() -> None:
    side1, side2 = [A, B, C], [D, "e:1", "f:1"]
    cfg = CFG.replace(dead_reap_after=10.0)
    mesh = mesh_of(*side1, *side2, config=cfg)
    t = mesh.now
    mesh.partition(side1, side2)
    mesh.run_for(CFG.suspicion_max_timeout_mult * 1.0 + 2 * CFG.probe_interval)
    for a in side1:
        view = mesh.view(a)
        assert all(view[x] is DEAD for x in side2)
        assert all(view[x] is ALIVE for x in side1)
    for a in side2:
        assert all(mesh.view(a)[x] is DEAD for x in side1)
    mesh.heal()
    healed = mesh.now
    # Reconnect syncs (one per push/pull period per node) find the other side; everyone
    # hears that it was declared dead, refutes, and the refutations spread.
    mesh.run_for(2 * cfg.push_pull_interval)
    assert mesh.converged()
    assert all(("JOINED", x) in mesh.kinds(A, since=healed) for x in side2)
    assert all(mesh.nodes[x].incarnation >= 1 for x in side1 + side2)
    for a in side1 + side2:
        assert not [k for k, _ in mesh.kinds(a, since=t) if k == "REAPED"]


def test_dead_members_are_reaped_after_dead_reap_after() -> None:
    mesh = mesh_of(A, B, C)
    mesh.crash(C)
    t = mesh.now
    mesh.run_for(6.0)
    dead_at = [at for at, addr, e in mesh.events if addr == A and e.kind is EventKind.DEAD]
    assert len(dead_at) == 1
    assert C not in mesh.view(A)  # reaped
    reaped_at = [at for at, addr, e in mesh.events if addr == A and e.kind is EventKind.REAPED]
    assert reaped_at == [pytest.approx(dead_at[0] + CFG.dead_reap_after, abs=CFG.probe_interval)]
    assert reaped_at[0] >= dead_at[0] + CFG.dead_reap_after
    assert mesh.kinds(A, since=t) == [("SUSPECTED", C), ("DEAD", C), ("REAPED", C)]


def test_a_restarted_member_with_the_same_id_comes_back_with_a_higher_incarnation() -> None:
    mesh = mesh_of(A, B, C)
    mesh.crash(C)
    mesh.run_for(2.5)
    assert mesh.view(A)[C] is DEAD and mesh.view(B)[C] is DEAD
    t = mesh.now
    c2 = mesh.add(C, seeds=[A])  # same id, fresh state: incarnation 0
    mesh.run_for(1.0)
    assert c2.incarnation == 1  # it heard it was dead at 0 and refuted
    for a in (A, B):
        assert mesh.view(a)[C] is ALIVE
        assert mesh.kinds(a, since=t) == [("JOINED", C)]
    assert mesh.converged()


def test_a_restarted_member_is_told_its_stale_incarnation_directly() -> None:
    mesh = mesh_of(A, B)
    b = mesh.nodes[B]
    mesh.inject(A, B, Suspect(incarnation=0, node=node_id_for(B), sender=node_id_for(A)))
    assert b.incarnation == 1
    mesh.run_for(1.0)
    # B restarts without the seed knowing: its first Alive carries incarnation 0.
    mesh.inject(B, A, Alive(incarnation=0, node=node_id_for(B), address=B, meta=meta(B)))
    told = mesh.log[-1]
    assert (told.src, told.dst) == (A, B)
    assert told.msg == Alive(incarnation=1, node=node_id_for(B), address=B, meta=meta(B))


def test_meta_update_bumps_incarnation_and_reaches_everyone() -> None:
    mesh = mesh_of(A, B, C)
    t = mesh.now
    new = NodeMeta(hostname="a", cpus=8, load=2)
    mesh.nodes[A].update_meta(new, now=t)
    assert mesh.nodes[A].incarnation == 1
    mesh.run_for(1.0)
    for a in (B, C):
        assert mesh.kinds(a, since=t) == [("UPDATED", A)]
        assert mesh.nodes[a].member(node_id_for(A)).meta == new  # type: ignore[union-attr]


def test_push_pull_repairs_news_that_gossip_lost() -> None:
    mesh = mesh_of(A, B, C)
    t = mesh.now
    # All gossip messages are lost; only probes and push/pull get through.
    mesh.drop(lambda s, d, m: isinstance(m, Alive | Suspect | Dead))
    mesh.nodes[A].update_meta(NodeMeta(hostname="a", cpus=4), now=t)
    mesh.run_for(CFG.push_pull_interval * 2.5)
    assert [k for k, _ in mesh.kinds(B, since=t)] == ["UPDATED"]
    assert [k for k, _ in mesh.kinds(C, since=t)] == ["UPDATED"]
    assert of_type(mesh.sent(since=t), PushPull)


# ------------------------------------------------------------------ bounds


def test_piggyback_per_message_is_bounded() -> None:
    cfg = CFG.replace(max_piggyback=2)
    addresses = [f"n{i}:1" for i in range(10)]
    mesh = mesh_of(*addresses, config=cfg, settle=4.0)
    by_write: dict[tuple[float, str, str], int] = {}
    for d in mesh.log:
        if isinstance(d.msg, Alive | Suspect | Dead):
            key = (d.at, d.src, d.dst)
            by_write[key] = by_write.get(key, 0) + 1
    assert (
        by_write and max(by_write.values()) <= 2 * 2
    )  # a probe/ack and a gossip round may coincide


def test_queues_and_tables_are_bounded() -> None:
    cfg = CFG.replace(max_broadcasts=4, max_members=6, max_outbox=3, max_events=5, max_relays=2)
    swim = Swim(
        node_id=node_id_for(A), address=A, meta=meta(A), config=cfg, rng=random.Random(1), now=0.0
    )
    for i in range(20):
        addr = f"x{i}:1"
        swim.on_message(
            addr,
            node_id_for(addr),
            Alive(incarnation=0, node=node_id_for(addr), address=addr, meta=meta(addr)),
            now=0.0,
        )
    assert len(swim.members()) == 6
    assert swim.pending_broadcasts == 4
    events = []
    while (e := swim.next_event()) is not None:
        events.append(e)
    assert len(events) == 5
    for i in range(5):
        swim.on_message(
            B, node_id_for(B), PingReq(seq=i, target=node_id_for(C), address=C), now=0.0
        )
    out = swim.messages_to_send()
    assert len(out) == 3
    assert swim.dropped_messages > 0
    assert len(swim._relays) == 2


def test_same_seed_same_run() -> None:
    def run(seed: int) -> list[tuple[float, str, str, Message]]:
        mesh = MemoryMesh(config=CFG, seed=seed)
        mesh.add(A)
        for a in (B, C, D):
            mesh.add(a, seeds=[A])
        mesh.run_until(2.0)
        mesh.crash(D)
        mesh.run_until(6.0)
        return [(d.at, d.src, d.dst, d.msg) for d in mesh.log]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_garbage_free_inputs_messages_we_do_not_handle_are_ignored() -> None:
    swim = Swim(
        node_id=node_id_for(A), address=A, meta=meta(A), config=CFG, rng=random.Random(1), now=0.0
    )
    swim.on_message(B, node_id_for(B), Ack(seq=99), now=0.0)  # no probe with that seq
    swim.on_message(B, node_id_for(B), Nack(seq=99), now=0.0)
    swim.on_message(B, node_id_for(B), Ping(seq=1, target=node_id_for(C)), now=0.0)  # not for us
    swim.on_message(
        B,
        node_id_for(B),
        Suspect(incarnation=0, node=node_id_for(C), sender=node_id_for(B)),
        now=0.0,
    )
    swim.on_message(
        B, node_id_for(B), Dead(incarnation=0, node=node_id_for(C), sender=node_id_for(B)), now=0.0
    )
    assert swim.messages_to_send() == []
    assert swim.next_event() is None
    assert [m.address for m in swim.members()] == [A]


def test_a_stalled_node_suspects_without_asking_helpers_it_could_not_wait_for() -> None:
    swim = Swim(
        node_id=node_id_for(A), address=A, meta=meta(A), config=CFG, rng=random.Random(2), now=0.0
    )
    for addr in (B, C):
        swim.on_message(
            addr,
            node_id_for(addr),
            Alive(incarnation=0, node=node_id_for(addr), address=addr, meta=meta(addr)),
            now=0.0,
        )
    while not any(isinstance(m, Ping) for _, m in swim.messages_to_send()):
        deadline = swim.next_deadline()
        assert deadline is not None
        swim.handle_timer(now=deadline)
    started = swim.next_deadline()
    assert started is not None  # the direct-ack timeout
    swim.handle_timer(now=started + 10.0)  # we were frozen past the whole probe period
    out = swim.messages_to_send()
    assert not [m for _, m in out if isinstance(m, PingReq)]
    assert [m for _, m in out if isinstance(m, Suspect)][:1] != []
    assert swim.health == 1


def test_a_stale_suspicion_about_us_is_answered_with_our_current_alive() -> None:
    mesh = mesh_of(A, B, C)
    b = mesh.nodes[B]
    mesh.inject(C, B, Suspect(incarnation=0, node=node_id_for(B), sender=node_id_for(C)))
    assert b.incarnation == 1
    mesh.run_for(1.0)
    # A missed the refutation and still suspects incarnation 0 (the buddy ping carries it).
    mesh.inject(A, B, Suspect(incarnation=0, node=node_id_for(B), sender=node_id_for(A)))
    told = mesh.log[-1]
    assert (told.src, told.dst) == (B, A)
    assert told.msg == Alive(incarnation=1, node=node_id_for(B), address=B, meta=meta(B))
    assert b.incarnation == 1  # nothing new to refute
    assert b._table.broadcasts.pending()[0] == told.msg  # and it is gossiped again


# ------------------------------------------------- the local preset's budget


@pytest.mark.parametrize("seed", range(6))
def test_local_preset_a_member_frozen_for_3s_is_never_declared_dead(seed: int) -> None:
    cfg = SwimConfig.local()
    addresses = [f"n{i}:7000" for i in range(8)]
    mesh = mesh_of(*addresses, seed=seed, config=cfg, settle=4.0)
    victim = addresses[3]
    mesh.run_for(0.137 * seed)  # freeze at a different probe phase each time
    t = mesh.now
    mesh.freeze(victim, 3.0)
    mesh.run_for(12.0)
    deaths = [(addr, k) for at, addr, e in mesh.events if at >= t for k, who in [(e.kind.name, e.member.address)]
              if who == victim and k in ("DEAD", "LEFT")]  # fmt: skip
    assert deaths == []
    suspected = [
        at
        for at, _, e in mesh.events
        if at >= t and e.member.address == victim and e.kind is EventKind.SUSPECTED
    ]
    assert suspected and min(suspected) < t + 3.0  # it was suspected while frozen...
    assert mesh.nodes[victim].incarnation == 1  # ...and refuted once it thawed
    assert mesh.converged()


@pytest.mark.parametrize("seed", range(4))
def test_local_preset_a_killed_member_is_dead_everywhere_within_6s(seed: int) -> None:
    cfg = SwimConfig.local()
    addresses = [f"n{i}:7000" for i in range(8)]
    mesh = mesh_of(*addresses, seed=seed, config=cfg, settle=4.0)
    victim = addresses[5]
    mesh.run_for(0.113 * seed)
    t = mesh.now
    mesh.crash(victim)  # connections drop: the transport reports it (hints)
    mesh.run_for(8.0)
    seen_dead = {
        addr: at
        for at, addr, e in mesh.events
        if at >= t and e.member.address == victim and e.kind is EventKind.DEAD
    }
    assert sorted(seen_dead) == sorted(set(addresses) - {victim})
    assert max(seen_dead.values()) - t < 6.0
