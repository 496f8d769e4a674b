"""Leased copies on virtual time: the requester's ``Replicator`` (choice by rank, confirm,
renew, refusals, silence, a member leaving, release, bounds) and the holder's ``Leases``
(grant, renew, bounds, sweep). Every output is asserted; nothing sleeps."""

from __future__ import annotations

import pytest

from node.blobs.replicas import (
    CopiesChanged,
    CopyState,
    LeaseEnded,
    Leases,
    ReplicaLimit,
    ReplicaSettings,
    Replicator,
)
from node.placement import rank
from protocol.connection import Channel
from protocol.messages.blobs import BlobLease, BlobRelease, LeaseStatus

BLOB = b"\x42" * 32
SELF = b"\x00" * 32
MEMBERS = [bytes([i]) * 32 for i in range(1, 8)]
SETTINGS = ReplicaSettings(lease_s=60.0, poll_s=1.0, max_misses=3, retry_after_s=30.0, max_blobs=2)


def _asks(r: Replicator) -> list[bytes]:
    sends = r.messages_to_send()
    assert all(s.channel is Channel.CONTROL and isinstance(s.message, BlobLease) for s in sends), sends
    for s in sends:
        assert isinstance(s.message, BlobLease) and s.message.blob_id == BLOB and s.message.lease_s == 60.0
    return [s.dest for s in sends]


def _releases(r: Replicator) -> list[bytes]:
    sends = r.messages_to_send()
    assert all(isinstance(s.message, BlobRelease) for s in sends), sends
    return [s.dest for s in sends]


def _events(r: Replicator) -> list[CopiesChanged]:
    out = []
    while (e := r.next_event()) is not None:
        out.append(e)
    return out


def _replicator(*, known: tuple[bytes, ...] = ()) -> Replicator:
    r = Replicator(node_id=SELF, settings=SETTINGS)
    r.set_members([SELF, *MEMBERS], now=0.0)
    r.replicate(BLOB, 2, now=0.0, known=known, hints=(SELF,))
    return r


def test_copies_go_to_the_first_in_rank_not_already_holding_it_and_are_confirmed() -> None:
    ranked = rank(BLOB, MEMBERS)
    r = _replicator(known=(ranked[0],))
    assert r.messages_to_send() == [] and r.next_deadline() == 0.0  # asked on the timer
    r.handle_timer(now=0.0)
    assert _asks(r) == ranked[1:3]  # the holder known already is chosen last
    assert r.next_deadline() is None  # both in flight
    r.on_reply(ranked[1], BLOB, LeaseStatus.FETCHING, lease_s=60.0, now=0.5)
    assert _events(r) == [] and r.next_deadline() == 1.5  # ask again in poll_s
    r.on_reply(ranked[2], BLOB, LeaseStatus.HELD, lease_s=60.0, now=0.5)
    assert _events(r) == [CopiesChanged(BLOB, (ranked[2],))]
    r.handle_timer(now=1.5)
    assert _asks(r) == [ranked[1]]
    r.on_reply(ranked[1], BLOB, LeaseStatus.HELD, lease_s=60.0, now=1.6)
    (event,) = _events(r)
    assert set(event.holders) == {ranked[1], ranked[2]} and set(r.confirmed(BLOB)) == set(event.holders)
    assert r.next_deadline() == pytest.approx(20.5)  # renewed every lease_s / 3
    r.handle_timer(now=20.5)
    assert _asks(r) == [ranked[2]]


def test_a_small_mesh_still_gets_its_copies_from_members_that_hold_it() -> None:
    r = Replicator(node_id=SELF, settings=SETTINGS)
    r.set_members([SELF, MEMBERS[0], MEMBERS[1]], now=0.0)
    r.replicate(BLOB, 2, now=0.0, known=(MEMBERS[0],))
    r.handle_timer(now=0.0)
    assert _asks(r) == [MEMBERS[1], MEMBERS[0]]


def test_refusal_and_silence_move_the_copy_to_the_next_in_rank() -> None:
    ranked = rank(BLOB, MEMBERS)
    r = _replicator()
    r.handle_timer(now=0.0)
    assert _asks(r) == ranked[:2]
    r.on_reply(ranked[0], BLOB, LeaseStatus.REFUSED, lease_s=0.0, now=0.1)
    assert r.copies(BLOB) == {ranked[1]: CopyState.ASKING, ranked[2]: CopyState.ASKING}
    r.handle_timer(now=0.1)
    assert _asks(r) == [ranked[2]]
    for t in (1.0, 2.0):  # two misses: asked again each poll
        r.on_no_reply(ranked[1], BLOB, now=t)
        r.handle_timer(now=t + 1.0)
        assert _asks(r) == [ranked[1]]
    r.on_no_reply(ranked[1], BLOB, now=3.0)  # the third: replaced
    assert set(r.copies(BLOB)) == {ranked[2], ranked[3]}
    assert r.messages_to_send() == [] and _events(r) == []


def test_a_member_that_leaves_is_replaced_and_an_unrenewed_lease_is_no_longer_confirmed() -> None:
    ranked = rank(BLOB, MEMBERS)
    r = _replicator()
    r.handle_timer(now=0.0)
    _asks(r)
    for node in ranked[:2]:
        r.on_reply(node, BLOB, LeaseStatus.HELD, lease_s=30.0, now=0.0)  # shorter than asked
    _events(r)
    assert r.next_deadline() == 10.0
    r.set_members([m for m in MEMBERS if m != ranked[0]], now=5.0)
    assert _events(r) == [CopiesChanged(BLOB, (ranked[1],))] and set(r.copies(BLOB)) == {ranked[1], ranked[2]}
    r.handle_timer(now=5.0)
    assert _asks(r) == [ranked[2]]
    assert r.confirmed(BLOB) == (ranked[1],)
    r.handle_timer(now=10.0)
    assert _asks(r) == [ranked[1]]  # its renewal goes unanswered...
    r.handle_timer(now=30.0)  # ...and the lease runs out
    assert _events(r) == [CopiesChanged(BLOB, ())]


def test_release_ends_every_lease_and_stray_answers_are_released() -> None:
    ranked = rank(BLOB, MEMBERS)
    r = _replicator()
    r.handle_timer(now=0.0)
    _asks(r)
    r.release(BLOB)
    assert sorted(_releases(r)) == sorted(ranked[:2])
    assert r.next_deadline() is None and r.confirmed(BLOB) == ()
    r.on_reply(ranked[0], BLOB, LeaseStatus.HELD, lease_s=60.0, now=0.2)  # the answer came late
    assert _releases(r) == [ranked[0]]
    r.on_reply(ranked[1], BLOB, LeaseStatus.REFUSED, lease_s=0.0, now=0.2)
    assert r.messages_to_send() == []


def test_fewer_copies_release_the_unconfirmed_first() -> None:
    ranked = rank(BLOB, MEMBERS)
    r = _replicator()
    r.handle_timer(now=0.0)
    _asks(r)
    r.on_reply(ranked[1], BLOB, LeaseStatus.HELD, lease_s=60.0, now=0.1)
    _events(r)
    r.replicate(BLOB, 1, now=0.2)
    assert _releases(r) == [ranked[0]] and r.confirmed(BLOB) == (ranked[1],)


def test_bounds() -> None:
    r = _replicator()
    with pytest.raises(ReplicaLimit):
        r.replicate(BLOB, SETTINGS.max_copies + 1, now=0.0)
    r.replicate(b"\x01" * 32, 1, now=0.0)
    with pytest.raises(ReplicaLimit):  # max_blobs = 2
        r.replicate(b"\x02" * 32, 1, now=0.0)
    r.replicate(BLOB, 0, now=0.0)  # 0: release
    r.replicate(b"\x02" * 32, 1, now=0.0)


def test_leases_grant_renew_release_expire_and_are_bounded() -> None:
    a, b, c = MEMBERS[:3]
    leases = Leases(max_total=3, max_per_requester=2)
    assert leases.grant(a, BLOB, 60.0, now=0.0) and leases.grant(b, BLOB, 10.0, now=0.0)
    assert leases.grant(a, b"\x01" * 32, 5.0, now=0.0)
    assert not leases.grant(a, b"\x02" * 32, 5.0, now=0.0)  # a has 2 already
    assert not leases.grant(c, b"\x02" * 32, 5.0, now=0.0)  # 3 in all
    assert leases.grant(a, b"\x01" * 32, 20.0, now=1.0)  # a renewal always passes
    assert len(leases) == 3 and leases.next_deadline() == 10.0
    leases.handle_timer(now=10.0)
    assert leases.next_event() is None and leases.leased(BLOB)  # a's lease still holds it
    leases.release(a, BLOB)
    assert leases.next_event() == LeaseEnded(BLOB) and not leases.leased(BLOB)
    assert leases.next_deadline() == 21.0  # the renewed lease, not the stale entry at 5.0
    leases.handle_timer(now=21.0)
    assert leases.next_event() == LeaseEnded(b"\x01" * 32)
    assert len(leases) == 0 and leases.next_deadline() is None and leases.next_event() is None
    assert leases.grant(c, b"\x02" * 32, 5.0, now=22.0)
