"""Holder lookups of one fetch and who-asked records, on explicit time: a lookup every
``every_s`` backing off while nobody new turns up, at once when urgent, one in flight, random
members at most once per ``fallback_every_s``; interest records expire, are bounded, and the
announcements they drive are rate-limited."""

from __future__ import annotations

import pytest

from node.blobs.interest import Interest
from node.blobs.lookups import HolderLookups

A, B, C = (bytes([i]) * 32 for i in (1, 2, 3))
X, Y, Z = b"\x10" * 32, b"\x20" * 32, b"\x30" * 32


def test_lookups_are_periodic_back_off_reset_on_news_and_one_at_a_time() -> None:
    p = HolderLookups(now=0.0, every_s=1.0, max_every_s=4.0)
    assert p.due(now=0.0)
    p.begin(now=0.0)
    assert not p.due(now=5.0) and p.next_deadline() is None  # one in flight, however late
    with pytest.raises(AssertionError):
        p.begin(now=5.0)
    p.end(found_new=True)
    assert p.next_deadline() == 1.0 and not p.due(now=0.9) and p.due(now=1.0)
    waits = []
    at = 1.0
    for _ in range(4):  # nobody new: 2, 4, 4, 4 s apart
        p.begin(now=at)
        p.end(found_new=False)
        assert p.next_deadline() is not None
        waits.append(p.next_deadline() - at)  # type: ignore[operator]
        at = p.next_deadline()  # type: ignore[assignment]
    assert waits == [2.0, 4.0, 4.0, 4.0]
    p.begin(now=at)
    p.end(found_new=True)  # someone new: every second again
    assert p.next_deadline() == at + 1.0
    assert p.counters["lookups"] == 6


def test_an_urgent_lookup_is_due_at_once_but_never_two_in_flight() -> None:
    p = HolderLookups(now=0.0, every_s=1.0, max_every_s=8.0)
    p.begin(now=0.0)
    p.end(found_new=False)
    assert not p.due(now=0.5)
    p.urgent()
    assert p.due(now=0.5) and p.next_deadline() == 0.0
    p.begin(now=0.5)
    p.urgent()  # the core asks again while the lookup runs
    assert not p.due(now=0.6)
    p.end(found_new=False)
    assert p.due(now=0.6)  # the urgency stays for the next one


def test_random_members_are_asked_at_most_once_per_interval() -> None:
    p = HolderLookups(now=0.0, fallback_every_s=10.0, fallback_members=8)
    assert p.fallback(now=0.0) == 8
    assert [p.fallback(now=t) for t in (1.0, 5.0, 9.9)] == [0, 0, 0]
    assert p.fallback(now=10.0) == 8 and p.counters["fallbacks"] == 2
    assert HolderLookups(now=0.0, fallback_members=0).fallback(now=0.0) == 0


def test_interest_expires_unless_asked_again_and_the_sweep_forgets_it() -> None:
    i = Interest(now=0.0, ttl_s=30.0, sweep_s=5.0)
    assert i.next_deadline() is None
    i.add(X, A, now=0.0)
    i.add(X, B, now=20.0)
    assert i.to_announce(X, now=25.0) == [A, B] and i.next_deadline() == 5.0
    assert i.to_announce(X, now=31.0, force=True) == [B]  # A's record ran out at 30: not told
    assert len(i) == 2  # hidden, not swept yet
    i.handle_timer(now=31.0)
    assert len(i) == 1 and i.expired == 1 and i.next_deadline() == 36.0
    i.add(X, B, now=40.0)  # B asks again: refreshed until 70
    i.handle_timer(now=55.0)
    assert len(i) == 1
    i.handle_timer(now=70.0)
    assert len(i) == 0 and i.next_deadline() is None and i.to_announce(X, now=70.0, force=True) == []


def test_announcements_are_rate_limited_forced_when_complete_and_then_forgotten() -> None:
    i = Interest(now=0.0, every_s=0.5)
    assert i.to_announce(X, now=0.0) == []  # nobody asked
    i.add(X, A, now=0.0)
    assert i.to_announce(X, now=0.0) == [A]
    assert i.to_announce(X, now=0.4) == []
    assert i.to_announce(X, now=0.4, force=True) == [A]
    assert i.to_announce(X, now=0.8) == []  # 0.5 s after the forced one
    assert i.to_announce(X, now=0.9) == [A]
    i.forget(X)
    assert len(i) == 0 and i.to_announce(X, now=5.0, force=True) == []


def test_interest_is_bounded_and_forgets_members_that_left() -> None:
    i = Interest(now=0.0, max_blobs=2, max_peers=2)
    i.add(X, A, now=0.0)
    i.add(X, B, now=0.0)
    i.add(X, C, now=0.0)  # the oldest record of X goes
    assert i.to_announce(X, now=0.0) == [B, C]
    i.add(Y, A, now=1.0)
    i.add(X, A, now=2.0)  # X asked about last: Y is the least recent
    i.add(Z, A, now=3.0)
    assert i.to_announce(Y, now=3.0, force=True) == [] and len(i) == 3
    i.keep_only({A})
    assert i.to_announce(X, now=3.0, force=True) == [A] and len(i) == 2
