"""Incarnation bounds: no claim overflows our incarnation or makes us persist what a restart
refuses (issue 10, defect 2). Swim driven with explicit ``now``; claims about others through
the in-memory mesh (every message crosses the real codec)."""

from __future__ import annotations

import random

import pytest

from discovery.config import SwimConfig
from discovery.events import EventKind
from discovery.incarnation import (
    MAX_CLAIM_JUMP,
    MAX_INCARNATION,
    bumped_incarnation,
    refutation_incarnation,
    start_incarnation,
)
from discovery.swim import Swim
from discovery.testing import MemoryMesh, node_id_for
from protocol.errors import ConfigError
from protocol.messages.gossip import (
    Alive,
    Dead,
    MemberState,
    MemberStatus,
    NodeMeta,
    PushPull,
    Suspect,
)
from protocol.schema import Message, decode_body, encode_body

CFG = SwimConfig.test()
A, B, C = "a:1", "b:1", "c:1"
ME, B_ID, C_ID = node_id_for(A), node_id_for(B), node_id_for(C)
WIRE_MAX = 2**64 - 1


def make_swim(incarnation: int = 0) -> Swim:
    return Swim(node_id=ME, address=A, meta=NodeMeta(hostname="a"), config=CFG,
                rng=random.Random(1), now=0.0, incarnation=incarnation)


def claims(inc: int) -> list[Message]:
    """Every kind of claim about us (A) at ``inc``, as B would send it."""
    return [
        Suspect(incarnation=inc, node=ME, sender=B_ID),
        Dead(incarnation=inc, node=ME, sender=B_ID),
        Alive(incarnation=inc, node=ME, address=A, meta=NodeMeta(hostname="forged")),
    ]


def events(swim: Swim) -> list[tuple[EventKind, int]]:
    out = []
    while (e := swim.next_event()) is not None:
        out.append((e.kind, e.member.incarnation))
    return out


# ------------------------------------------------------------------ formulas


@pytest.mark.parametrize(("own", "claim", "want"), [
    (0, 0, 1),
    (5, 7, 8),
    (7, 5, 8),  # callers only refute claims >= own; still never below own + 1
    (0, MAX_CLAIM_JUMP, MAX_CLAIM_JUMP + 1),
    (0, MAX_CLAIM_JUMP + 1, None),
    (10, MAX_CLAIM_JUMP + 10, MAX_CLAIM_JUMP + 11),
    (MAX_INCARNATION - 3, MAX_INCARNATION - 1, MAX_INCARNATION),
    (MAX_INCARNATION - 3, MAX_INCARNATION, None),
    (MAX_INCARNATION, MAX_INCARNATION, None),
    (0, MAX_INCARNATION, None),
    (0, WIRE_MAX, None),
    (MAX_INCARNATION - 1, WIRE_MAX, None),
])
def test_refutation_incarnation(own: int, claim: int, want: int | None) -> None:
    assert refutation_incarnation(own, claim) == want


@pytest.mark.parametrize(("last", "want"), [
    (0, 1), (41, 42), (MAX_INCARNATION - 1, MAX_INCARNATION), (MAX_INCARNATION, MAX_INCARNATION),
])
def test_start_incarnation_accepts_everything_a_member_persists(last: int, want: int) -> None:
    assert start_incarnation(last) == want
    assert bumped_incarnation(last) == want


@pytest.mark.parametrize("last", [-1, MAX_INCARNATION + 1, 2**64, WIRE_MAX])
def test_start_incarnation_refuses_what_no_member_persists(last: int) -> None:
    with pytest.raises(ConfigError, match="incarnation"):
        start_incarnation(last)


def test_swim_refuses_to_start_above_the_bound() -> None:
    make_swim(MAX_INCARNATION)
    with pytest.raises(ValueError, match="incarnation"):
        make_swim(MAX_INCARNATION + 1)


# -------------------------------------------------------------- claims about us


@pytest.mark.parametrize("kind", [0, 1, 2], ids=["suspect", "dead", "alive"])
@pytest.mark.parametrize("inc", [WIRE_MAX, 1 << 62, MAX_CLAIM_JUMP + 1])
def test_an_implausible_claim_about_us_is_refused_and_counted(kind: int, inc: int) -> None:
    swim = make_swim()
    swim.on_message(B, B_ID, claims(inc)[kind], now=1.0)
    assert swim.incarnation == 0
    assert events(swim) == [] and swim.messages_to_send() == []
    stats = swim.stats()
    assert (stats["implausible_claims_total"], stats["refutations_total"]) == (1, 0)
    me = swim.member(ME)
    assert me is not None and me.status is MemberStatus.ALIVE and me.incarnation == 0
    assert swim.health == 0  # a refused lie does not make us think we are slow


@pytest.mark.parametrize("kind", [0, 1, 2], ids=["suspect", "dead", "alive"])
def test_a_claim_within_the_jump_is_refuted_as_swim_says(kind: int) -> None:
    swim = make_swim(7)
    swim.on_message(B, B_ID, claims(7 + MAX_CLAIM_JUMP)[kind], now=1.0)
    assert swim.incarnation == 8 + MAX_CLAIM_JUMP
    assert events(swim) == [(EventKind.REFUTED, 8 + MAX_CLAIM_JUMP)]
    assert swim.stats()["refutations_total"] == 1
    assert swim.stats()["implausible_claims_total"] == 0


def test_refutations_saturate_at_the_bound_a_restart_accepts() -> None:
    swim = make_swim(MAX_INCARNATION - 10)
    swim.on_message(B, B_ID, claims(MAX_INCARNATION - 1)[0], now=1.0)
    assert swim.incarnation == MAX_INCARNATION
    for msg in claims(MAX_INCARNATION) + claims(WIRE_MAX):
        swim.on_message(B, B_ID, msg, now=2.0)
    assert swim.incarnation == MAX_INCARNATION
    assert swim.stats()["implausible_claims_total"] == 6
    swim.update_meta(NodeMeta(hostname="new"), now=3.0)  # a meta update saturates too
    assert swim.incarnation == MAX_INCARNATION
    assert start_incarnation(swim.incarnation) == MAX_INCARNATION
    for _, msg in swim.messages_to_send():
        decode_body(encode_body(msg))


def test_after_refused_claims_we_still_leave_with_a_valid_dead() -> None:
    swim = make_swim(MAX_INCARNATION)
    for msg in claims(WIRE_MAX):
        swim.on_message(B, B_ID, msg, now=1.0)
    swim.on_message(B, B_ID, Alive(incarnation=0, node=B_ID, address=B, meta=NodeMeta()), now=1.0)
    events(swim)
    swim.leave(now=2.0)
    assert events(swim) == [(EventKind.LEFT, MAX_INCARNATION)]
    sent = [msg for _, msg in swim.messages_to_send()]
    assert Dead(incarnation=MAX_INCARNATION, node=ME, sender=ME) in sent
    for msg in sent:
        decode_body(encode_body(msg))


def test_a_push_pull_entry_about_us_at_the_wire_maximum_is_refused() -> None:
    swim = make_swim()
    entry = MemberState(node=ME, address=A, incarnation=WIRE_MAX, status=MemberStatus.DEAD,
                        meta=NodeMeta())
    swim.on_message(B, B_ID, PushPull(reply=True, members=(entry,)), now=1.0)
    assert swim.incarnation == 0 and swim.stats()["implausible_claims_total"] == 1


# ------------------------------------------------------------ claims about others


def test_claims_about_others_at_the_wire_maximum_follow_swim_and_cross_the_wire() -> None:
    mesh = MemoryMesh(config=CFG, seed=1)
    a = mesh.add(A)
    mesh.add(B, seeds=[A])
    mesh.run_until(1.0)
    mesh.inject(B, A, Alive(incarnation=WIRE_MAX, node=C_ID, address=C, meta=NodeMeta()))
    mesh.inject(B, A, Suspect(incarnation=WIRE_MAX, node=C_ID, sender=B_ID))
    c = a.member(C_ID)
    assert c is not None and (c.status, c.incarnation) == (MemberStatus.SUSPECT, WIRE_MAX)
    for _ in range(200):  # gossip, push/pull and the suspicion timeout, all through the codec
        mesh.run_for(CFG.probe_interval)
        c = a.member(C_ID)
        if c is None or c.status is not MemberStatus.SUSPECT:
            break
    assert c is not None and (c.status, c.incarnation) == (MemberStatus.DEAD, WIRE_MAX)
    assert ("DEAD", C) in mesh.kinds(A)
    assert a.incarnation == 0 and a.stats()["implausible_claims_total"] == 0
    assert any(isinstance(d.msg, PushPull) and any(s.incarnation == WIRE_MAX for s in d.msg.members)
               for d in mesh.log)
